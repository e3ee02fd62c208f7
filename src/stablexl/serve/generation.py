"""From a request to the pipeline: the loaded models, the one resolve step per job, and the job's work.

Both HTTP surfaces translate their body into a `GenerationRequest` (stablexl.request), `resolve_request`
checks it against the loaded model and the server's limits and fills every default (so a job's settings
are concrete and limits apply to them), and `run()` executes it in the model's worker thread. A check
that fails raises `RequestError` naming the request field; each surface maps the field to its spelling.
"""

from __future__ import annotations

import inspect
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from ..request import GenerationRequest, Limits, RequestError, steps_run
from .images import png_bytes
from .preview import Previewer
from .queue import Cancelled, Job

log = logging.getLogger("stablexl.serve")


class InputError(RequestError):
    """A request the server refuses before (or besides) the pipeline's checks, with its HTTP status;
    `field` is a GenerationRequest path or the surface's own field name."""

    def __init__(self, field: str, message: str, status: int = 422):
        super().__init__(field, message)
        self.status = status


# ==================================================================================================
# Loaded models
# ==================================================================================================


def size_multiple(config) -> int:
    """Pixel sizes must be multiples of the VAE's downsampling factor (8); the UNet takes any latent size."""
    return config.vae.downsample_factor


@dataclass
class LoadedModel:
    name: str
    pipes: list  # stablexl.pipeline.Pipeline, one per device (worker slot)
    previewers: list  # Previewer | None, one per pipe

    @property
    def pipe(self):
        """The first device's pipeline (every copy has the same config and defaults)."""
        return self.pipes[0]

    @property
    def previewer(self):
        return self.previewers[0]

    @property
    def config(self):
        return self.pipe.config

    def describe(self, default: bool) -> dict:
        cfg = self.config
        return {"name": self.name, "family": cfg.family, "resolution": cfg.resolution,
                "size_multiple": size_multiple(cfg), "default": default, "defaults": dict(self.pipe.defaults),
                "devices": [str(getattr(p, "device", "cpu")) for p in self.pipes],
                "inpainting": cfg.unet.in_channels == 9, "notes": list(self.pipe.parts.notes)}


class Models:
    """The models this server serves, each loaded once per device at startup and shared by all jobs.
    `loader(name)` or `loader(name, device)` returns a Pipeline."""

    def __init__(self, names: list[str], loader: Callable, preview: str = "auto", devices: list[str] | None = None):
        if not names:
            raise ValueError("serve at least one model (--model)")
        if len(set(names)) != len(names):
            raise ValueError(f"a model is listed twice: {names}")
        self.devices = list(devices or ["auto"])
        if len(set(self.devices)) != len(self.devices):
            raise ValueError(f"a device is listed twice: {self.devices}")
        self.names, self.loader, self.preview = list(names), loader, preview
        self.loaded: dict[str, LoadedModel] = {}
        self.default = names[0]
        self._lock = threading.Lock()

    def _load(self, name: str, device: str):
        try:
            takes_device = len(inspect.signature(self.loader).parameters) >= 2
        except (TypeError, ValueError):
            takes_device = False
        return self.loader(name, device) if takes_device else self.loader(name)

    def load_all(self) -> None:
        """Load every model on every device (call from a worker thread: this is torch work)."""
        for name in self.names:
            pipes = [self._load(name, d) for d in self.devices]
            previewers = [None if self.preview == "none" else Previewer(p, self.preview) for p in pipes]
            with self._lock:
                self.loaded[name] = LoadedModel(name, pipes, previewers)
            log.info("loaded model %s (%s) on %s", name, pipes[0].config.family,
                     ", ".join(str(getattr(p, "device", "cpu")) for p in pipes))

    def get(self, name: str | None, field: str = "model") -> LoadedModel:
        name = self.default if name is None else name
        try:
            return self.loaded[name]
        except KeyError:
            raise InputError(field, f"unknown model {name!r}; this server serves: {', '.join(self.names)}") from None


# ==================================================================================================
# The checked request
# ==================================================================================================


def resolve_request(request: GenerationRequest, models: Models, limits: Limits) -> GenerationRequest:
    """The one `resolve` step (stablexl.request) against the named model (and refiner) and the server's
    limits. RequestError (a ValueError naming the request field) propagates."""
    m = models.get(request.model)
    refiner = None
    if request.handoff.refiner is not None:
        refiner = models.get(request.handoff.refiner, field="handoff.refiner")
    return m.pipe.resolve(request.replace(model=m.name), None if refiner is None else refiner.pipe, limits=limits)


# ==================================================================================================
# Running a job (worker thread)
# ==================================================================================================


@dataclass
class Output:
    images: list[dict]  # {"png": bytes, "seed", "width", "height", "infotext", "model_hash"}
    latents: tuple[list[int], bytes] | None  # (shape, float32 little-endian data), for output_type "latent"
    notes: list[str]
    request: GenerationRequest  # as it ran


class _Progress:
    """Sampler steps across stages (base + refiner) and iterations -> job.report(step, total, preview)."""

    def __init__(self, job: Job, req: GenerationRequest, previewer: Previewer | None):
        self.job, self.req, self.previewer = job, req, previewer
        self.done, self.total = 0, steps_run(req) * req.iterations
        job.report(0, self.total)

    def __call__(self, i: int, n: int, x, x0) -> None:
        if self.job.cancel_requested:
            raise Cancelled()
        self.done += 1
        self.total = max(self.total, self.done)
        preview = None
        if self.previewer is not None and x0 is not None:
            preview = self.previewer(x0, self.req.width, self.req.height, last=i == n - 1)
        self.job.report(self.done, self.total, preview)


def run(job: Job, req: GenerationRequest, models: Models) -> Output:
    """The work of one job (a resolved request), in its model's worker thread."""
    m, slot = models.get(req.model), job.slot
    refiner = models.get(req.handoff.refiner, "handoff.refiner").pipes[slot] if req.handoff.refiner else None
    result = m.pipes[slot].generate(req, refiner=refiner, callback=_Progress(job, req, m.previewers[slot]))
    images = []
    for k, img in enumerate(result.images):
        text = result.infotext(k)
        images.append({"png": png_bytes(img, text), "seed": result.seeds[k], "width": img.width,
                       "height": img.height, "infotext": text, "model_hash": result.model_hash})
    lat = result.latents.float().cpu() if req.output_type == "latent" else None
    return Output(images, None if lat is None else (list(lat.shape), latents_to_bytes(lat)), result.notes,
                  result.request)


def latents_to_bytes(t: torch.Tensor) -> bytes:
    return t.float().contiguous().numpy().astype("<f4").tobytes()


def latents_from_bytes(raw: bytes, shape: tuple[int, ...]) -> torch.Tensor:
    n = int(np.prod(shape)) if shape else 0
    if any(s < 1 for s in shape) or n > 4 * 1024 * 1024:
        raise InputError("latents", f"latents shape {list(shape)} is empty or too large")
    if len(raw) != 4 * n:
        raise InputError("latents", f"latents data has {len(raw)} bytes; shape {list(shape)} needs {4 * n} "
                                    "(float32 little-endian)")
    return torch.from_numpy(np.frombuffer(raw, dtype="<f4").astype(np.float32).reshape(shape).copy())
