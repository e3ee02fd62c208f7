"""GenerationRequest: one declaration of every option, one resolve step, and the surfaces that translate to it."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from PIL import Image

from stablexl.config import PRESETS, SamplingDefaults
from stablexl.io.metadata import parse_infotext
from stablexl.names import A1111_SAMPLER, SAMPLER_NAMES, parse_sampler, resolve_sampler
from stablexl.pipeline import Pipeline
from stablexl.request import (
    FLAT, GenerationRequest, Handoff, Hires, ImageInput, ImagePrompt, Limits, MicroConditions, RequestError,
    request_from_flat,
    resolve,
)

_PIPES: dict = {}


def pipe(name: str, device: str) -> Pipeline:
    if (name, device) not in _PIPES:
        _PIPES[name, device] = Pipeline.from_pretrained(name, device=device)
    return _PIPES[name, device]


@pytest.fixture(scope="module")
def init_image():
    g = torch.Generator().manual_seed(3)
    return Image.fromarray((torch.rand(64, 64, 3, generator=g) * 255).to(torch.uint8).numpy())


@pytest.fixture(scope="module")
def mask_image():
    m = Image.new("L", (64, 64), 0)
    m.paste(255, (16, 16, 48, 48))
    return m


def _same(a, b):
    assert torch.equal(a.latents, b.latents), "latents differ"
    assert a.seeds == b.seeds
    assert [np.asarray(i).tobytes() for i in a.images] == [np.asarray(i).tobytes() for i in b.images]


# ---- the keyword call is a thin translation: bit-identical results ---------------------------------------

def test_generate_equals_keyword_call_txt2img(device):
    p = pipe("tiny-sdxl", device)
    kw = dict(steps=4, cfg=6.0, seed=11, batch=2, sampler="DPM++ 2M Karras", guidance_rescale=0.5,
              original_size=(32, 48), crop=(8, 0))
    want = p("a red apple", "blurry", **kw)
    got = p.generate(GenerationRequest("a red apple", "blurry", steps=4, cfg=6.0, seed=11, batch=2,
                                       sampler="DPM++ 2M Karras", guidance_rescale=0.5,
                                       conditions=MicroConditions(original_size=(32, 48), crop=(8, 0))))
    _same(got, want)
    assert got.request == want.request
    assert (got.request.sampler, got.request.schedule) == ("dpmpp_2m", "karras")


def test_generate_equals_keyword_call_img2img_and_inpaint(device, init_image, mask_image):
    p = pipe("tiny-sdxl", device)
    _same(p.generate(GenerationRequest("x", steps=6, seed=2, image=ImageInput(init_image, strength=0.5))),
          p("x", steps=6, seed=2, init_image=init_image, strength=0.5))
    _same(p.generate(GenerationRequest("x", steps=6, seed=2, image=ImageInput(init_image, 0.75, mask_image, 2.0))),
          p("x", steps=6, seed=2, init_image=init_image, strength=0.75, mask=mask_image, mask_blur=2.0))


def test_generate_equals_refine_both_modes(device):
    base, refiner = pipe("tiny-sdxl", device), pipe("tiny-refiner", device)
    for mode in ("handoff", "sdedit"):
        want = base.refine(refiner, "x", steps=6, seed=4, mode=mode, switch_at=0.5, aesthetic_score=3.0)
        got = base.generate(GenerationRequest("x", steps=6, seed=4, conditions=MicroConditions(aesthetic_score=3.0),
                                              handoff=Handoff(refiner=refiner.name, switch_at=0.5, mode=mode)),
                            refiner=refiner)
        _same(got, want)
        assert got.request.handoff.mode == mode and got.request.model == base.name


def test_generate_equals_keyword_call_unclip(device, init_image):
    from stablexl.models.parts import build_parts

    torch.manual_seed(0)
    p = Pipeline(build_parts(PRESETS["tiny-unclip"], device="cpu", with_image_encoder=True).eval(), device=device)
    _same(p.generate(GenerationRequest("x", steps=3, seed=1, image_prompt=ImagePrompt(init_image, 100))),
          p("x", steps=3, seed=1, image_prompt=init_image, noise_level=100))


def test_iterations_continue_the_seeds(device):
    """A1111's n_iter: batch k of n starts at seed + k·batch, and each image equals that seed run alone."""
    p = pipe("tiny-sdxl", device)
    res = p.generate(GenerationRequest("x", steps=3, seed=20, batch=2, iterations=2))
    assert res.seeds == [20, 21, 22, 23] and len(res.images) == 4 and res.latents.shape[0] == 4
    alone = p("x", steps=3, seed=22, batch=2)
    assert torch.allclose(res.latents[2:], alone.latents, rtol=0, atol=1e-5)
    texts = [parse_infotext(res.infotext(k)) for k in range(4)]
    assert [t["seed"] for t in texts] == [20, 21, 22, 23]


def test_unknown_keyword_is_refused_listing_the_accepted_ones():
    with pytest.raises(TypeError) as e:
        request_from_flat("x", stpes=20)
    assert "stpes" in str(e.value) and "steps" in str(e.value) and "init_image" in str(e.value)
    # every flat name maps onto a real field of its record
    for flat, (record, name) in FLAT.items():
        cls = {"conditions": MicroConditions, "image": ImageInput, "handoff": Handoff, "image_prompt": ImagePrompt,
               "hires": Hires}[record]
        assert name in {f.name for f in dataclasses.fields(cls)}, flat


def test_unknown_request_fields_are_refused_listing_the_accepted_ones():
    with pytest.raises(TypeError, match="GenerationRequest: unknown field.*stpes; accepted: prompt, negative_prompt"):
        GenerationRequest("x", stpes=3)
    with pytest.raises(TypeError, match="ImageInput: unknown field.*strenght; accepted: image, strength"):
        ImageInput(None, strenght=0.5)


def test_request_is_frozen():
    req = GenerationRequest("x")
    with pytest.raises(dataclasses.FrozenInstanceError):
        req.steps = 3  # type: ignore[misc]


# ---- resolve: per-model defaults come from what the model is ----------------------------------------------

def test_defaults_come_from_the_model_config_not_its_name():
    mini, turbo = PRESETS["mini"], PRESETS["sdxl-turbo"]
    r = resolve(GenerationRequest("x", seed=1), mini)
    assert (r.steps, r.cfg, r.sampler, r.schedule, r.width) == (30, 5.0, "dpmpp_2m", "karras", 64)
    t = resolve(GenerationRequest("x", seed=1), turbo)
    assert (t.steps, t.cfg, t.sampler, t.schedule, t.width) == (1, 0.0, "euler_ancestral", "trailing", 512)
    # the same architecture under another name keeps its declared defaults; a config without them gets its family's
    renamed = dataclasses.replace(turbo, name="my-distilled-model")
    assert resolve(GenerationRequest("x", seed=1), renamed).steps == 1
    plain = dataclasses.replace(mini, name="mini", sampling=None)
    assert resolve(GenerationRequest("x", seed=1), plain).sampler == "euler"
    assert resolve(GenerationRequest("x", seed=1), PRESETS["sd15"]).cfg == 7.5
    # and the defaults travel with the config through its JSON (our checkpoint metadata)
    assert type(turbo).from_json(turbo.to_json()).sampling == SamplingDefaults(1, 0.0, "euler_ancestral", "trailing")


def test_shipped_mini_declares_its_sampling_defaults():
    p = Pipeline.from_pretrained("mini", device="cpu")
    assert p.config.sampling is not None and p.defaults["sampler"] == "dpmpp_2m"


def test_resolve_fills_every_default(init_image):
    r = resolve(GenerationRequest("x", image=ImageInput(init_image)), PRESETS["tiny-sdxl"])
    assert r.image.strength == 0.3 and 0 <= r.seed < 2**31 and (r.width, r.height) == (64, 64)
    assert r.conditions.original_size == (64, 64) and r.conditions.negative_crop == (0, 0)
    assert resolve(GenerationRequest("x", image=ImageInput(init_image)), PRESETS["tiny-sd15"]).image.strength == 0.8
    assert resolve(r, PRESETS["tiny-sdxl"]) == r, "resolving a resolved request changes nothing"


BAD = [
    (dict(steps=0), "steps", "steps must be >= 1"),
    (dict(steps=2.5), "steps", "an integer"),
    (dict(cfg=float("nan")), "cfg", "finite"),
    (dict(cfg=-1), "cfg", ">= 0"),
    (dict(width=60), "width", "multiple of 8"),
    (dict(sampler="Euler b"), "sampler", "unknown sampler 'Euler b'"),
    (dict(schedule="cosine"), "schedule", "unknown schedule 'cosine'"),
    (dict(seed=2**40), "seed", "seed must be between 0 and"),
    (dict(batch=0), "batch", "batch must be >= 1"),
    (dict(guidance_rescale=2.0), "guidance_rescale", "between 0.0 and 1.0"),
    (dict(output_type="np"), "output_type", "'pil' or 'latent'"),
    (dict(handoff=Handoff(denoising_end=0.5)), "handoff.denoising_end", "output_type 'latent'"),
    (dict(handoff=Handoff(refiner="r")), "handoff.refiner", "no refiner model was given"),
    (dict(handoff=Handoff(latents=torch.zeros(2, 4, 8, 8))), "handoff.latents", "shape (batch=1, 4, h, w)"),
    (dict(handoff=Handoff(latents=torch.full((1, 4, 8, 8), float("inf")))), "handoff.latents", "NaN or infinity"),
    (dict(image_prompt=ImagePrompt(Image.new("RGB", (8, 8)))), "image_prompt", "needs an unCLIP model"),
    (dict(image=ImageInput("/no/such.png")), "image.image", "no such file"),
    (dict(image=ImageInput(Image.new("RGB", (64, 64)), strength=1.5)), "image.strength", "in (0.0, 1.0]"),
    (dict(image=ImageInput(Image.new("RGB", (64, 64)), strength=0.1), steps=5), "image.strength",
     "raise steps to at least 10"),
    (dict(image=ImageInput(Image.new("RGB", (64, 64)), mask=Image.new("L", (32, 64)))), "image.mask", "must match"),
    (dict(image=ImageInput(torch.zeros(1, 4, 8, 8), mask=Image.new("L", (64, 64)))), "image.mask", "as pixels"),
    (dict(image=ImageInput(Image.new("RGB", (4, 4)))), "image.image", "pass width and height"),
    (dict(conditions=MicroConditions(original_size=(0, 64))), "conditions.original_size", ">= 1"),
    (dict(prompt=("a", "b"), batch=3), "batch", "2 prompts with batch 3"),
    (dict(discard_penultimate="yes"), "discard_penultimate", "true, false or unset"),
    (dict(discard_penultimate=True, sigmas=(3.0, 1.0)), "discard_penultimate", "custom sigmas run as given"),
]


@pytest.mark.parametrize("sampler,schedule,want", [
    ("DPM2 Karras", None, True), ("DPM2 a", "karras", True), ("DPM++ 3M SDE Exponential", None, True),
    ("dpm_2", "leading", False), ("dpm_2_ancestral", "trailing", False), ("euler", "karras", False),
    ("DPM++ 2M Karras", None, False), ("uni_pc", "normal", True), ("uni_pc_bh2", "trailing", False),
])
def test_discard_penultimate_follows_the_peers(sampler, schedule, want):
    r = resolve(GenerationRequest("x", sampler=sampler, schedule=schedule), PRESETS["tiny-sdxl"])
    assert r.discard_penultimate is want
    assert resolve(r, PRESETS["tiny-sdxl"]) == r


@pytest.mark.parametrize("changes,field,needle", BAD, ids=[b[1] + "-" + str(i) for i, b in enumerate(BAD)])
def test_resolve_names_the_field_and_the_fix(changes, field, needle):
    req = GenerationRequest(**{"prompt": "x", **changes})
    with pytest.raises(RequestError) as e:
        resolve(req, PRESETS["tiny-sdxl"])
    assert e.value.field == field and needle in e.value.message, (e.value.field, e.value.message)


def test_resolve_applies_server_limits():
    lim = Limits(max_width=128, max_height=128, max_steps=20, max_batch=4)
    assert resolve(GenerationRequest("x"), PRESETS["tiny-sdxl"], limits=lim).steps == 20  # default capped
    for changes, field in ((dict(width=256), "width"), (dict(steps=21), "steps"), (dict(batch=2, iterations=3), "batch")):
        with pytest.raises(RequestError) as e:
            resolve(GenerationRequest("x", **changes), PRESETS["tiny-sdxl"], limits=lim)
        assert e.value.field == field


def test_inpainting_unet_and_unclip_need_their_inputs():
    with pytest.raises(RequestError, match="inpainting model"):
        resolve(GenerationRequest("x"), PRESETS["sd15-inpaint"])
    with pytest.raises(RequestError, match="pass image_prompt"):
        resolve(GenerationRequest("x"), PRESETS["tiny-unclip"])


def test_mask_is_resized_with_the_image_when_asked(init_image):
    small = Image.new("L", (32, 32), 255)
    r = resolve(GenerationRequest("x", width=64, height=64, image=ImageInput(init_image, mask=small, resize_mask=True,
                                                                              mask_invert=True)), PRESETS["tiny-sdxl"])
    assert r.image.mask.size == (64, 64) and r.image.mask.getextrema() == (0, 0)  # inverted white -> black
    crop = resolve(GenerationRequest("x", width=64, height=32, image=ImageInput(init_image, fit="crop")),
                   PRESETS["tiny-sdxl"])
    assert crop.image.image.size == (64, 32)


# ---- one name table: every surface maps names the same way -------------------------------------------------

@pytest.mark.parametrize("name", ["DPM++ 2M Karras", "dpm++ 2m sde exponential", "Euler a", "k_euler_a", "euler_a",
                                  "dpmpp_2m_sde_gpu", "LCM", "heun"])
def test_one_sampler_table_for_every_surface(name):
    ours, implied = resolve_sampler(name)
    assert ours in SAMPLER_NAMES
    parsed, p_implied, _ = parse_sampler(name)
    if parsed in SAMPLER_NAMES:  # what the infotext reader and the A1111 API see
        assert (parsed, p_implied) == (ours, implied)
    r = resolve(GenerationRequest("x", sampler=name), PRESETS["tiny-sdxl"])
    assert r.sampler == ours and r.schedule == (implied or "leading")
    assert A1111_SAMPLER[ours]


def test_schedule_accepts_peer_spellings():
    for name, want in (("Karras", "karras"), ("SGM Uniform", "sgm_uniform"), ("sgm_uniform", "sgm_uniform"),
                       ("Uniform", "normal"), ("discrete", "normal"), ("ays", "align_your_steps"),
                       ("DDIM", "ddim_uniform"), ("KL Optimal", "kl_optimal")):
        assert resolve(GenerationRequest("x", schedule=name), PRESETS["tiny-sdxl"]).schedule == want


# ---- the infotext is a projection of the request ------------------------------------------------------------

def test_infotext_round_trips_the_resolved_request(device, init_image):
    p = pipe("tiny-sdxl", device)
    res = p.generate(GenerationRequest("a cat", "dog", steps=6, seed=9, sampler="dpmpp_2m", schedule="karras",
                                       guidance_rescale=0.7, image=ImageInput(init_image, strength=0.5),
                                       conditions=MicroConditions(original_size=(32, 48), crop=(8, 0))))
    got = parse_infotext(res.infotext(0))
    r = res.request
    assert (got["prompt"], got["negative_prompt"], got["steps"], got["seed"], got["cfg"]) == \
        (r.prompt, r.negative_prompt, r.steps, r.seed, r.cfg)
    assert (got["sampler"], got["schedule"], got["guidance_rescale"]) == ("dpmpp_2m", "karras", 0.7)
    assert got["extra"]["Denoising strength"] == "0.5" and got["extra"]["Original size"] == "48x32"
    assert got["extra"]["Crop"] == "0x8" and "Target size" not in got["extra"]  # the default is not written


def test_request_from_infotext_repeats_the_picture(device, tmp_path):
    """The infotext read back is a request again: the PNG's settings regenerate the same image."""
    from stablexl.io.metadata import read_png_settings, request_from_infotext, save_png

    p = pipe("tiny-sdxl", device)
    first = p.generate(GenerationRequest("a cat", "dog", steps=4, seed=12, sampler="Euler a", schedule="karras",
                                         guidance_rescale=0.3, width=64, height=48,
                                         conditions=MicroConditions(original_size=(32, 48), crop=(8, 4))))
    path = save_png(first.images[0], tmp_path / "o.png", first.infotext(0))
    again = p.generate(request_from_infotext(read_png_settings(path)))
    assert again.request == first.request
    assert torch.equal(again.latents, first.latents)


def test_custom_sigmas_and_eta(device):
    p = pipe("tiny-sdxl", device)
    from stablexl.diffusion.schedule import make_sigmas

    # a custom list starts at noise * sigmas[0] (k-diffusion, ComfyUI), as Euler with trailing spacing does
    trailing = [float(v) for v in make_sigmas(p.schedule, 5, "trailing")]
    want = p("x", steps=5, seed=3, sampler="euler", schedule="trailing")
    got = p("x", seed=3, sampler="euler", sigmas=trailing[:-1])  # the final 0 is appended
    assert got.request.steps == 5 and got.request.schedule == "custom"
    assert torch.allclose(got.latents, want.latents, rtol=0, atol=1e-6)
    text = parse_infotext(got.infotext(0))
    assert text["extra"]["Sigmas"].count(",") == 5
    with pytest.raises(RequestError, match="strictly descending"):
        p("x", sigmas=[1.0, 2.0])
    with pytest.raises(RequestError, match="disagrees"):
        p("x", sigmas=[3.0, 1.0], steps=4)
    a = p("x", steps=4, seed=3, sampler="ddim", eta=0.0)
    b = p("x", steps=4, seed=3, sampler="ddim")
    c = p("x", steps=4, seed=3, sampler="ddim", eta=1.0)
    assert torch.equal(a.latents, b.latents) and not torch.allclose(a.latents, c.latents)
    assert parse_infotext(c.infotext(0))["extra"]["Eta"] == "1.0"
    with pytest.raises(RequestError, match="takes no eta") as e:
        p("x", steps=4, sampler="euler", eta=0.5)
    assert e.value.field == "eta"
