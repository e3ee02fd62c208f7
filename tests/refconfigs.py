"""Official configurations of the reference implementations, written out as the hub config.json files
(reference/architecture.md §1.1, §2, §3.1, §6), and the expected parameter counts (§1.3, §2, §3.1, §6)."""

_SD_DOWN = ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"]
_SD_UP = ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3

SD15_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, act_fn="silu", attention_head_dim=8,
    block_out_channels=[320, 640, 1280, 1280], cross_attention_dim=768, down_block_types=_SD_DOWN,
    up_block_types=_SD_UP, downsample_padding=1, flip_sin_to_cos=True, freq_shift=0, layers_per_block=2,
    mid_block_scale_factor=1, norm_eps=1e-5, norm_num_groups=32,
)
SD21_UNET = dict(SD15_UNET, sample_size=96, attention_head_dim=[5, 10, 20, 20], cross_attention_dim=1024,
                 use_linear_projection=True, upcast_attention=True)
SD21_BASE_UNET = dict(SD21_UNET, sample_size=64, upcast_attention=False)
SDXL_BASE_UNET = dict(
    sample_size=128, in_channels=4, out_channels=4, act_fn="silu", addition_embed_type="text_time",
    addition_time_embed_dim=256, attention_head_dim=[5, 10, 20], block_out_channels=[320, 640, 1280],
    cross_attention_dim=2048, down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"], flip_sin_to_cos=True, freq_shift=0,
    layers_per_block=2, norm_eps=1e-5, norm_num_groups=32, projection_class_embeddings_input_dim=2816,
    transformer_layers_per_block=[1, 2, 10], use_linear_projection=True,
)
SDXL_REFINER_UNET = dict(
    sample_size=128, in_channels=4, out_channels=4, act_fn="silu", addition_embed_type="text_time",
    addition_time_embed_dim=256, attention_head_dim=[6, 12, 24, 24], block_out_channels=[384, 768, 1536, 1536],
    cross_attention_dim=1280,
    down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"], flip_sin_to_cos=True,
    freq_shift=0, layers_per_block=2, norm_eps=1e-5, norm_num_groups=32, projection_class_embeddings_input_dim=2560,
    transformer_layers_per_block=4, use_linear_projection=True,
)

# preset name -> (diffusers UNet config, UNet parameters from reference §1.3)
UNETS = {
    "sd15": (SD15_UNET, 859_520_964),
    "sd15-inpaint": (dict(SD15_UNET, in_channels=9), 859_535_364),
    "sd21": (SD21_UNET, 865_910_724),
    "sd21-base": (SD21_BASE_UNET, 865_910_724),
    "sd21-unclip-h": (dict(SD21_UNET, class_embed_type="projection", projection_class_embeddings_input_dim=2048), 870_173_124),
    "sd21-unclip-l": (dict(SD21_UNET, class_embed_type="projection", projection_class_embeddings_input_dim=1536), 869_517_764),
    "sdxl-base": (SDXL_BASE_UNET, 2_567_463_684),
    "sdxl-refiner": (SDXL_REFINER_UNET, 2_259_526_660),
}

VAE = dict(
    in_channels=3, out_channels=3, block_out_channels=[128, 256, 512, 512], down_block_types=["DownEncoderBlock2D"] * 4,
    up_block_types=["UpDecoderBlock2D"] * 4, latent_channels=4, layers_per_block=2, norm_num_groups=32, act_fn="silu",
    sample_size=1024, scaling_factor=0.13025,
)
VAE_PARAMS = 83_653_863

_TEXT = dict(vocab_size=49408, max_position_embeddings=77, bos_token_id=0, eos_token_id=2, pad_token_id=1)
CLIP_L_TEXT = dict(_TEXT, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                   hidden_act="quick_gelu", projection_dim=768)
# diffusers' SD 2.x text encoder: OpenCLIP-H with its last block dropped (23 of 24).
OPENCLIP_H_TEXT_23 = dict(_TEXT, hidden_size=1024, intermediate_size=4096, num_hidden_layers=23, num_attention_heads=16,
                          hidden_act="gelu", projection_dim=512)
OPENCLIP_BIGG_TEXT = dict(_TEXT, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
                          hidden_act="gelu", projection_dim=1280)
TEXT_PARAMS = {"clip-l": 123_060_480, "openclip-h-23": 340_387_840, "openclip-bigg": 694_659_840}

CLIP_L_VISION = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                     hidden_act="quick_gelu", projection_dim=768, image_size=224, patch_size=14)
OPENCLIP_H_VISION = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=16,
                         hidden_act="gelu", projection_dim=1024, image_size=224, patch_size=14)
VISION_PARAMS = {"clip-l": 303_966_208, "openclip-h": 632_076_800}


def rel_err(got, want) -> float:
    """max |got - want| / max |want| (the parity measure of the issue)."""
    assert got.shape == want.shape, (got.shape, want.shape)
    assert want.float().abs().max() > 0 and want.float().std() > 0, "reference output is degenerate"
    return float((got.float() - want.float()).abs().max() / want.float().abs().max())


# Detection of official single files from their keys and shapes alone (no weights)


class KeysOnly:
    """A TensorSource stand-in with keys and shapes only (enough for detection)."""

    def __init__(self, shapes):
        self.shapes, self.path, self.metadata = shapes, "keys-only.safetensors", {}

    def keys(self):
        return list(self.shapes)

    def __contains__(self, key):
        return key in self.shapes

    def shape(self, key):
        return tuple(self.shapes[key])


def single_file_keys(config):
    from stablexl.io.keymaps import foreign_shape, single_file_layout
    from stablexl.models.parts import build_parts as _build_parts

    parts = _build_parts(config, device="meta")
    mods, shapes = parts.modules(), {}
    for comp in single_file_layout(config):
        sd = {k: tuple(v.shape) for k, v in mods[comp.component].state_dict().items()}
        for rule in comp.rules(config, list(sd)):
            shapes[comp.prefix + rule.theirs] = foreign_shape(rule, [sd[k] for k in rule.ours])
    return shapes
