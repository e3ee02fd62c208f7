"""The native job API (/v1) on the real tiny pipelines: jobs, progress, previews, events, cancellation, and every
pipeline option reachable (img2img, inpainting, refiner hand-off, micro-conditioning, latents, variations)."""

from __future__ import annotations

import base64
import json
import time

import numpy as np
import torch
from PIL import Image

from stablexl.config import PRESETS
from stablexl.models.parts import build_parts
from stablexl.pipeline import Pipeline

from .conftest import client, decode_png, png_b64, wait_job


def _generate(c, **body) -> dict:
    r = c.post("/v1/generate", json=body)
    assert r.status_code == 202, r.text
    assert r.headers["location"] == f"/v1/jobs/{r.json()['id']}"
    return wait_job(c, r.json()["id"])


def _pixels(job: dict, k: int = 0) -> np.ndarray:
    return np.asarray(decode_png(job["images"][k]["image"]).convert("RGB"), dtype=np.int16)


def test_generate_returns_job_then_images_with_infotext():
    with client() as c:
        r = c.post("/v1/generate", json={"prompt": "a red fox", "steps": 3, "seed": 7, "batch": 2,
                                         "sampler": "DPM++ 2M Karras", "negative_prompt": "blurry"})
        assert r.status_code == 202
        first = r.json()
        assert first["state"] in ("queued", "running") and first["images"] == []
        assert first["settings"]["seed"] == 7 and first["settings"]["sampler"] == "dpmpp_2m"
        job = wait_job(c, first["id"])
        assert job["state"] == "succeeded", job
        assert job["progress"] == {"step": 3, "total": 3, "fraction": 1.0}
        assert [i["seed"] for i in job["images"]] == [7, 8]
        for k, out in enumerate(job["images"]):
            img = decode_png(out["image"])
            assert img.size == (64, 64) and (out["width"], out["height"]) == (64, 64)
            assert img.text["parameters"] == out["infotext"]
            lines = out["infotext"].split("\n")
            assert lines[0] == "a red fox" and lines[1] == "Negative prompt: blurry"
            for needle in (f"Seed: {7 + k}", "Steps: 3", "Sampler: DPM++ 2M", "Schedule type: Karras", "Size: 64x64",
                           "Model: tiny-sdxl"):
                assert needle in lines[2]
        assert "randomly initialised" in job["notes"][0]
        # the same request again gives the same pixels (seeded)
        again = _generate(c, prompt="a red fox", steps=3, seed=7, batch=2, sampler="DPM++ 2M Karras",
                          negative_prompt="blurry")
        assert np.array_equal(_pixels(job, 1), _pixels(again, 1))


def test_running_job_reports_progress_eta_and_preview():
    with client() as c:
        job_id = c.post("/v1/generate", json={"prompt": "x", "steps": 40, "seed": 1}).json()["id"]
        seen = None
        for _ in range(2000):
            j = c.get(f"/v1/jobs/{job_id}").json()
            if j["state"] == "running" and j["progress"]["step"] >= 3:
                seen = j
                break
            assert j["state"] in ("queued", "running"), j
            time.sleep(0.01)
        assert seen is not None, "never saw the job running past step 3"
        assert seen["progress"]["total"] == 40 and 0 < seen["progress"]["fraction"] < 1
        assert seen["eta_seconds"] is not None and seen["eta_seconds"] > 0
        preview = decode_png(seen["preview"])
        assert preview.format == "PNG" and preview.size == (64, 64)
        assert c.get(f"/v1/jobs/{job_id}", params={"preview": "false"}).json()["preview"] is None
        done = wait_job(c, job_id)
        assert done["state"] == "succeeded" and done["preview"] is None and done["eta_seconds"] is None


def test_event_stream_sends_progress_with_previews_then_done():
    with client() as c:
        c.post("/v1/generate", json={"prompt": "first", "steps": 10})  # keeps ours queued until we listen
        job_id = c.post("/v1/generate", json={"prompt": "x", "steps": 20, "seed": 2}).json()["id"]
        events = []
        with c.stream("GET", f"/v1/jobs/{job_id}/events") as r:
            assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
            kind = None
            for line in r.iter_lines():
                if line.startswith("event: "):
                    kind = line[7:]
                elif line.startswith("data: "):
                    events.append((kind, json.loads(line[6:])))
        kinds = [k for k, _ in events]
        assert kinds[0] == "state" and events[0][1]["state"] == "queued"
        assert kinds[-1] == "done" and kinds.count("done") == 1
        progress = [e for k, e in events if k == "progress"]
        assert progress, kinds
        steps = [e["progress"]["step"] for e in progress]
        assert steps == sorted(steps) and steps[-1] <= 20
        assert any(e["preview"] for e in progress)
        decode_png(next(e["preview"] for e in progress if e["preview"]))
        final = events[-1][1]
        assert final["state"] == "succeeded" and len(final["images"]) == 1


def test_cancel_running_job_stops_at_next_step():
    with client() as c:
        job_id = c.post("/v1/generate", json={"prompt": "x", "steps": 300, "seed": 3}).json()["id"]
        wait_job(c, job_id, states=("running",))
        r = c.delete(f"/v1/jobs/{job_id}")
        assert r.status_code == 200 and r.json()["cancel_requested"] is True
        done = wait_job(c, job_id, timeout=20)
        assert done["state"] == "cancelled" and done["images"] == []
        assert done["progress"]["step"] < 300
        # deleting a finished job forgets it
        assert c.delete(f"/v1/jobs/{job_id}").status_code == 200
        assert c.get(f"/v1/jobs/{job_id}").status_code == 404


def test_img2img_and_inpainting_keep_unmasked_pixels():
    src = Image.new("RGB", (64, 64), (200, 30, 30))
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (16, 16, 48, 48))
    with client() as c:
        job = _generate(c, prompt="x", init_image=png_b64(src), strength=0.5, steps=4, seed=1)
        assert job["state"] == "succeeded", job
        assert "Denoising strength: 0.5" in job["images"][0]["infotext"]
        inpaint = _generate(c, prompt="x", init_image=png_b64(src), mask=png_b64(mask), strength=0.75, steps=4,
                            seed=1, mask_blur=0)
        px = _pixels(inpaint)
        assert tuple(px[2, 2]) == (200, 30, 30), "outside the mask the init image is kept exactly"
        assert tuple(px[32, 32]) != (200, 30, 30)
        inverted = _generate(c, prompt="x", init_image=png_b64(src), mask=png_b64(mask), strength=0.75, steps=4,
                             seed=1, mask_invert=True)
        px = _pixels(inverted)
        assert tuple(px[32, 32]) == (200, 30, 30) and tuple(px[2, 2]) != (200, 30, 30)
        # a non-square init image and no size given: the output takes the image's size
        wide = _generate(c, prompt="x", init_image=png_b64(Image.new("RGB", (100, 52), "blue")), strength=0.5,
                         steps=2)
        assert decode_png(wide["images"][0]["image"]).size == (96, 48)


def test_default_strength_that_leaves_no_step_is_refused_before_queueing():
    src = Image.new("RGB", (64, 64), "white")
    with client() as c:
        # no strength: the model's SDXL default 0.3 x 2 steps leaves no step; resolve says so at once
        r = c.post("/v1/generate", json={"prompt": "x", "init_image": png_b64(src), "steps": 2})
        assert r.status_code == 422, r.text
        detail = r.json()["detail"][0]
        assert detail["loc"] == ["body", "strength"] and "steps x strength = 2 x 0.3" in detail["msg"]
        assert "raise steps to at least 4" in detail["msg"]


def test_pipeline_value_error_inside_job_becomes_failed_state(monkeypatch):
    def fail(self, req, seeds, **kw):
        raise ValueError("found late: this input cannot be sampled")

    with client() as c:
        monkeypatch.setattr(Pipeline, "_run", fail)
        job = _generate(c, prompt="x", steps=2)
        assert job["state"] == "failed"
        assert "found late" in job["error"] and job["images"] == []


def test_refiner_handoff_and_aesthetic_score():
    with client(models=["tiny-sdxl", "tiny-refiner"]) as c:
        jobs = [_generate(c, prompt="x", steps=4, seed=5, refiner="tiny-refiner", refiner_switch_at=0.5,
                          aesthetic_score=a) for a in (3.0, 9.0)]
        for job in jobs:
            assert job["state"] == "succeeded", job
            assert job["progress"]["step"] == job["progress"]["total"] == 4  # base steps + refiner steps
            text = job["images"][0]["infotext"]
            assert "Model: tiny-sdxl" in text and "Refiner: tiny-refiner" in text and "Refiner switch at: 0.5" in text
        assert not np.array_equal(_pixels(jobs[0]), _pixels(jobs[1])), "aesthetic score reaches the refiner"

        # the same hand-off by hand: base -> latents -> refiner, equal to the one-job refiner (Euler draws no noise)
        base = _generate(c, prompt="x", steps=4, seed=5, denoising_end=0.5, output_type="latent")
        assert base["state"] == "succeeded" and base["images"] == []
        lat = base["latents"]
        assert lat["shape"] == [1, 4, 8, 8] and lat["dtype"] == "float32"
        assert len(base64.b64decode(lat["data"])) == 4 * 4 * 8 * 8
        refined = _generate(c, prompt="x", model="tiny-refiner", steps=4, seed=5, denoising_start=0.5,
                            latents={"shape": lat["shape"], "data": lat["data"]}, aesthetic_score=3.0)
        assert refined["state"] == "succeeded", refined
        assert np.array_equal(_pixels(refined), _pixels(jobs[0]))


def test_refiner_as_sdedit_equals_the_pipeline():
    with client(models=["tiny-sdxl", "tiny-refiner"]) as c:
        job = _generate(c, prompt="x", steps=4, seed=5, refiner="tiny-refiner", refiner_mode="sdedit",
                        refiner_strength=0.5, sampler="euler_ancestral")
        assert job["state"] == "succeeded", job
        assert job["progress"]["step"] == job["progress"]["total"] == 4 + 2  # all base steps, then 4 x 0.5
        text = job["images"][0]["infotext"]
        assert "Refiner: tiny-refiner" in text and "Refiner mode: sdedit" in text and "Refiner strength: 0.5" in text
        assert "Refiner switch at" not in text
        base, refiner = Pipeline.from_pretrained("tiny-sdxl"), Pipeline.from_pretrained("tiny-refiner")
        want = base.refine(refiner, "x", mode="sdedit", refiner_strength=0.5, steps=4, seed=5,
                           sampler="euler_ancestral", width=64, height=64)
        assert np.array_equal(_pixels(job), np.asarray(want.images[0]))
        bad = c.post("/v1/generate", json={"prompt": "x", "refiner": "tiny-refiner", "refiner_mode": "nope"})
        assert bad.status_code == 422 and "refiner_mode" in bad.text


def test_micro_conditioning_reaches_the_pipeline():
    with client() as c:
        ref = _pixels(_generate(c, prompt="x", steps=2, seed=9))
        assert np.array_equal(ref, _pixels(_generate(c, prompt="x", steps=2, seed=9, original_size=[64, 64],
                                                     target_size=[64, 64], crop=[0, 0])))
        for extra in ({"original_size": [32, 48]}, {"crop": [8, 4]}, {"target_size": [128, 128]},
                      {"negative_original_size": [16, 16], "negative_prompt": "y"}, {"guidance_rescale": 0.7}):
            job = _generate(c, prompt="x", steps=2, seed=9, **extra)
            assert job["state"] == "succeeded", (extra, job)
            assert not np.array_equal(ref, _pixels(job)), extra
        text = _generate(c, prompt="x", steps=2, seed=9, original_size=[32, 48])["images"][0]["infotext"]
        assert "Original size: 48x32" in text  # infotext sizes are width x height


def _unclip_with_image_encoder(name: str):
    # the tiny-unclip preset is built without a CLIP image encoder (as official unCLIP single files), so
    # Pipeline.from_pretrained("tiny-unclip") cannot make variations; build one that can, with random weights
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        parts = build_parts(PRESETS[name], device="cpu", with_image_encoder=True).eval()
    return Pipeline(parts, name=name)


def test_variations_with_unclip_model():
    face = Image.new("RGB", (64, 64), (20, 120, 220))
    with client(models=["tiny-unclip"], loader=_unclip_with_image_encoder) as c:
        a = _generate(c, prompt="", image_prompt=png_b64(face), noise_level=0, steps=2, seed=1)
        b = _generate(c, prompt="", image_prompt=png_b64(face), noise_level=500, steps=2, seed=1)
        assert a["state"] == b["state"] == "succeeded", (a, b)
        assert "Noise level: 500" in b["images"][0]["infotext"]
        assert not np.array_equal(_pixels(a), _pixels(b))
        r = c.post("/v1/generate", json={"prompt": "x", "steps": 2})
        assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "image_prompt"]


def test_models_samplers_and_server_info():
    with client(models=["tiny-sdxl", "tiny-refiner"]) as c:
        models = c.get("/v1/models").json()
        assert [m["name"] for m in models] == ["tiny-sdxl", "tiny-refiner"]
        assert models[0]["default"] and not models[1]["default"]
        assert models[1]["family"] == "sdxl-refiner" and models[0]["size_multiple"] == 8
        s = c.get("/v1/samplers").json()
        names = {x["name"]: x["a1111_name"] for x in s["samplers"]}
        assert names["euler_ancestral"] == "Euler a" and names["dpmpp_2m"] == "DPM++ 2M"
        assert {x["name"] for x in s["schedules"]} >= {"karras", "leading", "trailing"}
        info = c.get("/v1/server").json()
        assert info["limits"] == {"max_width": 128, "max_height": 128, "max_steps": 300, "max_batch": 4}
        assert c.get("/openapi.json").json()["paths"].keys() >= {"/v1/generate", "/sdapi/v1/txt2img"}


def test_a_few_step_model_is_served_with_its_turbo_defaults(tmp_path):
    """A distilled model (here: tiny-sdxl's weights with the few-step sampling `train add` writes) is offered with
    its defaults, and a request that names only a prompt runs 1 step, no CFG, on the trailing schedule."""
    import dataclasses as dc

    from stablexl.config import FEW_STEP_SAMPLING
    from stablexl.io.models import save_model

    parts = Pipeline.from_pretrained("tiny-sdxl").parts
    parts.config = dc.replace(parts.config, sampling=FEW_STEP_SAMPLING)
    path = save_model(parts, tmp_path / "student.safetensors")
    with client(models=[str(path)], loader=lambda name: Pipeline.from_pretrained(name)) as c:
        (m,) = c.get("/v1/models").json()
        assert m["defaults"] == {"steps": 1, "cfg": 0.0, "sampler": "lcm", "schedule": "trailing"}
        job = _generate(c, prompt="a red fox", seed=3, model=m["name"])
        assert job["state"] == "succeeded", job
        s = job["settings"]
        assert (s["steps"], s["cfg"], s["sampler"], s["schedule"]) == (1, 0.0, "lcm", "trailing")
        assert "Steps: 1" in job["images"][0]["infotext"]
