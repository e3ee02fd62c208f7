"""Limits and bad input: every refused field is a 4xx JSON error that names the field, never a 5xx."""

from __future__ import annotations

import base64
import io
import json

import pytest
from PIL import Image

from .conftest import client, png_b64

IMG64 = png_b64(Image.new("RGB", (64, 64), "white"))


def _huge_png() -> str:
    # 5000 x 4000 = 20 Mpx of black compresses to a small file; the server must refuse it from the header
    buf = io.BytesIO()
    Image.new("L", (5000, 4000), 0).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def _truncated_png() -> str:
    raw = base64.b64decode(IMG64)
    return base64.b64encode(raw[: len(raw) // 2]).decode()


NATIVE_CASES = [
    ({"width": 256}, "width", "at most 128"),
    ({"height": 200}, "height", "at most 128"),
    ({"width": 60}, "width", "multiple of 8"),
    ({"height": 0}, "height", "greater than or equal to 1"),
    ({"steps": 301}, "steps", "between 1 and 300"),
    ({"batch": 5}, "batch", "at most 4 images"),
    ({"model": "sd_xl_base_1.0"}, "model", "unknown model"),
    ({"refiner": "nope"}, "refiner", "unknown model"),
    ({"sampler": "Euler b"}, "sampler", "unknown sampler"),
    ({"schedule": "cosine"}, "schedule", "unknown schedule"),
    ({"init_image": "not base64!"}, "init_image", "not valid base64"),
    ({"init_image": base64.b64encode(b"hello world").decode()}, "init_image", "not an image"),
    ({"init_image": _truncated_png()}, "init_image", "truncated"),
    ({"init_image": None, "mask": IMG64}, "mask", "needs init_image"),
    ({"init_image": IMG64, "mask": png_b64(Image.new("L", (32, 64)))}, "mask", "must match"),
    ({"init_image": IMG64, "strength": 0.1, "steps": 5}, "strength", "no step to run"),
    ({"strength": 1.5}, "strength", "less than or equal to 1"),
    ({"cfg": float("nan")}, "cfg", None),
    ({"seed": 2**40}, "seed", None),
    ({"steps": "ten"}, "steps", "valid integer"),
    ({"prompt": None}, "prompt", "valid string"),
    ({"prompt": "\ud800"}, "prompt", "unicode"),
    ({"denoising_end": 0.5}, "denoising_end", "output_type 'latent'"),
    ({"latents": {"shape": [1, 4, 8, 8], "data": "AAAA"}}, "latents", "bytes"),
    ({"latents": {"shape": [2, 4, 8, 8], "data": base64.b64encode(bytes(4 * 512)).decode()}}, "latents", "shape"),
    ({"image_prompt": IMG64}, "image_prompt", "unCLIP"),
    ({"unknown_field": 1}, "unknown_field", "Extra inputs"),
]


@pytest.fixture(scope="module")
def c():
    with client() as c:
        yield c


@pytest.mark.parametrize("extra,field,needle", NATIVE_CASES, ids=[f"{c[1]}-{i}" for i, c in enumerate(NATIVE_CASES)])
def test_native_bad_field_is_422_naming_it(c, extra, field, needle):
    body = {"prompt": "x", "steps": 2, **extra}
    if body.get("init_image") is None:
        body.pop("init_image", None)
    if extra.get("prompt", "") is None:
        body["prompt"] = None
    r = c.post("/v1/generate", content=json.dumps(body), headers={"content-type": "application/json"})
    assert r.status_code in (404, 422), r.text
    detail = r.json()["detail"]
    locs = [d["loc"] for d in detail]
    assert any(field in loc for loc in locs), (field, detail)
    if needle:
        assert any(needle in d["msg"] for d in detail), (needle, detail)


def test_huge_image_dimensions_are_refused_before_decoding(c):
    huge = _huge_png()
    r = c.post("/v1/generate", json={"prompt": "x", "init_image": huge})
    assert r.status_code == 422 and "at most" in r.json()["detail"][0]["msg"]
    r = c.post("/sdapi/v1/img2img", json={"prompt": "x", "init_images": [huge]})
    assert r.status_code == 422 and r.json()["field"] == "init_images"
    r = c.post("/sdapi/v1/png-info", json={"image": huge})
    assert r.status_code == 422 and r.json()["field"] == "image"


@pytest.mark.parametrize("extra,field", [
    ({"width": 1000}, "width"), ({"height": 63}, "height"), ({"steps": 1000}, "steps"),
    ({"batch_size": 3, "n_iter": 2}, "batch_size"), ({"cfg_scale": "high"}, "cfg_scale"),
    ({"sampler_name": "Nope"}, "sampler_name"), ({"refiner_checkpoint": "nope"}, "refiner_checkpoint"),
    ({"seed": "abc"}, "seed"), ({"force_task_id": "../../etc"}, "force_task_id"),
])
def test_a1111_bad_field_names_it(c, extra, field):
    r = c.post("/sdapi/v1/txt2img", json={"prompt": "x", "steps": 2, **extra})
    assert 400 <= r.status_code < 500, r.text
    body = r.json()
    named = body.get("field") or " ".join(".".join(map(str, d["loc"])) for d in body["detail"])
    assert field in named, body
    assert {"error", "detail", "errors"} <= set(body)  # A1111's error keys


def test_malformed_bodies_are_4xx(c):
    assert c.post("/v1/generate", content=b"{not json", headers={"content-type": "application/json"}
                  ).status_code == 422
    assert c.post("/v1/generate", json=["a", "list"]).status_code == 422
    assert c.post("/sdapi/v1/options", json=[1, 2]).status_code == 422
    assert c.post("/sdapi/v1/txt2img", content=b"\xff\xfe", headers={"content-type": "application/json"}
                  ).status_code == 422
    r = c.post("/v1/generate", content=b"x" * 10, headers={"content-type": "application/json",
                                                           "content-length": str(200 * 1024 * 1024)})
    assert r.status_code == 413


def test_pipeline_value_error_on_sync_route_is_422():
    # strength 0.3 of 4 steps starts at step 3 and the refiner hand-off at 0.8 also ends the base at step 3:
    # the pipeline finds no step to run and raises ValueError inside the job -> 422 with its message
    with client(models=["tiny-sdxl", "tiny-refiner"]) as c:
        r = c.post("/sdapi/v1/img2img", json={"prompt": "x", "steps": 4, "denoising_strength": 0.3, "init_images": [IMG64],
                                              "refiner_checkpoint": "tiny-refiner", "refiner_switch_at": 0.8})
        assert r.status_code == 422 and r.json()["error"] == "ValueError"
        assert "no steps left to run" in r.json()["detail"]
        job = c.get(f"/v1/jobs/{r.json()['job_id']}").json()
        assert job["state"] == "failed" and "no steps left to run" in job["error"]
