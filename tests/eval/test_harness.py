"""Feature extractors (loading paths and input contracts) and the emoji evaluation harness end to end, on a
tiny made-up emoji dataset, a tiny CLIP and the random tiny-sdxl preset."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

from stablexl.cli import main
from stablexl.config import CLIPTextConfig, CLIPVisionConfig
from stablexl.eval import CLIPEmbedder, InceptionFeatures, MiniCLIPFeatures, evaluate
from stablexl.eval.features import clean_resize
from stablexl.eval.harness import emoji_prompt, pick_names, read_emoji_reference
from stablexl.io.checkpoint import CheckpointError
from stablexl.io.components import save_component
from stablexl.models.clip import CLIPModel
from stablexl.models.tokenizer import default_tokenizer

# --------------------------------------------------------------------------------------------------
# Fixtures: a tiny emoji dataset and a tiny CLIP
# --------------------------------------------------------------------------------------------------

EMOJI = {  # name -> (colour, shape)
    "red circle": ((220, 30, 30), "circle"), "green square": ((30, 170, 60), "square"),
    "blue circle": ((40, 60, 220), "circle"), "yellow square": ((240, 200, 20), "square"),
    "purple circle": ((140, 40, 170), "circle"), "black square": ((20, 20, 20), "square"),
}


def draw(color, shape, h=64, w=64, top=0, left=0, pad=10) -> tuple[Image.Image, list[int]]:
    im = Image.new("RGB", (w, h), "white")
    box = [left + pad, top + pad, left + 63 - pad, top + 63 - pad]
    (ImageDraw.Draw(im).ellipse if shape == "circle" else ImageDraw.Draw(im).rectangle)(box, fill=color)
    ys, xs = np.nonzero((np.asarray(im) < 255).any(axis=2))
    return im, [int(ys.min()), int(xs.min()), int(ys.max()) + 1, int(xs.max()) + 1]


def make_emoji_dataset(root: Path) -> Path:
    """The `stablexl data emoji` layout: canonical singles of every twemoji name, plus items the harness must
    leave out of its reference set (a margin copy, an upscaled copy, a composition, other-style art)."""
    (root / "images").mkdir(parents=True)
    items = []

    def add(img, **meta):
        file = f"images/{len(items):06d}.png"
        img.save(root / file)
        items.append({"file": file, "caption": f"{meta['name']}, {meta['style']} style", "unified": "0",
                      "category": "Test", **meta})

    for name, (color, shape) in EMOJI.items():
        img, box = draw(color, shape)
        add(img, name=name, style="twemoji", kind="single", original_size=[64, 64], bbox=[box])
    img, box = draw((0, 0, 0), "circle", h=72, w=80, top=8, left=16)  # margin copy: not a reference image
    add(img, name="red circle", style="twemoji", kind="single", original_size=[72, 80], bbox=[box])
    img, box = draw((90, 90, 90), "square", pad=20)
    add(img, name="blue circle", style="twemoji", kind="upscaled", original_size=[24, 24], bbox=[box])
    img, box = draw((0, 0, 0), "square")
    add(img, name="red circle and blue circle", style="twemoji", kind="composition", original_size=[64, 64], bbox=[box])
    for name in ("red circle", "green square"):
        img, box = draw((128, 128, 128), "circle")
        add(img, name=name, style="noto", kind="single", original_size=[64, 64], bbox=[box])
    (root / "metadata.jsonl").write_text("".join(json.dumps(it) + "\n" for it in items))
    names = {"twemoji": sorted(EMOJI) + ["orange heart"],  # a name without a single image: a candidate only
             "noto": ["green square", "red circle"]}
    (root / "names.json").write_text(json.dumps(names))
    return root


@pytest.fixture(scope="module")
def emoji_data(tmp_path_factory) -> Path:
    return make_emoji_dataset(tmp_path_factory.mktemp("emoji") / "data")


def tiny_clip() -> CLIPModel:
    torch.manual_seed(0)
    vision = CLIPVisionConfig(image_size=32, patch_size=8, width=16, layers=1, heads=2, mlp_dim=32,
                              activation="gelu", projection_dim=8)
    text = CLIPTextConfig(width=16, layers=1, heads=2, mlp_dim=32, activation="gelu", projection_dim=8)
    return CLIPModel(vision, [text, text])


@pytest.fixture(scope="module")
def clip_file(tmp_path_factory) -> Path:
    return save_component(tiny_clip(), tmp_path_factory.mktemp("clip") / "clip.safetensors")


def shapes(n: int = 3) -> list[Image.Image]:
    return [draw(c, s)[0] for c, s in list(EMOJI.values())[:n]]


# --------------------------------------------------------------------------------------------------
# Feature extractors
# --------------------------------------------------------------------------------------------------


def test_clip_component_embeds_images_and_captions_like_training(clip_file):
    emb = CLIPEmbedder.load(clip_file)
    model = tiny_clip()  # same seed: the weights that were saved
    assert emb.label == "miniCLIP" and emb.pad_ids == (49407, 0)  # the mini preset's pads, tower by tower
    imgs = shapes()
    # images: [0, 1] -> bicubic antialiased to the tower's 32 px -> CLIP mean/std -> tower
    x = torch.from_numpy(np.stack([np.asarray(im) for im in imgs])).permute(0, 3, 1, 2).float() / 255
    x = F.interpolate(x, size=(32, 32), mode="bicubic", align_corners=False, antialias=True)
    mean, std = torch.tensor(model.vision.config.mean), torch.tensor(model.vision.config.std)
    expected = model.vision((x - mean[:, None, None]) / std[:, None, None])
    torch.testing.assert_close(emb.images(imgs), expected, atol=1e-5, rtol=1e-5)
    feats = MiniCLIPFeatures(clip_file)
    assert feats.name == "FD-miniCLIP"
    f = feats.extract(imgs)
    assert f.shape == (3, 8) and torch.allclose(f.norm(dim=1), torch.ones(3))
    torch.testing.assert_close(f, F.normalize(expected, dim=-1), atol=1e-5, rtol=1e-5)
    # captions: full 77-token ids with each tower's own pad give the same pooled embedding as the trimmed ones
    caps = ["red circle, twemoji style", "a much longer caption about a green square, noto style"]
    got = emb.texts(caps)
    tok = default_tokenizer()
    for tower, pad, g in zip(model.texts, (49407, 0), got):
        ids = tok(caps, pad_id=pad)
        assert ids.shape == (2, 77)
        torch.testing.assert_close(g, tower(ids, pooled=True).pooled, atol=1e-5, rtol=1e-5)


def test_clip_loading_errors_name_the_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match="stablexl train clip"):
        CLIPEmbedder.load(tmp_path / "nope.safetensors")
    from stablexl.config import PRESETS
    from stablexl.models.vae import AutoencoderKL

    vae = save_component(AutoencoderKL(PRESETS["tiny-sdxl"].vae), tmp_path / "vae.safetensors")
    with pytest.raises(CheckpointError, match="holds a vae"):
        CLIPEmbedder.load(vae)
    (tmp_path / "folder").mkdir()
    with pytest.raises(FileNotFoundError, match="config.json"):
        CLIPEmbedder.load(tmp_path / "folder")


def test_transformers_clip_folder_matches_transformers(tmp_path):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.CLIPConfig(
        text_config={"vocab_size": 49408, "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 2,
                     "num_attention_heads": 2, "max_position_embeddings": 77, "eos_token_id": 49407},
        vision_config={"image_size": 32, "patch_size": 8, "hidden_size": 16, "intermediate_size": 32,
                       "num_hidden_layers": 2, "num_attention_heads": 2},
        projection_dim=12)
    torch.manual_seed(0)
    ref = transformers.CLIPModel(cfg).eval()
    ref.save_pretrained(tmp_path / "tinyclip")
    emb = CLIPEmbedder.load(tmp_path / "tinyclip")
    assert emb.label == "tinyclip" and emb.pad_ids == (49407,) and len(emb.model.texts) == 1
    imgs, caps = shapes(), ["red circle", "a green square, noto style"]
    x = torch.from_numpy(np.stack([np.asarray(im) for im in imgs])).permute(0, 3, 1, 2).float() / 255
    x = F.interpolate(x, size=(32, 32), mode="bicubic", align_corners=False, antialias=True)
    mean, std = torch.tensor(emb.model.vision.config.mean), torch.tensor(emb.model.vision.config.std)
    with torch.no_grad():
        want_img = ref.get_image_features(pixel_values=(x - mean[:, None, None]) / std[:, None, None])
        want_txt = ref.get_text_features(input_ids=default_tokenizer()(caps, pad_id=49407))
    want_img = getattr(want_img, "pooler_output", want_img)  # a tensor, or an output object in newer releases
    want_txt = getattr(want_txt, "pooler_output", want_txt)
    torch.testing.assert_close(emb.images(imgs), want_img, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(emb.texts(caps)[0], want_txt, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(emb.model.logit_scale, ref.logit_scale.detach().reshape(1))


class FakeInception(torch.nn.Module):
    """Stands in for inception-2015-12-05.pt: `layers` returns what it was fed (mean, min, max, height, width)."""

    class Layers(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            b = x.shape[0]
            stats = [x.mean(dim=(1, 2, 3)), x.amin(dim=(1, 2, 3)), x.amax(dim=(1, 2, 3)),
                     torch.full((b,), float(x.shape[2])), torch.full((b,), float(x.shape[3]))]
            return torch.stack(stats, dim=1)[:, :, None, None]  # (B, 5, 1, 1), as pool3's (B, 2048, 1, 1)

    def __init__(self):
        super().__init__()
        self.layers = FakeInception.Layers()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


@pytest.mark.filterwarnings("ignore:`torch.jit:DeprecationWarning")
def test_inception_features_contract_with_a_stand_in_torchscript(tmp_path):
    path = tmp_path / "inception-2015-12-05.pt"
    torch.jit.save(torch.jit.script(FakeInception()), str(path))
    ex = InceptionFeatures(path, batch_size=2)
    assert ex.name == "FID"
    white, black = Image.new("RGB", (64, 64), "white"), Image.new("RGB", (40, 24), "black")
    ramp = Image.fromarray(np.tile(np.linspace(0, 255, 48).astype(np.uint8)[None, :, None], (48, 1, 3)))
    f = ex.extract([white, black, ramp])
    assert f.shape == (3, 5) and f.dtype == torch.float32
    assert f[:, 3:].eq(299).all()  # every image resized to 299 x 299, whatever its size
    torch.testing.assert_close(f[0, :3], torch.full((3,), 127 / 128))  # (255 - 128) / 128
    torch.testing.assert_close(f[1, :3], torch.full((3,), -1.0))  # (0 - 128) / 128
    resized = clean_resize(ramp, 299)  # float bicubic, not quantised: values between the uint8 steps
    assert resized.shape == (299, 299, 3) and not np.allclose(resized, resized.round())
    assert float(f[2, 0]) == pytest.approx(float(((resized - 128) / 128).mean()), abs=1e-5)


@pytest.mark.filterwarnings("ignore:`torch.jit:DeprecationWarning")
def test_inception_loading_errors_name_the_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match="never downloads.*--inception"):
        InceptionFeatures(tmp_path / "missing.pt")
    torch.save({"conv.weight": torch.zeros(2)}, tmp_path / "state_dict.pth")
    with pytest.raises(CheckpointError, match="not a TorchScript module"):
        InceptionFeatures(tmp_path / "state_dict.pth")
    torch.jit.save(torch.jit.script(FakeInception.Layers()), str(tmp_path / "other.pt"))
    with pytest.raises(CheckpointError, match="no `layers`"):
        InceptionFeatures(tmp_path / "other.pt")


# --------------------------------------------------------------------------------------------------
# The harness
# --------------------------------------------------------------------------------------------------


def test_reference_set_and_name_choice(emoji_data):
    ref = read_emoji_reference(emoji_data, "twemoji")
    assert sorted(ref.images) == sorted(EMOJI)  # margin, upscaled, composition and noto items left out
    assert ref.names[-1] == "orange heart" and "orange heart" not in ref.images
    assert Image.open(ref.images["red circle"]).getpixel((32, 32)) == EMOJI["red circle"][0]  # the canonical art
    a = pick_names(ref, 4, seed=1)
    assert a == pick_names(ref, 4, seed=1) and len(set(a)) == 4 and set(a) <= set(EMOJI)
    assert {tuple(pick_names(ref, 4, seed=s)) for s in range(5)} != {tuple(a)}  # the seed matters
    assert emoji_prompt("red circle", "twemoji") == "red circle, twemoji style"
    with pytest.raises(ValueError, match="between 2 and"):
        pick_names(ref, 7, seed=0)
    with pytest.raises(ValueError, match="has twemoji, noto"):
        read_emoji_reference(emoji_data, "openmoji")
    with pytest.raises(FileNotFoundError, match="stablexl data emoji"):
        read_emoji_reference(emoji_data / "images", "twemoji")


class ReplayPipeline:
    """'Generates' the dataset image of each prompted emoji: a perfect model. Called like a Pipeline."""

    name = "replay"

    def __init__(self, ref):
        self.ref, self.calls = ref, []

    def __call__(self, prompts, *, steps, cfg, seed, width, height, sampler, schedule):
        self.calls.append((len(prompts), seed))
        names = [p.removesuffix(", twemoji style") for p in prompts]
        images = [Image.open(self.ref.images[n]).convert("RGB") for n in names]
        from stablexl.io.metadata import generation_infotext
        from stablexl.request import GenerationRequest

        req = GenerationRequest(prompt=tuple(prompts), steps=steps, cfg=cfg, seed=seed, width=width, height=height,
                                sampler=sampler, schedule=schedule, batch=len(prompts), model=self.name)
        return SimpleNamespace(images=images, request=req, infotext=lambda k: generation_infotext(req, k))


def test_a_model_that_reproduces_the_dataset_scores_like_the_real_images(emoji_data, clip_file):
    pipe = ReplayPipeline(read_emoji_reference(emoji_data, "twemoji"))
    # the same CLIP again as the score CLIP: embedded on its own path, it must agree with the FD features' reuse
    r = evaluate(pipe, emoji_data, clip_file, n_prompts=5, seed=3, steps=2, batch=2, score_clip_path=clip_file)
    assert pipe.calls == [(2, 3), (2, 5), (1, 7)]  # batches of 2; image i has seed 3 + i
    gen, real = r["generated"], r["real"]
    assert gen["pixel_identity"] == 1.0 and real["pixel_identity"] is None
    assert all(it["pixel_nearest"] == it["name"] for it in r["images"])
    assert gen["fd"]["FD-miniCLIP"] == pytest.approx(real["fd"]["FD-miniCLIP"], abs=1e-9)
    assert gen["fd"]["FD-px8"] == pytest.approx(real["fd"]["FD-px8"], abs=1e-9)  # the independent feature space
    assert gen["kid"]["KID-miniCLIP"] == pytest.approx(real["kid"]["KID-miniCLIP"], abs=1e-9)
    for key in ("score", "top1", "top5"):
        assert gen["clip"]["miniCLIP"][key] == pytest.approx(real["clip"]["miniCLIP"][key])
    assert gen["sharpness"] == pytest.approx(real["sharpness"]) and gen["sharpness"] > 0
    assert gen["border_fraction"] == 0.0  # the shapes sit 10 px inside the canvas
    assert r["dataset"] == {"candidates": 7, "reference_images": 6, "chance_top1": 1 / 7, "chance_top5": 5 / 7}
    # per-image ranks add up to the reported retrieval accuracy (mean over the two text towers)
    ranks = torch.tensor([it["clip_rank"]["miniCLIP"] for it in r["images"]])  # (5, 2), 1 = own prompt first
    assert ranks.shape == (5, 2) and ranks.min() >= 1 and ranks.max() <= 7
    assert gen["clip"]["miniCLIP"]["top1"] == pytest.approx(float((ranks == 1).double().mean()))
    assert gen["clip"]["miniCLIP"]["top5"] == pytest.approx(float((ranks <= 5).double().mean()))
    assert 0 <= gen["clip"]["miniCLIP"]["score"] <= 100
    assert list(gen["clip"]) == ["miniCLIP", str(clip_file)] and r["settings"]["model"] == "replay"
    for which in (gen, real):
        for key in ("score", "top1", "top5"):
            assert which["clip"][str(clip_file)][key] == pytest.approx(which["clip"]["miniCLIP"][key], abs=1e-4)


def test_tiny_sdxl_end_to_end_through_the_cli(emoji_data, clip_file, tmp_path, capsys):
    out = tmp_path / "eval"
    argv = ["eval", "--model", "tiny-sdxl", "--data", str(emoji_data), "--clip", str(clip_file), "--output", str(out),
            "--prompts", "3", "--steps", "2", "--batch", "2", "--seed", "4"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "FD-miniCLIP" in printed and "retrieval top-1, miniCLIP" in printed and "pixel identity" in printed
    results = json.loads((out / "results.json").read_text())
    s = results["settings"]
    assert (s["model"], s["prompts"], s["steps"], s["sampler"], s["schedule"], s["size"]) == \
        ("tiny-sdxl", 3, 2, "dpmpp_2m", "karras", 64)
    assert any("randomly initialised" in n for n in results["notes"])
    names = [it["name"] for it in results["images"]]
    assert names == pick_names(read_emoji_reference(emoji_data, "twemoji"), 3, seed=4)
    for i, it in enumerate(results["images"]):
        img = Image.open(out / it["file"])
        assert img.size == (64, 64) and it["seed"] == 4 + i
        assert img.text["parameters"].startswith(emoji_prompt(it["name"], "twemoji")) and f"Seed: {4 + i}" in img.text["parameters"]
    assert Image.open(out / "contact_sheet.png").size == (6 * 128, 128 + 14)  # 3 generated | real pairs, 2x zoom
    g = results["generated"]
    assert g["fd"]["FD-miniCLIP"] >= 0 and g["sharpness"] > 0 and 0 <= g["border_fraction"] <= 1
    assert g["pixel_identity"] in (0, 1 / 3, 2 / 3, 1)


def test_cli_bad_paths_end_with_one_line(emoji_data, clip_file, tmp_path, capsys):
    common = ["--model", "tiny-sdxl", "--output", str(tmp_path / "o"), "--prompts", "2", "--steps", "1"]
    assert main(["eval", "--data", str(tmp_path / "nodata"), "--clip", str(clip_file), *common]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "metadata.jsonl: missing" in err and err.startswith("stablexl eval: error:")
    assert main(["eval", "--data", str(emoji_data), "--clip", str(tmp_path / "no.safetensors"), *common]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "stablexl train clip" in err
    assert main(["eval", "--data", str(emoji_data), "--clip", str(clip_file), "--inception", str(tmp_path / "x.pt"),
                 *common]) == 2
    assert "--inception" in capsys.readouterr().err
    assert main(["eval", "--data", str(emoji_data), "--clip", str(clip_file), *common, "--batch", "0"]) == 2
    assert "batch must be at least 1" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()  # nothing was generated or written
