"""Bad checkpoints end in one clear CheckpointError that says what is wrong and how to fix it."""

import os
import pickle

import pytest
import torch
from safetensors.torch import load_file, save_file

from stablexl.config import preset
from stablexl.io.checkpoint import CheckpointError
from stablexl.io.models import load_model, save_model
from stablexl.models.parts import build_parts


@pytest.fixture(scope="module")
def tiny_file(tmp_path_factory):
    torch.manual_seed(0)
    parts = build_parts(preset("tiny-sdxl"), device="cpu")
    path = tmp_path_factory.mktemp("ckpt") / "tiny.safetensors"
    save_model(parts, path, "single-file")
    return path, parts


def _rewrite(src, dst, edit, keep_metadata=False):
    from safetensors import safe_open

    sd = load_file(src)
    with safe_open(str(src), "pt") as f:
        meta = f.metadata() if keep_metadata else None
    edit(sd)
    save_file(sd, dst, metadata=meta)
    return dst


def test_truncated_file(tiny_file, tmp_path):
    path, _ = tiny_file
    data = path.read_bytes()
    bad = tmp_path / "truncated.safetensors"
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        load_model(bad)


def test_garbage_file(tmp_path):
    bad = tmp_path / "garbage.safetensors"
    bad.write_bytes(os.urandom(4096))
    with pytest.raises(CheckpointError, match="not a safetensors file|corrupt"):
        load_model(bad)


def test_tiny_file(tmp_path):
    bad = tmp_path / "empty.safetensors"
    bad.write_bytes(b"\x01\x02")
    with pytest.raises(CheckpointError, match="too short"):
        load_model(bad)


def test_corrupt_header_json(tiny_file, tmp_path):
    path, _ = tiny_file
    data = bytearray(path.read_bytes())
    data[8:12] = b"\xff\xfe{{"
    bad = tmp_path / "header.safetensors"
    bad.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="header"):
        load_model(bad)


def test_wrong_shape_missing_and_unexpected_keys_are_all_listed(tiny_file, tmp_path):
    path, _ = tiny_file
    key = "model.diffusion_model.input_blocks.1.0.in_layers.2.weight"
    gone = "first_stage_model.decoder.conv_out.bias"

    def edit(sd):
        sd[key] = torch.zeros(3, 3, 3, 3)
        del sd[gone]
        sd["model.diffusion_model.extra.weight"] = torch.zeros(2)

    bad = _rewrite(path, tmp_path / "shapes.safetensors", edit)
    with pytest.raises(CheckpointError) as e:
        load_model(bad, config=preset("tiny-sdxl"))
    msg = str(e.value)
    assert "1 missing" in msg and gone in msg
    assert "1 unexpected" in msg and "model.diffusion_model.extra.weight" in msg
    assert "1 wrong shape" in msg and key in msg and "[3, 3, 3, 3]" in msg


def test_wrong_model_type_for_full_size_detection(tiny_file, tmp_path):
    """A tiny SDXL-layout file without our metadata is detected as SDXL base and refused, loudly."""
    path, _ = tiny_file
    bad = _rewrite(path, tmp_path / "nometa.safetensors", lambda sd: None)
    with pytest.raises(CheckpointError, match="has 3 blocks; this model reads block 31"):
        load_model(bad)
    # with the right family but the wrong sizes, every shape problem is listed
    with pytest.raises(CheckpointError, match=r"wrong shape: model\.diffusion_model\."):
        load_model(bad, config=preset("sdxl-base"))


def test_unknown_layout(tmp_path):
    bad = tmp_path / "other.safetensors"
    save_file({"transformer.h.0.attn.weight": torch.zeros(4, 4), "lm_head.weight": torch.zeros(4, 4)}, bad)
    with pytest.raises(CheckpointError, match="unknown checkpoint layout"):
        load_model(bad)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_nan_weights_rejected(tiny_file, tmp_path, value):
    path, _ = tiny_file

    def edit(sd):
        sd["first_stage_model.decoder.conv_out.bias"][0] = value

    bad = _rewrite(path, tmp_path / "nan.safetensors", edit, keep_metadata=True)
    with pytest.raises(CheckpointError, match="NaN or inf"):
        load_model(bad)


def test_large_finite_weights_are_not_mistaken_for_inf():
    """check_finite's fast path sums each tensor; a sum that overflows must fall back to the exact check."""
    from torch import nn

    from stablexl.io.checkpoint import check_finite

    m = nn.Linear(4, 4, bias=False)
    with torch.no_grad():
        m.weight.fill_(3e38)  # finite in fp32; the fp32 sum of 16 overflows, the float64 one does not
    check_finite(m, "test")
    h = nn.Linear(64, 64, bias=False).half()
    with torch.no_grad():
        h.weight.fill_(60000.0)  # fp16 max is 65504; a sum in fp16 would overflow
    check_finite(h, "test")


def test_pickle_refused_by_default_and_loaded_safely_on_opt_in(tiny_file, tmp_path):
    path, parts = tiny_file
    ckpt = tmp_path / "model.ckpt"
    torch.save({"state_dict": load_file(path)}, ckpt)
    with pytest.raises(CheckpointError, match="arbitrary code.*allow_pickle"):
        load_model(ckpt)
    loaded = load_model(ckpt, allow_pickle=True, config=preset("tiny-sdxl"))
    a, b = parts.unet.state_dict(), loaded.unet.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch /tmp/stablexl_pwned",))


def test_malicious_pickle_not_executed_even_on_opt_in(tmp_path):
    if os.path.exists("/tmp/stablexl_pwned"):
        os.unlink("/tmp/stablexl_pwned")
    bad = tmp_path / "evil.pt"
    with open(bad, "wb") as f:
        pickle.dump({"state_dict": {"x": _Evil()}}, f)
    with pytest.raises(CheckpointError, match="weights_only"):
        load_model(bad, allow_pickle=True)
    assert not os.path.exists("/tmp/stablexl_pwned")


def test_missing_path_and_uncached_repo_id(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(CheckpointError, match="no such file"):
        load_model(tmp_path / "nope.safetensors")
    with pytest.raises(CheckpointError, match="never downloads"):
        load_model("stabilityai/stable-diffusion-xl-base-1.0")


def test_unknown_extension(tmp_path):
    f = tmp_path / "model.onnx"
    f.write_bytes(b"x" * 100)
    with pytest.raises(CheckpointError, match="unknown checkpoint format"):
        load_model(f)


def test_diffusers_folder_with_pickled_weights_only(tmp_path):
    parts = build_parts(preset("tiny-sd15"), device="cpu")
    root = save_model(parts, tmp_path / "pipe", "diffusers")
    w = root / "unet" / "diffusion_pytorch_model.safetensors"
    torch.save(load_file(w), root / "unet" / "diffusion_pytorch_model.bin")
    w.unlink()
    with pytest.raises(CheckpointError, match="pickled weights are refused"):
        load_model(root)


def test_diffusers_folder_unsupported_option(tmp_path):
    import json

    parts = build_parts(preset("tiny-sd15"), device="cpu")
    root = save_model(parts, tmp_path / "pipe", "diffusers")
    cfg = json.loads((root / "unet" / "config.json").read_text())
    cfg["resnet_time_scale_shift"] = "scale_shift"
    (root / "unet" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="resnet_time_scale_shift"):
        load_model(root)
