"""The AUTOMATIC1111 surface (/sdapi/v1) on the real tiny pipelines: request fields and response shape of
reference/peers.md §2.1, sampler-name mapping, progress/interrupt, options, discovery routes, png-info."""

from __future__ import annotations

import json
import threading
import time

import numpy as np
from PIL import Image

from stablexl.names import A1111_SAMPLER, SAMPLER_NAMES, SCHEDULE_NAMES, parse_schedule, resolve_sampler

from .conftest import client, decode_png, png_b64, wait_job


def test_txt2img_response_shape_seeds_and_sampler_mapping():
    with client() as c:
        r = c.post("/sdapi/v1/txt2img", json={
            "prompt": "a lighthouse", "negative_prompt": "blurry", "seed": 10, "steps": 2, "cfg_scale": 6.5,
            "width": 64, "height": 64, "batch_size": 2, "n_iter": 2, "sampler_name": "DPM++ 2M", "scheduler": "Karras",
            "styles": [], "eta": 1.0, "s_noise": 1, "s_churn": 0.5, "do_not_save_samples": True, "send_images": True})
        assert r.status_code == 200, r.text
        body = r.json()
        assert set(body) == {"images", "parameters", "info"}
        assert len(body["images"]) == 4
        info = json.loads(body["info"])
        assert info["all_seeds"] == [10, 11, 12, 13] and info["seed"] == 10
        assert info["sampler_name"] == "DPM++ 2M" and info["cfg_scale"] == 6.5 and info["steps"] == 2
        assert info["sd_model_name"] == "tiny-sdxl" and info["index_of_first_image"] == 0
        assert info["negative_prompt"] == "blurry" and len(info["infotexts"]) == 4
        for k, b64 in enumerate(body["images"]):
            img = decode_png(b64)
            assert img.size == (64, 64)
            assert img.text["parameters"] == info["infotexts"][k]
            last = info["infotexts"][k].split("\n")[-1]
            assert f"Seed: {10 + k}" in last and "Sampler: DPM++ 2M" in last and "Schedule type: Karras" in last
            assert "CFG scale: 6.5" in last
        assert body["parameters"]["prompt"] == "a lighthouse"
        # accepted for compatibility but not used: listed, not dropped silently (neutral values are not listed)
        assert info["ignored"] == ["eta", "s_churn"]
        unknown = c.post("/sdapi/v1/txt2img", json={"prompt": "x", "steps": 2, "sampler_nmae": "Euler"})
        assert unknown.status_code == 422 and unknown.json()["field"] == "sampler_nmae"
        assert "did you mean 'sampler_name'" in unknown.json()["detail"]
        # the same seed through the native API gives the same image (one pipeline behind both surfaces)
        a1111_first = np.asarray(decode_png(body["images"][0]).convert("RGB"))
        job = c.post("/v1/generate", json={"prompt": "a lighthouse", "negative_prompt": "blurry", "seed": 10,
                                           "steps": 2, "cfg": 6.5, "sampler": "dpmpp_2m", "schedule": "karras",
                                           "batch": 2}).json()  # batched like the A1111 call: same numerics
        native = np.asarray(decode_png(wait_job(c, job["id"])["images"][0]["image"]).convert("RGB"))
        assert np.array_equal(a1111_first, native)


def test_sampler_names_old_and_new_and_errors():
    with client() as c:
        for payload, sampler, schedule in (
                ({"sampler_name": "Euler a"}, "Euler a", "Automatic"),
                ({"sampler_index": "DPM++ 2M Karras"}, "DPM++ 2M", "Karras"),  # pre-1.9 name with the schedule in it
                ({"sampler_name": "Euler", "scheduler": "sgm_uniform"}, "Euler", "SGM Uniform"),
                ({"sampler_name": "k_euler_a", "scheduler": "automatic"}, "Euler a", "Automatic")):
            r = c.post("/sdapi/v1/txt2img", json={"prompt": "x", "steps": 1, **payload})
            assert r.status_code == 200, (payload, r.text)
            text = json.loads(r.json()["info"])["infotexts"][0]
            assert f"Sampler: {sampler}," in text and f"Schedule type: {schedule}" in text, (payload, text)
        r = c.post("/sdapi/v1/txt2img", json={"prompt": "x", "sampler_name": "DPM adaptive"})  # A1111's, not ours
        assert r.status_code == 404 and r.json()["field"] == "sampler_name"
        assert r.json()["detail"].startswith("Sampler not found: 'DPM adaptive'; available: DDPM, DDIM, Euler, ")
        r = c.post("/sdapi/v1/txt2img", json={"prompt": "x", "sampler_name": "Eular a"})
        assert r.status_code == 404 and "nearest: Euler a" in r.json()["detail"]
        r = c.post("/sdapi/v1/txt2img", json={"prompt": "x", "scheduler": "Karas"})
        assert r.status_code == 422 and r.json()["field"] == "scheduler" and "nearest: Karras" in r.json()["detail"]
        for field, value in (("restore_faces", True), ("tiling", True),
                             ("subseed_strength", 0.5), ("script_name", "x/y/z plot"),
                             ("alwayson_scripts", {"ControlNet": {"args": []}})):
            r = c.post("/sdapi/v1/txt2img", json={"prompt": "x", "steps": 1, field: value})
            assert r.status_code == 422 and r.json()["field"] == field, (field, r.text)


def test_img2img_inpainting_fields():
    src = Image.new("RGB", (64, 64), (10, 200, 10))
    mask = Image.new("L", (32, 32), 0)  # a different size: A1111 resizes the mask with the image
    mask.paste(255, (8, 8, 24, 24))
    with client() as c:
        base = {"prompt": "x", "steps": 4, "seed": 3, "width": 64, "height": 64, "denoising_strength": 0.75,
                "init_images": ["data:image/png;base64," + png_b64(src)], "mask_blur": 0,
                "inpainting_fill": 1, "inpaint_full_res": False}
        r = c.post("/sdapi/v1/img2img", json={**base, "mask": png_b64(mask)})
        assert r.status_code == 200, r.text
        px = np.asarray(decode_png(r.json()["images"][0]).convert("RGB"))
        assert tuple(px[1, 1]) == (10, 200, 10) and tuple(px[32, 32]) != (10, 200, 10)
        info = json.loads(r.json()["info"])
        assert info["denoising_strength"] == 0.75 and "Denoising strength: 0.75" in info["infotexts"][0]
        assert r.json()["parameters"]["init_images"] is None  # not echoed back unless include_init_images
        inv = c.post("/sdapi/v1/img2img", json={**base, "mask": png_b64(mask), "inpainting_mask_invert": 1})
        px = np.asarray(decode_png(inv.json()["images"][0]).convert("RGB"))
        assert tuple(px[32, 32]) == (10, 200, 10) and tuple(px[1, 1]) != (10, 200, 10)
        # plain img2img with crop-and-resize of a wide image
        wide = Image.new("RGB", (128, 64), (0, 0, 250))
        r = c.post("/sdapi/v1/img2img", json={"prompt": "x", "steps": 4, "width": 64, "height": 64,
                                              "init_images": [png_b64(wide)], "resize_mode": 1})
        assert r.status_code == 200 and decode_png(r.json()["images"][0]).size == (64, 64)
        for payload, field in (({"init_images": []}, "init_images"),
                               ({"init_images": ["bm90IGFuIGltYWdl"]}, "init_images"),
                               ({"init_images": [png_b64(src)], "resize_mode": 2}, "resize_mode"),
                               ({"init_images": [png_b64(src)], "mask": "%%%"}, "mask")):
            r = c.post("/sdapi/v1/img2img", json={"prompt": "x", "steps": 2, **payload})
            assert r.status_code == 422 and r.json()["field"] == field, (payload, r.text)


def test_progress_and_interrupt():
    with client() as c:
        idle = c.get("/sdapi/v1/progress").json()
        assert idle["progress"] == 0 and idle["state"]["job_count"] == 0 and idle["current_image"] is None
        result = {}
        t = threading.Thread(target=lambda: result.update(r=c.post("/sdapi/v1/txt2img",
                                                                    json={"prompt": "long", "steps": 300})))
        t.start()
        seen = None
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            p = c.get("/sdapi/v1/progress").json()
            if p["progress"] > 0 and p["current_image"]:
                seen = p
                break
            time.sleep(0.02)
        assert seen is not None, "no progress with a preview seen"
        assert seen["state"]["sampling_steps"] == 300 and 0 < seen["state"]["sampling_step"] < 300
        assert decode_png(seen["current_image"]).format == "PNG" and seen["eta_relative"] >= 0
        assert c.get("/sdapi/v1/progress", params={"skip_current_image": True}).json()["current_image"] is None
        assert c.post("/sdapi/v1/interrupt").status_code == 200
        t.join(30)
        r = result["r"]
        assert r.status_code == 200 and r.json()["images"] == []
        assert json.loads(r.json()["info"])["interrupted"] is True


def test_options_models_and_discovery_routes():
    with client(models=["tiny-sdxl", "tiny-sd15"]) as c:
        opts = c.get("/sdapi/v1/options").json()
        assert opts["sd_model_checkpoint"] == "tiny-sdxl"
        assert [m["title"] for m in c.get("/sdapi/v1/sd-models").json()] == ["tiny-sdxl", "tiny-sd15"]
        assert c.post("/sdapi/v1/options", json={"sd_model_checkpoint": "tiny-sd15", "CLIP_stop_at_last_layers": 1}
                      ).status_code == 200
        assert c.get("/sdapi/v1/options").json()["sd_model_checkpoint"] == "tiny-sd15"
        r = c.post("/sdapi/v1/txt2img", json={"prompt": "x", "steps": 1})
        assert json.loads(r.json()["info"])["sd_model_name"] == "tiny-sd15"
        r = c.post("/sdapi/v1/txt2img", json={"prompt": "x", "steps": 1,
                                              "override_settings": {"sd_model_checkpoint": "tiny-sdxl [abc123]"}})
        assert json.loads(r.json()["info"])["sd_model_name"] == "tiny-sdxl"
        r = c.post("/sdapi/v1/options", json={"sd_model_checkpoint": "sd_xl_base_1.0"})
        assert r.status_code == 422 and "unknown model" in r.json()["detail"]
        r = c.post("/sdapi/v1/txt2img", json={"prompt": "x", "override_settings": {"sd_model_checkpoint": "nope"}})
        assert r.status_code == 422 and r.json()["field"] == "override_settings.sd_model_checkpoint"
        samplers = c.get("/sdapi/v1/samplers").json()
        assert {"Euler a", "DPM++ 2M", "Euler", "DDIM"} <= {s["name"] for s in samplers}
        assert all(set(s) == {"name", "aliases", "options"} for s in samplers)
        # exactly the registered samplers, each listed name and alias resolving to it
        assert [s["name"] for s in samplers] == [A1111_SAMPLER.get(s, s) for s in SAMPLER_NAMES]
        for ours, rec in zip(SAMPLER_NAMES, samplers):
            assert rec["aliases"][0] == ours
            assert all(resolve_sampler(a) == (ours, None) for a in [rec["name"], *rec["aliases"]])
        schedulers = c.get("/sdapi/v1/schedulers").json()
        assert {"Automatic", "Karras", "SGM Uniform"} <= {s["label"] for s in schedulers}
        assert all(set(s) == {"name", "label", "aliases", "default_rho", "need_inner_model"} for s in schedulers)
        assert [parse_schedule(s["label"]) for s in schedulers] == list(SCHEDULE_NAMES)
        for ours, rec in zip(SCHEDULE_NAMES, schedulers):
            assert all(parse_schedule(a) == ours for a in [rec["name"], *rec["aliases"]])
        native = c.get("/v1/samplers").json()
        assert [s["name"] for s in native["samplers"]] == list(SAMPLER_NAMES)
        assert [s["name"] for s in native["schedules"]] == list(SCHEDULE_NAMES)
        assert c.get("/sdapi/v1/scripts").json() == {"txt2img": [], "img2img": []}


def test_png_info_round_trip():
    with client() as c:
        r = c.post("/sdapi/v1/txt2img", json={"prompt": "a (red:1.2) fox, night", "negative_prompt": "blur",
                                              "steps": 2, "seed": 42, "sampler_name": "Euler a"})
        image = r.json()["images"][0]
        info = c.post("/sdapi/v1/png-info", json={"image": image}).json()
        assert info["info"] == json.loads(r.json()["info"])["infotexts"][0]
        p = info["parameters"]
        assert p["Prompt"] == "a (red:1.2) fox, night" and p["Negative prompt"] == "blur"
        assert p["Seed"] == 42 and p["Steps"] == 2 and p["Sampler"] == "Euler a"
        assert (p["Size-1"], p["Size-2"]) == (64, 64) and p["Model"] == "tiny-sdxl"
        plain = c.post("/sdapi/v1/png-info", json={"image": png_b64(Image.new("RGB", (8, 8)))}).json()
        assert plain == {"info": "", "items": {}, "parameters": {}}
        r = c.post("/sdapi/v1/png-info", json={"image": "aGVsbG8="})
        assert r.status_code == 422 and r.json()["field"] == "image"


def test_model_hash_of_a_model_loaded_from_a_file(tmp_path):
    import torch

    from stablexl.config import PRESETS
    from stablexl.io.hashing import model_hash
    from stablexl.io.models import save_model
    from stablexl.models.parts import build_parts

    torch.manual_seed(0)
    path = save_model(build_parts(PRESETS["tiny-sdxl"], device="cpu"), tmp_path / "tiny.safetensors")
    with client(models=[str(path)], loader=None) as c:
        r = c.post("/sdapi/v1/txt2img", json={"prompt": "x", "steps": 1, "width": 64, "height": 64, "seed": 3})
        assert r.status_code == 200, r.text
        info = json.loads(r.json()["info"])
        h = model_hash(path)
        assert len(h) == 10 and info["sd_model_hash"] == h  # A1111's short hash: sha256[:10] of the file
        assert f"Model hash: {h}" in info["infotexts"][0]
        assert decode_png(r.json()["images"][0]).text["parameters"] == info["infotexts"][0]
