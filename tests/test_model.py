"""The side-tuned model on every supported tower family: frozen towers, real gradients, real interaction."""

from __future__ import annotations

import pytest
import torch

from m2ist import M2ISTConfig, SideTunedModel, get_side_tuned_model
from m2ist.evidence.baselines import build_model
from m2ist.evidence.profiling import saved_tensor_accounting
from m2ist.model import pair_layers
from tests.conftest import make_batch
from tests.tiny import TEXT_FAMILIES, VISION_FAMILIES, text_tower, tiny_config, vision_tower

FAMILY_PAIRS = [(v, "bert") for v in VISION_FAMILIES] + [("vit", t) for t in TEXT_FAMILIES if t != "bert"]


def _forward(model, batch):
    return model(**batch)


@pytest.mark.parametrize(("vision_family", "text_family"), FAMILY_PAIRS)
def test_every_family_trains_side_only(vision_family, text_family, batch):
    vision, text = vision_tower(vision_family), text_tower(text_family)
    model = get_side_tuned_model(vision, text, tiny_config())
    model.train()
    with saved_tensor_accounting({"vision": vision, "text": text}) as saved:
        out = _forward(model, batch)
    assert out.pred_boxes.shape == (2, 4)
    assert torch.all((out.pred_boxes > 0) & (out.pred_boxes < 1))
    out.loss.backward()

    assert all(p.grad is None for p in vision.parameters())
    assert all(p.grad is None for p in text.parameters())
    assert not vision.training and not text.training  # .train() must not reach the frozen towers
    assert saved.inside == {"vision": 0, "text": 0}, "autograd kept tensors inside a frozen tower"
    assert saved.count > 0
    side_grads = [p.grad for p in model.side.parameters()]
    assert side_grads and all(g is not None for g in side_grads)
    assert any(g.abs().sum() > 0 for g in side_grads)
    assert all(p.grad is not None for p in model.head.parameters())


@pytest.mark.parametrize(("vision_family", "text_family"), [("detr", "bert"), ("swin", "distilbert")])
def test_side_streams_read_the_taps(vision_family, text_family):
    """After training has moved the up-projections off zero, the text stream follows the phrase and the vision
    stream follows the image."""
    model = get_side_tuned_model(vision_tower(vision_family), text_tower(text_family), tiny_config())
    with torch.no_grad():
        for p in model.side.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    a, b = make_batch(seed=1), make_batch(seed=2)
    vision_a, text_a, _, _ = _side_outputs(model, a)
    vision_b_text, text_b, _, _ = _side_outputs(model, {**a, "input_ids": b["input_ids"]})
    assert not torch.allclose(text_a, text_b)
    torch.testing.assert_close(vision_a, vision_b_text)  # the phrase alone does not change the image stream
    vision_b, _, _, _ = _side_outputs(model, {**a, "pixel_values": b["pixel_values"]})
    assert not torch.allclose(vision_a, vision_b)


def _side_outputs(model, batch):
    vision_tokens, vision_mask, text_tokens, text_mask = model.encode(
        batch["pixel_values"], batch["pixel_mask"], batch["input_ids"], batch["attention_mask"])
    return vision_tokens, text_tokens, vision_mask, text_mask


@pytest.mark.parametrize("share", [True, False])
def test_interaction_expert_couples_modalities_through_shared_up_projection(share, batch):
    """M²IST's interaction: the IEA up-projection is shared, so learning from the text stream alone changes the
    vision stream. Without sharing (the ablation) it does not."""
    model = get_side_tuned_model(vision_tower("detr"), text_tower("bert"),
                                 tiny_config(experts=["iea"], share_iea_up_projection=share))
    vision_before, text_tokens, _, _ = _side_outputs(model, batch)
    text_tokens.pow(2).sum().backward()  # a loss on the text stream only
    with torch.no_grad():
        for p in model.side.parameters():
            if p.grad is not None:
                p.sub_(0.1 * p.grad)
    vision_after, _, _, _ = _side_outputs(model, batch)
    assert torch.allclose(vision_before, vision_after) != share


def test_frozen_towers_keep_batchnorm_and_dropout_off(batch):
    """A plain ResNet (real BatchNorm, tapped through the hidden-states fallback) keeps its running stats."""
    import transformers as T

    vision = T.ResNetModel(T.ResNetConfig(depths=[1, 1], hidden_sizes=[16, 32], embedding_size=8, layer_type="basic"))
    running_mean = [m.running_mean.clone() for m in vision.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    model = get_side_tuned_model(vision, text_tower("bert"), tiny_config())
    model.train()
    model(**batch).loss.backward()
    after = [m.running_mean for m in vision.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert running_mean and all(torch.equal(a, b) for a, b in zip(running_mean, after))
    assert model.head.training and not model.vision_model.training and not model.text_model.training


def test_backbone_dtype_bfloat16_keeps_side_and_head_float32(batch):
    model = get_side_tuned_model(vision_tower("vit"), text_tower("bert"), tiny_config(backbone_dtype="bfloat16"))
    assert next(model.vision_model.parameters()).dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for p in model.side.parameters())
    out = model(**batch)
    assert out.pred_boxes.dtype == torch.float32
    out.loss.backward()
    assert all(p.grad.dtype == torch.float32 for p in model.head.parameters())


def test_side_tuning_saves_a_small_fraction_of_full_fine_tuning_tensors():
    """Same towers, same batch: side-tuning keeps far fewer activations for backward than full fine-tuning."""
    import transformers as T

    config = tiny_config(image_size=64, max_query_len=16)

    def towers():
        torch.manual_seed(0)
        layers = dict(hidden_size=128, num_hidden_layers=4, num_attention_heads=4, intermediate_size=512)
        return (T.ViTModel(T.ViTConfig(**layers, image_size=64, patch_size=8)),
                T.BertModel(T.BertConfig(**layers, vocab_size=100)))

    batch = make_batch(batch=4, image_size=64, query_len=16)
    saved = {}
    for method in ("full", "m2ist"):
        model = build_model(*towers(), config, method=method)
        model.train()
        with saved_tensor_accounting() as stats:
            loss = model(**batch).loss
        loss.backward()
        saved[method] = stats.bytes
    ratio = saved["m2ist"] / saved["full"]
    assert ratio < 0.35, f"side-tuning saved {ratio:.2f} of full fine-tuning's tensors"


def test_default_config_reproduces_the_paper():
    config = M2ISTConfig()
    assert (config.bottleneck, config.adapter_scale, config.experts) == (128, 0.1, ["vea", "lea", "iea"])
    assert (config.intra_tap, config.inter_tap, config.layer_pairing) == ("ffn", "attention", "first")
    assert config.share_iea_up_projection
    assert (config.fusion_layers, config.fusion_dim, config.fusion_heads) == (6, 256, 8)
    assert (config.box_loss, config.box_loss_weight, config.giou_loss_weight) == ("l1", 1.0, 1.0)


def test_reference_configuration_parameter_counts():
    """DETR-R50 encoder + BERT-base with paper defaults: 2.99M ± 2% side parameters, ~2% of the model, head
    ~8.39M (random weights, full size)."""
    from m2ist.reference import build_reference_model

    counts = build_reference_model().parameter_counts()
    assert set(counts) == {"side", "head", "frozen"}
    assert abs(counts["side"] - 2.99e6) <= 0.02 * 2.99e6
    assert counts["head"] == pytest.approx(8.39e6, rel=0.01)
    share = counts["side"] / sum(counts.values())
    assert 0.015 < share < 0.025


def test_side_adapters_start_at_zero_output(batch):
    """Up-projections start at zero: the untrained side network passes the towers' features through."""
    model = get_side_tuned_model(vision_tower("vit"), text_tower("bert"), tiny_config())
    vision_tokens, text_tokens, _, _ = _side_outputs(model, batch)
    vision = model.vision_tower.tap({"pixel_values": batch["pixel_values"]}, [0], ["ffn"])
    text = model.text_tower.tap({"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}, [0],
                                ["ffn"])
    torch.testing.assert_close(vision_tokens, vision.tokens + vision.seed)
    torch.testing.assert_close(text_tokens, text.tokens + text.seed)


def test_layer_pairing_rules():
    first = M2ISTConfig()
    assert pair_layers(first, 6, 12) == [(i, i) for i in range(6)]
    spread = M2ISTConfig(layer_pairing="spread")
    assert pair_layers(spread, 6, 12) == [(i, 2 * i + 1) for i in range(6)]
    assert pair_layers(spread, 12, 6) == [(2 * i + 1, i) for i in range(6)]
    explicit = M2ISTConfig(vision_layers=[0, 5], text_layers=[3, 11])
    assert pair_layers(explicit, 6, 12) == [(0, 3), (5, 11)]
    with pytest.raises(ValueError, match="names layer 11, but the tower has 6"):
        pair_layers(M2ISTConfig(vision_layers=[11], text_layers=[0]), 6, 12)


def test_unregistered_tower_is_tapped_by_structure(batch):
    """ELECTRA outside the registry: the structural search finds its attention and FFN sub-layers (the outputs
    added to the residual stream), not the layer outputs."""
    import transformers as T

    from m2ist.taps import TEXT_TAPS

    saved = TEXT_TAPS.pop("electra")
    try:
        text = T.ElectraModel(T.ElectraConfig(embedding_size=32, hidden_size=32, num_hidden_layers=2,
                                              num_attention_heads=2, intermediate_size=64, vocab_size=100))
        model = get_side_tuned_model(vision_tower("vit"), text, tiny_config())
        spec = model.text_tower.spec
        assert (spec.source, spec.status) == ("structure", "exact")
        assert (spec.attention.module, spec.ffn.module) == ("attention.output.dense", "output.dense")
        model(**batch).loss.backward()
        assert all(p.grad is None for p in text.parameters())
    finally:
        TEXT_TAPS["electra"] = saved


def test_tower_without_repeated_block_falls_back_to_hidden_states(batch):
    """No ModuleList of blocks to hook: both experts read the layer outputs from ``output_hidden_states``."""
    from m2ist.taps import TEXT_TAPS

    class Layers(torch.nn.Module):  # iterable like a ModuleList, but not one
        def __init__(self, layers):
            super().__init__()
            for i, layer in enumerate(layers):
                self.add_module(f"l{i}", layer)

        def __iter__(self):
            return iter(self._modules.values())

        def __len__(self):
            return len(self._modules)

        def __getitem__(self, index):
            return list(self._modules.values())[index]

    text = text_tower("bert")
    text.encoder.layer = Layers(text.encoder.layer)  # same layers, no ModuleList

    spec = TEXT_TAPS.pop("bert")
    try:
        model = get_side_tuned_model(vision_tower("vit"), text, tiny_config())
        assert model.text_tower.spec.uses_hidden_states and model.text_tower.spec.status == "fallback"
        model(**batch).loss.backward()
    finally:
        TEXT_TAPS["bert"] = spec


def test_untappable_tower_names_the_supported_types():
    class Opaque(torch.nn.Module):
        def forward(self, input_ids, attention_mask=None):
            return input_ids

    with pytest.raises(ValueError, match=r"not in the tap registry \(.*bert.*\).*text_taps="):
        get_side_tuned_model(vision_tower("vit"), Opaque(), tiny_config())


def test_explicit_tap_names(batch):
    taps = {"layers": "encoder.layer.*", "attention": "attention.output", "ffn": "intermediate"}
    model = get_side_tuned_model(vision_tower("vit"), text_tower("bert"), tiny_config(text_taps=taps))
    assert model.text_tower.spec.note == "explicit taps"
    assert model.side.blocks[0].lea.norm.normalized_shape == (64,)  # the intermediate (up) projection is 64 wide
    model(**batch).loss.backward()
    with pytest.raises(ValueError, match="has no sub-module 'nope'"):
        get_side_tuned_model(vision_tower("vit"), text_tower("bert"),
                             tiny_config(text_taps={**taps, "ffn": "nope"}))


def test_config_validation_messages():
    with pytest.raises(ValueError, match=r"bottleneck=0 is invalid: expected a positive integer"):
        M2ISTConfig(bottleneck=0)
    with pytest.raises(ValueError, match="experts"):
        M2ISTConfig(experts=["vea", "router"])
    with pytest.raises(ValueError, match="give both `vision_layers` and `text_layers`"):
        M2ISTConfig(vision_layers=[0])
    with pytest.raises(ValueError, match="must be divisible"):
        M2ISTConfig(fusion_dim=250)
    with pytest.raises(ValueError, match="backbone_dtype"):
        M2ISTConfig(backbone_dtype="int8")


def test_config_json_round_trip_and_unknown_keys(tmp_path, caplog):
    config = M2ISTConfig(bottleneck=64, experts=["vea", "iea"], vision_layers=[0, 2], text_layers=[1, 3])
    config.save_pretrained(tmp_path)
    assert M2ISTConfig.from_pretrained(tmp_path) == config
    data = config.to_dict() | {"from_the_future": 1}
    with caplog.at_level("WARNING"):
        assert M2ISTConfig.from_dict(data) == config
    assert "from_the_future" in caplog.text
    (tmp_path / "m2ist_config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        M2ISTConfig.from_pretrained(tmp_path)


def test_caller_config_is_not_mutated():
    config = tiny_config()
    model = get_side_tuned_model(vision_tower("vit"), text_tower("bert"), config)
    assert config.vision_model_type is None and config.num_vision_tokens is None
    assert model.config.vision_model_type == "vit" and model.config.num_vision_tokens == 17


def test_too_long_text_is_a_clear_error(batch):
    model = get_side_tuned_model(vision_tower("vit"), text_tower("bert"), tiny_config())
    long = {**batch, "input_ids": torch.ones(2, 12, dtype=torch.long),
            "attention_mask": torch.ones(2, 12, dtype=torch.long)}
    with pytest.raises(ValueError, match="max_query_len=8"):
        model(**long)


def test_print_trainable_parameters(capsys):
    model = get_side_tuned_model(vision_tower("vit"), text_tower("bert"), tiny_config())
    model.print_trainable_parameters()
    out = capsys.readouterr().out
    counts = model.parameter_counts()
    assert f"side params: {counts['side']:,d}" in out and f"head params: {counts['head']:,d}" in out
    assert "trainable%" in out
    trainable, total = model.get_nb_trainable_parameters()
    assert trainable == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert total == sum(counts.values())
    assert isinstance(model, SideTunedModel)


@pytest.mark.parametrize("how", ["explicit", "structure"])
def test_prefix_tokens_are_read_from_the_tower(how, batch):
    """ViT's CLS token is read from its ``cls_token`` parameter (17 = 1 + 4x4), whether the taps are explicit or
    found by structure."""
    taps = {"layers": "layers.*", "attention": "attention", "ffn": "mlp"} if how == "explicit" else None
    model = get_side_tuned_model(vision_tower("vit"), text_tower("bert"), tiny_config(vision_taps=taps))
    assert model.vision_tower.num_prefix_tokens == 1
    assert model.vision_tower.spec.source == how
    mask = model.encode(batch["pixel_values"], batch["pixel_mask"], batch["input_ids"], batch["attention_mask"])[1]
    assert mask[:, 0].all()  # the CLS token is always valid
    assert not mask[-1].all()  # the padded right quarter of the last image is masked
    model(**batch).loss.backward()
