"""An unchanged A1111 client (the `webuiapi` package) against `stablexl serve` run from the command line."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import httpx
import numpy as np
import pytest
import webuiapi
from PIL import Image

KEY = "webui-key"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def cli_server(tmp_path_factory):
    port = _free_port()
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    cmd = [sys.executable, "-m", "stablexl.cli", "serve", "--model", "tiny-sdxl", "--port", str(port),
           "--api-key", KEY, "--max-width", "128", "--max-height", "128", "--max-steps", "20", "--max-batch", "4"]
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 90
    while True:
        try:
            if httpx.get(f"{url}/", timeout=1).status_code == 200:
                break
        except httpx.TransportError:
            pass
        assert proc.poll() is None, f"stablexl serve exited:\n{log.read_text()}"
        assert time.monotonic() < deadline, f"stablexl serve did not come up:\n{log.read_text()}"
        time.sleep(0.2)
    yield port, proc, log
    proc.send_signal(signal.SIGINT)  # uvicorn shuts down gracefully (lifespan stops the workers)
    try:
        assert proc.wait(timeout=30) == 0, log.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()


def test_webuiapi_txt2img_and_img2img(cli_server):
    port, _proc, _log = cli_server
    api = webuiapi.WebUIApi(host="127.0.0.1", port=port, username="me", password=KEY, sampler="Euler a", steps=3)
    assert [m["title"] for m in api.get_sd_models()] == ["tiny-sdxl"]
    assert "DPM++ 2M" in [s["name"] for s in api.get_samplers()]

    r = api.txt2img(prompt="a small house", negative_prompt="fog", seed=21, width=64, height=64, batch_size=2,
                    cfg_scale=6, sampler_name="DPM++ 2M", scheduler="Karras")
    assert len(r.images) == 2 and all(im.size == (64, 64) for im in r.images)
    assert r.info["all_seeds"] == [21, 22] and r.info["sampler_name"] == "DPM++ 2M"
    assert "Schedule type: Karras" in r.images[1].info["parameters"] and "Seed: 22" in r.images[1].info["parameters"]
    assert r.parameters["prompt"] == "a small house"

    src = Image.new("RGB", (64, 64), (250, 200, 0))
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (20, 20, 44, 44))
    r = api.img2img(images=[src], mask_image=mask, prompt="a window", width=64, height=64, steps=4, seed=3,
                    denoising_strength=0.75, mask_blur=0)
    assert len(r.images) == 1 and r.images[0].size == (64, 64)
    px = np.asarray(r.images[0].convert("RGB"))
    assert tuple(px[2, 2]) == (250, 200, 0) and tuple(px[32, 32]) != (250, 200, 0)
    assert r.info["denoising_strength"] == 0.75

    info = api.png_info(r.images[0])  # webuiapi re-encodes the PNG with its text chunks
    assert info.info.startswith("a window\n") and info.parameters["Seed"] == 3
    assert api.get_options()["sd_model_checkpoint"] == "tiny-sdxl"
    assert api.get_progress()["progress"] == 0


def test_cli_server_needs_the_key_but_serves_the_page(cli_server):
    port, _proc, _log = cli_server
    url = f"http://127.0.0.1:{port}"
    assert httpx.get(f"{url}/").status_code == 200
    assert httpx.get(f"{url}/web/app.js").status_code == 200
    assert httpx.get(f"{url}/openapi.json").status_code == 401
    ok = httpx.get(f"{url}/openapi.json", headers={"Authorization": f"Bearer {KEY}"})
    assert ok.status_code == 200 and "/sdapi/v1/txt2img" in ok.json()["paths"]
    with pytest.raises(RuntimeError) as e:
        webuiapi.WebUIApi(host="127.0.0.1", port=port).txt2img(prompt="x", width=64, height=64, steps=1)
    assert e.value.args[0] == 401


def test_webuiapi_hires_fix(cli_server):
    """webuiapi's txt2img(enable_hr=True, ...) gets the larger image; a model upscaler is refused with 422."""
    port, _proc, _log = cli_server
    api = webuiapi.WebUIApi(host="127.0.0.1", port=port, username="me", password=KEY, sampler="Euler", steps=2)
    r = api.txt2img(prompt="a small house", seed=4, width=64, height=48, enable_hr=True, hr_scale=2,
                    hr_upscaler=webuiapi.HiResUpscaler.Latent, hr_second_pass_steps=2, denoising_strength=0.6)
    assert r.image.size == (128, 96)
    assert "Hires upscale: 2" in r.image.info["parameters"] and r.info["denoising_strength"] == 0.6
    with pytest.raises(RuntimeError) as e:
        api.txt2img(prompt="x", width=64, height=64, enable_hr=True, hr_upscaler=webuiapi.HiResUpscaler.ESRGAN_4x)
    assert e.value.args[0] == 422 and "Latent (nearest-exact)" in e.value.args[1]
