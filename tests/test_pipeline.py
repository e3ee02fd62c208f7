"""Text-to-image against diffusers' own pipelines on the same random-weight folder and seeds."""

import pytest
import torch

import refconfigs as R
from stablexl.io.models import save_model
from stablexl.pipeline import Pipeline

import sys, os  # noqa: E401
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "io"))
from test_layouts import random_parts  # noqa: E402


@pytest.fixture(scope="module")
def sdxl_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipe") / "tiny-sdxl"
    save_model(random_parts("tiny-sdxl", seed=5), root, "diffusers")
    return root


SCHEDULERS = {"euler": "EulerDiscreteScheduler", "euler_ancestral": "EulerAncestralDiscreteScheduler",
              "ddim": "DDIMScheduler"}


@pytest.mark.parametrize("sampler", list(SCHEDULERS))
@pytest.mark.parametrize("negative", [None, "blurry"])
def test_sdxl_txt2img_matches_diffusers(sdxl_folder, sampler, negative):
    import diffusers

    ref = diffusers.StableDiffusionXLPipeline.from_pretrained(sdxl_folder)
    ref.scheduler = getattr(diffusers, SCHEDULERS[sampler]).from_config(ref.scheduler.config)
    ref.set_progress_bar_config(disable=True)
    gens = [torch.Generator().manual_seed(s) for s in (7, 8)]
    want = ref(["a red apple", "a red apple"], negative_prompt=None if negative is None else [negative] * 2,
               num_inference_steps=6, guidance_scale=5.0, height=64, width=64, generator=gens,
               output_type="latent").images
    ours = Pipeline.from_pretrained(sdxl_folder)
    got = ours("a red apple", negative, steps=6, cfg=5.0, seed=7, batch=2, width=64, height=64, sampler=sampler,
               schedule="leading")
    err = R.rel_err(got.latents, want)
    print(f"{sampler} negative={negative!r}: latent rel err {err:.2e}")
    assert err <= 1e-4


def test_batch_image_equals_single_seed_run(sdxl_folder):
    pipe = Pipeline.from_pretrained(sdxl_folder)
    batch = pipe("a red apple", steps=4, seed=11, batch=3, sampler="euler_ancestral")
    alone = pipe("a red apple", steps=4, seed=12, sampler="euler_ancestral")
    # equal up to float reassociation across batch sizes
    assert R.rel_err(batch.latents[1:2], alone.latents) <= 1e-5
    assert R.rel_err(batch.latents[0:1], alone.latents) > 1e-2


@pytest.fixture(scope="module")
def init_image():
    g = torch.Generator().manual_seed(21)
    arr = (torch.rand(64, 64, 3, generator=g) * 255).to(torch.uint8).numpy()
    from PIL import Image

    return Image.fromarray(arr)


@pytest.fixture(scope="module")
def mask_image():
    from PIL import Image

    m = torch.zeros(64, 64, dtype=torch.uint8)
    m[16:48, 8:40] = 255
    return Image.fromarray(m.numpy(), mode="L")


@pytest.mark.parametrize("strength", [0.3, 0.75])
@pytest.mark.parametrize("sampler", ["euler", "euler_ancestral"])
def test_sdxl_img2img_matches_diffusers(sdxl_folder, init_image, strength, sampler):
    import diffusers

    ref = diffusers.StableDiffusionXLImg2ImgPipeline.from_pretrained(sdxl_folder)
    ref.scheduler = getattr(diffusers, SCHEDULERS[sampler]).from_config(ref.scheduler.config)
    ref.set_progress_bar_config(disable=True)
    gens = [torch.Generator().manual_seed(s) for s in (3, 4)]
    want = ref(["a red apple"] * 2, image=init_image, strength=strength, num_inference_steps=10, guidance_scale=5.0,
               generator=gens, output_type="latent").images
    got = Pipeline.from_pretrained(sdxl_folder)("a red apple", init_image=init_image, strength=strength, steps=10, cfg=5.0,
                                                seed=3, batch=2, sampler=sampler, schedule="leading")
    err = R.rel_err(got.latents, want)
    print(f"img2img {sampler} strength {strength}: latent rel err {err:.2e}")
    assert err <= 1e-4


def test_img2img_too_few_steps_is_a_clear_error(sdxl_folder, init_image):
    with pytest.raises(ValueError, match="steps x strength = 2 x 0.3 < 1"):
        Pipeline.from_pretrained(sdxl_folder)("x", init_image=init_image, strength=0.3, steps=2)


@pytest.mark.parametrize("strength", [1.0, 0.6])
def test_sdxl_inpaint_4ch_matches_diffusers(sdxl_folder, init_image, mask_image, strength):
    import diffusers

    ref = diffusers.StableDiffusionXLInpaintPipeline.from_pretrained(sdxl_folder)
    ref.set_progress_bar_config(disable=True)
    gens = [torch.Generator().manual_seed(5)]
    want = ref("a red apple", image=init_image, mask_image=mask_image, strength=strength, num_inference_steps=8,
               guidance_scale=5.0, generator=gens, output_type="latent").images
    pipe = Pipeline.from_pretrained(sdxl_folder)
    got = pipe("a red apple", init_image=init_image, mask=mask_image, strength=strength, steps=8, cfg=5.0, seed=5,
               sampler="euler", schedule="leading", output_type="latent")
    err = R.rel_err(got.latents, want)
    print(f"inpaint 4ch strength {strength}: latent rel err {err:.2e}")
    assert err <= 1e-4
    # decoded: pixels outside the mask are the original image's
    out = pipe("a red apple", init_image=init_image, mask=mask_image, strength=strength, steps=8, seed=5)
    import numpy as np

    a, b, m = np.asarray(out.images[0]), np.asarray(init_image), np.asarray(mask_image) < 128
    assert np.array_equal(a[m], b[m])


def test_inpaint_9ch_matches_diffusers(tmp_path, init_image, mask_image):
    import dataclasses

    import diffusers

    from stablexl.config import TINY_SD15
    from stablexl.models.parts import build_parts

    cfg = dataclasses.replace(TINY_SD15, name="tiny-sd15-inpaint", unet=dataclasses.replace(TINY_SD15.unet, in_channels=9))
    torch.manual_seed(9)
    parts = build_parts(cfg, device="cpu")
    with torch.no_grad():
        for m in parts.modules().values():
            for p in m.parameters():
                p.add_(torch.randn_like(p) * 0.1)
    save_model(parts, tmp_path / "inpaint", "diffusers")
    ref = diffusers.StableDiffusionInpaintPipeline.from_pretrained(tmp_path / "inpaint", safety_checker=None)
    ref.set_progress_bar_config(disable=True)
    want = ref("a red apple", image=init_image, mask_image=mask_image, num_inference_steps=6, guidance_scale=7.5,
               generator=[torch.Generator().manual_seed(6)], output_type="latent", height=64, width=64).images
    got = Pipeline.from_pretrained(tmp_path / "inpaint")("a red apple", init_image=init_image, mask=mask_image, steps=6,
                                                         cfg=7.5, seed=6, sampler="euler", schedule="leading",
                                                         output_type="latent")
    err = R.rel_err(got.latents, want)
    print(f"inpaint 9ch: latent rel err {err:.2e}")
    assert err <= 1e-4


def test_base_to_refiner_handoff_matches_diffusers(sdxl_folder, tmp_path):
    import diffusers

    save_model(random_parts("tiny-refiner", seed=6), tmp_path / "refiner", "diffusers")
    base_ref = diffusers.StableDiffusionXLPipeline.from_pretrained(sdxl_folder)
    ref_ref = diffusers.StableDiffusionXLImg2ImgPipeline.from_pretrained(tmp_path / "refiner")
    for p in (base_ref, ref_ref):
        p.set_progress_bar_config(disable=True)
    g = [torch.Generator().manual_seed(13)]
    lat = base_ref("a red apple", num_inference_steps=10, denoising_end=0.8, guidance_scale=5.0, height=64, width=64,
                   generator=g, output_type="latent").images
    want = ref_ref("a red apple", image=lat, num_inference_steps=10, denoising_start=0.8, guidance_scale=5.0,
                   generator=g, output_type="latent").images
    base, refiner = Pipeline.from_pretrained(sdxl_folder), Pipeline.from_pretrained(tmp_path / "refiner")
    got = base.refine(refiner, "a red apple", switch_at=0.8, steps=10, cfg=5.0, seed=13, sampler="euler",
                      schedule="leading", width=64, height=64)
    err = R.rel_err(got.latents, want)
    print(f"base -> refiner at 0.8: latent rel err {err:.2e}")
    assert err <= 1e-4
    assert len(got.images) == 1


@pytest.fixture(scope="module")
def refiner_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipe") / "tiny-refiner"
    save_model(random_parts("tiny-refiner", seed=6), root, "diffusers")
    return root


@pytest.mark.parametrize("scores", [(6.0, 2.5), (7.5, 1.0)])
def test_base_then_refiner_as_sdedit_matches_diffusers(sdxl_folder, refiner_folder, scores):
    """The refiner as SDEdit: the base's full-schedule latents into diffusers' img2img pipeline at strength 0.3,
    one generator per image carried through both pipelines."""
    import diffusers

    base_ref = diffusers.StableDiffusionXLPipeline.from_pretrained(sdxl_folder)
    ref_ref = diffusers.StableDiffusionXLImg2ImgPipeline.from_pretrained(refiner_folder)
    for p in (base_ref, ref_ref):
        p.set_progress_bar_config(disable=True)
    g = [torch.Generator().manual_seed(s) for s in (21, 22)]
    lat = base_ref(["a red apple"] * 2, num_inference_steps=10, guidance_scale=5.0, height=64, width=64, generator=g,
                   output_type="latent").images
    want = ref_ref(["a red apple"] * 2, image=lat, strength=0.3, num_inference_steps=10, guidance_scale=5.0,
                   aesthetic_score=scores[0], negative_aesthetic_score=scores[1], generator=g, output_type="latent").images
    base, refiner = Pipeline.from_pretrained(sdxl_folder), Pipeline.from_pretrained(refiner_folder)
    got = base.refine(refiner, "a red apple", mode="sdedit", refiner_strength=0.3, steps=10, cfg=5.0, seed=21, batch=2,
                      sampler="euler", schedule="leading", width=64, height=64, aesthetic_score=scores[0],
                      negative_aesthetic_score=scores[1])
    err = R.rel_err(got.latents, want)
    print(f"base then refiner as SDEdit (strength 0.3, aesthetic {scores}): latent rel err {err:.2e}")
    assert err <= 1e-4
    assert len(got.images) == 2
    assert got.request.model == base.name and got.request.handoff.refiner == refiner.name
    assert got.request.handoff.mode == "sdedit" and got.request.handoff.refiner_strength == 0.3


def test_refiner_img2img_on_an_image_matches_diffusers(refiner_folder, init_image):
    """The refiner alone as SDEdit on a picture (pixels in, VAE-encoded), with diffusers' default strength."""
    import diffusers

    ref = diffusers.StableDiffusionXLImg2ImgPipeline.from_pretrained(refiner_folder)
    ref.set_progress_bar_config(disable=True)
    want = ref("a red apple", image=init_image, num_inference_steps=10, guidance_scale=5.0,
               generator=[torch.Generator().manual_seed(8)], output_type="latent").images
    got = Pipeline.from_pretrained(refiner_folder)("a red apple", init_image=init_image, steps=10, cfg=5.0, seed=8,
                                                   sampler="euler", schedule="leading")
    err = R.rel_err(got.latents, want)
    print(f"refiner img2img on an image (default strength {got.request.image.strength}): latent rel err {err:.2e}")
    assert got.request.image.strength == 0.3
    assert err <= 1e-4


def test_refiner_modes_reject_bad_input(sdxl_folder, refiner_folder, init_image, mask_image):
    base, refiner = Pipeline.from_pretrained(sdxl_folder), Pipeline.from_pretrained(refiner_folder)
    with pytest.raises(ValueError, match="unknown refiner mode 'img2img'; choose handoff or sdedit"):
        base.refine(refiner, "x", mode="img2img", steps=2)
    with pytest.raises(ValueError, match="inpainting with a refiner is not supported"):
        base.refine(refiner, "x", mode="sdedit", init_image=init_image, mask=mask_image, steps=2)
    with pytest.raises(ValueError, match=r"init latents must have shape \(B, 4, h, w\), got \(1, 3, 8, 8\)"):
        refiner("x", init_image=torch.zeros(1, 3, 8, 8), steps=4)
    with pytest.raises(ValueError, match="3 init latents for a batch of 2"):
        refiner("x", init_image=torch.zeros(3, 4, 8, 8), steps=4, batch=2)
    with pytest.raises(ValueError, match="differs from the init latents' 64x64"):
        refiner("x", init_image=torch.zeros(1, 4, 8, 8), steps=4, width=128)
    with pytest.raises(ValueError, match="init latents contain NaN"):
        refiner("x", init_image=torch.full((1, 4, 8, 8), float("nan")), steps=4)


@pytest.mark.parametrize("case", ["heun", "dpmpp_2m_karras", "turbo_1", "turbo_4", "rescale_0.7"])
def test_sdxl_sampler_variants_match_diffusers(sdxl_folder, case):
    import diffusers

    ref = diffusers.StableDiffusionXLPipeline.from_pretrained(sdxl_folder)
    ref.set_progress_bar_config(disable=True)
    base = ref.scheduler.config
    steps, cfg, rescale, ours_kw = 6, 5.0, 0.0, {}
    if case == "heun":
        ref.scheduler = diffusers.HeunDiscreteScheduler.from_config(base)
        ours_kw = dict(sampler="heun", schedule="leading")
    elif case == "dpmpp_2m_karras":
        ref.scheduler = diffusers.DPMSolverMultistepScheduler.from_config(base, use_karras_sigmas=True)
        ours_kw = dict(sampler="DPM++ 2M Karras")
    elif case.startswith("turbo"):  # SDXL-Turbo recipe: Euler ancestral, trailing spacing, no CFG
        ref.scheduler = diffusers.EulerAncestralDiscreteScheduler.from_config(base, timestep_spacing="trailing")
        steps, cfg = int(case[-1]), 0.0
        ours_kw = dict(sampler="euler_ancestral", schedule="trailing")
    else:
        rescale = 0.7
        ours_kw = dict(sampler="euler", schedule="leading")
    want = ref("a red apple", num_inference_steps=steps, guidance_scale=cfg, guidance_rescale=rescale, height=64,
               width=64, generator=[torch.Generator().manual_seed(17)], output_type="latent").images
    got = Pipeline.from_pretrained(sdxl_folder)("a red apple", steps=steps, cfg=cfg, guidance_rescale=rescale, seed=17,
                                                **ours_kw)
    err = R.rel_err(got.latents, want)
    print(f"{case}: latent rel err {err:.2e}")
    assert err <= 1e-4


@pytest.mark.parametrize("name", ["tiny-sd15", "tiny-sd21"])
def test_sd1_sd2_txt2img_match_diffusers(name, tmp_path):
    import diffusers

    save_model(random_parts(name, seed=8), tmp_path / name, "diffusers")
    ref = diffusers.StableDiffusionPipeline.from_pretrained(tmp_path / name, safety_checker=None)
    ref.set_progress_bar_config(disable=True)
    assert ref.scheduler.config.prediction_type == ("v_prediction" if name == "tiny-sd21" else "epsilon")
    want = ref(["a red apple"] * 2, negative_prompt=["blurry"] * 2, num_inference_steps=5, guidance_scale=7.5,
               height=64, width=64, generator=[torch.Generator().manual_seed(s) for s in (2, 3)],
               output_type="latent").images
    got = Pipeline.from_pretrained(tmp_path / name)("a red apple", "blurry", steps=5, cfg=7.5, seed=2, batch=2,
                                                    sampler="euler", schedule="leading")
    err = R.rel_err(got.latents, want)
    print(f"{name}: latent rel err {err:.2e}")
    assert err <= 1e-4


def test_weighted_and_long_prompts_run_through_the_pipeline(sdxl_folder):
    pipe = Pipeline.from_pretrained(sdxl_folder)
    plain = pipe("a red apple", steps=2, seed=1)
    weighted = pipe("a (red:1.5) apple", steps=2, seed=1)
    neutral = pipe("a (red:1.0) apple", steps=2, seed=1)  # syntax with weight 1 encodes as the plain prompt
    assert R.rel_err(neutral.latents, plain.latents) <= 1e-6
    assert R.rel_err(weighted.latents, plain.latents) > 1e-3
    long = " ".join(["a red apple on a wooden table,"] * 20)  # > 75 tokens: several chunks
    from stablexl.prompts import tokenize_weighted

    assert tokenize_weighted(long, 49407)[0].shape[0] >= 2
    out = pipe(long, "blurry BREAK lowres", steps=2, seed=1)
    assert torch.isfinite(out.latents).all()


@pytest.mark.parametrize("noise_level", [0, 250])
def test_unclip_image_variation_matches_diffusers(tmp_path, noise_level):
    import diffusers
    from PIL import Image

    save_model(random_parts("tiny-unclip", seed=10), tmp_path / "unclip", "diffusers")
    ref = diffusers.StableUnCLIPImg2ImgPipeline.from_pretrained(tmp_path / "unclip")
    ref.set_progress_bar_config(disable=True)
    g = torch.Generator().manual_seed(30)
    image = Image.fromarray((torch.rand(28, 28, 3, generator=g) * 255).to(torch.uint8).numpy())
    want = ref(image=image, prompt="a red apple", num_inference_steps=5, guidance_scale=7.5, noise_level=noise_level,
               generator=[torch.Generator().manual_seed(31)], output_type="latent", height=64, width=64).images
    pipe = Pipeline.from_pretrained(tmp_path / "unclip")
    got = pipe("a red apple", image_prompt=image, noise_level=noise_level, steps=5, cfg=7.5, seed=31, sampler="ddim",
               schedule="leading", output_type="latent")
    err = R.rel_err(got.latents, want)
    print(f"unCLIP variation noise_level {noise_level}: latent rel err {err:.2e}")
    assert err <= 1e-4
    with pytest.raises(ValueError, match="pass image_prompt"):
        pipe("a red apple", steps=2)


def test_micro_and_negative_micro_conditions_match_diffusers(sdxl_folder):
    import diffusers

    ref = diffusers.StableDiffusionXLPipeline.from_pretrained(sdxl_folder)
    ref.set_progress_bar_config(disable=True)
    want = ref("a red apple", negative_prompt="blurry", num_inference_steps=3, guidance_scale=5.0, height=64, width=64,
               original_size=(32, 48), crops_coords_top_left=(8, 0), target_size=(64, 64),
               negative_original_size=(16, 16), negative_crops_coords_top_left=(0, 4), negative_target_size=(48, 64),
               generator=[torch.Generator().manual_seed(2)], output_type="latent").images
    got = Pipeline.from_pretrained(sdxl_folder)(
        "a red apple", "blurry", steps=3, cfg=5.0, seed=2, sampler="euler", schedule="leading",
        original_size=(32, 48), crop=(8, 0), target_size=(64, 64),
        negative_original_size=(16, 16), negative_crop=(0, 4), negative_target_size=(48, 64))
    assert R.rel_err(got.latents, want) <= 1e-4


def test_zero_terminal_snr_schedule_matches_diffusers():
    from diffusers import EulerDiscreteScheduler

    from stablexl.diffusion.schedule import NoiseSchedule

    ref = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                 rescale_betas_zero_snr=True)
    ours = NoiseSchedule.ddpm(zero_terminal_snr=True).alphas_cumprod
    assert torch.allclose(ours, ref.alphas_cumprod, rtol=1e-5, atol=1e-9)
