"""The CLI end to end on the tiny preset and the shipped miniature (the default): PNGs with infotext, and one-line
errors for bad arguments."""

import pytest
from PIL import Image

from stablexl.cli import main


def test_generate_writes_png_with_parameters(tmp_path, capsys):
    out = tmp_path / "a.png"
    assert main(["generate", "grinning face", "--model", "tiny-sdxl", "--steps", "3", "--seed", "4", "--batch", "2",
                 "--output", str(out), "--sampler", "DPM++ 2M Karras", "--quiet"]) == 0
    for k in range(2):
        img = Image.open(tmp_path / f"a-{k}.png")
        assert img.size == (64, 64)
        text = img.text["parameters"]
        assert text.startswith("grinning face\n")
        assert f"Seed: {4 + k}" in text and "Sampler: DPM++ 2M" in text and "Schedule type: Karras" in text
    assert "randomly initialised" in capsys.readouterr().out


@pytest.mark.parametrize("mode", ["handoff", "sdedit"])
def test_generate_with_a_refiner_from_cli(tmp_path, mode):
    out = tmp_path / "r.png"
    assert main(["generate", "x", "--model", "tiny-sdxl", "--refiner", "tiny-refiner", "--refiner-mode", mode,
                 "--steps", "4", "--seed", "2", "--output", str(out), "--quiet"]) == 0
    text = Image.open(out).text["parameters"]
    assert "Model: tiny-sdxl" in text and "Refiner: tiny-refiner" in text
    if mode == "sdedit":
        assert "Refiner mode: sdedit" in text and "Refiner strength: 0.3" in text and "switch at" not in text
    else:
        assert "Refiner switch at: 0.8" in text and "Refiner mode" not in text


def test_img2img_and_inpaint_from_cli(tmp_path):
    src = tmp_path / "src.png"
    Image.new("RGB", (64, 64), (200, 30, 30)).save(src)
    mask = tmp_path / "mask.png"
    m = Image.new("L", (64, 64), 0)
    m.paste(255, (16, 16, 48, 48))
    m.save(mask)
    out = tmp_path / "inpaint.png"
    assert main(["generate", "x", "--init-image", str(src), "--mask", str(mask), "--strength", "0.75", "--steps", "4",
                 "--output", str(out), "--quiet"]) == 0
    px = Image.open(out).getpixel((2, 2))
    assert px == (200, 30, 30), "unmasked pixels are kept"


@pytest.mark.parametrize("argv,needle", [
    (["generate", "x", "--width", "65"], "width must be a positive multiple of 8"),
    (["generate", "x", "--sampler", "nope"], "unknown sampler 'nope'"),
    (["generate", "x", "--schedule", "nope"], "unknown schedule 'nope'"),
    (["generate", "x", "--steps", "ten"], "invalid int value"),
    (["generate", "x", "--init-image", "/does/not/exist.png"], "no such file"),
    (["generate", "x", "--mask", "m.png"], "--mask needs --init-image"),
    (["generate", "x", "--model", "/nope/model.safetensors"], "no such file"),
])
def test_bad_arguments_end_in_one_line(argv, needle, capsys):
    with pytest.raises(SystemExit) if "invalid int" in needle else _noop():
        code = main(argv + ["--quiet"])
        assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0], err


def test_mask_size_mismatch(tmp_path, capsys):
    src, mask = tmp_path / "s.png", tmp_path / "m.png"
    Image.new("RGB", (64, 64)).save(src)
    Image.new("L", (32, 32)).save(mask)
    assert main(["generate", "x", "--init-image", str(src), "--mask", str(mask), "--quiet"]) == 2
    assert "--mask: mask is 32x32 but the init image is 64x64" in capsys.readouterr().err


class _noop:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_seed_is_random_when_not_given(tmp_path, capsys):
    seeds = set()
    for k in range(3):
        main(["generate", "x", "--steps", "1", "--output", str(tmp_path / f"{k}.png"), "--quiet"])
        wrote = [line for line in capsys.readouterr().out.splitlines() if line.startswith("wrote ")]
        seeds.add(wrote[0].rsplit("(seed ", 1)[1].rstrip(")"))
    assert len(seeds) == 3
