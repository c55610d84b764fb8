"""Round 11 of the fault hunt, the method itself: configs whose model silently ignores an input or never trains a
part it builds are refused when the config is made (and when a saved one is read)."""

from __future__ import annotations

import json

import pytest
import torch

from m2ist import M2ISTConfig, get_side_tuned_model
from m2ist.head import rec_loss
from tests.conftest import make_batch
from tests.tiny import text_tower, tiny_config, vision_tower


@pytest.mark.parametrize("options", [dict(reg_init="text"), dict(reg_init="text", box_readout="reg"),
                                     dict(box_readout="vote")], ids=["reg-text", "reg-text-explicit", "vote-learned"])
def test_no_fusion_layer_needs_a_text_conditioned_reg_and_the_vote_readout(options):
    """``fusion_layers=0`` with the [REG] MLP reads [REG] alone: with ``reg_init='text'`` it was accepted, and every
    image got the same box (the vision side network and ``vision_proj`` never got a gradient)."""
    with pytest.raises(ValueError, match=r"fusion_layers=0 is invalid: .*reg_init='text'.*box_readout='vote'"):
        M2ISTConfig(fusion_layers=0, **options)


def test_a_saved_image_blind_config_is_refused_at_load(tmp_path):
    """A config file written before the check (fusion_layers 0, [REG] MLP) is refused naming the file."""
    values = M2ISTConfig().to_dict()
    values.update(fusion_layers=0, reg_init="text")
    (tmp_path / "m2ist_config.json").write_text(json.dumps(values))
    with pytest.raises(ValueError, match=r"m2ist_config\.json: M2ISTConfig\.fusion_layers=0 is invalid"):
        M2ISTConfig.from_json_file(tmp_path / "m2ist_config.json")


@pytest.mark.usefixtures("one_thread")
def test_the_allowed_no_fusion_head_sees_both_the_image_and_the_expression():
    """The one combination left (text-conditioned [REG], vote readout) reads both inputs."""
    model = get_side_tuned_model(vision_tower("vit"), text_tower("bert"),
                                 tiny_config(fusion_layers=0, reg_init="text", box_readout="vote")).eval()
    batch = {k: v for k, v in make_batch(2).items() if k != "labels"}
    with torch.no_grad():
        boxes = model(**batch).pred_boxes
        other_image = model(**dict(batch, pixel_values=batch["pixel_values"].flip(-1))).pred_boxes
        other_text = model(**dict(batch, input_ids=batch["input_ids"].roll(1, dims=1))).pred_boxes
    assert not torch.allclose(boxes, other_image) and not torch.allclose(boxes, other_text)


@pytest.mark.parametrize("experts", [["vea", "lea", "iea"], ["vea"], ["lea", "iea"]])
def test_a_zero_adapter_scale_with_intra_modal_experts_is_refused(experts):
    """``adapter_scale=0`` zeroes the VEA / LEA outputs and their gradients: they were built, counted as trainable
    and never changed."""
    with pytest.raises(ValueError, match=r"adapter_scale=0(\.0)? is invalid: .*never train"):
        M2ISTConfig(adapter_scale=0.0, experts=experts)


def test_a_zero_adapter_scale_is_allowed_without_intra_modal_experts():
    """The scale multiplies VEA and LEA only: with the IEA alone it has no say, and 0 is accepted."""
    assert M2ISTConfig(adapter_scale=0.0, experts=["iea"]).adapter_scale == 0.0


def test_a_patch_holding_any_image_pixel_is_valid_and_a_box_on_the_images_top_edge_is_pointed_at():
    """The pixel mask was sampled at each patch's top-left pixel (DETR's rule): with the processor's centred
    letterbox, the partial patch row at the image's top was masked (its image pixels hidden from the head) and a box
    on that edge had no valid cell, so its point loss was silently 0."""
    model = get_side_tuned_model(vision_tower("vit"), text_tower("bert"), tiny_config(box_readout="vote")).eval()
    pixel_mask = torch.zeros(1, 32, 32, dtype=torch.long)
    pixel_mask[:, 10:22] = 1  # a 32 x 12 image centred on the canvas: patch rows 1 and 2 hold part of it
    valid = model.vision_tower.token_mask(pixel_mask, torch.zeros(1, 17, 32), (4, 4))[0, 1:].view(4, 4)
    assert valid[:, 0].tolist() == [False, True, True, False]
    pixel_mask[:, 6:26] = 1
    out = model(pixel_values=torch.randn(1, 3, 32, 32), pixel_mask=pixel_mask,
                input_ids=torch.randint(3, 100, (1, 8)), attention_mask=torch.ones(1, 8, dtype=torch.long))
    top_edge = torch.tensor([[0.5, 7.5 / 32, 0.25, 3 / 32]])  # image rows 6..9, in patch row 0
    assert rec_loss(out.pred_boxes, top_edge, model.config, out.patch_logits)["loss_point"] > 0


def test_the_towers_dtype_set_on_the_config_of_a_built_model_is_refused_at_save(tmp_path):
    """``model.config.backbone_dtype = "bfloat16"`` left the towers in float32 but was saved: the reload ran its
    towers in bfloat16, another model than the one trained and evaluated. ``set_backbone_dtype`` casts and saves."""
    model = get_side_tuned_model(vision_tower("vit"), text_tower("bert"), tiny_config())
    model.config.backbone_dtype = "bfloat16"
    with pytest.raises(ValueError, match=r"changed after the model was built \(backbone_dtype: None -> 'bfloat16'\)"):
        model.save_pretrained(tmp_path / "adapter")
    model.config.backbone_dtype = None
    model.set_backbone_dtype("bfloat16")
    assert next(model.vision_model.parameters()).dtype == torch.bfloat16
    model.save_pretrained(tmp_path / "adapter")
    assert json.loads((tmp_path / "adapter" / "m2ist_config.json").read_text())["backbone_dtype"] == "bfloat16"
