"""A1111-style PNG `parameters` text ("infotext"): written on every image we save, and read back
(ours, A1111's, sd.cpp's, and ComfyUI's `prompt` graph) for `stablexl info`.

Grammar (reference/peers.md §2.3): prompt lines, an optional `Negative prompt: ` line, then one
line of comma-separated `Key: value` pairs; values containing `,` `:` or a newline are JSON-quoted.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from PIL import Image, PngImagePlugin

from .. import __version__
from ..names import (  # noqa: F401  (the one name table; normalise_* re-exported for readers)
    A1111_SAMPLER, A1111_SCHEDULE, COMFY_SAMPLER, parse_sampler as normalise_sampler, parse_schedule as normalise_schedule,
)


def _value(v) -> str:
    s = str(v)
    # also quote a value that starts with a quote, or a reader would take it for a quoted one
    return json.dumps(s, ensure_ascii=False) if any(c in s for c in ",:\n") or s.startswith('"') else s


def infotext(prompt: str, negative: str | None, params: dict) -> str:
    lines = [prompt]
    if negative:
        lines.append(f"Negative prompt: {negative}")
    lines.append(", ".join(f"{k}: {_value(v)}" for k, v in params.items() if v is not None))
    return "\n".join(lines)


def size_text(hw) -> str | None:
    """(height, width) -> "WxH", the order infotext writes sizes in (peers.md §2.3)."""
    return None if hw is None else f"{hw[1]}x{hw[0]}"


def lora_tags(loras) -> str:
    """The `<lora:NAME:W>` tags of a request's LoraSpecs (`<lora:NAME:TE_W:UNET_W>` when they differ), as A1111
    keeps them in the infotext's prompt; reading the text back applies them again."""
    def tag(s) -> str:
        te = s.strength if s.text_strength is None else s.text_strength
        return f"<lora:{s.name}:{s.strength:g}>" if te == s.strength else f"<lora:{s.name}:{te:g}:{s.strength:g}>"
    return " ".join(tag(s) for s in loras)


def lora_hashes_text(hashes: dict[str, str]) -> str | None:
    """A1111's `Lora hashes` value: "name: hash12, ..." with `:` and `,` removed from names
    (extra_networks_lora.py)."""
    items = [f"{n.replace(':', '').replace(',', '')}: {h}" for n, h in hashes.items() if h]
    return ", ".join(items) or None


def parse_lora_hashes(value: str | None) -> dict[str, str]:
    """A `Lora hashes` value (unquoted) -> {name: hash}."""
    out = {}
    for item in (value or "").split(","):
        name, sep, h = item.rpartition(":")
        if sep and name.strip():
            out[name.strip()] = h.strip()
    return out


def generation_infotext(req, index: int, *, model_hash: str | None = None,
                        lora_hashes: dict[str, str] | None = None) -> str:
    """Infotext for image `index` of a resolved GenerationRequest (in order over its iterations), with
    A1111's keys where it has them. The one writer for the CLI, the Python API and both server APIs."""
    prompts, negatives = req.prompts, req.negative_prompts
    it, k = divmod(index, req.batch)
    mc, h = req.conditions, req.handoff
    out_size = (req.height, req.width)
    refiner = h.refiner
    image = req.image
    hr = getattr(req, "hires", None)
    params = {
        "Steps": req.steps, "Sampler": A1111_SAMPLER.get(req.sampler, req.sampler),
        "Schedule type": A1111_SCHEDULE.get(req.schedule, req.schedule), "CFG scale": req.cfg,
        "Seed": req.seeds(it)[k], "Size": f"{req.width}x{req.height}",
        "Model hash": model_hash, "Model": req.model,
        "Denoising strength": image.strength if image is not None else hr.strength if hr is not None else None,
        "Mask blur": (image.mask_blur or None) if image is not None and image.mask is not None else None,
        "Refiner": refiner, "Refiner switch at": h.switch_at if refiner and h.mode == "handoff" else None,
        "Refiner mode": h.mode if refiner and h.mode != "handoff" else None,
        "Refiner strength": h.refiner_strength if refiner and h.mode == "sdedit" else None,
        "Guidance rescale": req.guidance_rescale or None,
        "Eta": req.eta, "Sigmas": None if req.sigmas is None else ", ".join(f"{v:g}" for v in req.sigmas),
        "Original size": size_text(mc.original_size) if mc.original_size not in (None, out_size) else None,
        "Target size": size_text(mc.target_size) if mc.target_size not in (None, out_size) else None,
        "Crop": f"{mc.crop[1]}x{mc.crop[0]}" if tuple(mc.crop or (0, 0)) != (0, 0) else None,
        "Noise level": req.image_prompt.noise_level if req.image_prompt is not None else None,
        **hires_params(req),
        "Lora hashes": lora_hashes_text(lora_hashes or {}),
        "Version": f"stablexl {__version__}",
    }
    loras = getattr(req, "loras", ())
    prompt = f"{prompts[k]} {lora_tags(loras)}" if loras else prompts[k]
    return infotext(prompt, negatives[k] if negatives else None, params)


def hires_params(req) -> dict:
    """A1111's hires keys (processing.py calculate_target_resolution / init): `Hires upscale` or `Hires resize`,
    `Hires steps`, `Hires upscaler`, and `Hires sampler`, `Hires schedule type`, `Hires prompt`, `Hires negative
    prompt` only where they differ from the first pass; `Hires CFG Scale` (Forge's key) likewise. `Size` stays the
    first pass's, as A1111 writes it."""
    hr = getattr(req, "hires", None)
    if hr is None:
        return {}
    out = {"Hires upscale": None if hr.resize else f"{hr.scale:g}",
           "Hires resize": f"{hr.resize[0]}x{hr.resize[1]}" if hr.resize else None,
           "Hires steps": hr.steps, "Hires upscaler": hr.upscaler}
    if hr.sampler != req.sampler:
        out["Hires sampler"] = A1111_SAMPLER.get(hr.sampler, hr.sampler)
    if hr.schedule != req.schedule:
        out["Hires schedule type"] = A1111_SCHEDULE.get(hr.schedule, hr.schedule)
    if hr.cfg != req.cfg:
        out["Hires CFG Scale"] = hr.cfg
    if hr.prompt is not None:
        out["Hires prompt"] = hr.prompt
    if hr.negative_prompt is not None:
        out["Hires negative prompt"] = hr.negative_prompt
    return out


def hires_from_infotext(extra: dict, strength):
    """The Hires record of an infotext's hires keys (None without them). A1111 leaves `Hires steps` out when the
    second pass runs the first pass's steps; its `Hires sampler: Use same sampler` and empty prompts mean the
    first pass's too."""
    from ..request import Hires

    if not any(k in extra for k in ("Hires upscale", "Hires resize", "Hires upscaler")):
        return None
    m = _SIZE.match(str(extra.get("Hires resize", "")))
    same = ("", "Use same sampler", "Use same scheduler")
    sampler = extra.get("Hires sampler")
    schedule = extra.get("Hires schedule type")
    return Hires(scale=_float(extra.get("Hires upscale")) if extra.get("Hires upscale") else 2.0,
                 resize=(int(m.group(1)), int(m.group(2))) if m else None,
                 upscaler=extra.get("Hires upscaler") or "Latent",
                 steps=_int(extra["Hires steps"]) if extra.get("Hires steps") else None,
                 strength=strength if strength is not None else 0.7,
                 sampler=None if sampler in (None, *same) else sampler,
                 schedule=None if schedule in (None, *same) else schedule,
                 prompt=extra.get("Hires prompt") or None, negative_prompt=extra.get("Hires negative prompt") or None,
                 cfg=_float(extra["Hires CFG Scale"]) if extra.get("Hires CFG Scale") else None)


def request_from_infotext(parsed: dict):
    """A parsed infotext (`parse_infotext` / `read_png_settings`, any source) -> the GenerationRequest that
    repeats its text-to-image settings (A1111's "send to txt2img"). Images (init image, mask, image prompt)
    are not in the text, so image-to-image settings are not carried; names go through the one name table
    when the request is resolved."""
    from ..request import GenerationRequest, MicroConditions

    extra = parsed.get("extra", {})

    def hw(key):  # infotext writes sizes "WxH"; the request holds (H, W)
        m = _SIZE.match(str(extra.get(key, "")))
        return (int(m.group(2)), int(m.group(1))) if m else None

    crop = hw("Crop")  # written "LEFTxTOP" -> (top, left)
    sigmas = tuple(float(v) for v in str(extra["Sigmas"]).split(",")) if extra.get("Sigmas") else None
    eta = _float(extra.get("Eta")) if extra.get("Eta") not in (None, "") else None
    return GenerationRequest(
        prompt=parsed.get("prompt", ""), negative_prompt=parsed.get("negative_prompt") or None,
        steps=parsed.get("steps"), cfg=parsed.get("cfg"), seed=parsed.get("seed"), width=parsed.get("width"),
        height=parsed.get("height"), sampler=parsed.get("sampler"),
        schedule=None if sigmas is not None else parsed.get("schedule"), sigmas=sigmas, eta=eta,
        guidance_rescale=parsed.get("guidance_rescale") or 0.0,
        hires=hires_from_infotext(extra, _float(extra["Denoising strength"]) if extra.get("Denoising strength")
                                  else None),
        conditions=MicroConditions(original_size=hw("Original size"), target_size=hw("Target size"),
                                   crop=crop if crop is not None else (0, 0)),
    )


def save_png(image: Image.Image, path: str | Path, parameters: str) -> Path:
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", parameters)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, pnginfo=info)
    return path


# ==================================================================================================
# Reading: infotext (ours, A1111, sd.cpp), ComfyUI graphs, image files
# ==================================================================================================
#
# Every reader returns the same normalised dict:
#   prompt, negative_prompt   str ("" when absent)
#   steps, seed, width, height  int or None
#   cfg, guidance_rescale     float (guidance_rescale 0.0 when absent)
#   sampler                   our name (euler, euler_ancestral, heun, dpmpp_2m, dpmpp_2m_sde, ddim,
#                             ddpm, lcm) when the source name has one, else the source's name as is
#   schedule                  leading trailing linspace karras exponential when there is a clear
#                             equivalent, else the source's name as is
#   model, model_hash         str or None
#   clip_skip                 int (1 when absent, as A1111)
#   source                    "stablexl" | "a1111" | "sd.cpp" | "comfyui"
#   image                     {"format", "width", "height"} of the file (read_png_settings only)
#   extra                     every other key as written (infotext: str values), in file order
#   defaults                  A1111 keys that were missing and what A1111 takes them to be
#                             (only for source "a1111" with a parameters line; {} otherwise)

class MetadataError(ValueError):
    """An image file that cannot be read, or that holds no generation settings (one-line message)."""


# A1111 reads a missing key as this value (peers.md §2.3 rule 5); groups apply only when the
# feature shows up in the text at all.
_A1111_DEFAULTS = {"RNG": "GPU", "VAE Encoder": "Full", "VAE Decoder": "Full"}
_A1111_HIRES_DEFAULTS = {"Hires sampler": "Use same sampler", "Hires checkpoint": "Use same checkpoint",
                         "Hires prompt": "", "Hires negative prompt": ""}
_A1111_INPAINT_DEFAULTS = {"Mask mode": "Inpaint masked", "Masked content": "original",
                           "Inpaint area": "Whole picture", "Masked area padding": "32"}

# One `Key: value` pair of the parameters line: keys are \w[\w \-/]+, values JSON-quoted or comma-free.
_PAIR = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')
_BARE = re.compile(r'\s*([^,:"]+?)\s*(?:,|$)')  # a key written bare because its value equals its name
_SIZE = re.compile(r"^(\d+)x(\d+)$")
_NEG = "Negative prompt:"


def _unquote(v: str) -> str:
    v = v.strip()
    if len(v) >= 2 and v[0] == '"' and v[-1] == '"':
        try:
            s = json.loads(v)
        except ValueError:
            return v
        if isinstance(s, str):
            return s
    return v


def _pairs(line: str) -> tuple[list[tuple[str, str]], int]:
    """Split a parameters line into (key, value) pairs; also returns how many were `Key: value` pairs."""
    out, n, pos = [], 0, 0
    line = line.rstrip("\r")
    while pos < len(line):
        if not line[pos:].strip():
            break
        m = _PAIR.match(line, pos)
        if m:
            out.append((m.group(1).strip(), _unquote(m.group(2))))
            n += 1
        else:
            m = _BARE.match(line, pos)
            if m and m.group(1).strip():
                out.append((m.group(1).strip(), m.group(1).strip()))
            else:  # unparseable text: skip to the next comma
                nxt = line.find(",", pos)
                if nxt < 0:
                    break
                pos = nxt + 1
                continue
        if m.end() == pos:
            break
        pos = m.end()
    return out, n


def _int(v):
    try:
        return int(str(v).strip())
    except ValueError:
        try:
            f = float(str(v).strip())
        except ValueError:
            return v
        return int(f) if f.is_integer() else f


def _float(v):
    try:
        return float(str(v).strip())
    except ValueError:
        return v


# infotext key -> (our field, converter); keys not listed here go to `extra` verbatim
def _name(v: str) -> str | None:
    return v or None


_FIELDS = {"Steps": ("steps", _int), "CFG scale": ("cfg", _float), "Seed": ("seed", _int),
           "Model": ("model", _name), "Model hash": ("model_hash", _name), "Clip skip": ("clip_skip", _int),
           "Guidance rescale": ("guidance_rescale", _float)}


def _empty(source: str) -> dict:
    return {"prompt": "", "negative_prompt": "", "steps": None, "sampler": None, "schedule": None, "cfg": None,
            "seed": None, "width": None, "height": None, "model": None, "model_hash": None, "clip_skip": 1,
            "guidance_rescale": 0.0, "source": source, "extra": {}, "defaults": {}}


def parse_infotext(text: str) -> dict:
    """Parse A1111-style `parameters` text (ours, A1111's, sd.cpp's) into the normalised dict above.

    Grammar (reference/peers.md §2.3): prompt lines up to a line starting `Negative prompt:`; negative
    prompt lines up to the last line; the last line holds the `Key: value` pairs, but only if it has at
    least 3 of them (otherwise it is part of the prompt / negative prompt). Lines are kept as written
    (A1111 strips them; we do not, so prompts round-trip exactly), except for the one space after
    `Negative prompt:` and a `\r` ending a line (CRLF text). A prompt that itself contains a line starting `Negative prompt:` cannot be told
    apart from a negative prompt: that ambiguity is the format's.
    """
    lines = [ln[:-1] if ln.endswith("\r") else ln for ln in text.rstrip("\r\n").split("\n")]
    pairs, n = _pairs(lines[-1])
    if n >= 3:
        lines.pop()
    else:
        pairs = []
    prompt, negative, in_neg = [], [], False
    for line in lines:
        if not in_neg and line.startswith(_NEG):
            in_neg = True
            line = line[len(_NEG):]
            line = line[1:] if line.startswith(" ") else line
        (negative if in_neg else prompt).append(line)
    keys = dict(pairs)
    version = keys.get("Version", "")
    sampler_text = keys.get("Sampler")
    sampler, implied, dialect = normalise_sampler(sampler_text) if sampler_text is not None else (None, None, "")
    source = "stablexl" if version.startswith("stablexl") else "sd.cpp" if dialect == "sd.cpp" else "a1111"

    res = _empty(source)
    res["prompt"] = "\n".join(prompt)
    res["negative_prompt"] = "\n".join(negative)
    res["sampler"] = sampler
    stype = keys.get("Schedule type")
    if not pairs:
        res["schedule"] = None
    elif stype is None or (implied is not None and stype.lower() == "automatic"):
        # a missing Schedule type is A1111's "Automatic" (sd.cpp writes its schedule in the sampler)
        res["schedule"] = implied if implied is not None or dialect == "sd.cpp" else "leading"
    else:
        res["schedule"] = normalise_schedule(stype)
    for k, v in pairs:
        if k in ("Sampler", "Schedule type"):
            continue
        if k == "Size" and _SIZE.match(v):
            w, h = _SIZE.match(v).groups()
            res["width"], res["height"] = int(w), int(h)
        elif k in _FIELDS:
            field, conv = _FIELDS[k]
            res[field] = conv(v)
        else:
            res["extra"][k] = v
    if source == "a1111" and pairs:
        defaults = {k: v for k, v in _A1111_DEFAULTS.items() if k not in keys}
        if any(k.startswith("Hires ") for k in keys):
            defaults.update({k: v for k, v in _A1111_HIRES_DEFAULTS.items() if k not in keys})
        if "Mask blur" in keys:
            defaults.update({k: v for k, v in _A1111_INPAINT_DEFAULTS.items() if k not in keys})
        res["defaults"] = defaults
    return res


# ---- ComfyUI ---------------------------------------------------------------------------------------
#
# The PNG `prompt` chunk holds the "API format" graph: {node_id: {"class_type": str, "inputs": {...},
# "_meta"?: {"title": str}}} with string node ids; an input is a literal or a link
# [source_node_id, output_index]. The `workflow` chunk holds the editor's graph (nodes with positions
# and widgets_values, links as [link_id, from_node, from_slot, to_node, to_slot, type]); we only
# report that it is there.

_SAMPLER_NODES = ("KSampler", "KSamplerAdvanced")
_TEXT_NODES = ("CLIPTextEncode", "CLIPTextEncodeSDXL", "CLIPTextEncodeSDXLRefiner")
_CKPT_NODES = {"CheckpointLoaderSimple": "ckpt_name", "CheckpointLoader": "ckpt_name",
               "unCLIPCheckpointLoader": "ckpt_name", "UNETLoader": "unet_name"}
_LATENT_NODES = ("EmptyLatentImage", "EmptySD3LatentImage")


def _is_link(v) -> bool:
    return isinstance(v, list) and len(v) == 2 and isinstance(v[0], (str, int)) and isinstance(v[1], int)


class _Graph:
    def __init__(self, graph: dict):
        self.g = {str(k): v for k, v in graph.items() if isinstance(v, dict)}

    def node(self, link) -> tuple[dict, int] | tuple[None, None]:
        if not _is_link(link):
            return None, None
        n = self.g.get(str(link[0]))
        return (n, link[1]) if isinstance(n, dict) else (None, None)

    @staticmethod
    def inputs(n: dict) -> dict:
        i = n.get("inputs")
        return i if isinstance(i, dict) else {}

    def literal(self, v, depth: int = 0):
        """A literal input, or the literal behind a link to a value node (primitive, seed, string...)."""
        if not _is_link(v):
            return v
        n, _ = self.node(v)
        if n is None or depth > 8:
            return None
        ins = self.inputs(n)
        for key in ("value", "seed", "noise_seed", "int", "float", "string", "text", "number"):
            if key in ins:
                return self.literal(ins[key], depth + 1)
        return None

    def texts(self, link, want: int | None = None, seen=None) -> list[str]:
        """Prompt texts feeding a CONDITIONING link, through combine / control-net / area nodes."""
        seen = set() if seen is None else seen
        n, out = self.node(link)
        if n is None or id(n) in seen:
            return []
        seen.add(id(n))
        ins = self.inputs(n)
        ct = n.get("class_type")
        if ct in _TEXT_NODES:
            if ct == "CLIPTextEncodeSDXL":
                g, l_ = self.literal(ins.get("text_g")), self.literal(ins.get("text_l"))
                parts = [t for t in (g, l_) if isinstance(t, str)]
                return parts[:1] if len(parts) == 2 and parts[0] == parts[1] else parts
            t = self.literal(ins.get("text"))
            return [t] if isinstance(t, str) else []
        if "positive" in ins and "negative" in ins:  # e.g. ControlNetApplyAdvanced: outputs 0/1
            return self.texts(ins["positive" if out == 0 else "negative"], None, seen)
        found = []
        for k, v in ins.items():
            if _is_link(v) and ("conditioning" in k.lower() or k in ("positive", "negative")):
                found += self.texts(v, None, seen)
        return found

    def model_chain(self, link) -> tuple[str | None, list[str], float | None]:
        """(checkpoint name, LoRAs as 'name:strength', RescaleCFG multiplier) upstream of a MODEL link."""
        loras, rescale = [], None
        for _ in range(64):
            n, _o = self.node(link)
            if n is None:
                break
            ins, ct = self.inputs(n), n.get("class_type")
            if ct in _CKPT_NODES:
                name = self.literal(ins.get(_CKPT_NODES[ct]))
                return (name if isinstance(name, str) else None), loras[::-1], rescale
            if ct in ("LoraLoader", "LoraLoaderModelOnly"):
                loras.append(f"{self.literal(ins.get('lora_name'))}:{self.literal(ins.get('strength_model'))}")
            if ct == "RescaleCFG":
                rescale = self.literal(ins.get("multiplier"))
            link = ins.get("model")
        return None, loras[::-1], rescale

    def clip_skip(self, link) -> int:
        """Follow a text encoder's CLIP input to CLIPSetLastLayer (-1 = clip skip 1, -2 = 2...)."""
        for _ in range(64):
            n, _o = self.node(link)
            if n is None:
                break
            ins = self.inputs(n)
            if n.get("class_type") == "CLIPSetLastLayer":
                v = self.literal(ins.get("stop_at_clip_layer"))
                return -int(v) if isinstance(v, (int, float)) else 1
            link = ins.get("clip")
        return 1

    def latent(self, link) -> tuple[dict | None, list[str]]:
        """(EmptyLatentImage-like node, class types passed through) upstream of a LATENT link."""
        path = []
        for _ in range(64):
            n, _o = self.node(link)
            if n is None:
                break
            ct, ins = n.get("class_type"), self.inputs(n)
            if ct in _LATENT_NODES:
                return n, path
            path.append(ct)
            link = ins.get("latent_image", ins.get("samples"))
        return None, path


def _first_text_node(g: _Graph, link, seen=None):
    n, _ = g.node(link)
    seen = set() if seen is None else seen
    if n is None or id(n) in seen:
        return None
    seen.add(id(n))
    if n.get("class_type") in _TEXT_NODES:
        return n
    for v in _Graph.inputs(n).values():
        if _is_link(v):
            hit = _first_text_node(g, v, seen)
            if hit is not None:
                return hit
    return None


def parse_comfyui_prompt(graph: dict) -> dict:
    """Normalised settings from a ComfyUI API-format graph (the PNG `prompt` chunk).

    Finds the KSampler / KSamplerAdvanced nodes; the first pass (the one whose latent does not come out
    of another sampler; lowest node id on ties) gives the main settings, later passes (SDXL refiner,
    hires fix) are listed in extra["passes"]. Text comes from CLIPTextEncode(SDXL) nodes behind the
    sampler's `positive` / `negative` inputs, the checkpoint from the loader behind `model` (LoRAs and
    RescaleCFG on the way are reported), the size from EmptyLatentImage behind `latent_image`.
    """
    if not isinstance(graph, dict):
        raise MetadataError("ComfyUI prompt chunk is not a JSON object of nodes")
    g = _Graph(graph)
    samplers = [(k, n) for k, n in g.g.items() if n.get("class_type") in _SAMPLER_NODES]
    if not samplers:
        raise MetadataError("ComfyUI graph has no KSampler / KSamplerAdvanced node (custom sampler nodes are "
                            "not understood)")

    def order(item):
        k, n = item
        _lat, path = g.latent(_Graph.inputs(n).get("latent_image"))
        later = any(ct in _SAMPLER_NODES for ct in path)
        return (later, int(k) if k.isdigit() else float("inf"), k)

    samplers.sort(key=order)
    res = _empty("comfyui")
    extra = res["extra"]

    def one(k, n) -> dict:
        ins = _Graph.inputs(n)
        raw_sampler, raw_sched = g.literal(ins.get("sampler_name")), g.literal(ins.get("scheduler"))
        model, loras, rescale = g.model_chain(ins.get("model"))
        d = {"node": k, "class_type": n.get("class_type"),
             "seed": g.literal(ins.get("seed", ins.get("noise_seed"))), "steps": g.literal(ins.get("steps")),
             "cfg": g.literal(ins.get("cfg")),
             "sampler": COMFY_SAMPLER.get(raw_sampler, raw_sampler) if isinstance(raw_sampler, str) else raw_sampler,
             "schedule": normalise_schedule(raw_sched) if isinstance(raw_sched, str) else raw_sched,
             "sampler_name": raw_sampler, "scheduler": raw_sched, "model": model, "loras": loras, "rescale": rescale}
        for key in ("denoise", "start_at_step", "end_at_step", "add_noise", "return_with_leftover_noise"):
            if key in ins:
                d[key] = g.literal(ins[key])
        return d

    k0, n0 = samplers[0]
    first = one(k0, n0)
    ins0 = _Graph.inputs(n0)
    pos, neg = g.texts(ins0.get("positive")), g.texts(ins0.get("negative"))
    res["prompt"], res["negative_prompt"] = "\n".join(pos), "\n".join(neg)
    for f in ("steps", "sampler", "schedule", "cfg", "seed", "model"):
        res[f] = first[f]
    if isinstance(res["cfg"], int):
        res["cfg"] = float(res["cfg"])
    if first["rescale"] is not None:
        res["guidance_rescale"] = float(first["rescale"])
    enc = _first_text_node(g, ins0.get("positive"))
    if enc is not None:
        res["clip_skip"] = g.clip_skip(_Graph.inputs(enc).get("clip"))
    lat, path = g.latent(ins0.get("latent_image"))
    if lat is not None:
        li = _Graph.inputs(lat)
        res["width"], res["height"] = g.literal(li.get("width")), g.literal(li.get("height"))
        if g.literal(li.get("batch_size")) not in (None, 1):
            extra["batch_size"] = g.literal(li.get("batch_size"))
    elif path:
        extra["latent_from"] = path[-1]  # e.g. VAEEncode: an img2img graph, size from the input image
    extra["sampler_name"], extra["scheduler"] = first["sampler_name"], first["scheduler"]
    if first["loras"]:
        extra["loras"] = first["loras"]
    for key in ("denoise", "start_at_step", "end_at_step"):
        if key in first:
            extra[key] = first[key]
    extra["sampler_node"] = f"{k0} ({first['class_type']})"
    passes = []
    for k, n in samplers[1:]:
        d = one(k, n)
        passes.append({key: d[key] for key in ("node", "class_type", "model", "steps", "cfg", "sampler",
                                               "schedule", "seed", "denoise", "start_at_step", "end_at_step")
                       if d.get(key) is not None})
    if passes:
        extra["passes"] = passes
    return res


# ---- image files -----------------------------------------------------------------------------------

def decode_user_comment(raw) -> str | None:
    """EXIF UserComment (8-byte charset id, then text) as A1111 writes it for JPEG / WebP -> str."""
    if isinstance(raw, str):
        return raw
    if not isinstance(raw, (bytes, bytearray)) or not raw:
        return None
    head, body = bytes(raw[:8]), bytes(raw[8:])
    if head == b"UNICODE\0":
        if body[:2] in (b"\xfe\xff", b"\xff\xfe"):
            return body.decode("utf-16")
        # no BOM: UTF-16 big-endian per the EXIF spec (and piexif); guess little-endian from the zeros
        even, odd = body[0::2].count(0), body[1::2].count(0)
        return body.decode("utf-16-le" if odd > even else "utf-16-be", errors="replace")
    if head in (b"ASCII\0\0\0", b"\0" * 8):
        return body.decode("utf-8", errors="replace").rstrip("\0")
    return bytes(raw).decode("utf-8", errors="replace").rstrip("\0")


def _exif_texts(im: Image.Image) -> dict[str, str]:
    """parameters (EXIF UserComment, A1111) and prompt/workflow (IFD0 `prompt:{...}` strings, ComfyUI WebP)."""
    out: dict[str, str] = {}
    try:
        exif = im.getexif()
    except Exception:  # noqa: BLE001 - a broken EXIF block is just no metadata
        return out
    try:
        comment = decode_user_comment(exif.get_ifd(0x8769).get(0x9286))
    except Exception:  # noqa: BLE001
        comment = None
    if comment and comment.strip("\0 "):
        out["parameters"] = comment
    for v in exif.values():
        if isinstance(v, str):
            for key in ("prompt", "workflow"):
                if v.startswith(key + ":") and key not in out:
                    out[key] = v[len(key) + 1:]
    return out


def read_image_texts(path: str | Path) -> tuple[dict[str, str], dict]:
    """(text metadata, {"format", "width", "height"}) of an image: PNG tEXt/iTXt/zTXt, EXIF otherwise.

    Raises MetadataError for a missing file, a directory, a non-image and a truncated / corrupt image.
    """
    path = Path(path)
    if not path.exists():
        raise MetadataError(f"{path}: no such file; check the path")
    if path.is_dir():
        raise MetadataError(f"{path}: is a directory; pass an image file")
    try:
        im = Image.open(path)
    except Image.UnidentifiedImageError:
        raise MetadataError(f"{path}: not an image (or a truncated one); pass a PNG, JPEG or WebP file") from None
    except Image.DecompressionBombError as e:
        raise MetadataError(f"{path}: image too large for Pillow's safety limit ({e})") from None
    except Exception as e:  # noqa: BLE001 - Pillow raises many types for broken files
        raise MetadataError(f"{path}: cannot open image ({e}); the file is corrupt, re-export it") from None
    with im:
        try:
            im.load()  # also reads text chunks after the image data, and checks the data is all there
        except Exception as e:  # noqa: BLE001
            raise MetadataError(f"{path}: {im.format or 'image'} is truncated or corrupt ({e}); "
                                f"copy or re-export the complete file") from None
        texts = {k: v for k, v in getattr(im, "text", {}).items() if isinstance(v, str)}
        texts.update({k: v for k, v in im.info.items() if isinstance(v, str) and k not in texts})
        for k, v in _exif_texts(im).items():
            texts.setdefault(k, v)
        return texts, {"format": im.format, "width": im.width, "height": im.height}


def read_png_settings(path: str | Path) -> dict:
    """Generation settings stored in an image: the normalised dict (see above).

    Looks, in order, at the `parameters` text (ours, A1111, sd.cpp, Fooocus in A1111 mode; for JPEG /
    WebP the EXIF UserComment A1111 writes), then ComfyUI's `prompt` graph. ComfyUI's `workflow`
    chunk is reported in extra["workflow"]. Raises MetadataError (a ValueError) with a one-line
    message for a missing / unreadable / truncated file or one without generation settings.
    """
    texts, image = read_image_texts(path)
    has_workflow = "workflow" in texts
    params = texts.get("parameters")
    if params is not None and params.strip():
        res = parse_infotext(params)
        if "prompt" in texts:
            res["extra"].setdefault("comfyui", "prompt graph present too")
    elif "prompt" in texts:
        try:
            graph = json.loads(texts["prompt"])
        except ValueError as e:
            raise MetadataError(f"{path}: ComfyUI `prompt` text is not valid JSON ({e}); the metadata is damaged") \
                from None
        try:
            res = parse_comfyui_prompt(graph)
        except MetadataError as e:
            raise MetadataError(f"{path}: {e}") from None
    elif has_workflow:
        res = _empty("comfyui")
        res["extra"]["note"] = ("only the ComfyUI editor workflow is stored (no API `prompt` graph); "
                                "load it in ComfyUI to see the settings")
    else:
        raise MetadataError(f"{path}: no generation metadata (no `parameters` or ComfyUI `prompt` text, no EXIF "
                            f"UserComment); it was saved without metadata or the metadata was stripped")
    if has_workflow:
        try:
            wf = json.loads(texts["workflow"])
            nodes = wf.get("nodes") if isinstance(wf, dict) else None
            res["extra"]["workflow"] = f"present ({len(nodes)} nodes)" if isinstance(nodes, list) else "present"
        except ValueError:
            res["extra"]["workflow"] = "present (not valid JSON)"
    res["image"] = image
    return res
