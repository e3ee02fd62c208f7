"""int8 weights (stablexl/quant.py): every kernel against fp32, the miniature end to end, saving and loading."""

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from stablexl.io.checkpoint import CheckpointError
from stablexl.io.models import QUANTIZE_KEY, save_model
from stablexl.pipeline import Pipeline
from stablexl.quant import KERNELS, QuantizedLinear, int8_kernel, quantize_rows

rel = lambda a, b: ((a.float() - b.float()).norm() / b.float().norm()).item()  # noqa: E731


@pytest.fixture(scope="module")
def mini():
    return Pipeline.from_pretrained("mini", device="cpu")


@pytest.fixture(scope="module")
def mini_int8():
    return Pipeline.from_pretrained("mini", device="cpu", quantize="int8")


def test_quantize_rows_is_symmetric_int8():
    w = torch.randn(16, 32)
    q, s = quantize_rows(w)
    assert q.dtype == torch.int8 and q.abs().max() == 127 and s.shape == (16, 1)
    assert ((q.float() * s - w).abs() <= s / 2 + 1e-7).all()  # rounding: half a step of each row's scale, at most


# Per-layer relative error against fp32 on Gaussian inputs (measured: dequant 4e-3, int_mm 8.5e-3, fbgemm with
# its 7-bit activations 2.3e-2); the bounds leave room for other seeds, not for a broken kernel (~1).
BOUNDS = {"dequant": 1e-2, "int_mm": 2e-2, "fbgemm": 5e-2}


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("rows", [3, 40])  # int_mm needs more than 16 rows; fewer take the dequant path
def test_every_kernel_matches_fp32(kernel, rows, monkeypatch):
    monkeypatch.setenv("STABLEXL_INT8_KERNEL", kernel)
    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 96)
    x = torch.randn(2, rows, 64)
    q = QuantizedLinear.from_linear(lin)
    y = q(x)
    assert y.shape == (2, rows, 96) and y.dtype == x.dtype
    assert rel(y, lin(x)) < BOUNDS[kernel]
    assert rel(q.dequantized(), lin.weight) < 1e-2


def test_kernel_choice(monkeypatch):
    monkeypatch.delenv("STABLEXL_INT8_KERNEL", raising=False)
    assert int8_kernel(torch.device("cpu")) in KERNELS
    assert int8_kernel(torch.device("cuda")) == "int_mm"
    monkeypatch.setenv("STABLEXL_INT8_KERNEL", "fast")
    with pytest.raises(ValueError, match="use one of int_mm, fbgemm, dequant"):
        int8_kernel(torch.device("cpu"))


def test_scales_stay_fp32_under_a_dtype_cast():
    q = QuantizedLinear.from_linear(torch.nn.Linear(8, 8)).half()
    assert q.scale.dtype == torch.float32 and q.qweight.dtype == torch.int8 and q.bias.dtype == torch.float16


def test_the_fbgemm_weight_is_repacked_when_the_state_changes(monkeypatch):
    monkeypatch.setenv("STABLEXL_INT8_KERNEL", "fbgemm")
    a, b = torch.nn.Linear(16, 16), torch.nn.Linear(16, 16)
    q = QuantizedLinear.from_linear(a)
    x = torch.randn(20, 16)
    q(x)
    q.load_state_dict(QuantizedLinear.from_linear(b).state_dict())
    assert rel(q(x), b(x)) < BOUNDS["fbgemm"]


def test_mini_int8_quantises_the_unet_and_stays_close(mini, mini_int8):
    assert mini_int8.parts.quantized == {"unet": "int8"}
    kinds = {type(m).__name__ for m in mini_int8.parts.unet.modules()}
    assert "QuantizedLinear" in kinds and "Linear" not in kinds  # every Linear of the mini UNet has widths % 8 == 0
    assert all(type(m) is torch.nn.Linear for te in mini_int8.parts.text_encoders for m in te.modules()
               if "Linear" in type(m).__name__)
    kw = dict(seed=3, steps=8)
    a, b = mini("grinning face", **kw), mini_int8("grinning face", **kw)
    err = rel(b.latents, a.latents)
    print(f"mini, 8 steps: int8 latents vs fp32 rel err {err:.3e}")
    assert 0 < err < 0.1


def test_int8_file_saves_and_loads_as_int8(mini_int8, tmp_path):
    path = save_model(mini_int8.parts, tmp_path / "mini-int8.safetensors", dtype="fp16")
    with safe_open(str(path), "pt") as f:
        assert json.loads(f.metadata()[QUANTIZE_KEY]) == {"unet": "int8"}
        key = next(k for k in f.keys() if k.endswith(".qweight"))
        assert f.get_tensor(key).dtype == torch.int8
        assert f.get_tensor(key.replace("qweight", "scale")).dtype == torch.float32  # not cast to fp16
    again = Pipeline.from_pretrained(path, device="cpu")  # no quantize= needed: the file says int8
    assert again.parts.quantized == {"unet": "int8"}
    sd_a, sd_b = mini_int8.parts.unet.state_dict(), again.parts.unet.state_dict()
    for k in sd_a:
        if k.endswith(("qweight", "scale")):
            assert torch.equal(sd_a[k], sd_b[k]), k
    with pytest.raises(ValueError, match="only be saved in the stablexl format"):
        save_model(mini_int8.parts, tmp_path / "x.safetensors", fmt="single-file")


def test_corrupt_quantize_metadata_is_refused(mini_int8, tmp_path):
    path = save_model(mini_int8.parts, tmp_path / "m.safetensors")
    with safe_open(str(path), "pt") as f:
        meta = dict(f.metadata())
    tensors = load_file(str(path))
    meta[QUANTIZE_KEY] = json.dumps({"unet": "int4"})
    save_file(tensors, str(tmp_path / "bad.safetensors"), metadata=meta)
    with pytest.raises(CheckpointError, match="unreadable stablexl.quantize metadata"):
        Pipeline.from_pretrained(tmp_path / "bad.safetensors", device="cpu")
    del meta[QUANTIZE_KEY]  # int8 tensors where the model expects floats
    save_file(tensors, str(tmp_path / "bad2.safetensors"), metadata=meta)
    with pytest.raises(CheckpointError):
        Pipeline.from_pretrained(tmp_path / "bad2.safetensors", device="cpu")


def test_quantize_options_are_checked():
    with pytest.raises(ValueError, match="unknown quantize mode 'int4'"):
        Pipeline.from_pretrained("tiny-sdxl", quantize="int4")
    with pytest.raises(ValueError, match="quantize_text=True needs quantize='int8'"):
        Pipeline.from_pretrained("tiny-sdxl", quantize_text=True)
    p = Pipeline.from_pretrained("tiny-sdxl", device="cpu", quantize="int8", quantize_text=True)
    assert set(p.parts.quantized) == {"unet", "text_encoders.0", "text_encoders.1"}
    assert p("a cat", steps=2, seed=1, width=64, height=64).images[0].size == (64, 64)


def test_cli_generate_int8(tmp_path):
    from stablexl.cli import main

    out = tmp_path / "a.png"
    assert main(["generate", "grinning face", "--steps", "2", "--seed", "1", "--quantize", "int8", "--quiet",
                 "--output", str(out)]) == 0
    assert out.is_file()
