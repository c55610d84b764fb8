"""Hostile or careless use of the model layer (round 3): inputs passed to ``forward`` by hand, labels, a canvas
the vision tower does not cover, ``state_dict`` round trips with several adapters, unfrozen towers.
Repro scripts: /work/exp/hunt3/model/."""

from __future__ import annotations

import pytest
import torch

from m2ist import SideTunedModel, get_side_tuned_model
from tests.conftest import make_batch
from tests.tiny import IMAGE_SIZE, text_tower, tiny_config, vision_tower

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model() -> SideTunedModel:
    torch.manual_seed(0)
    built = get_side_tuned_model(vision_tower("vit"), text_tower("bert"), tiny_config())
    return built.eval()


def _inputs(**changes) -> dict[str, torch.Tensor]:
    batch = make_batch()
    batch.pop("labels")
    batch.update(changes)
    return {key: value for key, value in batch.items() if value is not None or key in changes}


_PIXELS = make_batch()["pixel_values"]
_IDS = make_batch()["input_ids"]


@pytest.mark.parametrize(("changes", "message"), [
    # silently accepted before: a canvas cropped by the ViT's patches, raw bytes, masks that change the boxes
    ({"pixel_values": torch.randn(2, 3, IMAGE_SIZE + 4, IMAGE_SIZE + 4), "pixel_mask": None},
     r"pixel_values must be \(batch, channels, 32, 32\).*got \(2, 3, 36, 36\)"),
    ({"pixel_values": (_PIXELS * 50 + 128).clamp(0, 255).to(torch.uint8)}, r"pixel_values are uint8"),
    ({"attention_mask": torch.tensor([[0] * 4 + [1] * 4] * 2)}, r"attention_mask\[0\] holds padding before a token"),
    ({"attention_mask": torch.tensor([[1] * 8, [0] * 8])}, r"attention_mask\[1\] holds only zeros"),
    ({"attention_mask": torch.full((2, 8), 2)}, r"attention_mask\[0\] holds values other than 0 and 1"),
    ({"pixel_mask": torch.ones(2, 16, 16, dtype=torch.long)}, r"pixel_mask must have the shape \(2, 32, 32\)"),
    ({"pixel_mask": torch.zeros(2, IMAGE_SIZE, IMAGE_SIZE, dtype=torch.long)}, r"pixel_mask\[0\] holds only zeros"),
    # cryptic before: a deep RuntimeError, AttributeError or unpacking error
    ({"pixel_values": _PIXELS.permute(0, 2, 3, 1)}, r"channels last\? use pixel_values.permute\(0, 3, 1, 2\)"),
    ({"pixel_values": _PIXELS[0]}, r"pixel_values must be \(batch, channels, 32, 32\)"),
    ({"input_ids": _IDS[:1], "attention_mask": None}, r"pixel_values hold 2 images but input_ids 1 expressions"),
    ({"attention_mask": torch.ones(2, 5, dtype=torch.long)}, r"attention_mask must have the shape \(2, 8\)"),
    ({"input_ids": _IDS.float()}, r"input_ids must be a \(batch, length\) tensor of integer token ids"),
    ({"input_ids": torch.randint(3, 50, (2, 600)), "attention_mask": None}, r"The text has 600 tokens"),
    ({"input_ids": None}, r"input_ids must be a tensor, got NoneType"),
    ({"input_ids": _IDS[:, :0], "attention_mask": None}, r"input_ids hold no token"),
    # NaN boxes for every sample of the batch before
    ({"pixel_values": torch.where(torch.arange(2).view(2, 1, 1, 1) == 1, float("nan"), _PIXELS)},
     r"pixel_values\[1\] hold NaN or infinite values"),
    ({"pixel_values": torch.where(torch.arange(2).view(2, 1, 1, 1) == 0, float("inf"), _PIXELS)},
     r"pixel_values\[0\] hold NaN or infinite values"),
])
def test_forward_refuses_inputs_the_towers_would_misread(model, changes, message):
    with pytest.raises((ValueError, TypeError), match=message):
        model(**_inputs(**changes))


def test_inputs_the_processor_gives_still_pass(model):
    """Bool or float masks, a half-precision image, a batch of one: unchanged."""
    batch = _inputs()
    reference = model(**batch).pred_boxes
    same = model(**_inputs(attention_mask=batch["attention_mask"].bool(), pixel_mask=batch["pixel_mask"].float(),
                           pixel_values=batch["pixel_values"].double())).pred_boxes
    torch.testing.assert_close(same, reference)
    single = model(**{key: value[:1] for key, value in batch.items()}).pred_boxes
    torch.testing.assert_close(single, reference[:1], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(("labels", "message"), [
    (torch.tensor([0.5, 0.5, 0.2, 0.2]), r"labels must be \(2, 4\).*got \(4,\)"),  # broadcast over the batch
    (torch.tensor([[0.5, 0.5, 0.2, 0.2]]), r"labels must be \(2, 4\).*got \(1, 4\)"),
    (torch.rand(2, 1, 4), r"labels must be \(2, 4\).*got \(2, 1, 4\)"),
    (torch.tensor([[3.0, 4.0, 20.0, 30.0], [0.5, 0.5, 0.2, 0.2]]), r"labels\[0\] = \[3.0, 4.0, 20.0, 30.0\] is not"),
    (torch.tensor([[0.5, 0.5, 0.2, 0.2], [0.5, 0.5, 0.0, 0.3]]), r"labels\[1\] .* w and h > 0"),
    # normalised xyxy (and xywh) boxes given as cx, cy, w, h: values in [0, 1], but the box leaves the canvas
    (torch.tensor([[0.5, 0.5, 0.2, 0.2], [0.6, 0.2, 0.9, 0.7]]), r"labels\[1\] = \[0.6, 0.2, 0.9, 0.7\] read as \(cx, cy, "
                                                               r"w, h\) reaches outside the canvas, as 1 of 2 labels do: "
                                                               r"xyxy or xywh"),
    (torch.tensor([[0.1, 0.3, 0.4, 0.2], [0.5, 0.5, 0.2, 0.2]]), r"labels\[0\] .* reaches outside the canvas"),
])
def test_labels_that_are_not_one_normalised_box_per_sample_are_refused(model, labels, message):
    for run in (lambda: model(**_inputs(), labels=labels),
                lambda: model(tower_features=model.tower_features(**_inputs()),
                              labels=labels)):
        with pytest.raises(ValueError, match=message):
            run()


def test_non_finite_labels_are_left_to_the_trainer(model):
    """NaN or infinite labels give a non-finite loss, which RECTrainer reports naming the step."""
    labels = torch.tensor([[0.5, 0.5, float("inf"), 0.2], [0.5, float("nan"), 0.2, 0.2]])
    assert not torch.isfinite(model(**_inputs(), labels=labels).loss)


def test_a_canvas_the_vision_tower_does_not_cover_is_refused():
    """A ViT with 8-pixel patches on a 36-pixel canvas never saw its last 4 pixel rows and columns, silently."""
    with pytest.raises(ValueError, match=r"never sees the last pixel row and column of the 36x36 canvas.*"
                                         r"8-pixel stride divides, e\.g\. 32 or 40"):
        get_side_tuned_model(vision_tower("vit"), text_tower("bert"), tiny_config(image_size=36))
    get_side_tuned_model(vision_tower("vit"), text_tower("bert"), tiny_config(image_size=40))  # a multiple: fine
    get_side_tuned_model(vision_tower("swin"), text_tower("bert"), tiny_config(image_size=34))  # Swin pads: fine


def test_an_adapter_trained_on_an_uncovered_canvas_still_loads(tmp_path, caplog, monkeypatch):
    """Refused when built, only warned about when an adapter saved that way is loaded."""
    monkeypatch.setattr(SideTunedModel, "_check_canvas_seen", lambda self, inputs: None)
    torch.manual_seed(0)
    get_side_tuned_model(vision_tower("vit"), text_tower("bert"), tiny_config(image_size=36)).save_pretrained(tmp_path)
    monkeypatch.undo()
    with caplog.at_level("WARNING", logger="m2ist.model"):
        SideTunedModel.from_pretrained(tmp_path, vision_tower("vit"), text_tower("bert"))
    assert "never sees the last pixel row and column" in caplog.text


def test_a_state_dict_taken_with_another_adapter_active_loads_each_adapter_into_itself():
    """torch.save(model.state_dict()) with adapter 'b' active, loaded into the same adapters with 'default' active:
    a strict load failed on 120 key names, a non-strict one swapped the two adapters' weights."""
    def two_adapters(seed: int) -> SideTunedModel:
        torch.manual_seed(seed)
        built = get_side_tuned_model(vision_tower("vit"), text_tower("bert"), tiny_config())
        built.add_adapter("b", tiny_config())
        with torch.no_grad():
            for p in (*built.side.parameters(), *built.inactive_adapters.parameters()):
                p.add_(torch.randn_like(p) * 0.1)
        return built.eval()

    source = two_adapters(0)
    batch = _inputs()
    expected = {name: out.pred_boxes for name, out in source.forward_all_adapters(**batch).items()}
    source.set_adapter("b")
    state = source.state_dict()
    for strict in (True, False):
        target = two_adapters(1)
        result = target.load_state_dict(state, strict=strict)
        assert not result.missing_keys and not result.unexpected_keys
        assert target.active_adapter == "default"
        for name, out in target.forward_all_adapters(**batch).items():
            torch.testing.assert_close(out.pred_boxes, expected[name], msg=name)


def test_training_with_an_unfrozen_tower_is_refused():
    """model.vision_model.requires_grad_(True) to fine-tune it too: it never changed (the towers run under
    no_grad), while print_trainable_parameters counted it as trained."""
    torch.manual_seed(0)
    built = get_side_tuned_model(vision_tower("vit"), text_tower("bert"), tiny_config()).train()
    built.vision_model.requires_grad_(True)
    with pytest.raises(ValueError, match=r"The vision tower has \d+ parameter tensors that require grad.*"
                                         r"requires_grad_\(False\)"):
        built(**make_batch())
    built.eval()
    built(**_inputs())  # inference is unaffected
    built.vision_model.requires_grad_(False)
    built.train()(**make_batch()).loss.backward()


def test_trainable_parameters_never_exceed_the_total():
    torch.manual_seed(0)
    built = get_side_tuned_model(vision_tower("vit"), text_tower("bert"), tiny_config())
    built.add_adapter("b", tiny_config())
    built.requires_grad_(True)
    trainable, total = built.get_nb_trainable_parameters()
    assert trainable <= total
