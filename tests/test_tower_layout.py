"""Token layout, canvas size, layer calls and hooks of the towers (beyond the support matrix)."""

from __future__ import annotations

import copy

import pytest
import torch
import transformers as T

from m2ist import get_side_tuned_model
from m2ist.towers import infer_grid
from tests.conftest import make_batch
from tests.tiny import VOCAB, text_tower, tiny_config, vision_tower
from tests.tower_matrix import VISION_FAMILIES


def test_infer_grid_refuses_a_non_square_grid_for_a_square_image():
    assert infer_grid(16, 1.0) == (4, 4)
    with pytest.raises(ValueError, match="square grid"):
        infer_grid(20, 1.0)  # 4 x 5 is no grid of a square image
    assert infer_grid(20, 0.8) == (4, 5)
    assert infer_grid(20, 1.0, square_only=False) == (4, 5)


@pytest.mark.parametrize("name", ["vit", "deit", "clip_vision", "siglip_vision", "dinov2", "dinov3_vit", "swin",
                                  "beit"])
def test_towers_run_on_a_canvas_other_than_their_image_size(name):
    """A 32-px tower on a 48-px canvas: position encodings are interpolated, the grid is 6 x 6."""
    family = next(f for f in VISION_FAMILIES if f.name == name)
    model = get_side_tuned_model(family.build(), text_tower("bert"), tiny_config(image_size=48))
    assert model.config.num_vision_tokens == family.prefix + 36
    assert model.tap_report()[0].grid == (6, 6)
    model(**make_batch(image_size=48)).loss.backward()


def test_tower_that_cannot_change_canvas_size_is_refused_in_one_line():
    """AIMv2's learned position embedding has no interpolation: another canvas is refused, with the way out."""
    family = next(f for f in VISION_FAMILIES if f.name == "aimv2_vision")
    with pytest.raises(ValueError) as error:
        get_side_tuned_model(family.build(), text_tower("bert"), tiny_config(image_size=48))
    message = str(error.value)
    assert "\n" not in message and "aimv2_vision_model" in message and "image_size=32" in message
    get_side_tuned_model(family.build(), text_tower("bert"), tiny_config(image_size=32))


def test_hiera_at_another_canvas_is_refused_not_misordered():
    family = next(f for f in VISION_FAMILIES if f.name == "hiera")
    with pytest.raises(ValueError, match=r"^Cannot side-tune the vision tower HieraModel .*image_size=32") as error:
        get_side_tuned_model(family.build(), text_tower("bert"), tiny_config(image_size=64))
    assert "\n" not in str(error.value)


def test_albert_shared_layer_is_one_layer_per_call():
    """ALBERT runs one shared layer twice: explicit taps and structure both see two layers, each its own call."""
    text = T.AlbertModel(T.AlbertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                        intermediate_size=64, embedding_size=16, vocab_size=VOCAB))
    taps = {"layers": "encoder.albert_layer_groups.*.albert_layers.*", "attention": "attention",
            "ffn": "ffn_output"}
    batch = make_batch()
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    with torch.no_grad():
        states = text(**inputs, output_hidden_states=True).hidden_states
    for config in (tiny_config(text_taps=taps), tiny_config()):
        model = get_side_tuned_model(vision_tower("vit"), text, config)
        assert model.text_tower.depth() == 2 and model.config.text_depth == 2
        features = model.text_tower.tap(inputs, [0, 1], ["layer", "ffn"])
        for index in (0, 1):
            torch.testing.assert_close(features.taps["layer"][index], states[index + 1])
        assert not torch.allclose(features.taps["ffn"][0], features.taps["ffn"][1])


def test_hooks_are_registered_once_and_capture_only_inside_tap(batch):
    model = get_side_tuned_model(vision_tower("vit"), text_tower("bert"), tiny_config())
    layer = model.vision_model.layers[0]

    def hooks() -> int:
        return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.vision_model.modules())

    before = hooks()
    assert len(layer._forward_pre_hooks) == 1 and before > 0
    for _ in range(3):
        model(**batch).loss.backward()
    assert hooks() == before
    with torch.no_grad():
        model.vision_model(pixel_values=batch["pixel_values"])  # outside tap: nothing is captured
    assert model.vision_tower._state is None


def test_a_deep_copy_taps_its_own_towers(batch):
    import copy

    model = get_side_tuned_model(vision_tower("vit"), text_tower("bert"), tiny_config()).eval()
    clone = copy.deepcopy(model)
    assert len(clone.vision_model.layers[0]._forward_pre_hooks) == 1
    with torch.no_grad():
        clone.vision_model.embeddings.patch_embeddings.projection.weight.mul_(2)
        clone_boxes, boxes = clone(**batch).pred_boxes, model(**batch).pred_boxes
    assert not torch.allclose(clone_boxes, boxes)  # the clone reads its own (changed) tower
    torch.testing.assert_close(model(**batch).pred_boxes, boxes)


def test_the_model_and_its_towers_pickle(batch):
    """torch.save(model) (and spawned workers) pickle the model; the user's tower pickles after wrapping too. The
    unpickled model taps its own towers and gives the same boxes."""
    import io
    import pickle

    vision = vision_tower("vit")
    model = get_side_tuned_model(vision, text_tower("bert"), tiny_config()).eval()
    pickle.dumps(vision)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    again = torch.load(buffer, weights_only=False)
    with torch.no_grad():
        torch.testing.assert_close(again(**batch).pred_boxes, model(**batch).pred_boxes, rtol=0, atol=0)
        again.vision_model.embeddings.patch_embeddings.projection.weight.mul_(2)
        assert not torch.allclose(again(**batch).pred_boxes, model(**batch).pred_boxes)  # its own tower


def test_a_tower_put_back_in_train_mode_is_tapped_without_dropout(batch):
    """A user who reuses a tower elsewhere may call tower.train(): the model's taps stay deterministic (the tower
    runs in eval mode while tapped) and the tower's mode is given back."""
    vision, text = vision_tower("vit"), text_tower("bert")
    model = get_side_tuned_model(vision, text, tiny_config()).eval()
    with torch.no_grad():
        reference = model(**batch).pred_boxes
        vision.train(), text.train()
        first, second = model(**batch).pred_boxes, model(**batch).pred_boxes
    torch.testing.assert_close(first, reference, rtol=0, atol=0)
    torch.testing.assert_close(second, reference, rtol=0, atol=0)
    assert vision.training and text.training


def test_a_tower_that_returns_tuples_is_named():
    config = T.ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                         image_size=32, patch_size=8, return_dict=False)
    with pytest.raises(ValueError, match=r"returns a tuple.*return_dict = True"):
        get_side_tuned_model(T.ViTModel(config), text_tower("bert"), tiny_config())


def test_a_peft_wrapped_tower_is_tapped_through_its_base_model(batch):
    """A tower with PEFT's LoRA around it (a user's fine-tuned backbone) builds like the bare tower, on a canvas
    other than its own (the base model interpolates its positions); fresh LoRA weights change nothing."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    bare = vision_tower("vit")
    wrapped = get_peft_model(copy.deepcopy(bare), LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    boxes = []
    for tower in (bare, wrapped):
        torch.manual_seed(1)
        model = get_side_tuned_model(tower, text_tower("bert"), tiny_config(image_size=48)).eval()
        assert model.config.num_vision_tokens == 1 + 6 * 6
        pixels = torch.nn.functional.interpolate(batch["pixel_values"], size=(48, 48))
        with torch.no_grad():
            boxes.append(model(**{**batch, "pixel_values": pixels, "pixel_mask": None}).pred_boxes)
    torch.testing.assert_close(boxes[1], boxes[0], rtol=0, atol=0)


def test_hooks_go_away_with_the_model():
    import gc

    vision = vision_tower("vit")
    model = get_side_tuned_model(vision, text_tower("bert"), tiny_config())
    assert len(vision.layers[0]._forward_pre_hooks) == 1
    del model
    gc.collect()
    assert len(vision.layers[0]._forward_pre_hooks) == 0


def test_tap_report_is_logged_once_per_tower(caplog):
    with caplog.at_level("INFO", logger="m2ist.model"):
        model = get_side_tuned_model(vision_tower("vit"), text_tower("bert"), tiny_config())
    lines = [r.getMessage() for r in caplog.records if r.name == "m2ist.model"]
    vision, text = model.tap_report()
    assert lines == [str(vision), str(text)]
    assert (vision.status, vision.source, vision.attention, vision.ffn) == ("exact", "structure", "attention", "mlp")
    assert (vision.num_prefix_tokens, vision.grid) == (1, (4, 4))
    assert (text.source, text.attention, text.ffn) == ("registry", "attention.output", "output.dense")
    assert "IEA <- attention" in str(vision) and "LEA <- output.dense" in str(text)


def test_siglip2_padding_patches_are_masked_in_the_tower(batch):
    """SigLIP2 gets the pixel mask per patch: what lies under the padding does not change the real tokens."""
    family = next(f for f in VISION_FAMILIES if f.name == "siglip2_vision")
    model = get_side_tuned_model(family.build(), text_tower("bert"), tiny_config()).eval()
    noisy = batch["pixel_values"].clone()
    noisy[-1][:, batch["pixel_mask"][-1] == 0] = 5.0
    inputs = {"pixel_values": batch["pixel_values"], "pixel_mask": batch["pixel_mask"]}
    clean = model.vision_tower.tap(inputs, [0, 1], ["attention", "ffn"])
    dirty = model.vision_tower.tap({**inputs, "pixel_values": noisy}, [0, 1], ["attention", "ffn"])
    valid = clean.mask
    torch.testing.assert_close(dirty.tokens[valid], clean.tokens[valid])
    assert not valid[-1].all()


def test_a_tower_with_unknowable_token_layout_is_refused_in_one_line():
    """Tokens that form no grid with the tower's leading tokens: refused, naming the family and the override."""
    vision = vision_tower("vit")
    with pytest.raises(ValueError) as error:
        get_side_tuned_model(vision, text_tower("bert"), tiny_config(vision_taps={"num_prefix_tokens": 3}))
    message = str(error.value)
    assert "\n" not in message and "model_type='vit'" in message and "num_prefix_tokens" in message
