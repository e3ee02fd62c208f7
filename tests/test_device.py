"""Devices and precision: explicit choices, the stored dtype never deciding, VAE upcast, a separate VAE,
offload modes, compile, and the out-of-memory fallback. Every path runs on the CPU (the suite's --device)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from stablexl.config import PRESETS
from stablexl.device import resolve_device, resolve_dtype, stream_weights, vae_dtype
from stablexl.io.checkpoint import CheckpointError
from stablexl.io.models import save_model
from stablexl.models.parts import build_parts
from stablexl.pipeline import Pipeline
from stablexl.request import GenerationRequest


def rel(a, b) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


@pytest.fixture(scope="module")
def tiny_file(tmp_path_factory):
    """tiny-sdxl with random weights, stored in fp16 (as most shared checkpoints are)."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("w") / "tiny-fp16.safetensors"
    return save_model(build_parts(PRESETS["tiny-sdxl"], device="cpu"), path, dtype="fp16")


# ---- choosing ---------------------------------------------------------------------------------------------

def test_device_names(monkeypatch):
    monkeypatch.delenv("STABLEXL_DEVICE", raising=False)
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(torch.device("cpu")).type == "cpu"
    want = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type in (want, "mps")
    with pytest.raises(ValueError, match="unknown device 'tpu'"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available.*use --device cpu"):
            resolve_device("cuda:1")
    monkeypatch.setenv("STABLEXL_DEVICE", "cpu")
    assert resolve_device("auto") == torch.device("cpu")


def test_dtype_auto_is_fp32_on_cpu_and_fp16_on_gpus(monkeypatch):
    monkeypatch.delenv("STABLEXL_DTYPE", raising=False)
    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32
    assert resolve_dtype(None, torch.device("cuda", 0)) == torch.float16
    assert resolve_dtype("auto", torch.device("mps")) == torch.float16
    assert resolve_dtype("bf16", torch.device("cuda", 0)) == torch.bfloat16
    with pytest.raises(ValueError, match="unknown dtype 'fp8'"):
        resolve_dtype("fp8", torch.device("cpu"))
    # the SDXL VAE decodes in fp32 under fp16 compute (force_upcast); bf16 has fp32's range
    assert vae_dtype(torch.float16, True) == torch.float32
    assert vae_dtype(torch.float16, False) == torch.float16
    assert vae_dtype(torch.bfloat16, True) == torch.bfloat16


def test_stored_fp16_computes_in_fp32_on_the_cpu(tiny_file, device, monkeypatch):
    """The issue's report: an fp16 file silently computed in fp16. Now the stored dtype is storage only."""
    monkeypatch.delenv("STABLEXL_DTYPE", raising=False)
    auto = Pipeline.from_pretrained(tiny_file, device="cpu")
    assert auto.dtype == torch.float32 and auto.parts.vae.dtype == torch.float32
    for m in auto.parts.modules().values():
        assert all(p.dtype == torch.float32 for p in m.parameters())
    explicit = Pipeline.from_pretrained(tiny_file, device="cpu", dtype="fp32")
    a, b = auto("x", steps=3, seed=1), explicit("x", steps=3, seed=1)
    assert torch.equal(a.latents, b.latents)


@pytest.mark.parametrize("dtype,tol", [("fp16", 1e-2), ("bf16", 5e-2)])
@pytest.mark.parametrize("name", ["tiny-sdxl", "tiny-sd15", "tiny-refiner"])
def test_reduced_precision_on_cpu_matches_fp32(name, dtype, tol, device):
    """fp16 / bf16 compute against fp32, same seeds, 4 steps. Measured here: fp16 1.1-2.4e-3, bf16 1.0-1.7e-2."""
    ref = Pipeline.from_pretrained(name, device=device, dtype="fp32")
    low = Pipeline.from_pretrained(name, device=device, dtype=dtype)
    assert low.dtype == {"fp16": torch.float16, "bf16": torch.bfloat16}[dtype]
    assert low.parts.vae.dtype == (torch.float32 if dtype == "fp16" else torch.bfloat16)
    a = low("a red apple", steps=4, seed=1)
    b = ref("a red apple", steps=4, seed=1)
    err = rel(a.latents, b.latents)
    print(f"{name} {dtype}: 4-step latent rel err {err:.2e}")
    assert err <= tol
    diff = np.abs(np.asarray(a.images[0], np.float32) - np.asarray(b.images[0], np.float32)).mean()
    assert diff < 8.0, f"mean pixel difference {diff}"


def test_noise_is_drawn_on_cpu_generators(device):
    """A seed means the same first latent on every device: diffusers' randn from a CPU generator."""
    p = Pipeline.from_pretrained("tiny-sdxl", device=device)
    seen = {}

    def cb(i, n, x, x0):
        seen.setdefault("dev", x.device)

    res = p("x", steps=1, seed=5, cfg=0, sampler="euler", schedule="trailing", callback=cb, output_type="latent")
    assert res.latents.device.type == torch.device(device).type == seen["dev"].type
    first = torch.randn((1, 4, 8, 8), generator=torch.Generator("cpu").manual_seed(5))
    assert res.noise is not None and torch.equal(torch.randn((1, 4, 8, 8), generator=torch.Generator().manual_seed(5)),
                                                 first)


# ---- a separate VAE (A1111 sd_vae) -------------------------------------------------------------------------

def test_separate_vae_from_every_layout(tmp_path, tiny_file, device):
    from stablexl.io.models import load_model

    base = Pipeline.from_pretrained(tiny_file, device=device)
    want = base("x", steps=3, seed=2)
    parts = load_model(tiny_file, dtype="fp32")
    sd = {k: v.contiguous() for k, v in parts.vae.state_dict().items()}
    save_file(sd, tmp_path / "vae-diffusers-keys.safetensors")
    single = save_model(parts, tmp_path / "single.safetensors", "single-file")
    from safetensors import safe_open

    with safe_open(str(single), "pt") as f:  # the VAE part of an official single file = an A1111 VAE file
        ldm = {k.removeprefix("first_stage_model."): f.get_tensor(k) for k in f.keys() if k.startswith("first_stage_model.")}
    save_file(ldm, tmp_path / "vae-ldm.safetensors")
    save_model(parts, tmp_path / "folder", "diffusers")
    for vae in ("vae-diffusers-keys.safetensors", "vae-ldm.safetensors", "folder", "folder/vae"):
        got = Pipeline.from_pretrained(tiny_file, device=device, vae=tmp_path / vae)("x", steps=3, seed=2)
        assert torch.equal(got.latents, want.latents)
        assert np.array_equal(np.asarray(got.images[0]), np.asarray(want.images[0])), vae
        assert any("VAE from" in n for n in got.notes)
    # another VAE's weights change the picture, not the latents
    other = {k: v + 0.05 * torch.randn_like(v) if v.ndim == 4 else v for k, v in sd.items()}
    save_file(other, tmp_path / "other.safetensors")
    got = Pipeline.from_pretrained(tiny_file, device=device, vae=tmp_path / "other.safetensors")("x", steps=3, seed=2)
    assert torch.equal(got.latents, want.latents) and not np.array_equal(np.asarray(got.images[0]),
                                                                           np.asarray(want.images[0]))


def test_separate_vae_for_another_model_is_refused(tmp_path, tiny_file):
    torch.manual_seed(1)
    sdxl_vae = build_parts(PRESETS["mini"], device="cpu").vae  # another architecture (widths differ)
    save_file({k: v.contiguous() for k, v in sdxl_vae.state_dict().items()}, tmp_path / "wrong.safetensors")
    with pytest.raises(CheckpointError, match="not a VAE for this model"):
        Pipeline.from_pretrained(tiny_file, vae=tmp_path / "wrong.safetensors")
    (tmp_path / "v.ckpt").write_bytes(b"\x80\x04not really")
    with pytest.raises(CheckpointError, match="refusing to load a pickled"):
        Pipeline.from_pretrained(tiny_file, vae=tmp_path / "v.ckpt")


def test_fp16_safe_vae_is_not_upcast(tmp_path, tiny_file):
    import json

    from stablexl.io.models import load_model

    save_model(load_model(tiny_file, dtype="fp32"), tmp_path / "m", "diffusers")
    cfg = tmp_path / "m" / "vae" / "config.json"
    d = json.loads(cfg.read_text())
    assert d["force_upcast"] is True
    d["force_upcast"] = False  # as madebyollin/sdxl-vae-fp16-fix declares
    cfg.write_text(json.dumps(d))
    p = Pipeline.from_pretrained(tiny_file, device="cpu", dtype="fp16", vae=tmp_path / "m" / "vae")
    assert p.parts.vae.dtype == torch.float16
    assert Pipeline.from_pretrained(tiny_file, device="cpu", dtype="fp16").parts.vae.dtype == torch.float32


# ---- offload, compile, out of memory -----------------------------------------------------------------------

@pytest.mark.parametrize("offload", ["model", "sequential"])
def test_offload_modes_give_the_same_images(offload, device, monkeypatch):
    ref = Pipeline.from_pretrained("tiny-sdxl", device=device)("x", steps=3, seed=3)
    calls = []
    if offload == "model":
        real_to = torch.nn.Module.to

        def spy(self, *a, **kw):
            calls.append(type(self).__name__)
            return real_to(self, *a, **kw)

        monkeypatch.setattr(torch.nn.Module, "to", spy)
    p = Pipeline.from_pretrained("tiny-sdxl", device=device, offload=offload)
    calls.clear()
    got = p("x", steps=3, seed=3)
    assert torch.equal(got.latents, ref.latents)
    if offload == "model":  # each phase brings its modules to the device and sends them home afterwards
        assert calls.count("UNet") == 2 and calls.count("CLIPTextModel") == 4 and calls.count("AutoencoderKL") == 2
    else:
        hooked = [m for m in p.parts.unet.modules() if getattr(m, "_stablexl_streamed", False)]
        assert len(hooked) > 10 and all(m._forward_pre_hooks for m in hooked)
    assert stream_weights(p.parts.unet, torch.device("cpu")) == 0 or offload == "model"  # hooks are installed once


def test_offload_name_is_checked():
    with pytest.raises(ValueError, match="unknown offload mode 'gpu'"):
        Pipeline.from_pretrained("tiny-sdxl", offload="gpu")


def test_compile_runs_the_unet_through_torch_compile(device):
    ref = Pipeline.from_pretrained("tiny-sdxl", device=device)("x", steps=2, seed=1)
    p = Pipeline.from_pretrained("tiny-sdxl", device=device, compile="eager")  # dynamo tracing without codegen
    assert p.compiled and p.parts.unet._compiled_call_impl is not None
    got = p("x", steps=2, seed=1)
    assert rel(got.latents, ref.latents) < 1e-5


def test_vae_out_of_memory_retries_in_tiles_then_says_what_to_do(device, monkeypatch, caplog):
    import stablexl.pipeline as P

    real = P.decode_latents
    tiles = []

    def flaky(vae, latents, tile=None, overlap=None):
        tiles.append(tile)
        if tile is None:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(vae, latents, tile=tile)

    p = Pipeline.from_pretrained("tiny-sdxl", device=device)
    want = p("x", steps=2, seed=1)
    monkeypatch.setattr(P, "decode_latents", flaky)
    got = p("x", steps=2, seed=1, width=128, height=128)
    assert tiles == [None, 8] and len(got.images) == 1 and got.images[0].size == (128, 128)  # 16 latents a side
    assert "retrying in tiles of 8" in caplog.text

    def always(vae, latents, tile=None, overlap=None):
        raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 123 bytes")

    monkeypatch.setattr(P, "decode_latents", always)
    with pytest.raises(MemoryError, match="ran out of memory.*smaller size or batch, --offload model"):
        p("x", steps=2, seed=1)
    monkeypatch.setattr(P, "decode_latents", real)
    assert torch.equal(p("x", steps=2, seed=1).latents, want.latents)


def test_unknown_load_options_are_refused(tiny_file):
    for name in ("tiny-sdxl", "mini", tiny_file):  # presets, the miniature and files alike
        with pytest.raises(TypeError, match="unknown option.*bogus; accepted: device, dtype"):
            Pipeline.from_pretrained(name, bogus=1)


def test_cli_device_flag(capsys):
    from stablexl.cli import main

    assert main(["generate", "x", "--model", "tiny-sdxl", "--device", "tpu", "--quiet"]) == 2
    assert "unknown device 'tpu'" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert main(["generate", "x", "--model", "tiny-sdxl", "--device", "cuda", "--quiet"]) == 2
        assert "CUDA is not available" in capsys.readouterr().err


def test_generate_request_on_the_suite_device(device):
    p = Pipeline.from_pretrained("tiny-sdxl", device=device)
    assert p.device.type == torch.device(device).type
    res = p.generate(GenerationRequest("x", steps=2, seed=1))
    assert res.latents.device.type == p.device.type and len(res.images) == 1
