"""The native API (/v1): asynchronous jobs with progress, previews, cancellation and a server-sent event stream."""

from __future__ import annotations

import base64
import binascii
import json

from fastapi import APIRouter, HTTPException, Query, Request, Response
from fastapi.responses import StreamingResponse
from starlette.concurrency import run_in_threadpool

from .. import __version__
from ..names import A1111_SAMPLER, A1111_SCHEDULE, SAMPLER_NAMES, SCHEDULE_NAMES, sampler_aliases, schedule_aliases
from ..request import GenerationRequest, Handoff, Hires, ImageInput, ImagePrompt, LoraSpec, MicroConditions
from .generation import InputError, latents_from_bytes
from .images import ImageInputError, b64, decode_image
from .queue import FINISHED, RUNNING, Job
from .schemas import GenerateRequest, JobView, ModelView, SamplersView

router = APIRouter(prefix="/v1", tags=["native"])


def image_field(text: str | None, field: str, mode: str = "RGB"):
    if text is None:
        return None
    try:
        return decode_image(text, mode)
    except ImageInputError as e:
        raise InputError(field, f"{field}: {e}") from None


# GenerationRequest paths -> this API's (flat) field names, for error messages and the settings view
FIELDS = {"image.image": "init_image", "image.strength": "strength", "image.mask": "mask",
          "image.mask_blur": "mask_blur", "image.mask_invert": "mask_invert", "handoff.refiner": "refiner",
          "handoff.switch_at": "refiner_switch_at", "handoff.mode": "refiner_mode",
          "handoff.refiner_strength": "refiner_strength", "handoff.denoising_start": "denoising_start",
          "handoff.denoising_end": "denoising_end", "handoff.latents": "latents", "image_prompt.image": "image_prompt",
          "image_prompt.noise_level": "noise_level", "iterations": "batch"}


def field_name(path: str) -> str:
    return FIELDS.get(path) or (path.split(".", 1)[1] if path.startswith("conditions.") else path)


def request_from_body(body: GenerateRequest) -> GenerationRequest:
    """The native body -> a GenerationRequest (decodes the images: CPU work, so it runs in a thread)."""
    latents = None
    if body.latents is not None:
        try:
            raw = base64.b64decode(body.latents.data, validate=True)
        except (binascii.Error, ValueError):
            raise InputError("handoff.latents", "latents.data is not valid base64") from None
        latents = latents_from_bytes(raw, tuple(body.latents.shape))
    image = None
    if body.init_image is not None:
        image = ImageInput(image_field(body.init_image, "image.image"), strength=body.strength,
                           mask=image_field(body.mask, "image.mask", "L"), mask_blur=body.mask_blur,
                           mask_invert=body.mask_invert)
    elif body.mask is not None:
        raise InputError("image.mask", "a mask needs init_image (the picture to inpaint)")
    image_prompt = None
    if body.image_prompt is not None:
        image_prompt = ImagePrompt(image_field(body.image_prompt, "image_prompt.image"), body.noise_level)
    return GenerationRequest(
        prompt=body.prompt, negative_prompt=body.negative_prompt, model=body.model, sampler=body.sampler,
        schedule=body.schedule, sigmas=None if body.sigmas is None else tuple(body.sigmas), eta=body.eta,
        steps=body.steps, cfg=body.cfg, seed=body.seed, width=body.width, height=body.height,
        batch=body.batch, guidance_rescale=body.guidance_rescale, output_type=body.output_type, vae_tile=body.vae_tile,
        decoder=body.decoder,
        conditions=MicroConditions(
            original_size=body.original_size, crop=body.crop, target_size=body.target_size,
            negative_original_size=body.negative_original_size, negative_crop=body.negative_crop,
            negative_target_size=body.negative_target_size, aesthetic_score=body.aesthetic_score,
            negative_aesthetic_score=body.negative_aesthetic_score),
        image=image, image_prompt=image_prompt,
        hires=None if body.hires is None else Hires(**{**body.hires.model_dump(), "resize": body.hires.resize}),
        loras=tuple(LoraSpec(x.name, x.strength, x.text_strength) for x in body.loras),
        handoff=Handoff(refiner=body.refiner, switch_at=body.refiner_switch_at, mode=body.refiner_mode,
                        refiner_strength=body.refiner_strength, denoising_start=body.denoising_start,
                        denoising_end=body.denoising_end, latents=latents),
    )


def settings_view(req: GenerationRequest) -> dict:
    """A resolved request as JSON in this API's field names (images described, not echoed), so a client can
    send it back as a body."""
    def img(v):
        return None if v is None else f"{v.width}x{v.height} image" if hasattr(v, "width") else list(v.shape)

    pair = lambda v: None if v is None else list(v)  # noqa: E731
    mc, h, im, ip = req.conditions, req.handoff, req.image, req.image_prompt
    return {
        "prompt": req.prompt if isinstance(req.prompt, str) else list(req.prompt),
        "negative_prompt": req.negative_prompt if req.negative_prompt is None or isinstance(req.negative_prompt, str)
        else list(req.negative_prompt),
        "model": req.model, "sampler": req.sampler, "schedule": None if req.sigmas is not None else req.schedule,
        "sigmas": None if req.sigmas is None else list(req.sigmas), "eta": req.eta, "steps": req.steps, "cfg": req.cfg,
        "seed": req.seed, "width": req.width, "height": req.height, "batch": req.batch, "n_iter": req.iterations,
        "guidance_rescale": req.guidance_rescale,
        "init_image": img(im.image) if im else None, "strength": im.strength if im else None,
        "mask": img(im.mask) if im else None, "mask_blur": im.mask_blur if im else 0.0,
        "refiner": h.refiner, "refiner_switch_at": h.switch_at, "refiner_mode": h.mode,
        "refiner_strength": h.refiner_strength, "denoising_start": h.denoising_start, "denoising_end": h.denoising_end,
        "latents": img(h.latents), "output_type": req.output_type,
        "original_size": pair(mc.original_size), "crop": pair(mc.crop), "target_size": pair(mc.target_size),
        "negative_original_size": pair(mc.negative_original_size), "negative_crop": pair(mc.negative_crop),
        "negative_target_size": pair(mc.negative_target_size), "aesthetic_score": mc.aesthetic_score,
        "negative_aesthetic_score": mc.negative_aesthetic_score,
        "image_prompt": img(ip.image) if ip else None, "noise_level": ip.noise_level if ip else 0,
        "vae_tile": req.vae_tile, "decoder": req.decoder,
        "loras": [{"name": x.name, "strength": x.strength, "text_strength": x.text_strength} for x in req.loras],
        "hires": None if getattr(req, "hires", None) is None else {**vars(req.hires), "resize": pair(req.hires.resize)},
    }


def prepare(body: GenerateRequest, server) -> GenerationRequest:
    return server.prepare(request_from_body(body))


def job_view(job: Job, server, *, preview: bool = True, images: bool = True) -> dict:
    out = job.result
    total = max(job.total, job.step)
    view = {
        "id": job.id, "state": job.state, "model": job.model, "created": job.created, "started": job.started,
        "finished": job.finished, "queue_position": server.queue.position(job),
        "progress": {"step": job.step, "total": total, "fraction": (job.step / total) if total else 0.0},
        "eta_seconds": job.eta(), "cancel_requested": job.cancel_requested,
        "preview": b64(job.preview) if preview and job.preview is not None and job.state == RUNNING else None,
        "images": [], "latents": None, "error": job.error, "notes": [],
        "settings": job.meta.get("settings", {}),
    }
    if out is not None:
        view["notes"] = out.notes
        view["settings"] = settings_view(out.request)
        if images:
            view["images"] = [{"image": b64(i["png"]), "seed": i["seed"], "width": i["width"], "height": i["height"],
                               "infotext": i["infotext"]} for i in out.images]
            if out.latents is not None:
                shape, data = out.latents
                view["latents"] = {"shape": shape, "dtype": "float32", "data": b64(data)}
    return view


def _job_or_404(server, job_id: str) -> Job:
    job = server.queue.get(job_id)
    if job is None:
        raise HTTPException(404, detail=f"no job {job_id!r} (unknown, or finished more than "
                                        f"{server.queue.ttl:g} s ago and forgotten)")
    return job


@router.post("/generate", status_code=202, response_model=JobView,
             summary="Queue a generation; returns the job at once (poll it, or stream its events)")
async def generate(body: GenerateRequest, request: Request, response: Response):
    server = request.app.state.server
    req = await run_in_threadpool(prepare, body, server)
    job = server.submit(req, origin="native")
    response.headers["Location"] = f"/v1/jobs/{job.id}"
    return job_view(job, server)


@router.get("/jobs/{job_id}", response_model=JobView, summary="State, progress, ETA, preview and results of a job")
async def get_job(job_id: str, request: Request, preview: bool = Query(True, description="include the preview")):
    server = request.app.state.server
    return job_view(_job_or_404(server, job_id), server, preview=preview)


@router.delete("/jobs/{job_id}", response_model=JobView,
               summary="Cancel a queued or running job (running ones stop at their next step); "
                       "on a finished job: forget it")
async def delete_job(job_id: str, request: Request):
    server = request.app.state.server
    job = _job_or_404(server, job_id)
    if job.state in FINISHED:
        server.queue.remove(job_id)
    else:
        server.queue.cancel(job_id)
    return job_view(job, server, preview=False, images=False)


@router.get("/jobs/{job_id}/events", summary="Server-sent events: `state`, `progress` (with preview), then `done`",
            response_class=StreamingResponse, responses={200: {"content": {"text/event-stream": {}}}})
async def job_events(job_id: str, request: Request, preview: bool = Query(True)):
    server = request.app.state.server
    job = _job_or_404(server, job_id)

    async def stream():
        version = -1
        while True:
            v = await job.changed(version, timeout=15.0)
            if v == version:
                yield ": keep-alive\n\n"  # an SSE comment, so proxies keep the connection open
                continue
            version = v
            done = job.done
            view = job_view(job, server, preview=preview, images=done)
            kind = "done" if done else "progress" if job.state == RUNNING else "state"
            yield f"event: {kind}\nid: {v}\ndata: {json.dumps(view)}\n\n"
            if done:
                return

    return StreamingResponse(stream(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


@router.get("/models", response_model=list[ModelView], summary="The models this server serves")
async def models(request: Request):
    server = request.app.state.server
    return [m.describe(default=name == server.models.default) for name, m in server.models.loaded.items()]


@router.get("/samplers", response_model=SamplersView, summary="Sampler and schedule names (ours and A1111's)")
async def samplers():
    return {"samplers": [{"name": s, "a1111_name": A1111_SAMPLER.get(s), "aliases": sampler_aliases(s)}
                         for s in SAMPLER_NAMES],
            "schedules": [{"name": s, "a1111_name": A1111_SCHEDULE.get(s), "aliases": schedule_aliases(s)}
                          for s in SCHEDULE_NAMES]}


@router.get("/server", summary="Limits, queue state and version")
async def server_info(request: Request):
    server = request.app.state.server
    lim = server.limits
    return {"version": __version__, "limits": {"max_width": lim.max_width, "max_height": lim.max_height,
                                               "max_steps": lim.max_steps, "max_batch": lim.max_batch},
            "queue": server.queue.status(), "preview": server.models.preview}
