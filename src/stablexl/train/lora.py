"""LoRA training: low-rank changes to a frozen model, trained on the UNet task's SDXL recipe and written as a
kohya file (reference/adapters.md §1.1).

Each targeted nn.Linear / nn.Conv2d is replaced by `LoraLayer`: base(x) + (alpha/rank)·up(down(x)), the base
frozen. As in kohya's `LoRAModule` (networks/lora.py), down is kaiming-uniform (a=√5), up is zero, so step 0 is
the base model exactly; a 3×3 conv gets a down conv with the base's kernel, stride and padding and a 1×1 up
conv (LoCon / "C3Lier"). Targets (kohya's defaults): every linear of the transformers (`attn`: attn1/attn2
to_q/k/v/out, `ff`: GEGLU proj and out, `proj`: proj_in/proj_out), optionally the resnets' convs, time
projection and shortcut and the down/upsampler convs (`conv`), and the text towers' q/k/v/out_proj/fc1/fc2.

The factors live in one module, `LoraNetwork`, which is what the loop trains, wraps for DDP, averages (EMA)
and checkpoints: its state holds the factors only. Its forward is the UNet's, so the UNet task's loss runs
unchanged through it. The generation library never imports this file; it reads what `save` writes.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from ..adapters.lora import Target, kohya_name, layer_path, save_lora
from ..models.conditioning import encode_text
from .data import TrainData
from .loop import Context, OptimizerSpec
from .unet import UNetTask, UNetTrainOptions

GROUPS = ("attn", "ff", "proj", "conv")
_ATTN = ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0",
         "attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0")
_FF = ("ff.net.0.proj", "ff.net.2")
_CONV = ("conv1", "conv2", "time_emb_proj", "conv_shortcut")  # in resnets; plus the down/upsampler convs
_TEXT = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "mlp.fc1", "mlp.fc2")


def unet_group(path: str) -> str | None:
    """Which `--modules` group a UNet layer path belongs to (None: never targeted, e.g. conv_in, time_embedding)."""
    if ".transformer_blocks." in path:
        return "attn" if path.endswith(_ATTN) else "ff" if path.endswith(_FF) else None
    if ".attentions." in path and path.endswith(("proj_in", "proj_out")):
        return "proj"
    if ".resnets." in path and path.endswith(_CONV) or path.endswith(("downsamplers.0.conv", "upsamplers.0.conv")):
        return "conv"
    return None


class LoraFactors(nn.Module):
    """down (r, in[, kh, kw]) and up (out, r[, 1, 1]) of one layer; adds scale·up(down(x))."""

    def __init__(self, base: nn.Module, rank: int, alpha: float, generator: torch.Generator):
        super().__init__()
        if isinstance(base, nn.Linear):
            self.down = nn.Linear(base.in_features, rank, bias=False)
            self.up = nn.Linear(rank, base.out_features, bias=False)
        else:
            if base.groups != 1 or base.padding_mode != "zeros":
                raise ValueError("LoRA needs plain convolutions (groups 1, zero padding)")
            self.down = nn.Conv2d(base.in_channels, rank, base.kernel_size, base.stride, base.padding,
                                  base.dilation, bias=False)
            self.up = nn.Conv2d(rank, base.out_channels, 1, bias=False)
        w = base.weight
        self.to(w.device)
        with torch.no_grad():  # kohya LoRAModule: kaiming_uniform_(down, a=√5), zeros_(up)
            d = torch.empty(self.down.weight.shape)
            nn.init.kaiming_uniform_(d, a=math.sqrt(5), generator=generator)
            self.down.weight.copy_(d)
            nn.init.zeros_(self.up.weight)
        self.rank, self.alpha, self.scale = rank, float(alpha), float(alpha) / rank

    def forward(self, x: Tensor) -> Tensor:
        return self.up(self.down(x)) * self.scale


class LoraLayer(nn.Module):
    """A frozen layer plus its trainable low-rank change (put in the base layer's place)."""

    def __init__(self, base: nn.Module, lora: LoraFactors):
        super().__init__()
        self.base, self.lora = base, lora

    def forward(self, x: Tensor) -> Tensor:
        return self.base(x) + self.lora(x)


class LoraNetwork(nn.Module):
    """The trainable factors of every targeted layer (by kohya name); forward = the UNet's forward.

    The base modules are held unregistered (their weights are not this module's parameters or state) but follow
    it in `.to()` and `.train()`, so the loop moves and switches the whole model through this module."""

    def __init__(self, parts, targets: dict[str, tuple[int, float]], seed: int = 0):
        super().__init__()
        modules = parts.modules()
        g = torch.Generator().manual_seed(seed)
        self.layers = nn.ModuleDict()
        self.keys: dict[str, str] = {}  # kohya name -> our layer key ("unet.down_blocks...")
        self._replaced: list[tuple[nn.Module, str, nn.Module]] = []  # (parent, child name, original)
        comps = set()
        for key, (rank, alpha) in targets.items():
            comp, path = layer_path(key)
            owner = modules[comp]
            base = owner.get_submodule(path)
            if type(base) not in (nn.Linear, nn.Conv2d):
                raise ValueError(f"{key}: LoRA training needs a float nn.Linear / nn.Conv2d, not {type(base).__name__}")
            name = kohya_name(Target(comp, path), parts)
            factors = LoraFactors(base, rank, alpha, g)
            parent_path, _, child = path.rpartition(".")
            parent = owner.get_submodule(parent_path) if parent_path else owner
            setattr(parent, child, LoraLayer(base, factors))
            self._replaced.append((parent, child, base))
            self.layers[name] = factors
            self.keys[name] = key
            comps.add(comp)
        self.__dict__["_unet"] = parts.unet
        self.__dict__["_bases"] = [m for c, m in modules.items() if c in comps or c == "unet"]

    def forward(self, *args, **kwargs):
        return self._unet(*args, **kwargs)

    def _apply(self, fn, recurse=True):
        for m in self._bases:
            m._apply(fn, recurse)
        return super()._apply(fn, recurse)

    def train(self, mode: bool = True):
        for m in self._bases:
            m.train(mode)
        return super().train(mode)

    def remove(self) -> None:
        """Put the original layers back (the model is the base model again)."""
        for parent, child, base in reversed(self._replaced):
            setattr(parent, child, base)
        self._replaced.clear()

    def factors(self, dtype: torch.dtype = torch.float32) -> dict[str, tuple[Tensor, Tensor, float]]:
        """{our layer key: (down, up, alpha)} as `adapters.lora.save_lora` takes them, on the CPU in `dtype`."""
        return {self.keys[n]: (f.down.weight.detach().to("cpu", dtype), f.up.weight.detach().to("cpu", dtype), f.alpha)
                for n, f in self.layers.items()}


@dataclass(frozen=True)
class LoraOptions:
    rank: int = 16
    alpha: float = 16.0  # scale = alpha / rank (kohya network_alpha)
    modules: tuple[str, ...] = ("attn", "ff", "proj")
    conv_rank: int | None = None  # `conv` layers' rank (kohya conv_dim); None: rank
    conv_alpha: float | None = None  # None: alpha
    text_encoders: bool = False  # also train both text towers (kohya trains them unless network_train_unet_only)
    save_dtype: str = "fp16"  # fp16 | fp32
    output_name: str = "lora"

    def __post_init__(self):
        bad = [m for m in self.modules if m not in GROUPS]
        if bad or not self.modules:
            raise ValueError(f"--modules: unknown group(s) {', '.join(bad) or '(none given)'}; "
                             f"choose from {', '.join(GROUPS)}")
        if self.rank < 1 or (self.conv_rank is not None and self.conv_rank < 1):
            raise ValueError("LoRA rank must be at least 1")
        if self.save_dtype not in ("fp16", "fp32"):
            raise ValueError(f"--save-dtype must be fp16 or fp32, got {self.save_dtype!r}")


def lora_targets(parts, opt: LoraOptions) -> dict[str, tuple[int, float]]:
    """{our layer key: (rank, alpha)} for the chosen groups, in module order. As kohya: 3×3 convs take the conv
    rank/alpha, the linear and 1×1 children of resnets (time projection, shortcut) the main ones."""
    out: dict[str, tuple[int, float]] = {}
    conv = (opt.conv_rank or opt.rank, opt.alpha if opt.conv_alpha is None else opt.conv_alpha)
    for path, m in parts.unet.named_modules():
        group = unet_group(path) if type(m) in (nn.Linear, nn.Conv2d) else None
        if group in opt.modules:
            k3 = isinstance(m, nn.Conv2d) and m.kernel_size != (1, 1)
            out[f"unet.{path}"] = conv if k3 else (opt.rank, opt.alpha)
    if opt.text_encoders:
        for i, (te, spec) in enumerate(zip(parts.text_encoders, parts.config.text_encoders)):
            # layers past the one read (SDXL: CLIP-L's last; bigG's runs for the pooled vector) get no gradient:
            # a zero LoRA, and a DDP error (unused parameters), so they are left out
            used = len(te.encoder.layers) if spec.pooled or spec.layer is None else spec.layer
            for path, m in te.named_modules():
                if type(m) is nn.Linear and path.startswith("encoder.layers.") and path.endswith(_TEXT) \
                        and int(path.split(".")[2]) < used:
                    out[f"text_encoders.{i}.{path}"] = (opt.rank, opt.alpha)
    if not out:
        raise ValueError(f"--modules {','.join(opt.modules)}: this model has no such layers")
    return out


class LoraTask(UNetTask):
    """The UNet task's recipe (buckets, micro-conditions, cached latents / text, dropout, loss) with only LoRA
    factors trained. With text towers trained, captions are encoded every step (nothing cached)."""

    name = "lora"

    def __init__(self, parts, data: TrainData, options: UNetTrainOptions = UNetTrainOptions(),
                 lora: LoraOptions = LoraOptions(), seed: int = 0, model_name: str = ""):
        if lora.text_encoders:
            options = dataclasses.replace(options, cache_text=False)
        super().__init__(parts, data, options)
        self.lora, self.model_name = lora, model_name
        for m in parts.modules().values():
            m.requires_grad_(False)
        self.network = LoraNetwork(parts, lora_targets(parts, lora), seed)

    def modules(self):
        return {"lora": self.network}

    def optimizers(self):
        return [OptimizerSpec("lora", ["lora"])]

    def loss(self, ctx: Context, data_step: int):
        inner = dataclasses.replace(ctx, models={"unet": ctx.models["lora"]})  # the network's forward is the UNet's
        _, loss, logs = super().loss(inner, data_step)
        return "lora", loss, logs

    def encode_captions(self, captions: list[str]):
        if not self.lora.text_encoders:
            return super().encode_captions(captions)
        cfg = self.parts.config  # with gradients, through the towers' LoRA layers
        ids = [self.tokenizer(captions, pad_id=spec.pad_id) for spec in cfg.text_encoders]
        context, pooled = encode_text(cfg, self.parts.text_encoders, ids)
        return context.float(), None if pooled is None else pooled.float()

    def config_json(self) -> dict:
        return {**super().config_json(), "lora": dataclasses.asdict(self.lora), "layers": len(self.network.layers)}

    def metadata(self, ctx: Context) -> dict[str, str]:
        """kohya's `ss_*` header fields (library/train_util.py; reference/adapters.md §1.1), all strings."""
        o, cfg, model = self.lora, ctx.config, self.parts.config
        args = {}
        if "conv" in o.modules:
            args = {"conv_dim": str(o.conv_rank or o.rank),
                    "conv_alpha": str(float(o.alpha if o.conv_alpha is None else o.conv_alpha))}
        meta = {
            "ss_network_module": "networks.lora", "ss_network_dim": str(o.rank), "ss_network_alpha": str(float(o.alpha)),
            "ss_network_args": json.dumps(args), "ss_output_name": o.output_name,
            "ss_network_train_unet_only": str(not o.text_encoders), "ss_sd_model_name": self.model_name,
            "ss_v2": str(model.family == "sd2"), "ss_resolution": str((model.resolution, model.resolution)),
            "ss_max_train_steps": str(cfg.steps), "ss_steps": str(cfg.steps), "ss_learning_rate": str(cfg.lr),
            "ss_seed": str(cfg.seed), "ss_num_train_images": str(len(self.data.records)),
            "ss_batch_size_per_device": str(cfg.batch_size // ctx.world), "ss_total_batch_size": str(cfg.batch_size),
            "ss_gradient_accumulation_steps": str(cfg.grad_accum), "ss_mixed_precision": cfg.precision,
            "ss_optimizer": "torch.optim.AdamW", "ss_noise_offset": str(self.opt.offset_noise),
            "ss_min_snr_gamma": str(self.opt.min_snr_gamma)}
        if self.parts.config.family == "sdxl-base":
            meta["ss_base_model_version"] = "sdxl_base_v1-0"
        return meta

    def save(self, out: Path, ctx: Context) -> Path:
        dtype = torch.float16 if self.lora.save_dtype == "fp16" else torch.float32
        return save_lora(out / f"{self.lora.output_name}.safetensors", self.parts, self.network.factors(dtype),
                         metadata=self.metadata(ctx))
