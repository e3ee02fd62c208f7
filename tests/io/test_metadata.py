"""Reading generation settings back from images: infotext (ours, A1111, sd.cpp), ComfyUI graphs,
JPEG/WebP EXIF, `stablexl info`, and the bad-input errors."""

import json
import os

import numpy as np
import pytest
from PIL import Image, PngImagePlugin

from stablexl import __version__
from stablexl.info import format_settings, main_info
from stablexl.io.metadata import (
    MetadataError, decode_user_comment, generation_infotext, normalise_sampler, parse_comfyui_prompt,
    parse_infotext, read_png_settings, save_png,
)
from stablexl.names import SCHEDULE_NAMES


def expected(**kw):
    """The normalised dict with A1111's values for everything not given."""
    d = {"prompt": "", "negative_prompt": "", "steps": None, "sampler": None, "schedule": None, "cfg": None,
         "seed": None, "width": None, "height": None, "model": None, "model_hash": None, "clip_skip": 1,
         "guidance_rescale": 0.0, "source": "a1111", "extra": {}, "defaults": {}}
    d.update(kw)
    return d


A1111_ALWAYS = {"RNG": "GPU", "VAE Encoder": "Full", "VAE Decoder": "Full"}
HIRES = {"Hires sampler": "Use same sampler", "Hires checkpoint": "Use same checkpoint", "Hires prompt": "",
         "Hires negative prompt": ""}

# ---- infotext in A1111's documented shapes (reference/peers.md §2.3) -------------------------------

INFOTEXTS = [
    # 1. the reference's own example: v1.10, hires fix + refiner, a JSON-quoted value
    ("a lighthouse at dusk, (volumetric light:1.2), dramatic sky\n"
     "Negative prompt: blurry, lowres, watermark\n"
     "Steps: 30, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 6.5, Seed: 1234, Size: 1024x1024, "
     "Model hash: 31e35c80fc, Model: sd_xl_base_1.0, Denoising strength: 0.35, Hires upscale: 1.5, "
     "Hires upscaler: Latent, Refiner: sd_xl_refiner_1.0 [7440042bbd], Refiner switch at: 0.8, "
     'Lora hashes: "detail: 0a1b2c3d4e5f", Version: v1.10.1',
     expected(prompt="a lighthouse at dusk, (volumetric light:1.2), dramatic sky",
              negative_prompt="blurry, lowres, watermark", steps=30, sampler="dpmpp_2m", schedule="karras",
              cfg=6.5, seed=1234, width=1024, height=1024, model="sd_xl_base_1.0", model_hash="31e35c80fc",
              extra={"Denoising strength": "0.35", "Hires upscale": "1.5", "Hires upscaler": "Latent",
                     "Refiner": "sd_xl_refiner_1.0 [7440042bbd]", "Refiner switch at": "0.8",
                     "Lora hashes": "detail: 0a1b2c3d4e5f", "Version": "v1.10.1"},
              defaults={**A1111_ALWAYS, **HIRES})),
    # 2. pre-1.9 shape: no negative prompt, no Schedule type, integer CFG
    ("masterpiece, a cat\n"
     "Steps: 20, Sampler: Euler a, CFG scale: 7, Seed: 42, Size: 512x768, Model hash: 6ce0161689, "
     "Model: v1-5-pruned-emaonly, Version: v1.6.0",
     expected(prompt="masterpiece, a cat", steps=20, sampler="euler_ancestral", schedule="leading", cfg=7.0,
              seed=42, width=512, height=768, model="v1-5-pruned-emaonly", model_hash="6ce0161689",
              extra={"Version": "v1.6.0"}, defaults=A1111_ALWAYS)),
    # 3. old sampler name carrying the schedule; Clip skip and ENSD written
    ("portrait of a knight\nNegative prompt: ugly\n"
     "Steps: 25, Sampler: DPM++ 2M Karras, CFG scale: 5.5, Seed: 3141592653, Size: 832x1216, "
     "Model hash: e6bb9ea85b, Clip skip: 2, ENSD: 31337",
     expected(prompt="portrait of a knight", negative_prompt="ugly", steps=25, sampler="dpmpp_2m",
              schedule="karras", cfg=5.5, seed=3141592653, width=832, height=1216, model_hash="e6bb9ea85b",
              clip_skip=2, extra={"ENSD": "31337"}, defaults=A1111_ALWAYS)),
    # 4. multi-line prompt and multi-line negative prompt
    ("line one,\nline two: with colon\n\nBREAK line four\n"
     "Negative prompt: bad hands,\nextra fingers\n"
     "Steps: 40, Sampler: Heun, Schedule type: Automatic, CFG scale: 8, Seed: 7, Size: 1024x1024",
     expected(prompt="line one,\nline two: with colon\n\nBREAK line four",
              negative_prompt="bad hands,\nextra fingers", steps=40, sampler="heun", schedule="leading",
              cfg=8.0, seed=7, width=1024, height=1024, defaults=A1111_ALWAYS)),
    # 5. last line has only 2 pairs: not a parameters line, all of it is prompt
    ("a castle\nstyle: baroque, lighting: soft",
     expected(prompt="a castle\nstyle: baroque, lighting: soft")),
    # 6. ... and with 2 pairs after a negative prompt, the line belongs to the negative prompt
    ("a castle\nNegative prompt: fog\nSteps: 20, Seed: 5",
     expected(prompt="a castle", negative_prompt="fog\nSteps: 20, Seed: 5")),
    # 7. JSON-quoted values with commas, colons, escaped quotes and a newline; a bare key
    ('<lora:detail:0.6> a "red" car\n'
     'Steps: 12, Sampler: LCM, CFG scale: 1.5, Seed: 0, Size: 768x768, Model: "C:\\\\models\\\\xl.safetensors", '
     'TI hashes: "emb: \\"abc\\", neg: def", Hires prompt: "two\\nlines", Tiling, '
     'Lora hashes: "detail: 1f2e3d4c5b6a"',
     expected(prompt='<lora:detail:0.6> a "red" car', steps=12, sampler="lcm", schedule="leading", cfg=1.5,
              seed=0, width=768, height=768, model="C:\\models\\xl.safetensors",
              extra={"TI hashes": 'emb: "abc", neg: def', "Hires prompt": "two\nlines", "Tiling": "Tiling",
                     "Lora hashes": "detail: 1f2e3d4c5b6a"},
              defaults={**A1111_ALWAYS, **{k: v for k, v in HIRES.items() if k != "Hires prompt"}})),
    # 8. v1.9+ Schedule types map to ours (SGM Uniform, Align Your Steps); an A1111 sampler we lack is kept as written
    ("a fox\nSteps: 8, Sampler: Euler, Schedule type: SGM Uniform, CFG scale: 2, Seed: 99, Size: 1024x1024, "
     "RNG: CPU, Version: v1.9.4",
     expected(prompt="a fox", steps=8, sampler="euler", schedule="sgm_uniform", cfg=2.0, seed=99, width=1024,
              height=1024, extra={"RNG": "CPU", "Version": "v1.9.4"},
              defaults={"VAE Encoder": "Full", "VAE Decoder": "Full"})),
    ("a fox\nSteps: 20, Sampler: DPM adaptive, Schedule type: Align Your Steps, CFG scale: 4.5, Seed: 1, "
     "Size: 896x1152",
     expected(prompt="a fox", steps=20, sampler="DPM adaptive", schedule="align_your_steps", cfg=4.5, seed=1,
              width=896, height=1152, defaults=A1111_ALWAYS)),
    # 9. img2img inpainting: Mask blur present brings the inpaint defaults; size-like extras verbatim
    ("a red door\nNegative prompt: \n"
     "Steps: 30, Sampler: DPM++ 2M SDE, Schedule type: Exponential, CFG scale: 7, Seed: 11, Size: 1024x1024, "
     "Denoising strength: 0.75, Mask blur: 4, Seed resize from: 512x512",
     expected(prompt="a red door", steps=30, sampler="dpmpp_2m_sde", schedule="exponential", cfg=7.0, seed=11,
              width=1024, height=1024,
              extra={"Denoising strength": "0.75", "Mask blur": "4", "Seed resize from": "512x512"},
              defaults={**A1111_ALWAYS, "Mask mode": "Inpaint masked", "Masked content": "original",
                        "Inpaint area": "Whole picture", "Masked area padding": "32"})),
    # 10. old "DPM++ 2M SDE Karras" + explicit Automatic: the name's schedule wins; CRLF line ends
    ("a boat\r\nNegative prompt: rain\r\nSteps: 15, Sampler: DPM++ 2M SDE Karras, Schedule type: Automatic, "
     "CFG scale: 6, Seed: 2, Size: 640x640\r\n",
     expected(prompt="a boat", negative_prompt="rain", steps=15, sampler="dpmpp_2m_sde", schedule="karras",
              cfg=6.0, seed=2, width=640, height=640, defaults=A1111_ALWAYS)),
    # 11. empty prompt, negative prompt only; old k-diffusion alias; Uniform schedule (= Normal)
    ("\nNegative prompt: text, signature\nSteps: 50, Sampler: k_euler, Schedule type: Uniform, CFG scale: 7.5, "
     "Seed: 123456789, Size: 512x512",
     expected(negative_prompt="text, signature", steps=50, sampler="euler", schedule="normal", cfg=7.5,
              seed=123456789, width=512, height=512, defaults=A1111_ALWAYS)),
    # 12. sd.cpp: `Sampler: <method> <schedule>`, its own keys kept
    ("a lovely cat\nNegative prompt: blurry\n"
     "Steps: 20, CFG scale: 7, Guidance: 3.5, Eta: 0, Seed: 42, Size: 1024x1024, Model: sd_xl_base_1.0, "
     "RNG: cuda, Sampler: euler_a karras, Version: stable-diffusion.cpp",
     expected(prompt="a lovely cat", negative_prompt="blurry", steps=20, sampler="euler_ancestral",
              schedule="karras", cfg=7.0, seed=42, width=1024, height=1024, model="sd_xl_base_1.0",
              source="sd.cpp", extra={"Guidance": "3.5", "Eta": "0", "RNG": "cuda",
                                      "Version": "stable-diffusion.cpp"})),
    # 13. ours
    (f"a cat\nSteps: 30, Sampler: Euler, Schedule type: Automatic, CFG scale: 5.0, Seed: 0, Size: 1024x1024, "
     f"Model: sdxl-base, Version: stablexl {__version__}",
     expected(prompt="a cat", steps=30, sampler="euler", schedule="leading", cfg=5.0, seed=0, width=1024,
              height=1024, model="sdxl-base", source="stablexl", extra={"Version": f"stablexl {__version__}"})),
]


@pytest.mark.parametrize("text,want", INFOTEXTS, ids=[f"infotext{i + 1}" for i in range(len(INFOTEXTS))])
def test_parse_infotext_shapes(text, want):
    assert parse_infotext(text) == want


@pytest.mark.parametrize("name,want", [
    ("Euler a", ("euler_ancestral", None, "a1111")), ("DPM++ 2M Karras", ("dpmpp_2m", "karras", "a1111")),
    ("dpm++ 2m sde exponential", ("dpmpp_2m_sde", "exponential", "a1111")), ("DDIM", ("ddim", None, "a1111")),
    ("euler_ancestral", ("euler_ancestral", None, "ours")), ("dpm++2m discrete", ("dpmpp_2m", "normal", "sd.cpp")),
    ("euler_a default", ("euler_ancestral", "default", "sd.cpp")), ("euler", ("euler", None, "ours")),
    ("ddim_trailing discrete", ("ddim", "trailing", "sd.cpp")), ("ipndm karras", ("ipndm", "karras", "sd.cpp")),
    ("DPM adaptive", ("DPM adaptive", None, "unknown")),
    ("k_dpmpp_2m_sde_heun_exp", ("dpmpp_2m_sde_heun", "exponential", "a1111")),
])
def test_normalise_sampler(name, want):
    assert normalise_sampler(name) == want


# ---- round trip through our writer -------------------------------------------------------------------

def _settings(**kw):
    s = {"prompt": ["a cat"], "negative_prompt": None, "steps": 30, "sampler": "euler", "schedule": "leading",
         "cfg": 5.0, "seed": 0, "width": 1024, "height": 1024, "model": "sdxl-base", "guidance_rescale": 0.0}
    s.update(kw)
    return s


def _infotext(s: dict, index: int) -> str:
    """The writer's output for settings `s` as a (resolved-looking) GenerationRequest."""
    from stablexl.request import GenerationRequest

    neg = s["negative_prompt"]
    req = GenerationRequest(prompt=tuple(s["prompt"]), negative_prompt=None if neg is None else tuple(neg),
                            batch=len(s["prompt"]), **{k: s[k] for k in ("steps", "sampler", "schedule", "cfg", "seed",
                                                                          "width", "height", "model", "guidance_rescale")})
    return generation_infotext(req, index)


TRICKY = [
    "a cat, on a mat: photo (detailed:1.3)",
    'she said "hello", then left',
    "first line\nsecond line, with comma\nthird: colon",
    "a: 1, b: 2, c: 3",  # a prompt line that looks like a parameters line
    "ünïcödé ☃ 日本語の猫, émoji 🐱",
    "  leading and trailing spaces  ",
    "ends with newline\n",
    "has Negative prompt: in the middle",
    "",
]


@pytest.mark.parametrize("prompt", TRICKY)
@pytest.mark.parametrize("negative", [None, "blurry, lowres", 'multi\nline "neg": ☃'])
def test_round_trip_prompts(prompt, negative):
    s = _settings(prompt=["other", prompt], negative_prompt=None if negative is None else ["x", negative],
                  seed=100, model='C:\\models\\"weird", name.safetensors', guidance_rescale=0.7)
    got = parse_infotext(_infotext(s, 1))
    assert got["prompt"] == prompt
    assert got["negative_prompt"] == (negative or "")
    assert (got["seed"], got["model"], got["guidance_rescale"]) == (101, s["model"], 0.7)
    assert got["source"] == "stablexl" and got["defaults"] == {}


@pytest.mark.parametrize("sampler", ["euler", "euler_ancestral", "heun", "dpmpp_2m", "dpmpp_2m_sde", "ddim",
                                     "ddpm", "lcm"])
@pytest.mark.parametrize("schedule", SCHEDULE_NAMES)
def test_round_trip_settings(sampler, schedule):
    s = _settings(sampler=sampler, schedule=schedule, steps=7, cfg=6.5, seed=2**32 + 5, width=832, height=1216,
                  model=None, guidance_rescale=None)
    got = parse_infotext(_infotext(s, 0))
    back = {k: got[k] for k in ("steps", "sampler", "schedule", "cfg", "seed", "width", "height", "model")}
    assert back == {k: s[k] for k in back}
    assert got["prompt"] == "a cat" and got["guidance_rescale"] == 0.0
    assert got["extra"] == {"Version": f"stablexl {__version__}"}


def test_round_trip_value_starting_with_quote():
    s = _settings(model='"quoted"')
    assert parse_infotext(_infotext(s, 0))["model"] == '"quoted"'


def test_round_trip_through_png(tmp_path):
    s = _settings(prompt=["ünïcödé, ☃: \"q\"\nline 2"], negative_prompt=["日本語"], schedule="karras",
                  sampler="dpmpp_2m")
    path = save_png(Image.new("RGB", (16, 16), "red"), tmp_path / "out.png", _infotext(s, 0))
    got = read_png_settings(path)
    assert got["prompt"] == s["prompt"][0] and got["negative_prompt"] == "日本語"
    assert (got["sampler"], got["schedule"], got["width"]) == ("dpmpp_2m", "karras", 1024)
    assert got["image"] == {"format": "PNG", "width": 16, "height": 16}


# ---- ComfyUI -----------------------------------------------------------------------------------------
# API-format graphs ("Save (API Format)" / the PNG `prompt` chunk): {node_id(str): {"class_type", "inputs",
# "_meta"}}; an input is a literal or a link [source_node_id, output_index]. CheckpointLoaderSimple
# outputs MODEL 0, CLIP 1, VAE 2; ControlNetApplyAdvanced outputs positive 0, negative 1.

def comfy_basic():
    """ComfyUI's default text-to-image graph (as in its websockets API example), SDXL-sized."""
    return {
        "3": {"class_type": "KSampler", "inputs": {
            "seed": 156680208700286, "steps": 20, "cfg": 8, "sampler_name": "euler", "scheduler": "normal",
            "denoise": 1, "model": ["4", 0], "positive": ["6", 0], "negative": ["7", 0], "latent_image": ["5", 0]},
            "_meta": {"title": "KSampler"}},
        "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "sd_xl_base_1.0.safetensors"}},
        "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 1024, "height": 1024, "batch_size": 1}},
        "6": {"class_type": "CLIPTextEncode", "inputs": {
            "text": "beautiful scenery nature glass bottle landscape, , purple galaxy bottle,", "clip": ["4", 1]}},
        "7": {"class_type": "CLIPTextEncode", "inputs": {"text": "text, watermark", "clip": ["4", 1]}},
        "8": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["4", 2]}},
        "9": {"class_type": "SaveImage", "inputs": {"filename_prefix": "ComfyUI", "images": ["8", 0]}},
    }


def comfy_sdxl_refiner():
    """SDXL base + refiner with KSamplerAdvanced, a LoRA, CLIPSetLastLayer, RescaleCFG, a seed primitive.

    The refiner sampler has the lower node id: the first pass is found by its latent, not its id."""
    return {
        "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "sd_xl_base_1.0.safetensors"}},
        "10": {"class_type": "LoraLoader", "inputs": {
            "lora_name": "detail_xl.safetensors", "strength_model": 0.8, "strength_clip": 0.8,
            "model": ["4", 0], "clip": ["4", 1]}},
        "11": {"class_type": "CLIPSetLastLayer", "inputs": {"stop_at_clip_layer": -2, "clip": ["10", 1]}},
        "12": {"class_type": "RescaleCFG", "inputs": {"multiplier": 0.7, "model": ["10", 0]}},
        "13": {"class_type": "PrimitiveInt", "inputs": {"value": 42}},
        "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 832, "height": 1216, "batch_size": 2}},
        "6": {"class_type": "CLIPTextEncodeSDXL", "inputs": {
            "width": 4096, "height": 4096, "crop_w": 0, "crop_h": 0, "target_width": 4096, "target_height": 4096,
            "text_g": "a majestic owl, 8k", "text_l": "a majestic owl, 8k", "clip": ["11", 0]}},
        "7": {"class_type": "CLIPTextEncode", "inputs": {"text": "blurry, lowres", "clip": ["11", 0]}},
        "3": {"class_type": "KSamplerAdvanced", "inputs": {
            "add_noise": "enable", "noise_seed": ["13", 0], "steps": 30, "cfg": 6.5,
            "sampler_name": "dpmpp_2m_sde_gpu", "scheduler": "karras", "start_at_step": 0, "end_at_step": 24,
            "return_with_leftover_noise": "enable", "model": ["12", 0], "positive": ["6", 0],
            "negative": ["7", 0], "latent_image": ["5", 0]}},
        "20": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "sd_xl_refiner_1.0.safetensors"}},
        "21": {"class_type": "CLIPTextEncodeSDXLRefiner", "inputs": {
            "ascore": 6, "width": 1024, "height": 1024, "text": "a majestic owl, 8k", "clip": ["20", 1]}},
        "22": {"class_type": "CLIPTextEncodeSDXLRefiner", "inputs": {
            "ascore": 2.5, "width": 1024, "height": 1024, "text": "blurry, lowres", "clip": ["20", 1]}},
        "2": {"class_type": "KSamplerAdvanced", "inputs": {
            "add_noise": "disable", "noise_seed": ["13", 0], "steps": 30, "cfg": 6.5, "sampler_name": "euler",
            "scheduler": "karras", "start_at_step": 24, "end_at_step": 10000,
            "return_with_leftover_noise": "disable", "model": ["20", 0], "positive": ["21", 0],
            "negative": ["22", 0], "latent_image": ["3", 0]}},
        "8": {"class_type": "VAEDecode", "inputs": {"samples": ["2", 0], "vae": ["20", 2]}},
        "9": {"class_type": "SaveImage", "inputs": {"filename_prefix": "sdxl", "images": ["8", 0]}},
    }


def comfy_img2img_controlnet():
    """img2img (VAEEncode latent, denoise < 1) with a ControlNet between the encoders and the sampler,
    the prompt in a string primitive, and a sampler/scheduler we have no equivalent for."""
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "juggernautXL.safetensors"}},
        "2": {"class_type": "LoadImage", "inputs": {"image": "input.png", "upload": "image"}},
        "3": {"class_type": "VAEEncode", "inputs": {"pixels": ["2", 0], "vae": ["1", 2]}},
        "4": {"class_type": "PrimitiveString", "inputs": {"value": "a watercolor city"}},
        "5": {"class_type": "CLIPTextEncode", "inputs": {"text": ["4", 0], "clip": ["1", 1]}},
        "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "photo", "clip": ["1", 1]}},
        "7": {"class_type": "ControlNetLoader", "inputs": {"control_net_name": "canny_xl.safetensors"}},
        "8": {"class_type": "ControlNetApplyAdvanced", "inputs": {
            "strength": 0.6, "start_percent": 0, "end_percent": 1, "positive": ["5", 0], "negative": ["6", 0],
            "control_net": ["7", 0], "image": ["2", 0], "vae": ["1", 2]}},
        "9": {"class_type": "KSampler", "inputs": {
            "seed": 7, "steps": 25, "cfg": 5.5, "sampler_name": "uni_pc", "scheduler": "beta", "denoise": 0.6,
            "model": ["1", 0], "positive": ["8", 0], "negative": ["8", 1], "latent_image": ["3", 0]}},
        "10": {"class_type": "VAEDecode", "inputs": {"samples": ["9", 0], "vae": ["1", 2]}},
        "11": {"class_type": "SaveImage", "inputs": {"filename_prefix": "i2i", "images": ["10", 0]}},
    }


WORKFLOW = {"last_node_id": 9, "last_link_id": 9, "version": 0.4, "links": [[1, 4, 0, 3, 0, "MODEL"]],
            "nodes": [{"id": 3, "type": "KSampler", "pos": [863, 186], "size": [315, 262],
                       "widgets_values": [156680208700286, "randomize", 20, 8, "euler", "normal", 1]},
                      {"id": 4, "type": "CheckpointLoaderSimple", "pos": [26, 474], "size": [315, 98],
                       "widgets_values": ["sd_xl_base_1.0.safetensors"]}]}


def test_comfy_basic():
    assert parse_comfyui_prompt(comfy_basic()) == expected(
        prompt="beautiful scenery nature glass bottle landscape, , purple galaxy bottle,",
        negative_prompt="text, watermark", steps=20, sampler="euler", schedule="normal", cfg=8.0,
        seed=156680208700286, width=1024, height=1024, model="sd_xl_base_1.0.safetensors", source="comfyui",
        extra={"sampler_name": "euler", "scheduler": "normal", "denoise": 1, "sampler_node": "3 (KSampler)"})


def test_comfy_sdxl_refiner():
    assert parse_comfyui_prompt(comfy_sdxl_refiner()) == expected(
        prompt="a majestic owl, 8k", negative_prompt="blurry, lowres", steps=30, sampler="dpmpp_2m_sde",
        schedule="karras", cfg=6.5, seed=42, width=832, height=1216, model="sd_xl_base_1.0.safetensors",
        clip_skip=2, guidance_rescale=0.7, source="comfyui",
        extra={"batch_size": 2, "sampler_name": "dpmpp_2m_sde_gpu", "scheduler": "karras",
               "loras": ["detail_xl.safetensors:0.8"], "start_at_step": 0, "end_at_step": 24,
               "sampler_node": "3 (KSamplerAdvanced)",
               "passes": [{"node": "2", "class_type": "KSamplerAdvanced", "model": "sd_xl_refiner_1.0.safetensors",
                           "steps": 30, "cfg": 6.5, "sampler": "euler", "schedule": "karras", "seed": 42,
                           "start_at_step": 24, "end_at_step": 10000}]})


def test_comfy_img2img_controlnet():
    assert parse_comfyui_prompt(comfy_img2img_controlnet()) == expected(
        prompt="a watercolor city", negative_prompt="photo", steps=25, sampler="uni_pc", schedule="beta",
        cfg=5.5, seed=7, model="juggernautXL.safetensors", source="comfyui",
        extra={"latent_from": "VAEEncode", "sampler_name": "uni_pc", "scheduler": "beta", "denoise": 0.6,
               "sampler_node": "9 (KSampler)"})


@pytest.mark.parametrize("comfy,ours", [("normal", "normal"), ("karras", "karras"), ("exponential", "exponential"),
                                        ("sgm_uniform", "sgm_uniform"), ("simple", "simple"),
                                        ("ddim_uniform", "ddim_uniform"), ("beta", "beta"),
                                        ("kl_optimal", "kl_optimal"), ("linear_quadratic", "linear_quadratic")])
def test_comfy_schedulers(comfy, ours):
    g = comfy_basic()
    g["3"]["inputs"]["scheduler"] = comfy
    assert parse_comfyui_prompt(g)["schedule"] == ours


def test_comfy_without_sampler():
    g = comfy_basic()
    del g["3"]
    with pytest.raises(MetadataError, match="KSampler"):
        parse_comfyui_prompt(g)


def _comfy_png(path, graph, workflow=None, size=(64, 64)):
    info = PngImagePlugin.PngInfo()
    info.add_text("prompt", json.dumps(graph))
    if workflow is not None:
        info.add_text("workflow", json.dumps(workflow))
    Image.new("RGB", size, "blue").save(path, pnginfo=info)
    return path


def test_read_comfy_png(tmp_path):
    path = _comfy_png(tmp_path / "ComfyUI_00001_.png", comfy_sdxl_refiner(), WORKFLOW)
    got = read_png_settings(path)
    assert (got["source"], got["prompt"], got["seed"], got["width"]) == ("comfyui", "a majestic owl, 8k", 42, 832)
    assert got["extra"]["workflow"] == "present (2 nodes)"
    assert "workflow" not in read_png_settings(_comfy_png(tmp_path / "b.png", comfy_basic()))["extra"]


def test_read_comfy_workflow_only(tmp_path):
    info = PngImagePlugin.PngInfo()
    info.add_text("workflow", json.dumps(WORKFLOW))
    Image.new("RGB", (8, 8)).save(tmp_path / "w.png", pnginfo=info)
    got = read_png_settings(tmp_path / "w.png")
    assert got["source"] == "comfyui" and got["extra"]["workflow"] == "present (2 nodes)"
    assert "editor workflow" in got["extra"]["note"]


def test_read_comfy_bad_json(tmp_path):
    info = PngImagePlugin.PngInfo()
    info.add_text("prompt", '{"3": {"class_type": "KSampler"')
    Image.new("RGB", (8, 8)).save(tmp_path / "j.png", pnginfo=info)
    with pytest.raises(MetadataError, match="not valid JSON"):
        read_png_settings(tmp_path / "j.png")


def test_parameters_win_over_comfy_prompt(tmp_path):
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", INFOTEXTS[1][0])
    info.add_text("prompt", json.dumps(comfy_basic()))
    Image.new("RGB", (8, 8)).save(tmp_path / "both.png", pnginfo=info)
    got = read_png_settings(tmp_path / "both.png")
    assert got["prompt"] == "masterpiece, a cat" and got["extra"]["comfyui"] == "prompt graph present too"


# ---- JPEG / WebP EXIF ---------------------------------------------------------------------------------

def _exif_image(path, comment: bytes | None = None, ifd0: dict | None = None):
    ex = Image.Exif()
    if comment is not None:
        ex.get_ifd(0x8769)[0x9286] = comment
    for k, v in (ifd0 or {}).items():
        ex[k] = v
    Image.new("RGB", (32, 32), "green").save(path, exif=ex)
    return path


@pytest.mark.parametrize("ext", ["jpg", "webp"])
def test_exif_user_comment_a1111(tmp_path, ext):
    text = INFOTEXTS[0][0].replace("a lighthouse", "a lighthouse ☃ ünï")
    path = _exif_image(tmp_path / f"a.{ext}", b"UNICODE\0" + text.encode("utf-16-be"))
    got = read_png_settings(path)
    assert got["prompt"].startswith("a lighthouse ☃ ünï") and got["sampler"] == "dpmpp_2m"
    assert got["image"]["format"] == ("JPEG" if ext == "jpg" else "WEBP")


@pytest.mark.parametrize("raw,want", [
    (b"UNICODE\0" + "héllo, ☃".encode("utf-16-be"), "héllo, ☃"),
    (b"UNICODE\0" + "héllo, ☃".encode("utf-16-le"), "héllo, ☃"),
    (b"UNICODE\0" + "héllo".encode("utf-16"), "héllo"),
    (b"ASCII\0\0\0plain text\0", "plain text"),
    (b"\0" * 8 + "utf8 ☃".encode(), "utf8 ☃"),
    ("already text", "already text"),
    (b"", None),
])
def test_decode_user_comment(raw, want):
    assert decode_user_comment(raw) == want


def test_comfy_webp_exif(tmp_path):
    path = _exif_image(tmp_path / "c.webp", ifd0={0x0110: "prompt:" + json.dumps(comfy_basic()),
                                                  0x010F: "workflow:" + json.dumps(WORKFLOW)})
    got = read_png_settings(path)
    assert got["source"] == "comfyui" and got["seed"] == 156680208700286
    assert got["extra"]["workflow"] == "present (2 nodes)"


# ---- bad input ----------------------------------------------------------------------------------------

def _one_line(e):
    msg = str(e.value)
    assert "\n" not in msg and isinstance(e.value, ValueError)
    return msg


def test_missing_file(tmp_path):
    with pytest.raises(ValueError) as e:
        main_info(str(tmp_path / "nope.png"), False)
    assert "no such file" in _one_line(e)


def test_directory(tmp_path):
    with pytest.raises(ValueError) as e:
        main_info(str(tmp_path), False)
    assert "directory" in _one_line(e)


@pytest.mark.parametrize("content", [b"Steps: 20, Sampler: Euler, Seed: 1\n", os.urandom(4096), b""])
def test_not_an_image(tmp_path, content):
    path = tmp_path / "fake.png"
    path.write_bytes(content)
    with pytest.raises(ValueError) as e:
        main_info(str(path), False)
    assert "not an image" in _one_line(e)


def test_truncated_png(tmp_path):
    rng = np.random.default_rng(0)
    path = tmp_path / "full.png"
    s = _settings()
    save_png(Image.fromarray(rng.integers(0, 256, (256, 256, 3), dtype=np.uint8)), path, _infotext(s, 0))
    data = path.read_bytes()
    for cut in (len(data) // 2, len(data) - 100):
        bad = tmp_path / f"cut{cut}.png"
        bad.write_bytes(data[:cut])
        with pytest.raises(ValueError) as e:
            main_info(str(bad), False)
        assert "truncated" in _one_line(e)


def test_png_without_metadata(tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "plain.png")
    Image.new("RGB", (8, 8)).save(tmp_path / "plain.jpg")
    for name in ("plain.png", "plain.jpg"):
        with pytest.raises(ValueError) as e:
            main_info(str(tmp_path / name), True)
        assert "no generation metadata" in _one_line(e)


# ---- stablexl info ------------------------------------------------------------------------------------

def test_main_info_text(tmp_path):
    s = _settings(prompt=["a cat,\non a mat"], negative_prompt=["dog"], sampler="dpmpp_2m", schedule="karras",
                  guidance_rescale=0.7)
    path = save_png(Image.new("RGB", (8, 8)), tmp_path / "o.png", _infotext(s, 0))
    out = main_info(str(path), False)
    lines = out.split("\n")
    assert lines[0] == 'prompt: "a cat,\\non a mat"'
    assert lines[1:9] == ["negative_prompt: dog", "steps: 30", "sampler: dpmpp_2m", "schedule: karras",
                          "cfg: 5.0", "seed: 0", "width: 1024", "height: 1024"]
    assert "model: sdxl-base" in lines and "guidance_rescale: 0.7" in lines and "source: stablexl" in lines
    assert lines[-1] == "image: PNG 8x8"
    assert all(": " in ln for ln in lines)


def test_main_info_a1111_defaults_and_comfy(tmp_path):
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", INFOTEXTS[0][0])
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png", pnginfo=info)
    out = main_info(str(tmp_path / "a.png"), False).split("\n")
    assert out[0] == "prompt: a lighthouse at dusk, (volumetric light:1.2), dramatic sky"
    assert "Lora hashes: detail: 0a1b2c3d4e5f" in out and "RNG: GPU (A1111 default, not in the file)" in out
    comfy = main_info(str(_comfy_png(tmp_path / "c.png", comfy_sdxl_refiner())), False).split("\n")
    assert comfy[0] == "prompt: a majestic owl, 8k" and "loras: [\"detail_xl.safetensors:0.8\"]" in comfy


def test_main_info_json(tmp_path):
    path = _comfy_png(tmp_path / "c.png", comfy_basic(), WORKFLOW)
    got = json.loads(main_info(str(path), True))
    assert got == {"file": str(path), **json.loads(json.dumps(read_png_settings(path)))}
    assert got["prompt"].startswith("beautiful scenery") and got["image"]["width"] == 64


def test_format_settings_skips_empty():
    text = format_settings(parse_infotext(INFOTEXTS[1][0]))
    assert text.split("\n")[0] == "prompt: masterpiece, a cat"
    assert "negative_prompt" not in text and "model_hash: 6ce0161689" in text and "guidance_rescale" not in text


def test_comfy_conditioning_combine():
    g = comfy_basic()
    g["10"] = {"class_type": "CLIPTextEncode", "inputs": {"text": "golden hour", "clip": ["4", 1]}}
    g["11"] = {"class_type": "ConditioningCombine", "inputs": {"conditioning_1": ["6", 0], "conditioning_2": ["10", 0]}}
    g["3"]["inputs"]["positive"] = ["11", 0]
    got = parse_comfyui_prompt(g)
    assert got["prompt"] == "beautiful scenery nature glass bottle landscape, , purple galaxy bottle,\ngolden hour"
    assert got["negative_prompt"] == "text, watermark"


def test_empty_default_shown_quoted():
    out = format_settings(parse_infotext(INFOTEXTS[0][0])).split("\n")
    assert 'Hires prompt: "" (A1111 default, not in the file)' in out


def test_info_does_not_import_torch():
    import subprocess
    import sys

    code = "import sys, stablexl.info; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


# ---- Model hash (A1111: first 10 hex digits of the checkpoint's SHA-256) ------------------------------

def test_model_hash_of_a_file_and_a_folder(tmp_path, monkeypatch):
    import hashlib

    from stablexl.io import hashing

    monkeypatch.setenv("STABLEXL_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(hashing, "_memo", {})
    f = tmp_path / "model.safetensors"
    f.write_bytes(b"weights" * 1000)
    assert hashing.model_hash(f) == hashlib.sha256(b"weights" * 1000).hexdigest()[:10]
    folder = tmp_path / "folder"
    (folder / "unet").mkdir(parents=True)
    (folder / "unet" / "config.json").write_text("{}")
    (folder / "unet" / "b.safetensors").write_bytes(b"B")
    (folder / "unet" / "a.safetensors").write_bytes(b"A")
    assert hashing.model_hash(folder) == hashlib.sha256(b"AB").hexdigest()[:10]  # weight files, sorted, one stream
    with pytest.raises(FileNotFoundError, match="no UNet weight files to hash"):
        hashing.model_hash(tmp_path / "cache")


def test_model_hash_is_cached_on_disk_and_redone_when_the_file_changes(tmp_path, monkeypatch):
    import hashlib

    from stablexl.io import hashing

    monkeypatch.setenv("STABLEXL_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(hashing, "_memo", {})
    f = tmp_path / "model.safetensors"
    f.write_bytes(b"one")
    first = hashing.model_hash(f)
    store = json.loads((tmp_path / "cache" / "hashes.json").read_text())
    assert store[str(f.resolve())]["sha256"].startswith(first)
    calls = []
    real = hashing.sha256_files
    monkeypatch.setattr(hashing, "sha256_files", lambda files: calls.append(files) or real(files))
    monkeypatch.setattr(hashing, "_memo", {})  # a new process: only the disk cache is left
    assert hashing.model_hash(f) == first and calls == []
    f.write_bytes(b"two, longer")  # new size and mtime: hashed again
    assert hashing.model_hash(f) == hashlib.sha256(b"two, longer").hexdigest()[:10] and len(calls) == 1
    (tmp_path / "cache" / "hashes.json").write_text("{not json")  # a damaged cache is ignored and rewritten
    monkeypatch.setattr(hashing, "_memo", {})
    assert hashing.model_hash(f) == hashlib.sha256(b"two, longer").hexdigest()[:10] and len(calls) == 2
    assert json.loads((tmp_path / "cache" / "hashes.json").read_text())


def test_generated_png_carries_model_hash_and_img2img_settings(tmp_path):
    import hashlib

    import torch

    from stablexl.io.models import save_model
    from stablexl.models.parts import build_parts
    from stablexl.config import preset
    from stablexl.pipeline import Pipeline

    torch.manual_seed(0)
    path = save_model(build_parts(preset("tiny-sdxl"), device="cpu"), tmp_path / "tiny.safetensors")
    pipe = Pipeline.from_pretrained(path)
    res = pipe("a cat", init_image=Image.new("RGB", (64, 64), "red"), strength=0.5, steps=4, seed=3,
               original_size=(32, 48), crop=(8, 0))
    got = parse_infotext(res.infotext(0))
    assert got["model_hash"] == hashlib.sha256(path.read_bytes()).hexdigest()[:10]
    assert got["model"] == "tiny.safetensors"
    assert got["extra"]["Denoising strength"] == "0.5"
    assert got["extra"]["Original size"] == "48x32" and got["extra"]["Crop"] == "0x8"
