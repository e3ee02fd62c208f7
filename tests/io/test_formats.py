"""Our format, dtypes, fp16 variants, the Hugging Face cache layout, and `stablexl convert`."""


import pytest
import torch
from safetensors import safe_open

from stablexl.config import ModelConfig, preset
from stablexl.io.models import CONFIG_KEY, load_model, save_model
from stablexl.models.parts import build_parts


def _same(a, b, dtype=None):
    for (name, m1), m2 in zip(a.modules().items(), b.modules().values()):
        s1, s2 = m1.state_dict(), m2.state_dict()
        assert s1.keys() == s2.keys(), name
        for k in s1:
            want = s1[k] if dtype is None else s1[k].to(dtype)
            assert torch.equal(want, s2[k]), f"{name}.{k}"


@pytest.fixture(scope="module")
def parts():
    torch.manual_seed(0)
    return build_parts(preset("tiny-sdxl"), device="cpu").eval()


def test_our_format_carries_config(parts, tmp_path):
    path = save_model(parts, tmp_path / "m.safetensors")
    with safe_open(str(path), "pt") as f:
        assert ModelConfig.from_json(f.metadata()[CONFIG_KEY]) == parts.config
        assert any(k.startswith("unet.") for k in f.keys())
    _same(parts, load_model(path))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_storage_dtypes(parts, tmp_path, dtype):
    name = {torch.float16: "fp16", torch.bfloat16: "bf16"}[dtype]
    path = save_model(parts, tmp_path / "m.safetensors", "single-file", dtype=name)
    with safe_open(str(path), "pt") as f:
        assert f.get_tensor("model.diffusion_model.out.2.weight").dtype == dtype
    loaded = load_model(path)
    assert loaded.unet.conv_out.weight.dtype == dtype
    _same(parts, loaded, dtype)
    up = load_model(path, dtype="fp32")
    assert up.unet.conv_out.weight.dtype == torch.float32


def test_diffusers_fp16_variant_and_hf_cache_layout(parts, tmp_path, monkeypatch):
    snap = tmp_path / "hub" / "models--acme--tiny-xl" / "snapshots" / "0123abcd"
    save_model(parts, snap, "diffusers", dtype="fp16")
    for f in list(snap.rglob("*.safetensors")):  # make it look like a hub repo with only fp16 variants
        f.rename(f.with_name(f.name.replace(".safetensors", ".fp16.safetensors")))
    (tmp_path / "hub" / "models--acme--tiny-xl" / "refs").mkdir()
    (tmp_path / "hub" / "models--acme--tiny-xl" / "refs" / "main").write_text("0123abcd")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    loaded = load_model("acme/tiny-xl", variant="fp16")
    assert loaded.unet.conv_in.weight.dtype == torch.float16
    _same(parts, loaded, torch.float16)
    _same(parts, load_model("acme/tiny-xl"), torch.float16)  # falls back to the only variant present


def test_loading_materialises_nothing_random(parts, tmp_path):
    """Every parameter comes from the file: loading twice gives bit-identical weights regardless of RNG."""
    path = save_model(parts, tmp_path / "m.safetensors")
    torch.manual_seed(123)
    a = load_model(path)
    torch.manual_seed(456)
    b = load_model(path)
    _same(a, b)


def test_convert_cli_between_all_formats(parts, tmp_path, capsys):
    from stablexl.cli import main

    src = save_model(parts, tmp_path / "m.safetensors")
    assert main(["convert", str(src), str(tmp_path / "sf.safetensors"), "--to", "single-file", "--dtype", "fp16"]) == 0
    assert main(["convert", str(tmp_path / "sf.safetensors"), str(tmp_path / "pipe"), "--to", "diffusers"]) == 0
    assert main(["convert", str(tmp_path / "pipe"), str(tmp_path / "back.safetensors"), "--to", "stablexl"]) == 0
    _same(parts, load_model(tmp_path / "back.safetensors"), torch.float16)
    out = capsys.readouterr().out
    assert "wrote" in out


def test_convert_cli_bad_input_is_one_line(tmp_path, capsys):
    from stablexl.cli import main

    bad = tmp_path / "x.ckpt"
    torch.save({"a": torch.zeros(1)}, bad)
    assert main(["convert", str(bad), str(tmp_path / "o.safetensors")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "arbitrary code" in err[0] and "--allow-pickle" in err[0]
