"""Shared pieces of the server tests: cached tiny pipelines, an app client, a live uvicorn server in a
thread, and a gated fake pipeline for tests that must control exactly when a job advances."""

from __future__ import annotations

import base64
import dataclasses
import contextlib
import io
import socket
import threading
import time

import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image

from stablexl.config import PRESETS
from stablexl.pipeline import GenerationResult, Pipeline
from stablexl.request import resolve
from stablexl.serve import ServeConfig, create_app

_PIPES: dict[str, Pipeline] = {}
_PIPES_LOCK = threading.Lock()


def tiny_loader(name: str) -> Pipeline:
    """Pipeline.from_pretrained, once per preset for the whole session (pipelines hold no per-call state)."""
    with _PIPES_LOCK:
        if name not in _PIPES:
            _PIPES[name] = Pipeline.from_pretrained(name)
        return _PIPES[name]


def config(**kw) -> ServeConfig:
    base = dict(models=["tiny-sdxl"], max_width=128, max_height=128, max_steps=300, max_batch=4, queue_size=8,
                job_ttl=60.0, loader=tiny_loader)
    base.update(kw)
    return ServeConfig(**base)


@contextlib.contextmanager
def client(**kw):
    """TestClient with the app's lifespan (models loaded, workers running)."""
    with TestClient(create_app(config(**kw))) as c:
        yield c


@contextlib.contextmanager
def live_server(cfg: ServeConfig):
    """The app on a real uvicorn server, on a free localhost port, in a thread of this process."""
    import uvicorn

    app = create_app(cfg)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}", app
    finally:
        server.should_exit = True
        thread.join(20)
        sock.close()


def png_b64(img: Image.Image) -> str:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def decode_png(text: str) -> Image.Image:
    img = Image.open(io.BytesIO(base64.b64decode(text)))
    img.load()
    return img


def wait_job(c, job_id: str, timeout: float = 60.0, states=("succeeded", "failed", "cancelled"), **headers) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        r = c.get(f"/v1/jobs/{job_id}", headers=headers or None)
        assert r.status_code == 200, r.text
        j = r.json()
        if j["state"] in states:
            return j
        assert time.monotonic() < deadline, f"job {job_id} still {j['state']} after {timeout} s"
        time.sleep(0.02)


class GatedPipeline:
    """Stands in for a Pipeline where a test must decide when each step happens.

    Each step waits for `gate` (a threading.Event); `calls` records prompts in the order they started and
    `entered` is set when a call begins. The config is tiny-sdxl's, so the server's checks behave as for it.
    """

    def __init__(self, name: str = "tiny-sdxl"):
        self.config = PRESETS[name]
        self.name = name
        self.defaults = dataclasses.asdict(self.config.sampling_defaults)
        self.parts = type("Parts", (), {"notes": []})()
        self.gate = threading.Event()
        self.entered = threading.Event()
        self.calls: list[str] = []

    def resolve(self, request, refiner=None, limits=None):
        return resolve(request, self.config, name=self.name, refiner_config=None if refiner is None else refiner.config,
                       limits=limits)

    def generate(self, request, *, refiner=None, callback=None):
        req = self.resolve(request, refiner)
        self.calls.append(req.prompt)
        self.entered.set()
        images, seeds = [], []
        for it in range(req.iterations):
            for i in range(req.steps):
                assert self.gate.wait(30), "test never opened the gate"
                if callback is not None:
                    callback(i, req.steps, None, None)
            seeds += req.seeds(it)
            images += [Image.new("RGB", (req.width, req.height), (s % 256, 0, 0)) for s in req.seeds(it)]
        n = len(images)
        return GenerationResult(images, torch.zeros(n, 4, req.height // 8, req.width // 8), seeds, req, [])


@pytest.fixture(autouse=True)
def _free_memory():
    """Overrides tests/conftest.py's per-test gc.collect + malloc_trim (~0.15 s a test): that exists for the
    multi-GB full-size references; these tests hold only the cached tiny pipelines."""
    yield


@pytest.fixture
def gated():
    pipe = GatedPipeline()
    yield pipe
    pipe.gate.set()  # never leave a worker blocked
