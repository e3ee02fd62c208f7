"""LoRA / LyCORIS loading and merging: parity with diffusers' load_lora_weights + set_adapters (and fuse_lora) on
a tiny SDXL folder, the LyCORIS / DoRA formulas written out independently, exact unloading, idempotence and the
errors for files that do not fit."""

import json
import os
import sys

import pytest
import torch
from safetensors.torch import save_file

import refconfigs as R
from stablexl.adapters.lora import LoraError, lora_names, save_lora, weight_modules
from stablexl.io.models import save_model
from stablexl.pipeline import Pipeline

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "io"))
from test_layouts import random_parts  # noqa: E402

GEN = dict(steps=3, cfg=5.0, seed=7, width=64, height=64, sampler="euler", schedule="leading")
UNET_PICK = ("attn1.to_q", "attn2.to_k", "attn2.to_out.0", "ff.net.0.proj", "ff.net.2", "proj_in", "proj_out",
             "resnets.0.conv1", "resnets.1.conv2", "time_emb_proj", "conv_shortcut", "downsamplers.0.conv",
             "upsamplers.0.conv")
TEXT_PICK = ("q_proj", "v_proj", "out_proj", "fc1", "fc2")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora") / "tiny-sdxl"
    save_model(random_parts("tiny-sdxl", seed=5), root, "diffusers")
    return root


@pytest.fixture(scope="module")
def pipe(folder):
    return Pipeline.from_pretrained(folder)


def random_layers(parts, seed, rank=4, unet=UNET_PICK, text=TEXT_PICK, alpha=2.0):
    """{our layer key: (down, up, alpha)} for the chosen UNet and text-encoder layers."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    comps = {"unet": (parts.unet, unet), **{f"text_encoders.{i}": (te, text) for i, te in enumerate(parts.text_encoders)}}
    for comp, (module, pick) in comps.items():
        for path, m in weight_modules(module).items():
            if any(path.endswith(p) for p in pick):
                w = m.weight
                k = w.shape[2:]
                down = torch.randn(rank, w.shape[1], *k, generator=g) * 0.3
                up = torch.randn(w.shape[0], rank, *([1] * len(k)), generator=g) * 0.3
                out[f"{comp}.{path}"] = (down, up, alpha)
    return out


def peft_file(path, parts, layers, alphas=None):
    """The diffusers/PEFT layout (what StableDiffusionXLPipeline.save_lora_weights writes): unet.<path>.lora_A."""
    sd, names = {}, {"text_encoders.0": "text_encoder", "text_encoders.1": "text_encoder_2"}
    for key, (down, up, _) in layers.items():
        if key.startswith("unet."):
            name = key
        else:
            comp = ".".join(key.split(".")[:2])
            rest = key[len(comp) + 1:]
            name = f"{names[comp]}.{rest}" if rest == "text_projection" else f"{names[comp]}.text_model.{rest}"
        sd[f"{name}.lora_A.weight"], sd[f"{name}.lora_B.weight"] = down.contiguous(), up.contiguous()
    meta = {"format": "pt"}
    if alphas:
        meta["lora_adapter_metadata"] = json.dumps(alphas)
    save_file(sd, str(path), metadata=meta)
    return path


def diffusers_latents(folder, files, weights, fuse=False):
    import diffusers

    ref = diffusers.StableDiffusionXLPipeline.from_pretrained(folder)
    ref.set_progress_bar_config(disable=True)
    ref.scheduler = diffusers.EulerDiscreteScheduler.from_config(ref.scheduler.config)
    for path in files:
        ref.load_lora_weights(path.parent, weight_name=path.name, adapter_name=path.stem)
    ref.set_adapters([p.stem for p in files], adapter_weights=weights)
    if fuse:
        ref.fuse_lora(components=["unet", "text_encoder", "text_encoder_2"])
    lat = ref(["a red apple"], num_inference_steps=3, guidance_scale=5.0, height=64, width=64,
              generator=[torch.Generator().manual_seed(7)], output_type="latent").images
    return lat, ref


def weights_of(parts):
    return {k: v.clone() for c, m in parts.modules().items() for k, v in m.state_dict(prefix=c + ".").items()}


def test_name_table_covers_kohya_sdxl():
    """722 kohya UNet modules (the transformer linears) and 72 + 192 text-encoder ones (reference §8)."""
    from stablexl.config import PRESETS
    from stablexl.models.parts import build_parts

    table = lora_names(build_parts(PRESETS["sdxl-base"], "meta"))
    tf = {t for n, t in table.items() if n.startswith("lora_unet_") and t.component == "unet" and
          (".transformer_blocks." in t.module or t.module.endswith(("proj_in", "proj_out")))}
    assert len(tf) == 722
    assert len({t for n, t in table.items() if n.startswith("lora_te1_")}) == 72
    assert len({t for n, t in table.items() if n.startswith("lora_te2_")}) == 192 + 1  # + text_projection
    assert table["lora_unet_output_blocks_2_2_conv"].module == "up_blocks.0.upsamplers.0.conv"
    assert table["lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q"] == \
        table["lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q"]


def test_kohya_ldm_layout_matches_diffusers(folder, pipe, tmp_path):
    """Our kohya writer (LDM names, with LoCon convs) read by diffusers and by us: same latents; two LoRAs with
    their own text / UNet strengths, one negative."""
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    save_lora(a, pipe.parts, random_layers(pipe.parts, 1))
    save_lora(b, pipe.parts, random_layers(pipe.parts, 2, rank=2, unet=("attn2.to_v", "proj_out"), alpha=None))
    want, _ = diffusers_latents(folder, [a, b], [{"unet": 0.7, "text_encoder": -0.5, "text_encoder_2": -0.5},
                                                 {"unet": -1.0, "text_encoder": 0.8, "text_encoder_2": 0.8}])
    base = pipe("a red apple", **GEN).latents
    try:
        pipe.load_lora(a, 0.7, text_strength=-0.5)
        pipe.load_lora(b, -1.0, text_strength=0.8)
        got = pipe("a red apple", **GEN)
    finally:
        pipe.unload_loras()
    assert R.rel_err(got.latents, want) <= 1e-4
    assert R.rel_err(base, want) > 1e-2  # the LoRAs changed the result
    assert 'Lora hashes: "a: ' in got.infotext(0) and "<lora:a:-0.5:0.7>" in got.infotext(0)


@pytest.mark.parametrize("with_alpha", [False, True])
def test_peft_layout_matches_diffusers_fused(folder, pipe, tmp_path, with_alpha):
    """PEFT keys (lora_A / lora_B), alphas from diffusers' lora_adapter_metadata header or none (= rank); the
    merged weights equal diffusers' fuse_lora and the latents its unfused run."""
    layers = random_layers(pipe.parts, 3, unet=("to_q", "to_k", "to_v", "to_out.0", "ff.net.2"))
    alphas = None
    if with_alpha:
        alphas = {"unet.r": 4, "unet.lora_alpha": 8, "unet.alpha_pattern": {"ff.net.2": 2},
                  "text_encoder.r": 4, "text_encoder.lora_alpha": 1, "text_encoder_2.r": 4, "text_encoder_2.lora_alpha": 4}
        for comp, mods in (("unet", ["to_q", "to_k", "to_v", "to_out.0", "ff.net.2"]),
                           ("text_encoder", list(TEXT_PICK)), ("text_encoder_2", list(TEXT_PICK))):
            alphas[f"{comp}.target_modules"] = mods
    path = peft_file(tmp_path / "p.safetensors", pipe.parts, layers, alphas)
    w = {"unet": 0.6, "text_encoder": 1.3, "text_encoder_2": 1.3}
    want, _ = diffusers_latents(folder, [path], [w])
    _, fused = diffusers_latents(folder, [path], [w], fuse=True)
    try:
        pipe.load_lora(path, 0.6, text_strength=1.3)
        got = pipe("a red apple", **GEN).latents
        ours = pipe.parts.unet.state_dict()
    finally:
        pipe.unload_loras()
    assert R.rel_err(got, want) <= 1e-4
    ref = {k.replace(".base_layer", ""): v for k, v in fused.unet.state_dict().items() if "lora_" not in k}
    key = "down_blocks.1.attentions.0.transformer_blocks.0.ff.net.2.weight"
    assert R.rel_err(ours[key], ref[key]) <= 1e-6
    assert R.rel_err(ours[key.replace("ff.net.2", "attn1.to_q")], ref[key.replace("ff.net.2", "attn1.to_q")]) <= 1e-6


def test_unload_is_bit_exact_and_twice_is_idempotent(pipe, tmp_path):
    path = tmp_path / "x.safetensors"
    save_lora(path, pipe.parts, random_layers(pipe.parts, 4))
    before = weights_of(pipe.parts)
    pipe.load_lora(path, 0.8)
    once = weights_of(pipe.parts)
    pipe.load_lora(path, 0.8)  # the same name again: replaced, not added
    assert all(torch.equal(once[k], v) for k, v in weights_of(pipe.parts).items())
    pipe.load_lora(path, -0.3)
    pipe.load_lora(path, 0.8)
    assert all(torch.equal(once[k], v) for k, v in weights_of(pipe.parts).items())
    changed = [k for k in before if not torch.equal(before[k], once[k])]
    assert len(changed) == len(random_layers(pipe.parts, 4))
    pipe.unload_loras()
    assert all(torch.equal(before[k], v) for k, v in weights_of(pipe.parts).items())


def test_switching_touches_only_changed_layers(pipe, tmp_path):
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    save_lora(a, pipe.parts, random_layers(pipe.parts, 5, unet=("attn1.to_q",), text=()))
    save_lora(b, pipe.parts, random_layers(pipe.parts, 6, unet=("attn2.to_q",), text=()))
    stack = pipe.loras
    la, lb = stack.load(a), stack.load(b)
    from stablexl.adapters.lora import Active

    n_a, n_b = len(la.layers), len(lb.layers)
    try:
        assert stack.apply([Active(la, 1, 1)]) == n_a
        assert stack.apply([Active(la, 1, 1)]) == 0  # the same set: nothing rewritten
        assert stack.apply([Active(la, 1, 1), Active(lb, 1, 1)]) == n_b
        assert stack.apply([Active(la, 1, 0.5), Active(lb, 1, 1)]) == n_a
    finally:
        stack.apply([])
    assert not stack._original and not stack._merged


def test_fp16_merge_rounds_once_and_restores(tmp_path):
    p = Pipeline.from_pretrained("tiny-sdxl", dtype="fp16", device="cpu")
    path = tmp_path / "h.safetensors"
    layers = random_layers(p.parts, 7, unet=("attn1.to_q",), text=())
    save_lora(path, p.parts, layers)
    key = next(iter(layers))
    m = p.parts.unet.get_submodule(key[len("unet."):])
    w0 = m.weight.detach().clone()
    p.load_lora(path, 0.5)
    down, up, alpha = layers[key]
    want = (w0.float() + 0.5 * alpha / down.shape[0] * (up @ down)).half()
    assert torch.equal(m.weight, want)
    p.unload_loras()
    assert torch.equal(m.weight, w0)


# ---- LyCORIS and DoRA against the published formulas (written out here, independently) --------------------

def _module(pipe, key):
    return pipe.parts.unet.get_submodule(key)


def _kohya(pipe, key):
    from stablexl.adapters.lora import Target, kohya_name

    return kohya_name(Target("unet", key), pipe.parts)


def _check_merge(pipe, tmp_path, key, tensors, want_delta, strength=0.7):
    path = tmp_path / "lyco.safetensors"
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
    w = _module(pipe, key).weight.detach().clone()
    try:
        pipe.load_lora(path, strength)
        got = _module(pipe, key).weight.detach() - w
    finally:
        pipe.unload_loras()
    assert R.rel_err(got, want_delta(w) * strength if callable(want_delta) else want_delta * strength) <= 1e-5


CONV = "down_blocks.1.resnets.0.conv1"  # 3x3, 64 -> 64
LIN = "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_k"


def test_loha_linear(pipe, tmp_path):
    g = torch.Generator().manual_seed(8)
    w = _module(pipe, LIN).weight
    o, i, r = w.shape[0], w.shape[1], 3
    a1, b1, a2, b2 = (torch.randn(s, generator=g) * 0.2 for s in ((o, r), (r, i), (o, r), (r, i)))
    n = _kohya(pipe, LIN)
    t = {f"{n}.hada_w1_a": a1, f"{n}.hada_w1_b": b1, f"{n}.hada_w2_a": a2, f"{n}.hada_w2_b": b2,
         f"{n}.alpha": torch.tensor(1.5)}
    # Hadamard product of two rank-r products (FedPara / LyCORIS LoHa), element by element
    want = torch.einsum("or,ri->oi", a1, b1) * torch.einsum("or,ri->oi", a2, b2) * (1.5 / r)
    _check_merge(pipe, tmp_path, LIN, t, want)


def test_loha_conv_tucker(pipe, tmp_path):
    g = torch.Generator().manual_seed(9)
    w = _module(pipe, CONV).weight
    o, i, r = w.shape[0], w.shape[1], 2
    t1, t2 = torch.randn(r, r, 3, 3, generator=g) * 0.3, torch.randn(r, r, 3, 3, generator=g) * 0.3
    a1, b1, a2, b2 = (torch.randn(s, generator=g) * 0.3 for s in ((r, o), (r, i), (r, o), (r, i)))
    n = _kohya(pipe, CONV)
    t = {f"{n}.hada_t1": t1, f"{n}.hada_t2": t2, f"{n}.hada_w1_a": a1, f"{n}.hada_w1_b": b1,
         f"{n}.hada_w2_a": a2, f"{n}.hada_w2_b": b2, f"{n}.alpha": torch.tensor(2.0)}

    def rebuild(tc, wa, wb):  # W[p, q, h, w] = Σ_ij t[i, j, h, w] wb[j, q] wa[i, p]
        out = torch.zeros(o, i, 3, 3)
        for a in range(r):
            for b in range(r):
                out += wa[a][:, None, None, None] * wb[b][None, :, None, None] * tc[a, b][None, None]
        return out
    _check_merge(pipe, tmp_path, CONV, t, rebuild(t1, a1, b1) * rebuild(t2, a2, b2) * (2.0 / r))


def _kron(a, b):
    """Kronecker product by blocks: block (i, j) is a[i, j] * b."""
    rows = [torch.cat([a[i, j] * b for j in range(a.shape[1])], dim=1) for i in range(a.shape[0])]
    return torch.cat(rows, dim=0)


def test_lokr_linear_factored(pipe, tmp_path):
    g = torch.Generator().manual_seed(10)
    w = _module(pipe, LIN).weight  # (64, 64)
    w1 = torch.randn(4, 2, generator=g) * 0.3  # full (a x b)
    w2a, w2b = torch.randn(16, 2, generator=g) * 0.3, torch.randn(2, 32, generator=g) * 0.3  # (c x d) at rank 2
    n = _kohya(pipe, LIN)
    t = {f"{n}.lokr_w1": w1, f"{n}.lokr_w2_a": w2a, f"{n}.lokr_w2_b": w2b, f"{n}.alpha": torch.tensor(1.0)}
    assert w.shape == (64, 64)
    _check_merge(pipe, tmp_path, LIN, t, _kron(w1, w2a @ w2b) * (1.0 / 2))


def test_lokr_full_halves_ignore_alpha(pipe, tmp_path):
    g = torch.Generator().manual_seed(11)
    w1, w2 = torch.randn(2, 4, generator=g), torch.randn(32, 16, generator=g) * 0.1
    n = _kohya(pipe, LIN)
    t = {f"{n}.lokr_w1": w1, f"{n}.lokr_w2": w2, f"{n}.alpha": torch.tensor(7.0)}
    _check_merge(pipe, tmp_path, LIN, t, _kron(w1, w2))  # both halves full: scale 1 (ComfyUI / LyCORIS)


def test_locon_tucker_mid(pipe, tmp_path):
    g = torch.Generator().manual_seed(12)
    w = _module(pipe, CONV).weight
    o, i, r = w.shape[0], w.shape[1], 3
    down, mid, up = (torch.randn(s, generator=g) * 0.3 for s in ((r, i, 1, 1), (r, r, 3, 3), (o, r, 1, 1)))
    n = _kohya(pipe, CONV)
    t = {f"{n}.lora_down.weight": down, f"{n}.lora_mid.weight": mid, f"{n}.lora_up.weight": up,
         f"{n}.alpha": torch.tensor(1.0)}
    want = torch.zeros(o, i, 3, 3)
    for m in range(r):
        for k in range(r):  # ΔW[o,i,h,w] = Σ up[o,m] mid[m,k,h,w] down[k,i]
            want += up[:, m, 0, 0][:, None, None, None] * mid[m, k][None, None] * down[k, :, 0, 0][None, :, None, None]
    _check_merge(pipe, tmp_path, CONV, t, want * (1.0 / r))


@pytest.mark.parametrize("axis", ["out", "in"])
def test_dora(pipe, tmp_path, axis):
    g = torch.Generator().manual_seed(13)
    w = _module(pipe, LIN).weight
    o, i, r = w.shape[0], w.shape[1], 2
    down, up = torch.randn(r, i, generator=g) * 0.3, torch.randn(o, r, generator=g) * 0.3
    mag = torch.rand(o, 1, generator=g) + 0.5 if axis == "out" else torch.rand(1, i, generator=g) + 0.5
    n = _kohya(pipe, LIN)
    t = {f"{n}.lora_down.weight": down, f"{n}.lora_up.weight": up, f"{n}.alpha": torch.tensor(2.0),
         f"{n}.dora_scale": mag}

    def want(w0):  # DoRA (Liu et al. 2024): m * V / ||V||, V = W + ΔW; strength scales W' - W (A1111, ComfyUI)
        v = w0 + up @ down
        norm = v.norm(dim=1, keepdim=True) if axis == "out" else v.norm(dim=0, keepdim=True)
        return mag * v / norm - w0
    _check_merge(pipe, tmp_path, LIN, t, want)


def test_peft_dora_matches_diffusers(folder, pipe, tmp_path):
    """PEFT DoRA (lora_magnitude_vector) at weight 1, against diffusers' own loading."""
    layers = random_layers(pipe.parts, 14, unet=("attn1.to_q", "ff.net.2"), text=())
    sd = {}
    for key, (down, up, _) in layers.items():
        m = pipe.parts.unet.get_submodule(key[len("unet."):])
        sd[f"{key}.lora_A.weight"], sd[f"{key}.lora_B.weight"] = down, up
        sd[f"{key}.lora_magnitude_vector"] = (m.weight + up @ down).norm(dim=1) * (1.2 + 0.1 * torch.rand(up.shape[0]))
    path = tmp_path / "d.safetensors"
    save_file(sd, str(path))
    want, _ = diffusers_latents(folder, [path], [1.0])
    try:
        pipe.load_lora(path)
        got = pipe("a red apple", **GEN).latents
    finally:
        pipe.unload_loras()
    assert R.rel_err(got, want) <= 1e-4


# ---- files that do not fit: one error, nothing changed -----------------------------------------------------

def _unchanged(pipe, fn):
    before = weights_of(pipe.parts)
    with pytest.raises(LoraError) as e:
        fn()
    assert all(torch.equal(before[k], v) for k, v in weights_of(pipe.parts).items())
    return str(e.value)


def test_pickle_is_refused(pipe, tmp_path):
    p = tmp_path / "x.pt"
    torch.save({"a": torch.zeros(1)}, p)
    assert "pickle" in _unchanged(pipe, lambda: pipe.load_lora(p))
    disguised = tmp_path / "y.safetensors"
    disguised.write_bytes(p.read_bytes())
    assert "pickle" in _unchanged(pipe, lambda: pipe.load_lora(disguised))


def test_truncated_file(pipe, tmp_path):
    p = tmp_path / "t.safetensors"
    save_lora(p, pipe.parts, random_layers(pipe.parts, 15))
    p.write_bytes(p.read_bytes()[:-100])
    assert "truncated" in _unchanged(pipe, lambda: pipe.load_lora(p))


def test_sd15_lora_on_sdxl(pipe, tmp_path):
    sd15 = Pipeline.from_pretrained("tiny-sd15")
    p = tmp_path / "sd15.safetensors"
    save_lora(p, sd15.parts, random_layers(sd15.parts, 16))
    msg = _unchanged(pipe, lambda: pipe.load_lora(p))
    assert "SD 1.x/2.x LoRA" in msg and "lora_te_text_model" in msg and "Fix:" in msg


def test_unknown_keys_and_wrong_shapes_listed_together(pipe, tmp_path):
    layers = random_layers(pipe.parts, 17, unet=("attn1.to_q",), text=())
    p = tmp_path / "u.safetensors"
    save_lora(p, pipe.parts, layers)
    from safetensors.torch import load_file

    sd = load_file(str(p))
    sd["lora_unet_not_a_layer.lora_down.weight"] = torch.zeros(2, 4)
    sd["lora_unet_not_a_layer.lora_up.weight"] = torch.zeros(4, 2)
    sd["something_else"] = torch.zeros(1)
    k = next(k for k in sd if k.endswith("attn1_to_q.lora_up.weight"))
    sd[k] = torch.zeros(sd[k].shape[0] + 1, sd[k].shape[1])
    save_file(sd, str(p))
    msg = _unchanged(pipe, lambda: pipe.load_lora(p))
    assert "lora_unet_not_a_layer" in msg and "something_else" in msg and "do not fit" in msg


def test_a_good_layer_and_a_bad_one_apply_nothing(pipe, tmp_path):
    """All or nothing: the first layers fit, a later one does not; no weight changes."""
    layers = random_layers(pipe.parts, 18)
    k = list(layers)[-1]
    down, up, a = layers[k]
    layers[k] = (down, torch.zeros(up.shape[0] + 2, *up.shape[1:]), a)
    p = tmp_path / "half.safetensors"
    save_lora(p, pipe.parts, layers)
    _unchanged(pipe, lambda: pipe.load_lora(p))


def test_quantised_layer_is_a_clear_error(tmp_path):
    p = Pipeline.from_pretrained("tiny-sdxl")
    path = tmp_path / "q.safetensors"
    layers = random_layers(p.parts, 19, unet=("attn1.to_q",), text=())
    save_lora(path, p.parts, layers)
    key = next(iter(layers))[len("unet."):]
    m = p.parts.unet.get_submodule(key)
    m.weight.data = m.weight.data.to(torch.int8)  # stands in for a quantised weight
    with pytest.raises(LoraError, match="quantis"):
        p.load_lora(path)


def test_sd15_lora_on_sd15():
    p = Pipeline.from_pretrained("tiny-sd15")
    layers = random_layers(p.parts, 20)
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "s.safetensors")
        save_lora(path, p.parts, layers)
        lora = p.load_lora(path)
        assert len(lora.layers) == len(layers)
        p.unload_loras()


def test_int8_quantised_unet_takes_the_runtime_path(tmp_path):
    """int8 layers are not refused: the LoRA is applied at run time (tests/adapters/test_lora_int8.py)."""
    quant = pytest.importorskip("stablexl.quant")
    p = Pipeline.from_pretrained("tiny-sdxl")
    path = tmp_path / "q8.safetensors"
    save_lora(path, p.parts, random_layers(p.parts, 21, unet=("attn1.to_q",), text=()))
    quant.quantize_module(p.parts.unet)
    lora = p.load_lora(path)
    assert all(p.parts.unet.get_submodule(k[len("unet."):]).lora_terms for k in lora.layers)
