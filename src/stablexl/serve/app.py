"""The HTTP server: `create_app(config)` wires the models, the queue, both API surfaces and the web page.

    stablexl serve --model tiny-sdxl            # http://127.0.0.1:7860/
"""

from __future__ import annotations

import base64
import binascii
import logging
import secrets
import threading
import time
from collections.abc import Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from starlette.concurrency import run_in_threadpool

from .. import __version__
from . import a1111, native
from ..adapters.embeddings import EmbeddingFolder, Embeddings
from ..adapters.tags import LoraFolder
from ..request import GenerationRequest, Limits, RequestError
from . import admission
from .generation import InputError, Models, resolve_request, run
from .preview import PREVIEW_MODES
from .queue import Job, JobQueue, QueueFull

log = logging.getLogger("stablexl.serve")
WEB_DIR = Path(__file__).parent / "web"
MAX_BODY = 64 * 1024 * 1024  # bytes; a request body larger than this is refused (413) before it is read


@dataclass
class ServeConfig:
    models: list[str] = field(default_factory=lambda: ["tiny-sdxl"])  # the first is the default
    host: str = "127.0.0.1"
    port: int = 7860
    api_key: str | None = None
    max_width: int = 2048
    max_height: int = 2048
    max_steps: int = 150
    max_batch: int = 8
    queue_size: int = 32  # jobs waiting (running ones not counted); more get 429
    job_ttl: float = 600.0  # seconds a finished job stays retrievable
    preview: str = "auto"  # tiny decoder if the model has one, else the approximate latent -> RGB map
    devices: list[str] = field(default_factory=lambda: ["auto"])  # a worker per (model, device)
    dtype: str | None = "auto"
    offload: str = "none"
    compile: bool = False
    vae: str | None = None
    tiny_decoder: str | None = None  # for --decoder tiny and previews; None: a model's own (the miniature ships one)
    quantize: str | None = None  # "int8": the UNets' Linear weights as int8 (stablexl/quant.py)
    quantize_text: bool = False  # and the text encoders'
    loader: Callable | None = None  # (name[, device]) -> Pipeline; default Pipeline.from_pretrained
    max_memory: int | str | None = "auto"  # bytes jobs + models may use; "auto": the machine less a margin; None: no limit
    drain_timeout: float = 120.0  # on SIGTERM/SIGINT: seconds to finish accepted jobs before cancelling the rest
    drain_grace: float = 5.0  # then seconds finished results stay retrievable before the process exits
    lora_dir: str | None = None  # the folder `<lora:NAME:W>` tags and the APIs' LoRA names resolve in
    embeddings_dir: str | None = None  # textual inversions, triggered by file name or embedding:NAME

    def __post_init__(self):
        for name in ("max_width", "max_height", "max_steps", "max_batch", "queue_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.job_ttl < 0:
            raise ValueError(f"job_ttl must be >= 0, got {self.job_ttl}")
        if self.preview not in PREVIEW_MODES:
            raise ValueError(f"preview must be one of {', '.join(PREVIEW_MODES)}, got {self.preview!r}")
        if self.api_key is not None and not self.api_key:
            raise ValueError("api_key must not be empty")
        if self.drain_timeout < 0 or self.drain_grace < 0:
            raise ValueError("drain_timeout and drain_grace must be >= 0")


def _default_loader(config: ServeConfig) -> Callable[[str, str], object]:
    def load(name: str, device: str):
        from ..pipeline import Pipeline

        return Pipeline.from_pretrained(name, device=device, dtype=config.dtype, offload=config.offload,
                                        compile=config.compile, vae=config.vae, tiny_decoder=config.tiny_decoder,
                                        quantize=config.quantize, quantize_text=config.quantize_text)
    return load


def _worker_thread_init() -> None:
    import torch

    # Pipeline.__init__ sets this in the thread that builds the pipeline; the flag (x86 MXCSR FTZ/DAZ) is
    # per thread, so each worker sets it again for the UNet calls it makes (see pipeline.py).
    torch.set_flush_denormal(True)


class ShuttingDown(Exception):
    def __init__(self, retry_after: int):
        super().__init__("the server is shutting down and accepts no new jobs; retry against another instance or "
                         "after it restarts")
        self.retry_after = retry_after


class Server:
    """What the routes share: models, queue, limits and the A1111 options dict."""

    def __init__(self, config: ServeConfig):
        self.config = config
        self.limits = Limits(config.max_width, config.max_height, config.max_steps, config.max_batch)
        self.models = Models(config.models, config.loader or _default_loader(config), config.preview, config.devices)
        self.queue = JobQueue(config.models, config.queue_size, config.job_ttl, thread_init=_worker_thread_init,
                              slots=len(self.models.devices))
        self.options: dict = {"sd_model_checkpoint": self.models.default, "samples_format": "png",
                              "CLIP_stop_at_last_layers": 1, "sd_vae": "Automatic"}
        self.draining = False  # set on SIGTERM/SIGINT: no new jobs (503), accepted ones finish
        mm = config.max_memory
        self.max_memory = admission.default_max_memory() if mm == "auto" else \
            admission.parse_bytes(mm) if isinstance(mm, str) else mm
        self.budget = admission.MemoryBudget(None)  # set once the models are loaded (start)
        self.lora_folder = None if config.lora_dir is None else LoraFolder(config.lora_dir)
        self.embeddings_folder = None if config.embeddings_dir is None else EmbeddingFolder(config.embeddings_dir)

    def start(self) -> None:
        """After the models are loaded: what they hold is the resident part; jobs share the rest of --max-memory."""
        for m in self.models.loaded.values():  # every pipeline resolves LoRA names in the server's folder
            for p in m.pipes:
                if hasattr(p, "lora_folder"):
                    p.lora_folder = self.lora_folder
                if hasattr(p, "embeddings"):  # and embeddings in its folder, as that model reads them
                    p.embeddings = None if self.embeddings_folder is None else Embeddings(self.embeddings_folder,
                                                                                          p.config)
        self.resident = admission.current_rss()
        total = admission.activation_budget(self.max_memory, self.resident)
        if total is not None and total <= 0:
            raise RuntimeError(f"--max-memory {self.max_memory / 2**20:.0f} MiB is below what the loaded models "
                               f"already hold ({self.resident / 2**20:.0f} MiB); raise it")
        self.budget = admission.MemoryBudget(total)
        log.info("memory: %.0f MiB resident after loading; %s for jobs", self.resident / 2**20,
                 "no limit" if total is None else f"{total / 2**20:.0f} MiB")
        self.queue.start()

    def prepare(self, request: GenerationRequest) -> GenerationRequest:
        """The one resolve step against the model and the limits, then memory admission (host pipelines):
        a request that would not fit is split / tiled (same images) or refused with 413."""
        req = resolve_request(request, self.models, self.limits)
        m = self.models.get(req.model)
        if admission.is_host_device(m.pipe):
            req = admission.fit(req, m.config, self.budget.total)
        return req

    def drain(self) -> None:
        """Graceful shutdown's work (a thread of its own): refuse new jobs, let accepted ones finish within
        `drain_timeout` (then cancel what still waits), and keep results retrievable for `drain_grace`."""
        self.draining = True
        log.info("shutting down: finishing accepted jobs (up to %.0f s); new jobs get 503", self.config.drain_timeout)
        if not self.queue.wait_idle(self.config.drain_timeout):
            n = self.queue.cancel_pending("cancelled: the server shut down before this job started")
            log.warning("drain timeout: cancelled %d waiting job(s); waiting for the running one(s)", n)
            self.queue.wait_idle()
        time.sleep(self.config.drain_grace)


    def submit(self, req: GenerationRequest, *, job_id: str | None = None, origin: str = "native") -> Job:
        """Queue a resolved request; ShuttingDown, QueueFull and ValueError (job id taken) propagate."""
        if self.draining:
            raise ShuttingDown(max(1, round(self.config.drain_timeout)))
        m = self.models.get(req.model)
        need = admission.estimate(req, m.config).peak if admission.is_host_device(m.pipe) else 0

        def work(job: Job):
            with self.budget.reserve(need):
                return run(job, req, self.models)

        return self.queue.submit(req.model, work, job_id=job_id,
                                 meta={"origin": origin, "settings": native.settings_view(req)})


# ==================================================================================================
# Authentication and body size (pure ASGI, so it also covers /openapi.json, /docs and streams)
# ==================================================================================================


def _public(path: str) -> bool:
    return path in ("/", "/index.html") or path.startswith("/web/")


class GuardMiddleware:
    """With an API key, every route but the page's static files needs `Authorization: Bearer KEY`
    (HTTP Basic with the key as password is accepted too, which is how A1111 clients send credentials)."""

    def __init__(self, app, api_key: str | None):
        self.app, self.key = app, api_key

    def _authorised(self, header: str) -> bool:
        scheme, _, value = header.partition(" ")
        value = value.strip()
        if scheme.lower() == "bearer":
            return secrets.compare_digest(value.encode(), self.key.encode())
        if scheme.lower() == "basic":
            try:
                _user, _, password = base64.b64decode(value, validate=True).decode("utf-8").partition(":")
            except (binascii.Error, ValueError):
                return False
            return secrets.compare_digest(password.encode(), self.key.encode())
        return False

    async def __call__(self, scope, receive, send):
        if scope["type"] not in ("http", "websocket"):
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        length = headers.get("content-length", "")
        if scope["type"] == "http" and length.isdigit() and int(length) > MAX_BODY:
            return await JSONResponse({"detail": f"request body larger than {MAX_BODY} bytes"}, 413)(scope, receive, send)
        if self.key is not None and not _public(scope["path"]) and not self._authorised(headers.get("authorization", "")):
            if scope["type"] == "websocket":  # close the handshake: 1008 = policy violation (RFC 6455)
                return await send({"type": "websocket.close", "code": 1008})
            resp = JSONResponse({"detail": "missing or wrong API key: send 'Authorization: Bearer <key>'"}, 401,
                                headers={"WWW-Authenticate": 'Bearer realm="stablexl"'})
            return await resp(scope, receive, send)
        return await self.app(scope, receive, send)


# ==================================================================================================
# Errors: every bad field is a 4xx naming the field
# ==================================================================================================


def _is_a1111(request: Request) -> bool:
    return request.url.path.startswith("/sdapi/")


def _clean_errors(errors) -> list[dict]:
    # pydantic's error records echo the input (could be megabytes of base64) and may hold exceptions
    return [{"loc": list(e.get("loc", ())), "msg": str(e.get("msg", "")), "type": str(e.get("type", ""))}
            for e in errors]


async def _validation_error(request: Request, exc: RequestValidationError):
    errors = _clean_errors(exc.errors())
    body = {"detail": errors}
    if _is_a1111(request):  # A1111's error shape (reference/peers.md §2.1) plus FastAPI's detail list
        text = "; ".join(f"{'.'.join(map(str, e['loc'][1:] or e['loc']))}: {e['msg']}" for e in errors)
        body = {"error": "RequestValidationError", "detail": errors, "body": "", "errors": text}
    return JSONResponse(body, 422)


async def _input_error(request: Request, exc: RequestError):
    status = getattr(exc, "status", 404 if exc.not_found else 422)
    if _is_a1111(request):
        name = a1111.field_name(exc.field)
        return JSONResponse({"error": "InputError", "detail": exc.message, "field": name, "body": "",
                             "errors": f"{name}: {exc.message}"}, status)
    name = native.field_name(exc.field)
    return JSONResponse({"detail": [{"loc": ["body", *name.split(".")], "msg": exc.message,
                                     "type": "value_error"}]}, status)


async def _queue_full(request: Request, exc: QueueFull):
    return JSONResponse({"detail": str(exc)}, 429, headers={"Retry-After": str(exc.retry_after)})


async def _shutting_down(request: Request, exc: ShuttingDown):
    return JSONResponse({"detail": str(exc)}, 503, headers={"Retry-After": str(exc.retry_after)})


async def _internal_error(request: Request, exc: Exception):
    log.exception("unhandled error on %s", request.url.path)
    return JSONResponse({"detail": f"internal error: {type(exc).__name__}"}, 500)


# ==================================================================================================
# The app
# ==================================================================================================


def create_app(config: ServeConfig | None = None) -> FastAPI:
    config = config or ServeConfig()
    server = Server(config)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await run_in_threadpool(server.models.load_all)  # torch work, off the event loop
        server.start()
        try:
            yield
        finally:
            await run_in_threadpool(server.queue.stop)

    app = FastAPI(title="stablexl", version=__version__, lifespan=lifespan,
                  description="Stable Diffusion XL from scratch: a native job API (/v1) and an "
                              "AUTOMATIC1111-compatible surface (/sdapi/v1).")
    app.state.server = server
    app.add_middleware(GuardMiddleware, api_key=config.api_key)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(RequestError, _input_error)
    app.add_exception_handler(QueueFull, _queue_full)
    app.add_exception_handler(ShuttingDown, _shutting_down)
    app.add_exception_handler(Exception, _internal_error)
    app.include_router(native.router)
    app.include_router(a1111.router)
    app.mount("/web", StaticFiles(directory=WEB_DIR), name="web")

    @app.get("/", include_in_schema=False)
    async def index():
        return FileResponse(WEB_DIR / "index.html", media_type="text/html")

    return app


class _GracefulServer:
    """uvicorn's Server with SIGTERM/SIGINT starting a drain (Server.drain) instead of an immediate stop; a second
    signal stops at once. The process then exits 0 (uvicorn would re-raise the signal it caught)."""

    def __init__(self, app: FastAPI, host: str, port: int):
        import uvicorn

        outer = self

        class _Uvicorn(uvicorn.Server):
            def handle_exit(self, sig, frame):  # noqa: ARG002 - uvicorn's signature
                outer.on_signal(sig)

        # open streams (server-sent events) are closed after 5 s once the drain is over
        self.uv = _Uvicorn(uvicorn.Config(app, host=host, port=port, log_level="info", timeout_graceful_shutdown=5))
        self.server: Server = app.state.server
        self.signals = 0

    def on_signal(self, sig) -> None:
        self.signals += 1
        if self.signals > 1 or self.uv.should_exit:
            self.uv.should_exit = self.uv.force_exit = True
            return

        def drain_then_exit():
            self.server.drain()
            self.uv.should_exit = True

        threading.Thread(target=drain_then_exit, name="stablexl-drain", daemon=True).start()

    def run(self) -> None:
        self.uv.run()


def serve(config: ServeConfig) -> None:
    """Run the app on uvicorn (blocks). Localhost unless config.host says otherwise. SIGTERM / SIGINT drain:
    new jobs get 503, accepted jobs finish, results stay retrievable for `drain_grace` s, then exit 0."""
    if config.host not in ("127.0.0.1", "localhost", "::1") and config.api_key is None:
        log.warning("serving on %s without --api-key: anyone who can reach this address can use the server",
                    config.host)
    _GracefulServer(create_app(config), config.host, config.port).run()
