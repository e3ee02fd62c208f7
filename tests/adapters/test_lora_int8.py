"""LoRAs on int8 layers (quant.py QuantizedLinear): applied at run time, never merged. Against an fp32 twin whose
Linear weights are the int8 ones dequantised, with the same LoRA merged (exact up to fp32 rounding); against the
fp32 model within the int8 error; unloading and strength 0 give the same bits; switching rewrites only what
changes."""

import pytest
import torch
from safetensors.torch import save_file

import refconfigs as R
from stablexl.adapters.lora import Active, save_lora
from stablexl.pipeline import Pipeline
from stablexl.quant import QuantizedLinear
from test_lora import random_layers

GEN = dict(steps=3, cfg=5.0, seed=7, width=64, height=64, sampler="euler", schedule="leading")


@pytest.fixture(autouse=True)
def _dequant_kernel(monkeypatch):
    # the same int8 product on every CPU, so the fp32 twin below is exact up to rounding
    monkeypatch.setenv("STABLEXL_INT8_KERNEL", "dequant")


def int8_layers(pipe):
    return {(c, n): m for c, mod in pipe.parts.modules().items() for n, m in mod.named_modules()
            if isinstance(m, QuantizedLinear)}


def twin(pipe_int8, name, **kw):
    """The fp32 model with each quantised layer's weight replaced by its dequantised int8 value."""
    ref = Pipeline.from_pretrained(name, device="cpu", **kw)
    modules = ref.parts.modules()
    with torch.no_grad():
        for (comp, path), q in int8_layers(pipe_int8).items():
            modules[comp].get_submodule(path).weight.copy_(q.dequantized())
    return ref


@pytest.fixture(scope="module")
def tiny8():
    return Pipeline.from_pretrained("tiny-sdxl", device="cpu", quantize="int8", quantize_text=True)


@pytest.fixture(scope="module")
def fp32():  # for making files: its layers have float weights to take shapes from
    return Pipeline.from_pretrained("tiny-sdxl", device="cpu").parts


def lyco_file(path, pipe, seed):
    """One file with a LoHa, a LoKr and a DoRA layer, on quantised linears (kohya names)."""
    from stablexl.adapters.lora import Target, kohya_name

    g = torch.Generator().manual_seed(seed)
    base = "down_blocks.1.attentions.0.transformer_blocks.0."
    n = {k: kohya_name(Target("unet", base + k), pipe.parts) for k in ("attn1.to_k", "attn1.to_v", "attn2.to_q")}
    r = lambda *s: torch.randn(*s, generator=g) * 0.3  # noqa: E731
    t = {f"{n['attn1.to_k']}.hada_w1_a": r(64, 3), f"{n['attn1.to_k']}.hada_w1_b": r(3, 64),
         f"{n['attn1.to_k']}.hada_w2_a": r(64, 3), f"{n['attn1.to_k']}.hada_w2_b": r(3, 64),
         f"{n['attn1.to_k']}.alpha": torch.tensor(1.5),
         f"{n['attn1.to_v']}.lokr_w1": r(4, 2), f"{n['attn1.to_v']}.lokr_w2_a": r(16, 2),
         f"{n['attn1.to_v']}.lokr_w2_b": r(2, 32), f"{n['attn1.to_v']}.alpha": torch.tensor(1.0),
         f"{n['attn2.to_q']}.lora_down.weight": r(2, 64), f"{n['attn2.to_q']}.lora_up.weight": r(64, 2),
         f"{n['attn2.to_q']}.dora_scale": torch.rand(64, 1, generator=g) + 0.5}
    save_file({k: v.contiguous() for k, v in t.items()}, str(path))
    return path


@pytest.mark.parametrize("kind", ["lora", "lycoris"])
def test_runtime_equals_merge_into_dequantised_twin(tiny8, fp32, tmp_path, kind):
    """UNet and both (quantised) text encoders; convs in the same file are merged as before."""
    path = tmp_path / f"{kind}.safetensors"
    if kind == "lora":
        save_lora(path, fp32, random_layers(fp32, 1))
    else:
        lyco_file(path, tiny8, 2)
    ref = twin(tiny8, "tiny-sdxl")
    base = tiny8("a red apple", **GEN).latents
    try:
        lora = tiny8.load_lora(path, 0.7, text_strength=-0.5)
        ref.load_lora(path, 0.7, text_strength=-0.5)
        got, want = tiny8("a red apple", **GEN).latents, ref("a red apple", **GEN).latents
    finally:
        tiny8.unload_loras()
    runtime = [k for k in lora.layers if isinstance(_layer(tiny8, k), QuantizedLinear)]
    assert runtime  # the int8 path was taken
    assert R.rel_err(got, want) <= 1e-5
    assert R.rel_err(base, want) > 1e-2  # the LoRA changed the result


def _layer(pipe, key):
    from stablexl.adapters.lora import layer_path

    comp, path = layer_path(key)
    return pipe.parts.modules()[comp].get_submodule(path)


def test_dense_terms_for_kinds_without_low_rank(tiny8, tmp_path):
    path = lyco_file(tmp_path / "l.safetensors", tiny8, 3)
    try:
        lora = tiny8.load_lora(path)
        terms = [_layer(tiny8, k).lora_terms for k in lora.layers]
    finally:
        tiny8.unload_loras()
    assert all(len(t) == 1 and t[0][1] is None and t[0][0].shape == (64, 64) for t in terms)


def test_unload_and_strength_zero_are_bit_exact(tiny8, fp32, tmp_path):
    path = tmp_path / "x.safetensors"
    save_lora(path, fp32, random_layers(fp32, 4))
    layers = int8_layers(tiny8)
    state = {k: (m.qweight.data_ptr(), m.qweight.clone(), m.scale.clone()) for k, m in layers.items()}
    before = tiny8("a red apple", **GEN).latents
    tiny8.load_lora(path, 0.0)
    assert all(not m.lora_terms for m in layers.values())
    assert torch.equal(tiny8("a red apple", **GEN).latents, before)
    tiny8.load_lora(path, 0.9)
    assert sum(bool(m.lora_terms) for m in layers.values()) > 10
    assert not torch.equal(tiny8("a red apple", **GEN).latents, before)
    tiny8.load_lora(path, 0.9)  # the same name again: replaced, never doubled
    assert all(len(m.lora_terms) <= 1 for m in layers.values())
    tiny8.unload_loras()
    assert all(not m.lora_terms for m in layers.values())
    assert torch.equal(tiny8("a red apple", **GEN).latents, before)
    for k, m in layers.items():
        ptr, qw, sc = state[k]
        assert m.qweight.data_ptr() == ptr and torch.equal(m.qweight, qw) and torch.equal(m.scale, sc)
    assert not tiny8.loras._original and not tiny8.loras._merged


def test_switching_touches_only_changed_int8_layers(tiny8, fp32, tmp_path):
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    save_lora(a, fp32, random_layers(fp32, 5, unet=("attn1.to_q",), text=()))
    save_lora(b, fp32, random_layers(fp32, 6, unet=("attn2.to_q",), text=()))
    stack = tiny8.loras
    la, lb = stack.load(a), stack.load(b)
    try:
        assert stack.apply([Active(la, 1, 1)]) == len(la.layers)
        kept = {k: _layer(tiny8, k).lora_terms for k in la.layers}
        assert stack.apply([Active(la, 1, 1)]) == 0
        assert stack.apply([Active(la, 1, 1), Active(lb, 1, 1)]) == len(lb.layers)
        assert all(_layer(tiny8, k).lora_terms is kept[k] for k in la.layers)  # not rebuilt
        assert stack.apply([Active(la, 1, 0.5), Active(lb, 1, 1)]) == len(la.layers)
    finally:
        stack.apply([])
    assert all(not m.lora_terms for m in int8_layers(tiny8).values())


def test_mini_int8_with_lora_is_within_the_int8_error(tmp_path):
    """The shipped miniature: int8 + LoRA against fp32 + the same LoRA merged, as close as int8 alone is to fp32,
    while the LoRA moves the result much further."""
    mini, mini8 = Pipeline.from_pretrained("mini", device="cpu"), Pipeline.from_pretrained("mini", device="cpu",
                                                                                          quantize="int8")
    path = tmp_path / "m.safetensors"
    save_lora(path, mini.parts, random_layers(mini.parts, 7, rank=8, unet=("to_q", "to_v", "ff.net.2"), text=(),
                                              alpha=8.0))
    kw = dict(seed=3, steps=8)
    plain, plain8 = mini("grinning face", **kw).latents, mini8("grinning face", **kw).latents
    mini.load_lora(path, 0.05)  # random factors: 0.05 changes the picture without making it noise
    mini8.load_lora(path, 0.05)
    lora, lora8 = mini("grinning face", **kw).latents, mini8("grinning face", **kw).latents
    int8_err, err, effect = R.rel_err(plain8, plain), R.rel_err(lora8, lora), R.rel_err(lora, plain)
    print(f"mini: int8 vs fp32 {int8_err:.2e}; with LoRA {err:.2e}; LoRA effect {effect:.2e}")
    assert err < max(2 * int8_err, 1e-2) and effect > 5 * err
