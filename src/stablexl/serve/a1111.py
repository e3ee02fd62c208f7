"""The AUTOMATIC1111 surface (/sdapi/v1): request and response shapes of reference/peers.md §2.1, so existing
clients (e.g. the `webuiapi` package) work unchanged.

txt2img / img2img are synchronous, as in A1111, but run through the same queue as native jobs: a client
that disconnects does not stop its job, and with `force_task_id` the result stays at /v1/jobs/{id}.
Fields that would change the picture in ways we cannot honour (face restoration, tiling, variation seeds,
scripts, a hires checkpoint or a model upscaler such as ESRGAN) are refused with 422 rather than ignored; knobs our samplers do not have
(eta, s_churn, ...) and bookkeeping fields are accepted and ignored, as A1111 ignores unknown ones.
"""

from __future__ import annotations

import difflib
import json
import math
import time
from typing import Any

from fastapi import APIRouter, Body, Query, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from ..io.metadata import MetadataError, hires_params, parse_infotext
from ..names import (
    A1111_ALIASES, A1111_SAMPLER, A1111_SCHEDULE, A1111_SCHEDULE_ID, ETA_SAMPLERS, SAMPLER_NAMES, SCHEDULE_NAMES,
    nearest_names, parse_schedule, resolve_sampler, sampler_spellings, schedule_aliases, schedule_spellings,
)
from ..request import LATENT_UPSCALERS, PIXEL_UPSCALERS, GenerationRequest, Handoff, Hires, ImageInput, MicroConditions
from .generation import InputError
from .images import ImageInputError, b64, open_image, png_texts
from .native import image_field
from .queue import CANCELLED, FAILED, RUNNING
from .schemas import A1111Result, Img2ImgRequest, PngInfoRequest, PngInfoResult, Txt2ImgRequest

router = APIRouter(prefix="/sdapi/v1", tags=["a1111"])

# GenerationRequest paths -> the A1111 request fields, for error messages
FIELD_NAMES = {"cfg": "cfg_scale", "batch": "batch_size", "iterations": "n_iter", "sampler": "sampler_name",
               "schedule": "scheduler", "image.strength": "denoising_strength", "image.image": "init_images",
               "image.mask": "mask", "image.mask_blur": "mask_blur",
               "handoff.refiner": "refiner_checkpoint", "handoff.switch_at": "refiner_switch_at",
               "model": "override_settings.sd_model_checkpoint", "image.mask_invert": "inpainting_mask_invert",
               "image.fit": "resize_mode", "hires": "enable_hr", "hires.scale": "hr_scale",
               "hires.resize": "hr_resize_x", "hires.upscaler": "hr_upscaler", "hires.steps": "hr_second_pass_steps",
               "hires.strength": "denoising_strength", "hires.sampler": "hr_sampler_name",
               "hires.schedule": "hr_scheduler", "hires.prompt": "hr_prompt",
               "hires.negative_prompt": "hr_negative_prompt"}


def field_name(path: str) -> str:
    return FIELD_NAMES.get(path) or (path.split(".", 1)[1] if path.startswith("conditions.") else path)


def json_safe(v: Any, depth: int = 0) -> Any:
    """Echoed client values as strict UTF-8 JSON: non-finite floats become null (JSON has no NaN)."""
    if depth > 64:
        return None
    if isinstance(v, float):
        return v if math.isfinite(v) else None
    if isinstance(v, str):  # lone surrogates (valid in JSON text, not in UTF-8) become U+FFFD
        return v.encode("utf-8", "surrogatepass").decode("utf-8", "replace") if not v.isascii() else v
    if isinstance(v, dict):
        return {json_safe(str(k)): json_safe(x, depth + 1) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [json_safe(x, depth + 1) for x in v]
    return v


def _model_name(server, title: Any, field: str) -> str:
    """A1111 checkpoint titles look like 'name [hash]'; we accept the title or the bare name."""
    if not isinstance(title, str):
        raise InputError(field, f"{FIELD_NAMES.get(field, field)} must be a string, got {type(title).__name__}")
    name = title.split(" [")[0].strip() if title.endswith("]") else title.strip()
    return server.models.get(name, field).name


def _sampler(body) -> tuple[str | None, str | None]:
    """A1111's sampler_name / scheduler (any dialect the one name table knows) -> (ours, schedule or None)."""
    name = body.sampler_name or body.sampler_index
    implied = None
    if name:
        try:
            name, implied = resolve_sampler(name)
        except ValueError:  # A1111 answers an unknown sampler with 404 "Sampler not found"
            available = [A1111_SAMPLER.get(s, s) for s in SAMPLER_NAMES]
            raise InputError("sampler", _not_found("Sampler not found:", name, sampler_spellings(), available),
                             status=404) from None
    schedule = None
    if body.scheduler and body.scheduler.strip().lower() != "automatic":
        schedule = parse_schedule(body.scheduler)
        if schedule not in SCHEDULE_NAMES:
            available = [A1111_SCHEDULE.get(s, s) for s in SCHEDULE_NAMES]
            raise InputError("schedule", _not_found("unknown scheduler", body.scheduler, schedule_spellings(),
                                                    available))
    return name, schedule or implied


def _not_found(what: str, name: str, spellings: dict[str, str], available: list[str]) -> str:
    """A1111's error text, with the nearest accepted spellings (A1111's own where one differs only in case)."""
    near = nearest_names(name, {**spellings, **{a.lower(): a for a in available}})
    nearest = f"nearest: {', '.join(near)}; " if near else ""
    return f"{what} {name!r}; {nearest}available: {', '.join(available)}"


def _refuse_unsupported(body) -> None:
    checks = [("restore_faces", body.restore_faces, "face restoration is not available on this server"),
              ("tiling", body.tiling, "seamless tiling is not available on this server"),
              ("subseed_strength", (body.subseed_strength or 0) > 0, "variation seeds are not available"),
              ("script_name", bool(body.script_name), f"script {body.script_name!r} not found"),
              ("alwayson_scripts", bool(body.alwayson_scripts),
               f"always-on scripts not found: {', '.join(map(str, body.alwayson_scripts))}")]
    if isinstance(body, Txt2ImgRequest) and body.enable_hr:
        checks.append(("hr_checkpoint_name", (body.hr_checkpoint_name or "").strip() not in ("", "Use same checkpoint"),
                       "a separate hires checkpoint is not available on this server; leave hr_checkpoint_name unset"))
    for field, bad, msg in checks:
        if bad:
            raise InputError(field, msg)


# Fields accepted for compatibility but not used, with the value at which ignoring them changes nothing
# (A1111 clients such as webuiapi send every field on every request).
NEUTRAL = {"styles": (None, []), "subseed": None, "seed_resize_from_w": (-1, 0, None),
           "seed_resize_from_h": (-1, 0, None), "s_min_uncond": (None, 0.0), "s_churn": (None, 0.0),
           "s_tmax": (None, 0.0, float("inf")), "s_tmin": (None, 0.0), "s_noise": (None, 1.0),
           "save_images": (False,), "do_not_save_samples": None, "do_not_save_grid": None, "comments": (None, {}),
           "disable_extra_networks": (False,), "override_settings_restore_afterwards": None, "infotext": (None, ""),
           "image_cfg_scale": None, "initial_noise_multiplier": (None, 1.0), "inpainting_fill": (0, 1),
           "inpaint_full_res": (True, 1, False, 0), "inpaint_full_res_padding": None, "mask_round": (True,),
           "latent_mask": (None,), "firstpass_image": (None,), "firstphase_width": None,
           "firstphase_height": None, "script_args": None}
# (the hr_* fields are used when enable_hr is set; without it A1111 ignores them too, so they are not reported)


def ignored_fields(body, eta_used: bool) -> list[str]:
    """The fields of `body` that change A1111's picture but not ours (set, and not at their neutral value)."""
    out = []
    for name in sorted(body.model_fields_set):
        neutral = NEUTRAL.get(name, ())
        if name == "eta":
            if body.eta is not None and not eta_used:
                out.append("eta")
        elif name == "denoising_strength" and isinstance(body, Txt2ImgRequest):
            continue  # txt2img uses it only for the hires pass, refused below when enabled
        elif name in NEUTRAL and neutral is not None and getattr(body, name) not in neutral:
            out.append(name)
    overrides = set(body.override_settings or {}) - {"sd_model_checkpoint"}
    return out + [f"override_settings.{k}" for k in sorted(overrides)]


def _refuse_unknown(body) -> None:
    unknown = sorted(body.model_extra or {})
    if unknown:
        accepted = sorted(type(body).model_fields)
        near = {k: difflib.get_close_matches(k, accepted, n=2) for k in unknown}
        hints = "; ".join(f"{k!r}" + (f" (did you mean {' or '.join(map(repr, v))}?)" if v else "")
                          for k, v in near.items())
        raise InputError(unknown[0], f"unknown field(s) {hints}; accepted: {', '.join(accepted)}")


def _same(v, *same) -> str | None:
    """A1111's hr_sampler_name / hr_scheduler / hr_prompt: empty or "Use same ..." means the first pass's."""
    return None if v is None or v.strip() in ("", *same) else v


def _hires(body) -> Hires | None:
    """txt2img's hr_* fields -> Hires (reference/adapters.md §6); None unless enable_hr."""
    if not isinstance(body, Txt2ImgRequest) or not body.enable_hr:
        return None
    sampler = _same(body.hr_sampler_name, "Use same sampler")
    schedule = _same(body.hr_scheduler, "Use same scheduler", "Automatic")
    if sampler is not None:
        try:
            sampler, implied = resolve_sampler(sampler)
        except ValueError:
            available = [A1111_SAMPLER.get(s, s) for s in SAMPLER_NAMES]
            raise InputError("hires.sampler", _not_found("Sampler not found:", body.hr_sampler_name,
                                                         sampler_spellings(), available), status=404) from None
        schedule = schedule or implied
    upscaler = body.hr_upscaler if body.hr_upscaler not in (None, "") else "Latent"  # A1111: None -> latent default
    return Hires(scale=body.hr_scale if body.hr_scale is not None else 2.0,
                 resize=(body.hr_resize_x or 0, body.hr_resize_y or 0), upscaler=upscaler,
                 steps=body.hr_second_pass_steps or None,
                 # A1111's StableDiffusionProcessingTxt2Img default is 0.75
                 strength=body.denoising_strength if body.denoising_strength is not None else 0.75,
                 sampler=sampler, schedule=schedule, prompt=_same(body.hr_prompt),
                 negative_prompt=_same(body.hr_negative_prompt))


def _request(body, server, image: ImageInput | None = None) -> GenerationRequest:
    """An A1111 body -> a GenerationRequest (their names mapped to ours once, here)."""
    _refuse_unknown(body)
    _refuse_unsupported(body)
    sampler, schedule = _sampler(body)
    overrides = body.override_settings or {}
    model = server.options["sd_model_checkpoint"]
    if "sd_model_checkpoint" in overrides:
        model = _model_name(server, overrides["sd_model_checkpoint"], "model")
    refiner = None
    if body.refiner_checkpoint and body.refiner_checkpoint.strip().lower() not in ("", "none"):
        refiner = _model_name(server, body.refiner_checkpoint, "handoff.refiner")
    return GenerationRequest(
        prompt=body.prompt, negative_prompt=body.negative_prompt, model=model, sampler=sampler, schedule=schedule,
        steps=body.steps, cfg=body.cfg_scale, seed=body.seed, width=body.width, height=body.height,
        # A1111 applies eta only to the samplers that have one and ignores it for the rest (clients always send it)
        eta=body.eta if sampler in ETA_SAMPLERS else None,
        batch=body.batch_size, iterations=body.n_iter, image=image, hires=_hires(body),
        handoff=Handoff(refiner=refiner, switch_at=body.refiner_switch_at if body.refiner_switch_at is not None else 0.8),
        conditions=MicroConditions(aesthetic_score=body.aesthetic_score,
                                   negative_aesthetic_score=body.negative_aesthetic_score))


def request_from_txt2img(body: Txt2ImgRequest, server) -> GenerationRequest:
    return server.prepare(_request(body, server))


def request_from_img2img(body: Img2ImgRequest, server) -> GenerationRequest:
    if not body.init_images:
        raise InputError("image.image", "init_images is empty: img2img needs one image")
    if len(body.init_images) > 1:
        raise InputError("image.image", "one init image per request is supported")
    if body.resize_mode not in (0, 1):
        raise InputError("image.fit", "resize_mode 0 (just resize) and 1 (crop and resize) are supported")
    mask, blur = None, 0.0
    if body.mask is not None:
        mask = image_field(body.mask, "image.mask", "L")
        blur = body.mask_blur
        if blur is None:
            xy = [v for v in (body.mask_blur_x, body.mask_blur_y) if v is not None]
            blur = max(xy) if xy else 4.0  # A1111's default mask blur
    image = ImageInput(image_field(body.init_images[0], "image.image"), strength=body.denoising_strength, mask=mask,
                       mask_blur=float(blur), mask_invert=bool(body.inpainting_mask_invert),
                       fit="crop" if body.resize_mode == 1 else "resize",
                       resize_mask=True)  # A1111 resizes the mask with the image
    return server.prepare(_request(body, server, image))


def _info(req: GenerationRequest, job, images: list[dict], body, interrupted: bool, inpaint_unet: bool) -> dict:
    seeds = [i["seed"] for i in images] or [s for it in range(req.iterations) for s in req.seeds(it)]
    n = len(seeds)
    extra = {"Schedule type": A1111_SCHEDULE.get(req.schedule, req.schedule)}
    if req.handoff.refiner:
        extra.update({"Refiner": req.handoff.refiner, "Refiner switch at": req.handoff.switch_at})
    extra.update({k: v for k, v in hires_params(req).items() if v is not None})
    prompt, negative = req.prompts[0], (req.negative_prompts or ("",))[0]
    return {
        "prompt": prompt, "all_prompts": [prompt] * n, "negative_prompt": negative,
        "all_negative_prompts": [negative] * n, "seed": req.seed, "all_seeds": seeds,
        "subseed": -1, "all_subseeds": [-1] * n, "subseed_strength": 0.0, "width": req.width,
        "height": req.height, "sampler_name": A1111_SAMPLER.get(req.sampler, req.sampler),
        "scheduler": A1111_SCHEDULE.get(req.schedule, req.schedule), "cfg_scale": req.cfg,
        "steps": req.steps, "batch_size": req.batch, "restore_faces": False, "face_restoration_model": None,
        "sd_model_name": req.model, "sd_model_hash": images[0].get("model_hash") if images else None,
        "sd_vae_name": None, "sd_vae_hash": None,
        "seed_resize_from_w": -1, "seed_resize_from_h": -1,
        "denoising_strength": req.image.strength if req.image is not None else
        req.hires.strength if req.hires is not None else None,
        "extra_generation_params": extra, "index_of_first_image": 0, "infotexts": [i["infotext"] for i in images],
        "styles": list(body.styles or []), "job_timestamp": time.strftime("%Y%m%d%H%M%S", time.localtime(job.created)),
        "ignored": ignored_fields(body, req.eta is not None),
        "clip_skip": 1, "is_using_inpainting_conditioning": req.image is not None and req.image.mask is not None
        and inpaint_unet,
        "job_id": job.id, "interrupted": interrupted,
    }


async def _run_sync(body, req: GenerationRequest, request: Request, kind: str):
    server = request.app.state.server
    try:
        job = server.submit(req, job_id=body.force_task_id, origin="a1111")
    except ValueError as e:  # the job id is taken
        raise InputError("force_task_id", str(e)) from None
    await job.wait_done()  # the worker wakes us; the job finishes even if this client has gone
    if job.state == FAILED:  # the pipeline's ValueError (bad input it caught) is the client's 422, anything else ours
        status, kind = (422, "ValueError") if job.error_kind == "invalid" else (500, "InternalError")
        return JSONResponse({"error": kind, "detail": job.error, "body": "", "errors": job.error, "job_id": job.id},
                            status)
    out = job.result if job.state != CANCELLED else None
    images = out.images if out is not None else []
    params = body.model_dump()
    if kind == "img2img" and not body.include_init_images:
        params.update(init_images=None, mask=None)
    return {"images": [b64(i["png"]) for i in images] if body.send_images else [],
            "parameters": json_safe(params),
            "info": json.dumps(_info(req, job, images, body, interrupted=job.state == CANCELLED,
                                     inpaint_unet=server.models.get(req.model).config.unet.in_channels == 9))}


@router.post("/txt2img", response_model=A1111Result)
async def txt2img(body: Txt2ImgRequest, request: Request):
    req = await run_in_threadpool(request_from_txt2img, body, request.app.state.server)
    return await _run_sync(body, req, request, "txt2img")


@router.post("/img2img", response_model=A1111Result)
async def img2img(body: Img2ImgRequest, request: Request):
    req = await run_in_threadpool(request_from_img2img, body, request.app.state.server)
    return await _run_sync(body, req, request, "img2img")


@router.get("/progress")
async def progress(request: Request, skip_current_image: bool = Query(False)):
    """The most recently started running job, in A1111's shape (state is a snapshot dict)."""
    server = request.app.state.server
    running = sorted(server.queue.running(), key=lambda j: j.started or 0)
    pending = server.queue.pending_count()
    job = running[-1] if running else None
    state = {"skipped": False, "interrupted": False, "job": "", "job_count": len(running) + pending,
             "job_timestamp": "0", "job_no": 0, "sampling_step": 0, "sampling_steps": 0}
    if job is None:
        return {"progress": 0.0, "eta_relative": 0.0, "state": state, "current_image": None, "textinfo": None}
    total = max(job.total, job.step, 1)
    state.update(job=job.id, interrupted=job.cancel_requested, sampling_step=job.step, sampling_steps=total,
                 job_timestamp=time.strftime("%Y%m%d%H%M%S", time.localtime(job.created)))
    preview = job.preview if job.state == RUNNING else None
    return {"progress": job.step / total, "eta_relative": job.eta() or 0.0, "state": state,
            "current_image": b64(preview) if preview is not None and not skip_current_image else None,
            "textinfo": f"step {job.step}/{total}"}


@router.post("/interrupt")
async def interrupt(request: Request):
    """Stop the running job(s) at their next step; a synchronous caller gets the images made so far (none)."""
    server = request.app.state.server
    for job in server.queue.running():
        server.queue.cancel(job.id)
    return {}


@router.get("/options")
async def get_options(request: Request):
    return request.app.state.server.options


@router.post("/options")
async def set_options(request: Request, body: dict[str, Any] = Body(...)):
    server = request.app.state.server
    if len(body) > 256:
        raise InputError("options", "at most 256 options per request")
    if "sd_model_checkpoint" in body:
        body["sd_model_checkpoint"] = _model_name(server, body["sd_model_checkpoint"], "model")
    server.options.update(json_safe(body))
    server.models.default = server.options["sd_model_checkpoint"]
    return {}


@router.get("/sd-models")
async def sd_models(request: Request):
    server = request.app.state.server
    return [{"title": n, "model_name": n, "hash": None, "sha256": None, "filename": n, "config": None}
            for n in server.models.names]


@router.get("/loras")
async def loras(request: Request):
    """The LoRA files of --lora-dir as A1111 lists them: [{name, alias, path, metadata}] ([] without a folder)."""
    folder = request.app.state.server.lora_folder
    return [] if folder is None else await run_in_threadpool(folder.describe)


@router.post("/refresh-loras")
async def refresh_loras(request: Request):
    """Rescan --lora-dir; A1111 answers null (lora_script.py returns list_available_networks(), which is None)."""
    folder = request.app.state.server.lora_folder
    if folder is not None:
        await run_in_threadpool(folder.scan)
    return None


@router.get("/embeddings")
async def embeddings(request: Request):
    """The textual inversions of --embeddings-dir as the current model reads them, in A1111's shape:
    {"loaded": {name: {step, sd_checkpoint, sd_checkpoint_name, shape, vectors}}, "skipped": {...}}; files made
    for another model (other widths), pickles and broken files are under "skipped"."""
    server = request.app.state.server
    pipe = server.models.get(server.options["sd_model_checkpoint"]).pipe
    emb = getattr(pipe, "embeddings", None)
    return {"loaded": {}, "skipped": {}} if emb is None else await run_in_threadpool(emb.describe)


@router.post("/refresh-embeddings")
async def refresh_embeddings(request: Request):
    """Rescan --embeddings-dir (every request rescans too); A1111 answers null."""
    server = request.app.state.server
    for m in server.models.loaded.values():
        for p in m.pipes:
            if getattr(p, "embeddings", None) is not None:
                await run_in_threadpool(p.embeddings.refresh)
    return None


@router.get("/latent-upscale-modes")
async def latent_upscale_modes():
    """A1111's latent upscale modes (modules/shared.py latent_upscale_modes), [{name}]."""
    return [{"name": n} for n in LATENT_UPSCALERS]


@router.get("/upscalers")
async def upscalers():
    """The pixel upscalers we have, as A1111's records (modules/api/models.py UpscalerItem): plain resamplers."""
    return [{"name": n, "model_name": None, "model_path": None, "model_url": None, "scale": 4.0}
            for n in PIXEL_UPSCALERS]


@router.get("/samplers")
async def samplers():
    """The samplers we run, in A1111's record shape: the display name, then our name and A1111's aliases."""
    return [{"name": A1111_SAMPLER.get(s, s), "aliases": list(dict.fromkeys([s, *A1111_ALIASES[s]])), "options": {}}
            for s in SAMPLER_NAMES]


# schedules that index the model's training σ's (A1111 passes them the inner model)
_NEEDS_MODEL = {"leading", "trailing", "linspace", "normal", "simple", "sgm_uniform", "ddim_uniform", "beta"}


@router.get("/schedulers")
async def schedulers():
    """The schedules we run as A1111 v1.9+ scheduler records: `name` the lower-case id, `label` what the UI
    shows, `aliases` our name and the other spellings we accept."""
    return [{"name": A1111_SCHEDULE_ID.get(s, s), "label": A1111_SCHEDULE.get(s, s),
             "aliases": [a for a in dict.fromkeys([s, *schedule_aliases(s)]) if a != A1111_SCHEDULE_ID.get(s, s)],
             "default_rho": {"karras": 7.0, "polyexponential": 1.0}.get(s, -1),
             "need_inner_model": s in _NEEDS_MODEL} for s in SCHEDULE_NAMES]


@router.get("/scripts")
async def scripts():
    """No scripts or extensions; clients such as webuiapi probe this to find ControlNet & co."""
    return {"txt2img": [], "img2img": []}


def _png_info(body: PngInfoRequest) -> dict:
    try:
        img = open_image(body.image)
    except ImageInputError as e:
        raise InputError("image", f"image: {e}") from None
    texts = png_texts(img)
    geninfo = texts.pop("parameters", "")
    items = {k: v for k, v in texts.items()}
    if not geninfo:
        return {"info": "", "items": items, "parameters": {}}
    try:
        res = parse_infotext(geninfo)
    except MetadataError:
        return {"info": geninfo, "items": items, "parameters": {}}
    params: dict[str, Any] = {"Prompt": res["prompt"], "Negative prompt": res["negative_prompt"]}
    # back to A1111's keys (its parse_generation_parameters output)
    if res["steps"] is not None:
        params["Steps"] = res["steps"]
    if res["sampler"] is not None:
        params["Sampler"] = A1111_SAMPLER.get(res["sampler"], res["sampler"])
    if res["schedule"] is not None:
        params["Schedule type"] = A1111_SCHEDULE.get(res["schedule"], res["schedule"])
    for key, field in (("CFG scale", "cfg"), ("Seed", "seed"), ("Model", "model"), ("Model hash", "model_hash")):
        if res[field] is not None:
            params[key] = res[field]
    if res["width"] is not None:
        params["Size-1"], params["Size-2"] = res["width"], res["height"]
    params["Clip skip"] = res["clip_skip"]
    params.update(res["extra"])
    return {"info": geninfo, "items": items, "parameters": params}


@router.post("/png-info", response_model=PngInfoResult)
async def png_info(body: PngInfoRequest):
    return json_safe(await run_in_threadpool(_png_info, body))
