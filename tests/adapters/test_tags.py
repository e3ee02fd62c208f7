"""A1111 `<lora:...>` prompt tags, the LoRA folder's confinement, and the tags through the request, the pipeline,
the infotext, the CLI and both HTTP APIs."""

import os
import sys

import pytest
import torch

from stablexl.adapters.lora import save_lora
from stablexl.adapters.tags import LoraFolder, TagError, check_name, extract_tags
from stablexl.pipeline import Pipeline
from stablexl.request import GenerationRequest, LoraSpec, RequestError, resolve
from stablexl.config import PRESETS

sys.path.insert(0, os.path.dirname(__file__))
from test_lora import random_layers, weights_of  # noqa: E402


# ---- parsing ---------------------------------------------------------------------------------------------

def test_tag_forms_follow_a1111():
    text, tags = extract_tags("a cat <lora:detail:0.8>, <lora:style:0.5:1.2> <lora:plain> <lora:n:te=0.3:unet=-1>")
    assert text == "a cat ,   "
    assert [(t.name, t.text_strength, t.unet_strength) for t in tags] == [
        ("detail", 0.8, 0.8), ("style", 0.5, 1.2), ("plain", 1.0, 1.0), ("n", 0.3, -1.0)]
    assert extract_tags("<hypernet:x:1> stays")[0] == "<hypernet:x:1> stays"  # only lora / lyco tags are ours


@pytest.mark.parametrize("bad", ["<lora::1>", "<lora:x:abc>", "<lora:x:1:2:3>", "<lora:x:nan>"])
def test_malformed_tags(bad):
    with pytest.raises(TagError):
        extract_tags(bad)


@pytest.mark.parametrize("name", ["../x", "a/b", "/etc/passwd", "..", "C:evil", "a\\b"])
def test_names_are_not_paths(name):
    with pytest.raises(TagError, match="plain name"):
        check_name(name)


# ---- the folder ------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def lora_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("loras")
    parts = Pipeline.from_pretrained("tiny-sdxl").parts
    save_lora(root / "detail.safetensors", parts, random_layers(parts, 1, unet=("attn1.to_q",)))
    (root / "sub").mkdir()
    save_lora(root / "sub" / "style.safetensors", parts, random_layers(parts, 2, unet=("attn2.to_v",)))
    torch.save({"x": torch.zeros(1)}, root / "old.pt")
    outside = tmp_path_factory.mktemp("outside")
    save_lora(outside / "secret.safetensors", parts, random_layers(parts, 3, unet=("attn1.to_q",)))
    os.symlink(outside / "secret.safetensors", root / "secret.safetensors")
    os.symlink(root / "detail.safetensors", root / "alias.safetensors")  # a link that stays inside is fine
    return root


def test_folder_confinement(lora_dir):
    f = LoraFolder(lora_dir)
    assert sorted(f.files) == ["alias", "detail", "style"]
    assert f.find("style").name == "style.safetensors"  # recursive, by base name (A1111)
    with pytest.raises(LookupError, match="outside the LoRA folder"):
        f.find("secret")
    with pytest.raises(LookupError, match="pickled"):
        f.find("old")
    with pytest.raises(LookupError) as e:
        f.find("detial")
    assert str(lora_dir) in str(e.value) and "nearest: detail" in str(e.value)
    with pytest.raises(TagError):
        f.find("../outside/secret")


# ---- the request -----------------------------------------------------------------------------------------

def test_resolve_moves_tags_into_loras(lora_dir):
    cfg = PRESETS["tiny-sdxl"]
    req = resolve(GenerationRequest(prompt="a cat <lora:detail:0.7> <lora:style:0.2:0.9>",
                                    negative_prompt="ugly <lora:detail:-1>", loras=(LoraSpec("style", 0.1),)),
                  cfg, lora_folder=LoraFolder(lora_dir))
    assert req.prompt == "a cat  " and req.negative_prompt == "ugly "  # A1111: the negative's tags have no effect
    assert req.loras == (LoraSpec("detail", 0.7, 0.7), LoraSpec("style", 0.9, 0.2))  # a name twice: the last wins
    with pytest.raises(RequestError) as e:
        resolve(GenerationRequest(prompt="<lora:nope:1>"), cfg, lora_folder=LoraFolder(lora_dir))
    assert e.value.not_found and "nope" in e.value.message
    with pytest.raises(RequestError, match="no LoRA folder"):
        resolve(GenerationRequest(prompt="<lora:detail:1>"), cfg)
    with pytest.raises(RequestError):
        resolve(GenerationRequest(prompt="x", loras=(LoraSpec("detail", 1e6),)), cfg, lora_folder=LoraFolder(lora_dir))


def test_pipeline_switches_per_request_and_writes_infotext(lora_dir):
    from stablexl.io.metadata import parse_infotext, parse_lora_hashes, request_from_infotext

    pipe = Pipeline.from_pretrained("tiny-sdxl", lora_dir=lora_dir)
    before = weights_of(pipe.parts)
    plain = pipe("a cat", steps=2, seed=1).latents
    tagged = pipe("a cat <lora:detail:0.8>", steps=2, seed=1)
    assert not torch.equal(plain, tagged.latents)
    text = tagged.infotext(0)
    assert text.startswith("a cat  <lora:detail:0.8>")
    parsed = parse_infotext(text)
    assert parse_lora_hashes(parsed["extra"]["Lora hashes"]) == {"detail": tagged.lora_hashes["detail"]}
    assert len(tagged.lora_hashes["detail"]) == 12
    again = pipe.generate(request_from_infotext(parsed))  # reading the text back applies the LoRA again
    assert torch.equal(again.latents, tagged.latents)
    back = pipe("a cat", steps=2, seed=1).latents  # no tags: the LoRA is gone again
    assert torch.equal(back, plain)
    assert all(torch.equal(before[k], v) for k, v in weights_of(pipe.parts).items())


def test_cli_lora_flags(lora_dir, tmp_path):
    from stablexl.cli import main, parse_lora_arg
    from stablexl.io.metadata import read_png_settings

    assert parse_lora_arg("C:\\x\\a.safetensors:0.5") == ("C:\\x\\a.safetensors", 0.5, 0.5)
    assert parse_lora_arg("a:0.5:1.5") == ("a", 0.5, 1.5)
    assert parse_lora_arg("a") == ("a", 1.0, 1.0)
    out = tmp_path / "o.png"
    assert main(["generate", "x", "--model", "tiny-sdxl", "--steps", "2", "--quiet", "--output", str(out),
                 "--lora", f"{lora_dir / 'detail.safetensors'}:0.5", "--lora-dir", str(lora_dir),
                 "--lora", "style:0.3"]) == 0
    s = read_png_settings(out)
    assert "<lora:detail:0.5>" in s["prompt"] and "<lora:style:0.3>" in s["prompt"]
    assert "detail: " in s["extra"]["Lora hashes"] and "style: " in s["extra"]["Lora hashes"]
    assert main(["generate", "x <lora:nope:1>", "--model", "tiny-sdxl", "--steps", "2", "--quiet",
                 "--output", str(out), "--lora-dir", str(lora_dir)]) == 2


def test_server_lora_routes_and_fields(lora_dir):
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
    from server.conftest import client, wait_job

    with client(lora_dir=str(lora_dir)) as c:
        r = c.get("/sdapi/v1/loras")
        assert r.status_code == 200
        items = {x["name"]: x for x in r.json()}
        assert set(items) == {"alias", "detail", "style"}
        assert items["detail"]["metadata"]["ss_base_model_version"] == "sdxl_base_v1-0"
        assert set(items["detail"]) == {"name", "alias", "path", "metadata"}
        r = c.post("/sdapi/v1/refresh-loras")
        assert r.status_code == 200 and r.json() is None
        r = c.post("/sdapi/v1/txt2img", json={"prompt": "x <lora:detail:0.6>", "steps": 2, "width": 64, "height": 64})
        assert r.status_code == 200, r.text
        import json

        info = json.loads(r.json()["info"])
        assert "Lora hashes" in info["infotexts"][0]
        r = c.post("/sdapi/v1/txt2img", json={"prompt": "x <lora:../../etc/passwd:1>", "steps": 2})
        assert r.status_code == 422
        r = c.post("/sdapi/v1/txt2img", json={"prompt": "x <lora:missing:1>", "steps": 2})
        assert r.status_code == 404
        r = c.post("/v1/generate", json={"prompt": "x", "steps": 2, "width": 64, "height": 64,
                                         "loras": [{"name": "style", "strength": 0.5, "text_strength": -0.5}]})
        assert r.status_code in (200, 202), r.text
        job = wait_job(c, r.json()["id"])
        assert job["state"] == "succeeded", job
        assert job["settings"]["loras"] == [{"name": "style", "strength": 0.5, "text_strength": -0.5}]
        r = c.post("/v1/generate", json={"prompt": "x", "loras": [{"name": "/abs", "strength": 1}]})
        assert r.status_code == 422
