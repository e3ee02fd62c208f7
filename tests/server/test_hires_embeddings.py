"""The hires fix and textual inversions over HTTP: A1111's txt2img hr_* fields and its refused upscaler names,
the native `hires` field, GET /sdapi/v1/embeddings in A1111's shape and embeddings in prompts."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from stablexl.request import Hires

from .conftest import client, decode_png, tiny_loader, wait_job


def _pixels(img) -> np.ndarray:
    return np.asarray(img.convert("RGB"))


def test_a1111_hires_fields():
    body = {"prompt": "a lighthouse", "seed": 5, "steps": 2, "width": 64, "height": 48, "sampler_name": "Euler",
            "enable_hr": True, "hr_scale": 2, "hr_upscaler": "Latent (nearest)", "hr_second_pass_steps": 2,
            "denoising_strength": 0.6, "hr_sampler_name": "Use same sampler", "hr_prompt": "", "hr_resize_x": 0,
            "hr_resize_y": 0, "hr_checkpoint_name": "Use same checkpoint"}
    with client() as c:
        r = c.post("/sdapi/v1/txt2img", json=body)
        assert r.status_code == 200, r.text
        img = decode_png(r.json()["images"][0])
        info = json.loads(r.json()["info"])
    assert img.size == (128, 96)
    assert info["denoising_strength"] == 0.6 and info["width"] == 64 and "hr_scale" not in info["ignored"]
    text = info["infotexts"][0]
    assert "Size: 64x48" in text and "Hires upscale: 2" in text and "Hires upscaler: Latent (nearest)" in text
    assert "Hires steps: 2" in text and "Denoising strength: 0.6" in text
    assert info["extra_generation_params"]["Hires upscale"] == "2"
    want = tiny_loader("tiny-sdxl")("a lighthouse", negative_prompt="", seed=5, steps=2, width=64, height=48,
                                    sampler="euler", hires=Hires(scale=2, upscaler="Latent (nearest)", steps=2,
                                                                 strength=0.6))
    assert np.array_equal(_pixels(img), _pixels(want.images[0]))


def test_a1111_hires_resize_and_off():
    with client() as c:
        r = c.post("/sdapi/v1/txt2img", json={"prompt": "x", "steps": 1, "width": 64, "height": 64, "enable_hr": True,
                                              "hr_resize_x": 96, "hr_resize_y": 80, "hr_second_pass_steps": 1})
        assert r.status_code == 200, r.text
        assert decode_png(r.json()["images"][0]).size == (96, 80)
        assert "Hires resize: 96x80" in json.loads(r.json()["info"])["infotexts"][0]
        # without enable_hr the hr_* fields do nothing, as in A1111
        r = c.post("/sdapi/v1/txt2img", json={"prompt": "x", "steps": 1, "width": 64, "height": 64, "hr_scale": 4,
                                              "hr_upscaler": "R-ESRGAN 4x+"})
        assert r.status_code == 200 and decode_png(r.json()["images"][0]).size == (64, 64)


@pytest.mark.parametrize("name", ["R-ESRGAN 4x+", "ESRGAN_4x", "SwinIR 4x", "LDSR", "None", "ScuNET"])
def test_a1111_pixel_upscalers_refused(name):
    with client() as c:
        r = c.post("/sdapi/v1/txt2img", json={"prompt": "x", "steps": 1, "enable_hr": True, "hr_upscaler": name})
    assert r.status_code == 422 and r.json()["field"] == "hr_upscaler"
    assert "Latent (bicubic antialiased)" in r.json()["detail"] and "Latent (nearest-exact)" in r.json()["detail"]


@pytest.mark.parametrize("body, field", [
    ({"hr_checkpoint_name": "other.safetensors"}, "hr_checkpoint_name"),
    ({"hr_scale": 100}, "hr_scale"),
    ({"hr_resize_x": -64}, "hr_resize_x"),
    ({"denoising_strength": 0.0}, "denoising_strength"),
])
def test_a1111_hires_bad_values(body, field):
    with client() as c:
        r = c.post("/sdapi/v1/txt2img", json={"prompt": "x", "steps": 1, "width": 64, "height": 64,
                                              "enable_hr": True, **body})
    assert r.status_code == 422 and r.json()["field"] == field, r.text


def test_a1111_hires_unknown_sampler_is_404():
    with client() as c:
        r = c.post("/sdapi/v1/txt2img", json={"prompt": "x", "steps": 1, "enable_hr": True,
                                              "hr_sampler_name": "Eular a"})
    assert r.status_code == 404 and r.json()["field"] == "hr_sampler_name" and "Euler a" in r.json()["detail"]


def test_discovery_routes():
    with client() as c:
        modes = c.get("/sdapi/v1/latent-upscale-modes").json()
        ups = c.get("/sdapi/v1/upscalers").json()
    assert [m["name"] for m in modes] == ["Latent", "Latent (antialiased)", "Latent (bicubic)",
                                          "Latent (bicubic antialiased)", "Latent (nearest)", "Latent (nearest-exact)"]
    assert [u["name"] for u in ups] == ["Lanczos", "Nearest"]


def test_native_hires_field():
    with client() as c:
        r = c.post("/v1/generate", json={"prompt": "a fox", "steps": 2, "seed": 3, "width": 64, "height": 64,
                                         "hires": {"scale": 1.5, "steps": 1, "strength": 0.5, "upscaler": "Lanczos"}})
        assert r.status_code == 202, r.text
        job = wait_job(c, r.json()["id"])
        assert job["state"] == "succeeded", job
        assert (job["images"][0]["width"], job["images"][0]["height"]) == (96, 96)
        assert job["settings"]["hires"]["upscaler"] == "Lanczos" and job["settings"]["hires"]["steps"] == 1
        bad = c.post("/v1/generate", json={"prompt": "x", "hires": {"upscaler": "4x-UltraSharp"}})
        assert bad.status_code == 422 and bad.json()["detail"][0]["loc"] == ["body", "hires", "upscaler"]


@pytest.fixture()
def embeddings(tmp_path):
    g = torch.Generator().manual_seed(0)
    save_file({"clip_l": torch.randn(2, 32, generator=g), "clip_g": torch.randn(2, 48, generator=g)},
              str(tmp_path / "goodemb.safetensors"))
    save_file({"emb_params": torch.randn(3, 768, generator=g)}, str(tmp_path / "easynegative.safetensors"))
    torch.save({"string_to_param": {"*": torch.randn(1, 768)}}, str(tmp_path / "old.pt"))
    return tmp_path


def test_embeddings_route_and_prompts(embeddings):
    with client(embeddings_dir=str(embeddings)) as c:
        listing = c.get("/sdapi/v1/embeddings").json()
        assert listing["loaded"] == {"goodemb": {"step": None, "sd_checkpoint": None, "sd_checkpoint_name": None,
                                                 "shape": 80, "vectors": 2}}
        assert listing["skipped"]["easynegative"]["shape"] == 768 and listing["skipped"]["easynegative"]["vectors"] == 3
        assert set(listing["skipped"]) == {"easynegative", "old"}
        r = c.post("/sdapi/v1/txt2img", json={"prompt": "a (goodemb:1.2) cat", "negative_prompt": "embedding:goodemb",
                                              "steps": 1, "width": 64, "height": 64})
        assert r.status_code == 200, r.text
        r = c.post("/sdapi/v1/txt2img", json={"prompt": "x", "negative_prompt": "embedding:goodem", "steps": 1})
        assert r.status_code == 404 and r.json()["field"] == "negative_prompt" and "nearest: goodemb" in r.json()["detail"]
        r = c.post("/sdapi/v1/txt2img", json={"prompt": "x", "negative_prompt": "easynegative", "steps": 1,
                                              "width": 64, "height": 64})
        assert r.status_code == 200, r.text  # the plain word of a skipped file is text, as in A1111
        r = c.post("/sdapi/v1/txt2img", json={"prompt": "x", "negative_prompt": "embedding:easynegative", "steps": 1})
        assert r.status_code == 422 and "one tensor of width 768 (an SD 1.x embedding)" in r.json()["detail"]
        r = c.post("/v1/generate", json={"prompt": "embedding:old", "steps": 1})
        assert r.status_code == 422 and "safetensors" in r.json()["detail"][0]["msg"]
        assert c.post("/sdapi/v1/refresh-embeddings").status_code == 200
    with client() as c:  # the shared tiny pipeline is reset when a server without the folder starts
        assert c.get("/sdapi/v1/embeddings").json() == {"loaded": {}, "skipped": {}}
