"""The hires fix (request.Hires): equal to the two passes run by hand through the Python API, A1111's target-size
and step arithmetic, every latent mode, the pixel resamplers, the checks, and the infotext both ways."""

import pytest
import torch
import torch.nn.functional as F

from stablexl.io.metadata import parse_infotext, request_from_infotext
from stablexl.pipeline import Pipeline
from PIL import Image

from stablexl.request import (LATENT_UPSCALERS, GenerationRequest, Handoff, Hires, ImageInput, Limits, RequestError,
                              hires_steps, hires_target)

G = dict(seed=7, steps=4, sampler="euler", width=64, height=48, cfg=5.0)


@pytest.fixture(scope="module")
def pipe():
    return Pipeline.from_pretrained("tiny-sdxl")


@pytest.mark.parametrize("upscaler", list(LATENT_UPSCALERS))
def test_equals_two_passes_by_hand(pipe, upscaler):
    hr = pipe("a cat", negative_prompt="fog", hires_scale=2, hires_steps=3, hires_strength=0.7,
              hires_upscaler=upscaler, **G)
    assert hr.images[0].size == (128, 96) and hr.latents.shape == (1, 4, 12, 16)
    first = pipe("a cat", negative_prompt="fog", output_type="latent", **G).latents
    mode, antialias = LATENT_UPSCALERS[upscaler]
    up = F.interpolate(first, size=(12, 16), mode=mode, antialias=antialias)
    total, strength = hires_steps(hr.request.hires)
    assert (total, int(total * strength)) == (4, 3)  # A1111: int(3 / 0.7) = 4 levels, the last 3 run
    by_hand = pipe("a cat", negative_prompt="fog", init_image=up, strength=strength,
                   **{**G, "steps": total, "width": None, "height": None})
    assert torch.equal(by_hand.latents, hr.latents)
    assert by_hand.images[0].tobytes() == hr.images[0].tobytes()


def test_hires_options_reach_the_second_pass(pipe):
    """Second-pass sampler, schedule, cfg and prompts; batch with per-image seeds."""
    hr = pipe("a cat", hires=Hires(scale=1.5, steps=2, strength=0.5, sampler="DPM++ 2M", schedule="karras",
                                   prompt="a big cat", negative_prompt="blur", cfg=3.0), batch=2, **G)
    assert len(hr.images) == 2 and hr.images[0].size == (96, 72)
    first = pipe("a cat", output_type="latent", batch=2, **G).latents
    up = F.interpolate(first, size=(9, 12), mode="bilinear")
    total, strength = hires_steps(hr.request.hires)
    by_hand = pipe("a big cat", negative_prompt="blur", init_image=up, strength=strength, steps=total, cfg=3.0,
                   sampler="dpmpp_2m", schedule="karras", seed=7, batch=2)
    assert torch.equal(by_hand.latents, hr.latents)


def test_pixel_resampler(pipe):
    """Lanczos: the decoded first pass resized with PIL, then image-to-image from those pixels."""
    hr = pipe("a cat", hires_scale=2, hires_steps=2, hires_upscaler="Lanczos", **G)
    first = pipe("a cat", **G).images[0]
    total, strength = hires_steps(hr.request.hires)
    by_hand = pipe("a cat", init_image=first.resize((128, 96), Image.LANCZOS), strength=strength,
                   **{**G, "steps": total, "width": 128, "height": 96})
    assert hr.images[0].size == (128, 96)
    assert torch.equal(by_hand.latents, hr.latents)


@pytest.mark.parametrize("w, h, hires, want", [
    (64, 48, Hires(scale=2), (128, 96, 0, 0)),
    (64, 48, Hires(scale=1.3), (80, 56, 0, 0)),  # int(83.2) -> 80, int(62.4) -> 56
    (64, 48, Hires(resize=(128, 0)), (128, 96, 0, 0)),
    (64, 48, Hires(resize=(0, 72)), (96, 72, 0, 0)),
    (64, 48, Hires(resize=(128, 128)), (168, 128, 5, 0)),  # cover 128x128, crop 40 px = 5 latent columns
    (64, 48, Hires(resize=(200, 80)), (200, 144, 0, 8)),
])
def test_target_size(w, h, hires, want):
    assert hires_target(w, h, hires) == want


def test_resize_crops_centrally(pipe):
    hr = pipe("a cat", hires_resize=(128, 128), hires_steps=2, **G)
    assert hr.images[0].size == (128, 128)


@pytest.mark.parametrize("hires, field", [
    (Hires(upscaler="R-ESRGAN 4x+"), "hires.upscaler"),
    (Hires(upscaler="ESRGAN_4x"), "hires.upscaler"),
    (Hires(upscaler="None"), "hires.upscaler"),
    (Hires(scale=0.5), "hires.scale"),
    (Hires(scale=float("nan")), "hires.scale"),
    (Hires(strength=0.0), "hires.strength"),
    (Hires(steps=-1), "hires.steps"),
    (Hires(resize=(-8, 64)), "hires.resize"),
    (Hires(scale=4), "hires.scale"),  # 256 px > the limit
    (Hires(sampler="nope"), "hires.sampler"),
    (Hires(schedule="nope"), "hires.schedule"),
])
def test_refused(pipe, hires, field):
    with pytest.raises(RequestError) as e:
        pipe.resolve(GenerationRequest("a cat", hires=hires, width=64, height=64), limits=Limits(max_width=128))
    assert e.value.field == field
    if field == "hires.upscaler":
        assert "Latent (nearest-exact)" in e.value.message and "Lanczos" in e.value.message


def test_refused_with_init_image_or_refiner(pipe):
    with pytest.raises(RequestError, match="text-to-image"):
        pipe.resolve(GenerationRequest("a", hires=Hires(), image=ImageInput(Image.new("RGB", (64, 64)))))
    with pytest.raises(RequestError, match="refiner"):
        pipe.resolve(GenerationRequest("a", hires=Hires(), output_type="latent", handoff=Handoff(denoising_end=0.5)))


def test_infotext_round_trip(pipe):
    hr = pipe("a cat", hires=Hires(scale=1.5, steps=2, strength=0.6, sampler="DPM++ 2M", prompt="a big, cat"), **G)
    text = hr.infotext(0)
    assert "Size: 64x48" in text and "Denoising strength: 0.6" in text and "Hires upscale: 1.5" in text
    assert "Hires steps: 2" in text and "Hires upscaler: Latent" in text and "Hires sampler: DPM++ 2M" in text
    assert 'Hires prompt: "a big, cat"' in text
    back = request_from_infotext(parse_infotext(text))
    again = pipe.generate(back)
    assert again.request.hires == hr.request.hires
    assert torch.equal(again.latents, hr.latents)


def test_a1111_infotext_reads():
    text = ("a cat\nSteps: 20, Sampler: Euler a, Schedule type: Automatic, CFG scale: 7, Seed: 1, Size: 512x512, "
            "Denoising strength: 0.7, Hires resize: 1024x768, Hires upscaler: Latent (nearest), Version: v1.10.1")
    req = request_from_infotext(parse_infotext(text))
    assert req.hires == Hires(resize=(1024, 768), upscaler="Latent (nearest)", strength=0.7)


def test_progress_counts_both_passes(pipe):
    calls = []
    pipe("a cat", hires_steps=3, callback=lambda i, n, x, x0: calls.append((i, n)), **G)
    assert len(calls) == 4 + 3


def test_cli_flags(tmp_path, capsys):
    from stablexl.cli import main

    out = tmp_path / "h.png"
    assert main(["generate", "a cat", "--model", "tiny-sdxl", "--steps", "2", "--seed", "1", "--width", "64",
                 "--height", "48", "--hires-scale", "1.5", "--hires-steps", "1", "--hires-strength", "0.5",
                 "--hires-upscaler", "Latent (bicubic antialiased)", "--output", str(out), "--quiet"]) == 0
    img = Image.open(out)
    assert img.size == (96, 72) and "Hires upscaler: Latent (bicubic antialiased)" in img.info["parameters"]
    assert main(["generate", "x", "--model", "tiny-sdxl", "--hires-upscaler", "R-ESRGAN 4x+", "--quiet",
                 "--output", str(tmp_path / "n.png")]) == 2
    err = capsys.readouterr().err
    assert "--hires-upscaler" in err and "Latent (nearest)" in err
