"""LoRA and LyCORIS files: read them, match them to our layers, merge them into the weights, restore exactly.

Formats read (reference/adapters.md §1): kohya / A1111 (`lora_unet_*` in the LDM layout or the diffusers
layout, `lora_te_*` / `lora_te1_*` / `lora_te2_*`, `.alpha`, `.scale`); LoCon convs with the Tucker
`lora_mid`; diffusers / PEFT (`unet.` / `text_encoder.` / `text_encoder_2.` with `lora_A` / `lora_B`, the
older `lora.down` / `lora.up`, `to_q_lora` and `lora_linear_layer`, alphas from the `lora_adapter_metadata`
header); LyCORIS LoHa (`hada_*`, Tucker `hada_t1/t2`) and LoKr (`lokr_*`); DoRA (`dora_scale`,
`lora_magnitude_vector`). Only safetensors is read: a pickle can run code when loaded.

kohya names replace every `.` of a module path by `_`, so they cannot be split back; like A1111 and ComfyUI
we build the table of every name a file may use for each of our layers (from the model's own modules and
the one LDM key table in io/keymaps.py) and look names up in it (§1.1).

Merging (§2, §8): ΔW is computed in float32 from the untouched weight and rounded once to the weight's
dtype; the untouched weight is kept (only for layers a LoRA touches) and put back, never subtracted, so
unloading is bit-exact and switching sets never drifts (diffusers#5313, onediff#981).

int8 layers (stablexl/quant.py QuantizedLinear) are not merged: their int8 weight cannot hold ΔW without a
second rounding, so the LoRA is applied at run time (§8 "ΔW consistency", sd.cpp's at_runtime mode) as terms
the layer adds to its output (`lora_terms`). A low-rank file (LoRA / LoCon linear, PEFT) adds
strength·(alpha/rank)·(x downᵀ) upᵀ: r·(in + out) fp32 values per layer. Kinds without a low-rank form (LoHa,
LoKr, DoRA, LoCon Tucker) add one dense fp32 ΔW per layer, 4 bytes × out × in: four times the int8 weight it
sits beside (for DoRA, ΔW is taken from the dequantised weight). Unloading empties the list; the int8 weight
and its scales are never written.
"""

from __future__ import annotations

import itertools
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import torch
from torch import Tensor, nn

from ..io.checkpoint import atomic_save_safetensors
from ..io.keymaps import hf_clip_text_rules, ldm_unet_rules
from ..quant import QuantizedLinear
from .tags import read_adapter_file


class LoraError(ValueError):
    """A LoRA file that cannot be applied to this model; the message lists what did not match and the fix."""


# dtypes a weight may have for a merge; anything else (int8, fp8, packed) needs the runtime path
MERGEABLE = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
SHOW = 5  # keys listed per problem in an error message


# ==================================================================================================
# The names a file may use for each of our layers
# ==================================================================================================


@dataclass(frozen=True)
class Target:
    """One layer of ours a LoRA can change: its component ("unet", "text_encoders.N") and module path."""

    component: str
    module: str

    @property
    def key(self) -> str:  # our parameter is key + ".weight"
        return f"{self.component}.{self.module}"

    @property
    def is_text(self) -> bool:
        return self.component.startswith("text_encoders.")


def text_prefixes(family: str) -> list[tuple[str, str]]:
    """(kohya prefix, diffusers prefix) of each of the family's text encoders, in our order.

    kohya: `lora_te` for SD 1.x/2.x, `lora_te1` (CLIP-L) / `lora_te2` (bigG) for SDXL (networks/lora.py);
    diffusers: its pipeline's component names. The refiner has only bigG, diffusers' `text_encoder_2`."""
    if family.startswith("sdxl-base"):
        return [("lora_te1", "text_encoder"), ("lora_te2", "text_encoder_2")]
    if family == "sdxl-refiner":
        return [("lora_te2", "text_encoder_2")]
    return [("lora_te", "text_encoder")]


def layer_weight(m: nn.Module) -> Tensor | None:
    """A layer's weight matrix / conv kernel: `weight`, or `qweight` of a quantised layer (stablexl/quant.py)."""
    w = getattr(m, "weight", None)
    w = w if isinstance(w, Tensor) else getattr(m, "qweight", None)
    return w if isinstance(w, Tensor) and w.ndim >= 2 else None


def weight_modules(module: nn.Module) -> dict[str, nn.Module]:
    """Submodules holding a weight matrix or conv kernel of their own (path -> module), quantised ones
    included (so a LoRA for them gets a clear error, not "unknown"); embeddings excluded (their rows are
    tokens, which textual inversion extends, not LoRA)."""
    return {path: m for path, m in module.named_modules()
            if path and layer_weight(m) is not None and not isinstance(m, nn.Embedding)}


def lora_names(parts) -> dict[str, Target]:
    """Every module name a LoRA file may use for a layer of `parts` -> that layer."""
    table: dict[str, Target] = {}

    def add(name: str, target: Target) -> None:
        if table.setdefault(name, target) != target:
            raise AssertionError(f"LoRA name {name!r} would mean both {table[name].key} and {target.key}")

    unet_paths = list(weight_modules(parts.unet))
    ldm = ldm_unet_rules(parts.config.unet, [f"{p}.weight" for p in unet_paths])
    for path, rule in zip(unet_paths, ldm):
        t = Target("unet", path)
        add("lora_unet_" + path.replace(".", "_"), t)  # kohya, diffusers layout
        add("lora_unet_" + rule.theirs.removesuffix(".weight").replace(".", "_"), t)  # kohya, LDM layout
        add("unet." + path, t)  # diffusers / PEFT
    for i, (te, (kohya, diffusers)) in enumerate(zip(parts.text_encoders, text_prefixes(parts.config.family))):
        paths = list(weight_modules(te))
        for path, rule in zip(paths, hf_clip_text_rules([f"{p}.weight" for p in paths])):
            t = Target(f"text_encoders.{i}", path)
            hf = rule.theirs.removesuffix(".weight")  # transformers' name: text_model.encoder.layers.N...
            add(f"{kohya}_{hf.replace('.', '_')}", t)
            add(f"{diffusers}.{hf}", t)
    return table


def kohya_name(target: Target, parts) -> str:
    """The kohya name of one of our layers as kohya's SDXL trainer writes it: the UNet in the LDM layout."""
    if target.component == "unet":
        rule = ldm_unet_rules(parts.config.unet, [f"{target.module}.weight"])[0]
        return "lora_unet_" + rule.theirs.removesuffix(".weight").replace(".", "_")
    i = int(target.component.split(".")[1])
    kohya = text_prefixes(parts.config.family)[i][0]
    hf = hf_clip_text_rules([f"{target.module}.weight"])[0].theirs.removesuffix(".weight")
    return f"{kohya}_{hf.replace('.', '_')}"


# ==================================================================================================
# Reading a file into per-module tensors
# ==================================================================================================

# key ending -> role; the longest ending that matches wins
_SUFFIXES = {
    "lora_down.weight": "down", "lora_up.weight": "up", "lora_mid.weight": "mid",
    "lora_A.weight": "down", "lora_B.weight": "up", "lora_A.default.weight": "down", "lora_B.default.weight": "up",
    "lora.down.weight": "down", "lora.up.weight": "up",
    "lora_linear_layer.down.weight": "down", "lora_linear_layer.up.weight": "up",
    "alpha": "alpha", "scale": "scale", "dora_scale": "dora_scale", "lora_magnitude_vector": "magnitude",
    **{f"hada_{k}": f"hada_{k}" for k in ("w1_a", "w1_b", "w2_a", "w2_b", "t1", "t2")},
    **{f"lokr_{k}": f"lokr_{k}" for k in ("w1", "w1_a", "w1_b", "w2", "w2_a", "w2_b", "t2")},
}
_BY_LENGTH = sorted(_SUFFIXES, key=len, reverse=True)
_PEFT_ENDINGS = ("lora_A.weight", "lora_B.weight", "lora_A.default.weight", "lora_B.default.weight")
# old diffusers attention-processor names (state_dict_utils.py UNET_TO_DIFFUSERS / DIFFUSERS_OLD_TO_PEFT)
_OLD_PROC = re.compile(r"(.*)\.processor\.(to_q|to_k|to_v|to_out)_lora\.(down|up)\.weight$")
_OLD_TEXT = re.compile(r"(.*\.self_attn)\.(to_q|to_k|to_v|to_out)_lora\.(down|up)\.weight$")
_OLD_TEXT_NAMES = {"to_q": "q_proj", "to_k": "k_proj", "to_v": "v_proj", "to_out": "out_proj"}
_UNET_TOPS = ("down_blocks.", "mid_block.", "up_blocks.", "conv_in.", "conv_out.", "time_embedding.", "add_embedding.")


def _normalise_key(key: str) -> str:
    if m := _OLD_PROC.match(key):
        key = f"{m[1]}.{m[2]}{'.0' if m[2] == 'to_out' else ''}.lora.{m[3]}.weight"
    elif m := _OLD_TEXT.match(key):
        key = f"{m[1]}.{_OLD_TEXT_NAMES[m[2]]}.lora.{m[3]}.weight"
    if key.startswith(_UNET_TOPS):  # the oldest diffusers files have no `unet.` prefix
        key = "unet." + key
    return key


def split_key(key: str) -> tuple[str, str] | None:
    """`<module>.<ending>` -> (module, role), or None for a key that is no LoRA tensor."""
    for ending in _BY_LENGTH:
        if key.endswith("." + ending):
            return key[: -len(ending) - 1], _SUFFIXES[ending]
    return None


def read_lora_file(path: str | Path) -> tuple[dict[str, Tensor], dict[str, str]]:
    """All tensors and the header metadata of a safetensors LoRA; pickles are refused, never unpickled."""
    return read_adapter_file(path, LoraError, "Use a .safetensors version of this LoRA (most are published as one), "
                             "or convert it yourself in a trusted environment.")


# ==================================================================================================
# One layer's change: LoRA / LoCon / LoHa / LoKr, optionally DoRA
# ==================================================================================================


@dataclass
class Delta:
    """The factors one file stores for one layer, and the rules that turn them into ΔW."""

    kind: str  # "lora" | "loha" | "lokr"
    t: dict[str, Tensor]
    alpha: float | None = None
    scale_override: float | None = None  # an explicit `.scale` (A1111 network.py calc_scale; sd.cpp)
    dora: Tensor | None = None
    dora_axis: str | None = None  # "out" (per output row) or "in" (per input column), set when matched
    source: str = ""

    def rank(self) -> int | None:
        t = self.t
        if self.kind == "lora":
            return t["down"].shape[0]
        if self.kind == "loha":
            return t["hada_w1_b"].shape[0]
        # LoKr: the rank of a factored w2, else of a factored w1; none when both are full (ComfyUI lokr.py)
        if "lokr_w2_b" in t:
            return t["lokr_w2_b"].shape[0]
        return t["lokr_w1_b"].shape[0] if "lokr_w1_b" in t else None

    def scale(self) -> float:
        """alpha / rank; 1 without an alpha (every peer, reference §1.3) or, for LoKr, without a factored half."""
        if self.scale_override is not None:
            return self.scale_override
        r = self.rank()
        return 1.0 if self.alpha is None or not r else self.alpha / r

    def raw(self, device=None) -> Tensor:
        """ΔW · alpha/rank in float32, in the factors' natural shape (the caller reshapes to the weight's)."""
        f = {k: v.to(device, torch.float32) for k, v in self.t.items()}
        if self.kind == "lora":
            up, down = f["up"].flatten(1), f["down"]
            if "mid" in f:  # LoCon Tucker: ΔW[o,i,h,w] = Σ up[o,m] mid[m,n,h,w] down[n,i] (A1111 lyco_helpers)
                d = torch.einsum("m n h w, o m, n i -> o i h w", f["mid"], up, down.flatten(1))
            else:  # up @ down; convs flattened (ComfyUI / A1111 rebuild_conventional; equal to kohya's conv form)
                d = (up @ down.flatten(1)).reshape(up.shape[0], *down.shape[1:])
        elif self.kind == "loha":  # (w1_a w1_b) ⊙ (w2_a w2_b) (LyCORIS loha.py; Hyeon-Woo et al. 2022, FedPara)
            d = self._hada(f, "1") * self._hada(f, "2")
        else:  # kron(w1, w2) (LyCORIS lokr.py; Yeh et al. 2024, LyCORIS paper §3)
            w1 = f["lokr_w1"] if "lokr_w1" in f else f["lokr_w1_a"] @ f["lokr_w1_b"]
            if "lokr_w2" in f:
                w2 = f["lokr_w2"]
            elif "lokr_t2" in f:
                w2 = _tucker(f["lokr_t2"], f["lokr_w2_a"], f["lokr_w2_b"])
            else:
                w2 = f["lokr_w2_a"] @ f["lokr_w2_b"]
            if w2.ndim == 4:
                w1 = w1[:, :, None, None]
            d = torch.kron(w1, w2)
        return d * self.scale()

    @staticmethod
    def _hada(f: dict[str, Tensor], i: str) -> Tensor:
        a, b = f[f"hada_w{i}_a"], f[f"hada_w{i}_b"]
        if f"hada_t{i}" in f:
            return _tucker(f[f"hada_t{i}"], a, b)
        return a @ b

    def delta(self, weight: Tensor, strength: float) -> Tensor:
        """The change to add to `weight` (float32, the untouched weight) at `strength`."""
        d = self.raw(weight.device).reshape(weight.shape)
        if self.dora is None:
            return d * strength
        # DoRA (Liu et al. 2024, eq. 5): W' = m · (W + ΔW) / ||W + ΔW||, the norm per output row (PEFT
        # lora/dora.py get_weight_norm, LyCORIS wd_on_out) or per input column (A1111's original convention).
        # Strength scales W' − W, as A1111 (network.py apply_weight_decompose) and ComfyUI do.
        merged = weight + d
        if self.dora_axis == "out":
            norm = merged.flatten(1).norm(dim=1).reshape(-1, *[1] * (weight.ndim - 1))
        else:
            norm = merged.transpose(0, 1).flatten(1).norm(dim=1).reshape(1, -1, *[1] * (weight.ndim - 2))
        m = self.dora.to(weight.device, torch.float32).reshape(norm.shape)
        return (merged * (m / (norm + torch.finfo(torch.float32).eps)) - weight) * strength


def _tucker(t: Tensor, a: Tensor, b: Tensor) -> Tensor:
    """LyCORIS Tucker rebuild: t (r, r, kh, kw), a (r, out), b (r, in) -> (out, in, kh, kw)
    (`einsum("i j ..., j r, i p -> p r ...")`, lycoris/functional)."""
    return torch.einsum("i j h w, j r, i p -> p r h w", t, b, a)


_KINDS = {
    "lora": ({"down", "up"}, {"mid"}),
    "loha": ({"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"}, {"hada_t1", "hada_t2"}),
    "lokr": (set(), {"lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2"}),
}


def _make_delta(module: str, roles: dict[str, Tensor], alpha_default: float | None) -> Delta | str:
    """A Delta from one module's tensors, or a reason it cannot be one."""
    factors = {k: v for k, v in roles.items() if k not in ("alpha", "scale", "dora_scale", "magnitude")}
    kinds = {k for k, (need, opt) in _KINDS.items() if factors and set(factors) <= need | opt}
    if not factors:
        return "no weights (only " + ", ".join(sorted(roles)) + ")"
    if len(kinds) != 1:
        return "a mix of tensors of different adapter types: " + ", ".join(sorted(factors))
    kind = kinds.pop()
    need = _KINDS[kind][0]
    if kind == "lokr":
        has1 = "lokr_w1" in factors or {"lokr_w1_a", "lokr_w1_b"} <= set(factors)
        has2 = "lokr_w2" in factors or {"lokr_w2_a", "lokr_w2_b"} <= set(factors)
        if not (has1 and has2):
            return "incomplete LoKr factors: " + ", ".join(sorted(factors))
    elif not need <= set(factors):
        return f"incomplete {kind} factors (missing {', '.join(sorted(need - set(factors)))})"
    alpha = roles.get("alpha")
    scale = roles.get("scale")
    dora = roles.get("dora_scale", roles.get("magnitude"))
    return Delta(kind, factors,
                 alpha=float(alpha) if alpha is not None and float(alpha) != 0 else alpha_default,
                 scale_override=None if scale is None else float(scale),
                 dora=dora, dora_axis="out" if "magnitude" in roles else None, source=module)


# ==================================================================================================
# A file matched to a model
# ==================================================================================================

_uids = itertools.count(1)


@dataclass
class Lora:
    """A LoRA file matched to one model: the change to each layer it touches, by our layer key."""

    name: str
    layers: dict[str, Delta]
    targets: dict[str, Target]
    path: Path | None = None
    metadata: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    uid: int = field(default_factory=lambda: next(_uids))  # tells a reloaded (maybe changed) file apart
    _hash: str | None = None

    @property
    def short_hash(self) -> str | None:
        """A1111's 12-hex "Lora hashes" entry: `sshs_model_hash` from the header, else the addnet hash."""
        if self._hash is None and self.path is not None:
            from ..io.hashing import addnet_hash

            self._hash = (self.metadata.get("sshs_model_hash") or addnet_hash(self.path))[:12]
        return self._hash

    def delta(self, key: str, weight: Tensor, text_strength: float, unet_strength: float) -> Tensor:
        return self.layers[key].delta(weight, text_strength if self.targets[key].is_text else unet_strength)


def _peft_alpha(module: str, metadata: dict[str, str], comp: str) -> float | None:
    """A PEFT-format module's lora_alpha from diffusers' `lora_adapter_metadata` header, else None (= rank).

    diffusers writes the LoraConfig of each component under "<component>.<field>" (lora_base.py
    write_lora_layers / _pack_dict_with_prefix); `alpha_pattern` keys match module paths as PEFT does
    (tuners_utils: `re.match(rf"(.*\\.)?({key})$", name)`)."""
    raw = metadata.get("lora_adapter_metadata")
    if not raw:
        return None
    try:
        meta = json.loads(raw)
    except ValueError:
        return None
    rest = module[len(comp) + 1:]
    for key, value in (meta.get(f"{comp}.alpha_pattern") or {}).items():
        if re.match(rf"(.*\.)?({key})$", rest):
            return float(value)
    alpha = meta.get(f"{comp}.lora_alpha")
    return None if alpha is None else float(alpha)


def _family_hint(names: Iterable[str], metadata: dict[str, str], family: str) -> str | None:
    """Which model family a file that does not fit was made for, when its keys or header say so."""
    names = list(names)
    version = metadata.get("ss_base_model_version", "")
    xl = version.startswith("sdxl") or any(n.startswith(("lora_te1_", "lora_te2_", "text_encoder_2.")) for n in names)
    sd = version.startswith(("sd_v1", "sd_v2")) or any(n.startswith("lora_te_") for n in names)
    if family.startswith("sdxl") and sd and not xl:
        return "it looks like an SD 1.x/2.x LoRA (single text encoder `lora_te_` keys), but the model is SDXL"
    if not family.startswith("sdxl") and xl:
        return f"it looks like an SDXL LoRA (two text encoders), but the model is {family}"
    return None


def _listing(title: str, items: list[str]) -> str:
    shown = ", ".join(items[:SHOW]) + (f", … ({len(items) - SHOW} more)" if len(items) > SHOW else "")
    return f"{len(items)} {title}: {shown}"


def match_lora(tensors: dict[str, Tensor], parts, *, name: str, metadata: dict[str, str] | None = None,
               path: Path | None = None, table: dict[str, Target] | None = None) -> Lora:
    """Match a LoRA state dict to `parts`; every problem is collected into one LoraError, nothing is changed."""
    metadata = metadata or {}
    table = table if table is not None else lora_names(parts)
    where = str(path) if path is not None else name
    groups: dict[str, dict[str, Tensor]] = {}
    peft_modules: set[str] = set()
    not_lora, notes = [], []
    duplicate = []
    for key, value in tensors.items():
        if key.startswith("bundle_emb."):
            continue  # textual-inversion embeddings bundled with the LoRA (A1111): not loaded, noted below
        split = split_key(_normalise_key(key))
        if split is None:
            not_lora.append(key)
            continue
        module, role = split
        if role in groups.setdefault(module, {}):
            duplicate.append(key)
        groups[module][role] = value
        if key.endswith(_PEFT_ENDINGS):
            peft_modules.add(module)
    if any(k.startswith("bundle_emb.") for k in tensors):
        notes.append(f"{name}: the textual-inversion embeddings bundled in the file (bundle_emb.*) are not loaded")

    unknown, broken, shapes, quantised, twice = [], [], [], [], []
    layers: dict[str, Delta] = {}
    targets: dict[str, Target] = {}
    modules = parts.modules()
    for module, roles in groups.items():
        target = table.get(module)
        if target is None:
            unknown.append(module)
            continue
        comp = module.split(".", 1)[0]
        alpha_default = _peft_alpha(module, metadata, comp) if module in peft_modules else None
        delta = _make_delta(module, roles, alpha_default)
        if isinstance(delta, str):
            broken.append(f"{module} ({delta})")
            continue
        layer = modules[target.component].get_submodule(target.module)
        weight = layer_weight(layer)
        mergeable = type(layer) in (nn.Linear, nn.Conv2d) and weight.dtype in MERGEABLE
        if not (mergeable or isinstance(layer, QuantizedLinear)):  # int8: applied at run time (runtime_terms)
            quantised.append(f"{module} ({type(layer).__name__}, {weight.dtype})")
            continue
        problem = _shape_problem(delta, weight)
        if problem:
            shapes.append(f"{module} ({problem})")
            continue
        if target.key in layers:
            twice.append(f"{module} and {layers[target.key].source}")
            continue
        layers[target.key] = delta
        targets[target.key] = target

    problems = []
    if not_lora:
        problems.append(_listing("key(s) that are not LoRA/LyCORIS tensors", sorted(not_lora)))
    if unknown:
        problems.append(_listing(f"module(s) this {parts.config.family} model does not have", sorted(unknown)))
    if broken:
        problems.append(_listing("module(s) with unusable tensors", sorted(broken)))
    if duplicate:
        problems.append(_listing("tensor(s) given twice", sorted(duplicate)))
    if shapes:
        problems.append(_listing("module(s) whose shapes do not fit the model's layers", sorted(shapes)))
    if twice:
        problems.append(_listing("layer(s) named twice (in two layouts)", sorted(twice)))
    if quantised:
        problems.append(_listing("layer(s) that are quantised or not plain Linear/Conv2d (merging needs float "
                                 "weights; load the model without quantisation to use LoRAs)", sorted(quantised)))
    if not problems and not layers:
        problems.append("it holds no LoRA layers")
    if problems:
        hint = _family_hint(groups, metadata, parts.config.family)
        fix = hint + "; use a LoRA made for this model" if hint else (
            "use a LoRA made for this model family" if (unknown or shapes) and not quantised else
            "export the file again (kohya, diffusers/PEFT or LyCORIS safetensors)")
        if quantised and not (unknown or shapes or broken or not_lora):
            fix = "load the model in fp32/fp16/bf16 (without quantisation), then apply the LoRA"
        raise LoraError(f"{where}: not a LoRA for {parts.config.name} ({len(groups)} modules read, "
                        f"{len(layers)} matched). " + "; ".join(problems) + f". Fix: {fix}.")
    return Lora(name=name, layers=layers, targets=targets, path=path, metadata=metadata, notes=notes)


def _shape_problem(delta: Delta, weight: Tensor) -> str | None:
    """Why `delta` cannot be added to `weight`, or None (checked on the meta device: nothing is computed)."""
    try:
        nat = delta.raw("meta").shape
    except RuntimeError as e:
        return f"inconsistent factor shapes: {e}".split("\n")[0]
    if math.prod(nat) != weight.numel() or nat[0] != weight.shape[0]:
        return f"gives {tuple(nat)}, the layer is {tuple(weight.shape)}"
    if delta.dora is not None:
        n = delta.dora.numel()
        if delta.dora_axis is None:  # kohya / LyCORIS dora_scale: (out, 1, ...) or (1, in, ...) (ComfyUI's rule)
            delta.dora_axis = "out" if delta.dora.shape[0] == weight.shape[0] and n == weight.shape[0] else "in"
        want = weight.shape[0] if delta.dora_axis == "out" else weight.shape[1]
        if n != want:
            return f"DoRA magnitude has {n} values, the layer needs {want}"
    return None


def load_lora(path: str | Path, parts, *, name: str | None = None, table: dict[str, Target] | None = None) -> Lora:
    """Read and match one LoRA file (LoraError for anything that does not fit; the model is not touched)."""
    path = Path(path)
    tensors, metadata = read_lora_file(path)
    return match_lora(tensors, parts, name=name or path.stem, metadata=metadata, path=path, table=table)


# ==================================================================================================
# Merging a set of LoRAs into the weights, and restoring them
# ==================================================================================================


@dataclass(frozen=True)
class Active:
    """A LoRA in the set to apply, with its text-encoder and UNet strengths."""

    lora: Lora
    text_strength: float
    unet_strength: float


class LoraStack:
    """The LoRAs merged into one model's weights.

    `pinned` holds the LoRAs loaded by `add` (Pipeline.load_lora), which stay until `clear`; `apply(extra)`
    merges the pinned set plus a request's LoRAs (same name: the request's strengths). Each weight records
    which (LoRA, strength) pairs are in it, so a new set recomputes only the weights whose sum changes, from
    the kept original. int8 layers keep their weight and get `lora_terms` instead (runtime_terms), tracked
    the same way."""

    def __init__(self, parts):
        self.parts = parts
        self.pinned: dict[str, Active] = {}
        self.active: dict[str, Active] = {}  # what is merged now, by name
        self._original: dict[str, Tensor] = {}  # layer key -> the untouched weight (on the CPU)
        self._merged: dict[str, tuple] = {}  # layer key -> ((uid, strength), ...) merged into it
        self._table: dict[str, Target] | None = None
        self._cache: dict[str, tuple[tuple[int, int], Lora]] = {}  # resolved path -> ((size, mtime), Lora)

    @property
    def table(self) -> dict[str, Target]:
        if self._table is None:
            self._table = lora_names(self.parts)
        return self._table

    def load(self, path: str | Path, name: str | None = None) -> Lora:
        """A file matched to this model, read again only when its size or mtime changed (A1111 does the same)."""
        path = Path(path)
        try:
            st = path.stat()
        except OSError:
            raise LoraError(f"{path}: no such file") from None
        key, stamp = str(path.resolve()), (st.st_size, st.st_mtime_ns)
        hit = self._cache.get(key)
        if hit is not None and hit[0] == stamp and hit[1].name == (name or path.stem):
            return hit[1]
        lora = load_lora(path, self.parts, name=name, table=self.table)
        self._cache[key] = (stamp, lora)
        return lora

    def add(self, lora: Lora, strength: float = 1.0, text_strength: float | None = None) -> int:
        """Pin `lora` (replacing one of the same name: applying twice never doubles) and merge now."""
        self.pinned[lora.name] = Active(lora, strength if text_strength is None else text_strength, strength)
        return self.apply()

    def clear(self) -> int:
        """Unpin everything and restore every weight exactly."""
        self.pinned.clear()
        return self.apply()

    def apply(self, extra: Sequence[Active] = ()) -> int:
        """Merge the pinned LoRAs plus `extra`; returns the number of weights rewritten or restored."""
        wanted = dict(self.pinned)
        for a in extra:
            wanted[a.lora.name] = a
        plan: dict[str, list[tuple[Active, float]]] = {}
        for a in wanted.values():
            for key, target in a.lora.targets.items():
                s = a.text_strength if target.is_text else a.unet_strength
                if s != 0:
                    plan.setdefault(key, []).append((a, s))
        modules = self.parts.modules()
        changed = 0
        with torch.no_grad():
            for key in [*plan, *(k for k in self._merged if k not in plan)]:
                sig = tuple((a.lora.uid, s) for a, s in plan.get(key, ()))
                if self._merged.get(key, ()) == sig:
                    continue
                comp, path = layer_path(key)
                layer = modules[comp].get_submodule(path)
                if isinstance(layer, QuantizedLinear):  # not merged: terms added in its forward
                    layer.lora_terms = runtime_terms(layer, [(a.lora.layers[key], s) for a, s in plan.get(key, ())])
                    if sig:
                        self._merged[key] = sig
                    else:
                        del self._merged[key]
                    changed += 1
                    continue
                param = layer.weight
                if key not in self._original:  # the CPU original is kept as is (no copy); others copied to the CPU
                    self._original[key] = param.data if param.device.type == "cpu" else param.data.to("cpu", copy=True)
                orig = self._original[key]
                if not sig:
                    param.data = orig.to(param.device)
                    del self._original[key], self._merged[key]
                else:
                    base = orig.to(param.device, torch.float32, copy=True)
                    w = base.clone()
                    for a, s in plan[key]:  # each ΔW from the untouched weight (DoRA needs it), in order
                        w += a.lora.layers[key].delta(base, s)
                    param.data = w.to(orig.dtype)  # a new tensor: a file-backed original is never written
                    self._merged[key] = sig
                changed += 1
        self.active = {n: a for n, a in wanted.items()}
        return changed


def runtime_terms(layer: QuantizedLinear, deltas: Sequence[tuple[Delta, float]]) -> list:
    """`deltas` (each at its strength) as an int8 layer's `lora_terms` (fp32, on the layer's device): one
    (down, up, strength·alpha/rank) per low-rank LoRA, and the sum of the others as one dense ΔW."""
    device = layer.qweight.device
    terms, dense, base = [], None, None
    for d, s in deltas:
        if d.kind == "lora" and "mid" not in d.t and d.dora is None:
            down = d.t["down"].to(device, torch.float32).flatten(1)  # (r, in); a 1x1-conv-shaped file too
            up = d.t["up"].to(device, torch.float32).flatten(1)  # (out, r)
            terms.append((down, up, s * d.scale()))
        else:
            if base is None:
                base = layer.dequantized(torch.float32)
            dw = d.delta(base, s)
            dense = dw if dense is None else dense + dw
    if dense is not None:
        terms.append((dense, None, 1.0))
    return terms


def layer_path(key: str) -> tuple[str, str]:
    """Our layer key -> (component, module path): "text_encoders.1.encoder..." -> ("text_encoders.1", "encoder...")."""
    if key.startswith("text_encoders."):
        i, _, rest = key[len("text_encoders."):].partition(".")
        return f"text_encoders.{i}", rest
    comp, _, rest = key.partition(".")
    return comp, rest


# ==================================================================================================
# Writing kohya files
# ==================================================================================================


def save_lora(path: str | Path, parts, layers: dict[str, tuple[Tensor, Tensor, float | None]], *,
              metadata: dict[str, str] | None = None) -> Path:
    """Write a kohya LoRA: `layers` maps our layer keys ("unet.down_blocks.1.attentions.0.proj_in",
    "text_encoders.0.encoder.layers.0.self_attn.q_proj") to (down (r, in[, kh, kw]), up (out, r[, 1, 1]),
    alpha or None = rank). Names are kohya's SDXL trainer's: the UNet in the LDM layout, `lora_te1/2_`
    text encoders (networks/lora.py); `ss_base_model_version` is set for SDXL as kohya sets it."""
    out: dict[str, Tensor] = {}
    for key, (down, up, alpha) in layers.items():
        comp, module = layer_path(key)
        n = kohya_name(Target(comp, module), parts)
        out[f"{n}.lora_down.weight"] = down.contiguous()
        out[f"{n}.lora_up.weight"] = up.contiguous()
        out[f"{n}.alpha"] = torch.tensor(float(down.shape[0] if alpha is None else alpha))
    meta = {"ss_network_module": "networks.lora"}
    if parts.config.family == "sdxl-base":
        meta["ss_base_model_version"] = "sdxl_base_v1-0"
    meta.update(metadata or {})
    atomic_save_safetensors(out, path, meta)
    return Path(path)
