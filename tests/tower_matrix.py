"""The tower support matrix: tiny random towers of every family tried, their expected token layout, and the
support table of the docs (``python -m tests.tower_matrix`` rewrites ``docs/reference/support.md``).

Each vision family pairs with a tiny BERT, each text family with a tiny ViT (``tests/test_tower_matrix.py``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import transformers as T

from tests.tiny import IMAGE_SIZE, VOCAB

H, L, A, F = 32, 2, 2, 64  # hidden, layers, heads, feed-forward
_LAYERS = dict(hidden_size=H, num_hidden_layers=L, num_attention_heads=A, intermediate_size=F)
_DECODER = dict(**_LAYERS, vocab_size=VOCAB, num_key_value_heads=A, max_position_embeddings=64)
SUPPORT_PAGE = Path(__file__).resolve().parents[1] / "docs" / "reference" / "support.md"


@dataclass(frozen=True)
class Family:
    """One tower family: how to build a tiny random tower, and the truth its token layout is checked against.

    ``prefix`` / ``suffix``: tokens before / after the patch grid; ``grid``: the patch grid at ``IMAGE_SIZE``
    (None: text); ``refused``: the family is refused at build, with this text in the error.
    """

    name: str
    build: Callable[[], object]
    prefix: int = 0
    suffix: int = 0
    grid: tuple[int, int] | None = None
    refused: str | None = None
    overridable: bool = True  # a refusal offers tap overrides (False: the structure itself cannot be side-tuned)
    states: str | None = None  # output field of layer outputs to compare taps with (default: the spec's)
    states_layout: str = "b n c"
    states_offset: int = 1  # index of layer 0's output in those states (0: no embedding entry)
    last_state_normed: bool = False  # the last state carries the tower's final norm (decoders, T5, ModernBERT)
    states_are_layers: bool = True  # False: the states are stage outputs after a stage norm (PVTv2, SegFormer)
    depth: int = 2  # layer calls the taps cover (the configs have two layers or stages)


def _vit_like(config_class, model_class, **extra):
    return lambda: model_class(config_class(**_LAYERS, image_size=IMAGE_SIZE, patch_size=8, **extra))


def _detr(model_class, config_class, **extra):
    def build():
        resnet = T.ResNetConfig(depths=[1, 1], hidden_sizes=[16, 32], embedding_size=8, layer_type="basic",
                                out_features=["stage2"])
        return model_class(config_class(use_timm_backbone=False, use_pretrained_backbone=False, backbone_config=resnet,
                                        d_model=H, encoder_layers=L, decoder_layers=1, encoder_attention_heads=A,
                                        decoder_attention_heads=A, encoder_ffn_dim=F, decoder_ffn_dim=F,
                                        num_queries=4, **extra))
    return build


G4 = (4, 4)  # 32 px / patch 8
VISION_FAMILIES: list[Family] = [
    Family("vit", _vit_like(T.ViTConfig, T.ViTModel), prefix=1, grid=G4),
    Family("deit", _vit_like(T.DeiTConfig, T.DeiTModel), prefix=2, grid=G4),
    Family("beit", _vit_like(T.BeitConfig, T.BeitModel, use_mask_token=False), prefix=1, grid=G4),
    Family("data2vec-vision", _vit_like(T.Data2VecVisionConfig, T.Data2VecVisionModel), prefix=1, grid=G4),
    Family("vit_msn", _vit_like(T.ViTMSNConfig, T.ViTMSNModel), prefix=1, grid=G4),
    Family("ijepa", _vit_like(T.IJepaConfig, T.IJepaModel), prefix=0, grid=G4),
    Family("dinov2", lambda: T.Dinov2Model(T.Dinov2Config(hidden_size=H, num_hidden_layers=L, num_attention_heads=A,
                                                           mlp_ratio=2, image_size=IMAGE_SIZE, patch_size=8)),
           prefix=1, grid=G4),
    Family("dinov2_with_registers", lambda: T.Dinov2WithRegistersModel(T.Dinov2WithRegistersConfig(
        hidden_size=H, num_hidden_layers=L, num_attention_heads=A, mlp_ratio=2, image_size=IMAGE_SIZE, patch_size=8,
        num_register_tokens=3)), prefix=4, grid=G4),
    Family("dinov3_vit", lambda: T.DINOv3ViTModel(T.DINOv3ViTConfig(
        **_LAYERS, image_size=IMAGE_SIZE, patch_size=8, num_register_tokens=4)), prefix=5, grid=G4),
    Family("clip_vision", _vit_like(T.CLIPVisionConfig, T.CLIPVisionModel), prefix=1, grid=G4),
    Family("clip (dual encoder)", lambda: T.CLIPModel(T.CLIPConfig(
        vision_config=dict(**_LAYERS, image_size=IMAGE_SIZE, patch_size=8),
        text_config=dict(**_LAYERS, vocab_size=VOCAB, bos_token_id=0, eos_token_id=2), projection_dim=16)),
           prefix=1, grid=G4),
    Family("siglip (dual encoder)", lambda: T.SiglipModel(T.SiglipConfig(
        vision_config=dict(**_LAYERS, image_size=IMAGE_SIZE, patch_size=8),
        text_config=dict(**_LAYERS, vocab_size=VOCAB))), prefix=0, grid=G4),
    Family("siglip_vision", _vit_like(T.SiglipVisionConfig, T.SiglipVisionModel), prefix=0, grid=G4),
    Family("siglip2_vision", lambda: T.Siglip2VisionModel(T.Siglip2VisionConfig(**_LAYERS, patch_size=8,
                                                                                  num_patches=16)), grid=G4),
    Family("aimv2_vision", _vit_like(T.Aimv2VisionConfig, T.Aimv2VisionModel), prefix=0, grid=G4),
    Family("yolos", lambda: T.YolosModel(T.YolosConfig(
        **_LAYERS, image_size=[IMAGE_SIZE, IMAGE_SIZE], patch_size=8, num_detection_tokens=3)), prefix=1, suffix=3, grid=G4),
    Family("pixtral", lambda: T.PixtralVisionModel(T.PixtralVisionConfig(**_LAYERS, image_size=IMAGE_SIZE, patch_size=8,
                                                                          head_dim=16)),
           refused="packs the images of a batch into one sequence", overridable=False),
    Family("vit_mae", _vit_like(T.ViTMAEConfig, T.ViTMAEModel), refused="at random"),
    Family("seggpt", lambda: T.SegGptModel(T.SegGptConfig(
        hidden_size=H, num_hidden_layers=L, num_attention_heads=A, image_size=[IMAGE_SIZE, IMAGE_SIZE], patch_size=8,
        merge_index=0, intermediate_hidden_state_indices=[1])),
           refused="needs inputs m2ist does not give: prompt_pixel_values, prompt_masks", overridable=False),
    Family("swin", lambda: T.SwinModel(T.SwinConfig(embed_dim=16, depths=[1, 1], num_heads=[2, 2], image_size=IMAGE_SIZE,
                                                     patch_size=4, window_size=4)), grid=(4, 4)),
    Family("swinv2", lambda: T.Swinv2Model(T.Swinv2Config(embed_dim=16, depths=[1, 1], num_heads=[2, 2],
                                                           image_size=IMAGE_SIZE, patch_size=4, window_size=4)),
           grid=(4, 4)),
    Family("focalnet", lambda: T.FocalNetModel(T.FocalNetConfig(embed_dim=16, depths=[1, 1], image_size=IMAGE_SIZE,
                                                                 patch_size=4)), grid=(4, 4)),
    Family("hiera", lambda: T.HieraModel(T.HieraConfig(embed_dim=16, depths=[1, 1], num_heads=[1, 2],
                                                        image_size=[IMAGE_SIZE, IMAGE_SIZE], patch_size=[3, 3],
                                                        patch_stride=[4, 4], patch_padding=[1, 1],
                                                        masked_unit_size=[4, 4], query_stride=[2, 2],
                                                        num_query_pool=1)), grid=(4, 4),
           states="reshaped_hidden_states", states_layout="b h w c"),
    Family("pvt", lambda: T.PvtModel(T.PvtConfig(image_size=IMAGE_SIZE, num_encoder_blocks=2, depths=[1, 1],
                                                  sequence_reduction_ratios=[2, 1], hidden_sizes=[16, 32],
                                                  patch_sizes=[4, 2], strides=[4, 2], num_attention_heads=[1, 2],
                                                  mlp_ratios=[2, 2])), prefix=1, grid=(4, 4), states_offset=0),
    Family("pvt_v2", lambda: T.PvtV2Model(T.PvtV2Config(image_size=IMAGE_SIZE, num_encoder_blocks=2, depths=[1, 1],
                                                         sr_ratios=[2, 1], hidden_sizes=[16, 32], patch_sizes=[7, 3],
                                                         strides=[4, 2], num_attention_heads=[1, 2],
                                                         mlp_ratios=[2, 2])), grid=(4, 4), states_are_layers=False),
    Family("segformer", lambda: T.SegformerModel(T.SegformerConfig(num_encoder_blocks=2, depths=[1, 1],
                                                                    sr_ratios=[2, 1], hidden_sizes=[16, 32],
                                                                    patch_sizes=[7, 3], strides=[4, 2],
                                                                    num_attention_heads=[1, 2], mlp_ratios=[2, 2])),
           grid=(4, 4), states_are_layers=False),
    Family("convnext", lambda: T.ConvNextModel(T.ConvNextConfig(hidden_sizes=[16, 32], depths=[1, 1], num_stages=2)),
           grid=(4, 4)),
    Family("convnextv2", lambda: T.ConvNextV2Model(T.ConvNextV2Config(hidden_sizes=[16, 32], depths=[1, 1],
                                                                       num_stages=2)), grid=(4, 4)),
    Family("resnet", lambda: T.ResNetModel(T.ResNetConfig(depths=[1, 1], hidden_sizes=[16, 32], embedding_size=8,
                                                          layer_type="basic")), grid=(4, 4)),
    Family("regnet", lambda: T.RegNetModel(T.RegNetConfig(depths=[1, 1], hidden_sizes=[16, 32], embedding_size=8,
                                                          groups_width=8)), grid=(4, 4)),
    Family("efficientnet", lambda: T.EfficientNetModel(T.EfficientNetConfig(
        image_size=IMAGE_SIZE, width_coefficient=0.25, depth_coefficient=0.25, hidden_dim=320)), grid=(1, 1), depth=7),
    Family("mobilevit", lambda: T.MobileViTModel(T.MobileViTConfig(
        image_size=IMAGE_SIZE, hidden_sizes=[16, 16, 16], neck_hidden_sizes=[8, 8, 16, 16, 16, 24, 32],
        num_attention_heads=2)), grid=(1, 1), depth=5, states_offset=0),
    Family("poolformer", lambda: T.PoolFormerModel(T.PoolFormerConfig(depths=[1, 1], hidden_sizes=[16, 32],
                                                                       num_encoder_blocks=2, patch_sizes=[7, 3],
                                                                       strides=[4, 2], padding=[2, 1],
                                                                       layer_scale_init_value=0.1)),
           grid=(4, 4), states_offset=0),
    Family("detr", _detr(T.DetrModel, T.DetrConfig), grid=(4, 4)),
    Family("conditional_detr", _detr(T.ConditionalDetrModel, T.ConditionalDetrConfig), grid=(4, 4)),
    Family("deformable_detr", _detr(T.DeformableDetrModel, T.DeformableDetrConfig, num_feature_levels=1),
           refused="multi-scale"),
    # round 15: families a REC user could pick that the matrix lacked
    Family("levit", lambda: T.LevitModel(T.LevitConfig(
        image_size=IMAGE_SIZE, hidden_sizes=[16, 32, 48], num_attention_heads=[1, 2, 2], depths=[1, 1, 1],
        key_dim=[8, 8, 8], down_ops=[["Subsample", 8, 2, 4, 2, 2], ["Subsample", 8, 4, 4, 2, 2]])),
           grid=(1, 1), depth=3),  # its residual sub-layers are separate modules: the stages are tapped
    Family("cvt", lambda: T.CvtModel(T.CvtConfig(embed_dim=[8, 16, 32], num_heads=[1, 1, 2], depth=[1, 2, 3],
                                                  mlp_ratio=[2.0, 2.0, 2.0])),
           grid=(2, 2), depth=6, states_are_layers=False),  # its last-stage CLS token is left out of the taps
    Family("bit", lambda: T.BitModel(T.BitConfig(embedding_size=8, hidden_sizes=[16, 32], depths=[1, 1], num_groups=4,
                                                  layer_type="bottleneck", global_padding="SAME")), grid=(4, 4)),
    Family("mobilenet_v2", lambda: T.MobileNetV2Model(T.MobileNetV2Config(image_size=IMAGE_SIZE, depth_multiplier=0.25)),
           grid=(1, 1), depth=16),
    Family("mobilevitv2", lambda: T.MobileViTV2Model(T.MobileViTV2Config(image_size=IMAGE_SIZE, width_multiplier=0.25)),
           refused="the canvas is too small", overridable=False),  # its last stage would unfold a 1x1 map
    Family("swiftformer", lambda: T.SwiftFormerModel(T.SwiftFormerConfig(image_size=IMAGE_SIZE, depths=[1, 1, 1, 1],
                                                                          embed_dims=[8, 16, 16, 32])),
           grid=(1, 1), depth=7),
    Family("textnet", lambda: T.TextNetModel(T.TextNetConfig()), grid=(1, 1), depth=4),
    Family("hgnet_v2 (AutoBackbone)", lambda: T.HGNetV2Backbone(T.HGNetV2Config()), refused="it is a backbone",
           overridable=False),
    Family("dinov2 (AutoBackbone)", lambda: T.Dinov2Backbone(T.Dinov2Config(
        hidden_size=H, num_hidden_layers=L, num_attention_heads=A, mlp_ratio=2, image_size=IMAGE_SIZE, patch_size=8,
        out_features=["stage2"])), refused="it is a backbone", overridable=False),
    Family("vitdet", lambda: T.VitDetModel(T.VitDetConfig(
        **_LAYERS, image_size=IMAGE_SIZE, pretrain_image_size=IMAGE_SIZE, patch_size=8, window_size=2,
        window_block_indices=[0])), grid=G4),
    Family("sam_vision", lambda: T.SamVisionModel(T.SamVisionConfig(
        hidden_size=H, num_hidden_layers=L, num_attention_heads=A, mlp_dim=F, image_size=IMAGE_SIZE, patch_size=8,
        output_channels=16, window_size=2, global_attn_indexes=[1], initializer_range=0.02)),
           grid=G4, states_layout="b h w c"),  # channels-last layers, channels-first output (its neck)
    Family("dpt", lambda: T.DPTModel(T.DPTConfig(**_LAYERS, image_size=IMAGE_SIZE, patch_size=8,
                                                  backbone_out_indices=[0, 1], neck_hidden_sizes=[16, 16],
                                                  reassemble_factors=[1, 1], fusion_hidden_size=16)),
           prefix=1, grid=G4),
    Family("glpn", lambda: T.GLPNModel(T.GLPNConfig(num_encoder_blocks=2, depths=[1, 1], sr_ratios=[2, 1],
                                                     hidden_sizes=[16, 32], patch_sizes=[7, 3], strides=[4, 2],
                                                     num_attention_heads=[1, 2], mlp_ratios=[2, 2])),
           grid=(4, 4), states_are_layers=False),
    Family("mlcd_vision", _vit_like(T.MLCDVisionConfig, T.MLCDVisionModel), prefix=1, grid=G4),
    Family("siglip2 (dual encoder)", lambda: T.Siglip2Model(T.Siglip2Config(
        vision_config=dict(**_LAYERS, patch_size=8, num_patches=16), text_config=dict(**_LAYERS, vocab_size=VOCAB))),
           grid=G4),
    Family("owlvit_vision", _vit_like(T.OwlViTVisionConfig, T.OwlViTVisionModel), prefix=1, grid=G4),
    Family("owlv2_vision", _vit_like(T.Owlv2VisionConfig, T.Owlv2VisionModel), prefix=1, grid=G4),
    Family("blip_vision", _vit_like(T.BlipVisionConfig, T.BlipVisionModel, initializer_range=0.02), prefix=1, grid=G4),
    Family("chinese_clip_vision", _vit_like(T.ChineseCLIPVisionConfig, T.ChineseCLIPVisionModel), prefix=1, grid=G4),
    Family("altclip_vision", _vit_like(T.AltCLIPVisionConfig, T.AltCLIPVisionModel), prefix=1, grid=G4),
    Family("groupvit_vision", lambda: T.GroupViTVisionModel(T.GroupViTVisionConfig(
        hidden_size=H, intermediate_size=F, depths=[1, 1], num_group_tokens=[4, 0], num_output_groups=[4, 4],
        num_attention_heads=A, image_size=IMAGE_SIZE, patch_size=8)), refused="form no patch grid", overridable=False),
    Family("x_clip_vision", _vit_like(T.XCLIPVisionConfig, T.XCLIPVisionModel),
           refused="reads a batch as groups of images", overridable=False),  # clips of num_frames (8) frames
    Family("vjepa2", lambda: T.VJEPA2Model(T.VJEPA2Config(
        hidden_size=H, num_hidden_layers=L, num_attention_heads=A, mlp_ratio=2, crop_size=IMAGE_SIZE, patch_size=8,
        frames_per_clip=2, tubelet_size=2, pred_hidden_size=16, pred_num_hidden_layers=1, pred_num_attention_heads=2)),
           refused="pixel_values_videos", overridable=False),
]


def _text(config_class, model_class, **extra):
    return lambda: model_class(config_class(**{**_LAYERS, "vocab_size": VOCAB, **extra}))


TEXT_FAMILIES: list[Family] = [
    Family("bert", _text(T.BertConfig, T.BertModel)),
    Family("roberta", _text(T.RobertaConfig, T.RobertaModel)),
    Family("xlm-roberta", _text(T.XLMRobertaConfig, T.XLMRobertaModel)),
    Family("camembert", _text(T.CamembertConfig, T.CamembertModel)),
    Family("electra", _text(T.ElectraConfig, T.ElectraModel, embedding_size=H)),
    Family("ernie", _text(T.ErnieConfig, T.ErnieModel)),
    Family("deberta", _text(T.DebertaConfig, T.DebertaModel)),
    Family("deberta-v2", _text(T.DebertaV2Config, T.DebertaV2Model)),
    Family("distilbert", lambda: T.DistilBertModel(T.DistilBertConfig(dim=H, n_layers=L, n_heads=A, hidden_dim=F,
                                                                       vocab_size=VOCAB))),
    Family("albert", _text(T.AlbertConfig, T.AlbertModel, embedding_size=16)),
    Family("mpnet", _text(T.MPNetConfig, T.MPNetModel)),
    Family("roformer", _text(T.RoFormerConfig, T.RoFormerModel, embedding_size=H)),
    Family("modernbert", _text(T.ModernBertConfig, T.ModernBertModel, global_attn_every_n_layers=2,
                               pad_token_id=0, bos_token_id=1, eos_token_id=2, cls_token_id=1, sep_token_id=2),
           last_state_normed=True),
    Family("clip_text", _text(T.CLIPTextConfig, T.CLIPTextModel, bos_token_id=0, eos_token_id=2)),
    Family("clip (dual encoder)", lambda: T.CLIPModel(T.CLIPConfig(
        vision_config=dict(**_LAYERS, image_size=IMAGE_SIZE, patch_size=8),
        text_config=dict(**_LAYERS, vocab_size=VOCAB, bos_token_id=0, eos_token_id=2), projection_dim=16))),
    Family("siglip_text", _text(T.SiglipTextConfig, T.SiglipTextModel)),
    Family("t5 (encoder)", lambda: T.T5EncoderModel(T.T5Config(d_model=H, d_kv=16, d_ff=F, num_layers=L, num_heads=A,
                                                                 vocab_size=VOCAB)), last_state_normed=True),
    Family("bart (encoder of BartModel)", lambda: T.BartModel(T.BartConfig(
        d_model=H, encoder_layers=L, decoder_layers=1, encoder_attention_heads=A, decoder_attention_heads=A,
        encoder_ffn_dim=F, decoder_ffn_dim=F, vocab_size=VOCAB, max_position_embeddings=64))),
    Family("gpt2", lambda: T.GPT2Model(T.GPT2Config(n_embd=H, n_layer=L, n_head=A, vocab_size=VOCAB, n_positions=64)),
           last_state_normed=True),
    Family("llama", _text(T.LlamaConfig, T.LlamaModel, **_DECODER), last_state_normed=True),
    Family("mistral", _text(T.MistralConfig, T.MistralModel, **_DECODER), last_state_normed=True),
    Family("qwen2", _text(T.Qwen2Config, T.Qwen2Model, **_DECODER), last_state_normed=True),
    Family("qwen3", _text(T.Qwen3Config, T.Qwen3Model, **_DECODER, head_dim=16), last_state_normed=True),
    Family("gemma", _text(T.GemmaConfig, T.GemmaModel, **_DECODER, head_dim=16), last_state_normed=True),
    Family("phi", _text(T.PhiConfig, T.PhiModel, **_DECODER), last_state_normed=True),
    Family("fnet", _text(T.FNetConfig, T.FNetModel)),  # reads its padding: fed at max_query_len
    Family("convbert", _text(T.ConvBertConfig, T.ConvBertModel, embedding_size=H)),  # its convolutions too
    Family("nystromformer", _text(T.NystromformerConfig, T.NystromformerModel, num_landmarks=4, segment_means_seq_len=8),
           refused="fails on a padded phrase", overridable=False),
    Family("mobilebert", lambda: T.MobileBertModel(T.MobileBertConfig(
        **_LAYERS, vocab_size=VOCAB, embedding_size=16, intra_bottleneck_size=16, true_hidden_size=16,
        num_feedforward_networks=4))),  # its stacked FFNs are not layers; reads its padding (trigram embedding)
    Family("gemma2", _text(T.Gemma2Config, T.Gemma2Model, **_DECODER, head_dim=16, sliding_window=4),
           last_state_normed=True),
    Family("mixtral", _text(T.MixtralConfig, T.MixtralModel, **_DECODER, num_local_experts=2, num_experts_per_tok=1),
           last_state_normed=True),
    Family("olmo2", _text(T.Olmo2Config, T.Olmo2Model, **_DECODER), last_state_normed=True),  # post-norm sub-layers
    Family("gemma3_text", _text(T.Gemma3TextConfig, T.Gemma3TextModel, **_DECODER, head_dim=16, sliding_window=4),
           last_state_normed=True),
    Family("recurrent_gemma", _text(T.RecurrentGemmaConfig, T.RecurrentGemmaModel, **_DECODER, head_dim=16,
                                    lru_width=H, block_types=["recurrent", "attention"], attention_window_size=4),
           last_state_normed=True),  # layer 0 mixes tokens by an RG-LRU recurrence, not attention (noted)
    Family("funnel", lambda: T.FunnelModel(T.FunnelConfig(vocab_size=VOCAB, block_sizes=[1, 1], d_model=H, n_head=A,
                                                          d_head=16, d_inner=F)),
           refused="changes its sequence length between layers", overridable=False),
    Family("longformer", _text(T.LongformerConfig, T.LongformerModel, attention_window=16),
           refused="pads the sequence inside its layers", overridable=False),
    Family("xlnet", lambda: T.XLNetModel(T.XLNetConfig(d_model=H, n_layer=L, n_head=A, d_inner=F, vocab_size=VOCAB)),
           refused="its layers are sequence-first", overridable=False),
    # round 15
    Family("big_bird", _text(T.BigBirdConfig, T.BigBirdModel, attention_type="block_sparse", block_size=2,
                             num_random_blocks=1)),  # short phrases: runs its full attention
    Family("canine", lambda: T.CanineModel(T.CanineConfig(**_LAYERS, downsampling_rate=2, num_hash_buckets=64,
                                                          num_hash_functions=2, local_transformer_stride=4)),
           refused="changes its sequence length between layers", overridable=False),
    Family("luke", _text(T.LukeConfig, T.LukeModel, entity_vocab_size=10, entity_emb_size=16)),
    Family("xmod", _text(T.XmodConfig, T.XmodModel, languages=["en_XX"], default_language="en_XX")),
    Family("rembert", _text(T.RemBertConfig, T.RemBertModel, input_embedding_size=16, output_embedding_size=16)),
    Family("squeezebert", _text(T.SqueezeBertConfig, T.SqueezeBertModel, embedding_size=H, q_groups=1, k_groups=1,
                                v_groups=1, post_attention_groups=1, intermediate_groups=1, output_groups=1)),
    Family("ibert", _text(T.IBertConfig, T.IBertModel)),
    Family("megatron_bert", _text(T.MegatronBertConfig, T.MegatronBertModel), last_state_normed=True),
    Family("esm", _text(T.EsmConfig, T.EsmModel, pad_token_id=0, mask_token_id=1, position_embedding_type="rotary"),
           last_state_normed=True),
    Family("bros", _text(T.BrosConfig, T.BrosModel), refused="You have to specify bbox"),
    Family("layoutlm", _text(T.LayoutLMConfig, T.LayoutLMModel)),
    Family("lilt", lambda: T.LiltModel(T.LiltConfig(**{**_LAYERS, "hidden_size": 48}, vocab_size=VOCAB,
                                                    channel_shrink_ratio=4))),
    Family("markuplm", _text(T.MarkupLMConfig, T.MarkupLMModel)),
    Family("mt5 (encoder)", lambda: T.MT5EncoderModel(T.MT5Config(d_model=H, d_kv=16, d_ff=F, num_layers=L,
                                                                   num_heads=A, vocab_size=VOCAB)),
           last_state_normed=True),
    Family("umt5 (encoder)", lambda: T.UMT5EncoderModel(T.UMT5Config(d_model=H, d_kv=16, d_ff=F, num_layers=L,
                                                                      num_heads=A, vocab_size=VOCAB)),
           last_state_normed=True),
    Family("t5gemma (encoder)", lambda: T.T5GemmaEncoderModel(T.T5GemmaConfig(
        encoder=dict(**_DECODER, head_dim=16), decoder=dict(**_DECODER, head_dim=16), vocab_size=VOCAB,
        is_encoder_decoder=False)), last_state_normed=True),
    Family("modernbert-decoder", _text(T.ModernBertDecoderConfig, T.ModernBertDecoderModel, global_attn_every_n_layers=2,
                                       pad_token_id=0, bos_token_id=1, eos_token_id=2, cls_token_id=1,
                                       sep_token_id=2), last_state_normed=True),
    Family("olmo3", _text(T.Olmo3Config, T.Olmo3Model, **_DECODER, sliding_window=4), last_state_normed=True),
    Family("smollm3", _text(T.SmolLM3Config, T.SmolLM3Model, **_DECODER, pad_token_id=0), last_state_normed=True),
    Family("qwen3_moe", _text(T.Qwen3MoeConfig, T.Qwen3MoeModel, **_DECODER, head_dim=16, num_experts=2,
                              num_experts_per_tok=1, moe_intermediate_size=16), last_state_normed=True),
    Family("granite", _text(T.GraniteConfig, T.GraniteModel, **_DECODER), last_state_normed=True),
    Family("cohere2", _text(T.Cohere2Config, T.Cohere2Model, **_DECODER, sliding_window=4),
           last_state_normed=True),  # parallel attention and MLP
    Family("exaone4", _text(T.Exaone4Config, T.Exaone4Model, **_DECODER, sliding_window=4), last_state_normed=True),
]


@dataclass
class Built:
    """One family built into a side-tuned model (``model``), or the error that refused it (``error``)."""

    family: Family
    role: str
    model: object | None = None
    error: Exception | None = None

    @property
    def tower(self):
        """The tested tower (the vision tower for a vision family, else the text tower)."""
        return getattr(self.model, f"{self.role}_tower")

    @property
    def report(self):
        """The tested tower's :class:`~m2ist.taps.TapReport`."""
        return self.model.tap_report()[0 if self.role == "vision" else 1]


def build(family: Family, role: str) -> Built:
    """A side-tuned model on ``family`` (paired with a tiny BERT or ViT), or the refusal."""
    import torch

    from m2ist import get_side_tuned_model
    from tests.tiny import text_tower, tiny_config, vision_tower

    torch.manual_seed(0)
    tower = family.build()
    vision, text = (tower, text_tower("bert")) if role == "vision" else (vision_tower("vit"), tower)
    try:
        return Built(family, role, model=get_side_tuned_model(vision, text, tiny_config()))
    except ValueError as error:
        if family.refused is None:
            raise
        return Built(family, role, error=error)


def build_all() -> list[Built]:
    """Every family of the matrix, vision then text."""
    return [build(f, "vision") for f in VISION_FAMILIES] + [build(f, "text") for f in TEXT_FAMILIES]


def support_table(built: list[Built]) -> str:
    """The support page: one row per family with the taps used and exact / fallback / refused."""
    lines = [
        "# Tower support",
        "",
        "Generated by `python -m tests.tower_matrix` from the families that `tests/test_tower_matrix.py` builds",
        "(tiny random towers of transformers' base-model classes; each is built, trained one step, checked against",
        "its own hidden states and token layout, saved and re-loaded). **exact**: the IEA reads the attention",
        "sub-layer and the VEA/LEA the feed-forward sub-layer, as in the paper; **fallback**: both read the layer",
        "(CNN stage) output; **refused**: the build raises one line naming the family and the override.",
        "Layers: the layer modules and, in brackets, how many layer calls are tapped (ALBERT calls one shared layer",
        "twice). Sub-module paths are relative to one layer; `(call 2)` is the second call of a module used twice.",
        "",
    ]
    counts = {"exact": 0, "fallback": 0, "refused": 0}
    for role in ("vision", "text"):
        expert = "VEA" if role == "vision" else "LEA"
        lines += [f"## {role.capitalize()} towers", "",
                  f"| family | class | support | taps from | layers | IEA reads | {expert} reads | tokens | notes |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for item in (b for b in built if b.role == role):
            if item.error is not None:
                counts["refused"] += 1
                reason = str(item.error).split(": ", 1)[-1].split(". Override", 1)[0].rstrip(".")
                lines.append(f"| {item.family.name} | | refused | | | | | | {reason} |")
                continue
            r = item.report
            counts[r.status] += 1
            layers = ", ".join(f"`{name}`" for name in _patterns(r.layers)) + f" ({r.depth})"
            tokens = "" if role == "text" else (
                f"{r.num_prefix_tokens} prefix" + (f" + {r.num_suffix_tokens} suffix" if r.num_suffix_tokens else "")
                + (f" + {r.grid[0]}x{r.grid[1]} grid" if r.grid else ""))
            note = r.note.split(": ", 1)[-1] if r.source != "structure" else ""
            if r.mixer:  # the IEA reads a token mixer that is not attention in some layers
                note = f"{note}; {r.mixer}" if note else r.mixer
            lines.append(f"| {item.family.name} | `{r.model_class}` | {r.status} | {r.source} | {layers} | "
                         f"{_code(r.attention)} | {_code(r.ffn)} | {tokens} | {note} |")
        lines.append("")
    lines.insert(10, f"{counts['exact']} exact, {counts['fallback']} fallback, {counts['refused']} refused, "
                    f"0 broken ({sum(counts.values())} families).\n")
    return "\n".join(lines)


def _patterns(layers: tuple[str, ...]) -> list[str]:
    import re

    return list(dict.fromkeys(re.sub(r"(^|\.)\d+(?=\.|$)", r"\1*", name) for name in layers))


def _code(path: str | None) -> str:
    return f"`{path}`" if path else "layer output"


if __name__ == "__main__":
    SUPPORT_PAGE.parent.mkdir(parents=True, exist_ok=True)
    SUPPORT_PAGE.write_text(support_table(build_all()), encoding="utf-8")
    print(f"wrote {SUPPORT_PAGE}")
