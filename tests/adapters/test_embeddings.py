"""Textual inversion: parity with diffusers' load_textual_inversion on both SDXL encoders and on SD 1.5, inside
weighted prompts and past 77 tokens, the A1111 / ComfyUI triggers, and the files that must be refused."""

import os
import sys

import pytest
import torch
from safetensors.torch import save_file

from stablexl.adapters.embeddings import Embeddings, EmbeddingError, load_embedding
from stablexl.io.models import save_model
from stablexl.pipeline import Pipeline
from stablexl.request import GenerationRequest, RequestError

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "io"))
from test_layouts import random_parts  # noqa: E402

SIZE = (64, 64)


def vectors(n, width, seed):
    return torch.randn(n, width, generator=torch.Generator().manual_seed(seed)) * 0.5


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory):
    """A tiny SDXL diffusers folder and an embeddings folder: a 3-vector SDXL embedding, a 1-vector one, a file
    for another model and a pickle."""
    root = tmp_path_factory.mktemp("ti")
    folder = root / "tiny-sdxl"
    save_model(random_parts("tiny-sdxl", seed=5), folder, "diffusers")
    emb = root / "embeddings"
    (emb / "sub").mkdir(parents=True)
    three = {"clip_l": vectors(3, 32, 1), "clip_g": vectors(3, 48, 2)}
    save_file(three, str(emb / "myemb.safetensors"))
    one = {"clip_l": vectors(1, 32, 3), "clip_g": vectors(1, 48, 4)}
    save_file(one, str(emb / "sub" / "Zolqa.safetensors"))  # subfolders are walked; the name is the stem
    save_file({"emb_params": vectors(2, 32, 5)}, str(emb / "sd15thing.safetensors"))  # an SD 1.x file
    torch.save({"string_to_param": {"*": vectors(1, 32, 6)}}, str(emb / "pickled.pt"))
    return folder, emb, three, one


@pytest.fixture(scope="module")
def pipe(sdxl):
    folder, emb, _, _ = sdxl
    return Pipeline.from_pretrained(folder, embeddings_dir=emb)


@pytest.fixture(scope="module")
def ref(sdxl):
    """diffusers with the same vectors (two load_textual_inversion calls, one per encoder)."""
    import diffusers

    folder, _, three, one = sdxl
    r = diffusers.StableDiffusionXLPipeline.from_pretrained(folder)
    for name, sd in (("myemb", three), ("zolqa", one)):
        r.load_textual_inversion(sd["clip_l"], token=name, text_encoder=r.text_encoder, tokenizer=r.tokenizer)
        r.load_textual_inversion(sd["clip_g"], token=name, text_encoder=r.text_encoder_2, tokenizer=r.tokenizer_2)
    # Our folder's configs keep the SD hub's legacy eos_token_id 2, with which transformers pools at argmax(ids),
    # i.e. at the first added token. A1111 and ComfyUI pool at EOS, as we do; the fixed config does too.
    r.text_encoder_2.text_model.eos_token_id = 49407
    return r


def ours(pipe, prompts, negatives):
    cond, uncond = pipe.encode_prompt(prompts, negatives, size=SIZE)
    return cond.context, cond.vector[:, :48], uncond.context


def theirs(ref, prompts, negatives):
    with torch.no_grad():
        pe, npe, pooled, _ = ref.encode_prompt(prompts, negative_prompt=negatives, do_classifier_free_guidance=True,
                                               device="cpu")
    return pe, pooled, npe


def close(a, b, tol=1e-5):
    return (a - b).abs().max().item() <= tol


@pytest.mark.parametrize("prompt", ["a photo of myemb, red", "Zolqa and myemb together", "myemb"])
def test_sdxl_matches_diffusers(pipe, ref, prompt):
    """Both encoders read their own vectors (clip_l / clip_g); multi-vector expansion as diffusers'."""
    ctx, pooled, uctx = ours(pipe, [prompt], ["blurry zolqa"])
    want_ctx, want_pooled, want_uctx = theirs(ref, [prompt], ["blurry zolqa"])
    assert ctx.shape == want_ctx.shape == (1, 77, 80)
    assert close(ctx, want_ctx) and close(pooled, want_pooled) and close(uctx, want_uctx)
    plain = pipe.encode_prompt(["a photo of myembx, red"], None, size=SIZE)[0].context
    assert not close(ctx, plain, 1e-3)  # the vectors are in effect


def test_comfyui_trigger_is_the_same(pipe):
    a = ours(pipe, ["a photo of myemb, red"], None)[0]
    b = ours(pipe, ["a photo of embedding:myemb, red"], None)[0]
    c = ours(pipe, ["a photo of embedding:myemb.safetensors, red"], None)[0]
    d = ours(pipe, ["a photo of MyEmb, red"], None)[0]  # A1111 matches after lower-casing
    assert torch.equal(a, b) and torch.equal(a, c) and torch.equal(a, d)


def test_not_inside_words(pipe):
    """Only whole words trigger: 'myembed' is text (A1111 matches token runs)."""
    tok = pipe.tokenizer
    table = pipe.embeddings.table()
    assert max(tok.encode("myembed here", added=table.tokens)) < tok.vocab_size
    ids = table.tokens.ids["myemb"]
    assert len(ids) == 3 and min(ids) >= tok.vocab_size
    assert tok.encode("x myemb y", added=table.tokens)[1:4] == list(ids)


def _emphasis(z, w):
    """A1111 EmphasisOriginal written out: z·w, then rescaled to the original mean."""
    before = z.mean()
    z = z * w[:, :, None]
    return z * (before / z.mean())


def test_weighted_prompt_matches_diffusers_encoders(pipe, ref):
    """'(myemb:1.2)': every vector of the embedding weighs 1.2 (reference: diffusers' tokenizers and encoders with
    the emphasis formula applied by hand)."""
    ctx = ours(pipe, ["a photo of (myemb:1.2), red"], None)[0]
    parts = []
    for tokenizer, encoder in ((ref.tokenizer, ref.text_encoder), (ref.tokenizer_2, ref.text_encoder_2)):
        text = ref.maybe_convert_prompt("a photo of myemb, red", tokenizer)
        ids = tokenizer(text, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
        with torch.no_grad():
            z = encoder(ids, output_hidden_states=True).hidden_states[-2]
        w = torch.ones(1, 77)
        w[0, 4:7] = 1.2  # BOS a photo of | myemb myemb_1 myemb_2
        parts.append(_emphasis(z, w))
    assert close(ctx, torch.cat(parts, dim=-1))


def test_past_77_tokens(pipe, ref):
    """80 words + a 3-vector embedding: chunk 1 is the first 75 words, chunk 2 the rest with the embedding,
    each encoded as diffusers encodes that text alone."""
    ctx, pooled, _ = ours(pipe, ["cat " * 80 + "myemb"], None)
    assert ctx.shape == (1, 154, 80)
    first, first_pooled, _ = theirs(ref, ["cat " * 75], None)
    second, _, _ = theirs(ref, ["cat " * 5 + "myemb"], None)
    assert close(ctx[:, :77], first) and close(ctx[:, 77:], second) and close(pooled, first_pooled)


def test_long_negative_with_embedding(pipe):
    """An embedding in a long negative prompt pads the positive to the same chunk count."""
    cond, uncond = pipe.encode_prompt(["a cat"], ["bad " * 74 + "myemb"], size=SIZE)
    assert cond.context.shape == uncond.context.shape == (1, 154, 80)


def test_generate_and_listing(pipe):
    out = pipe("a photo of myemb", steps=2, seed=1, width=64, height=64, sampler="euler")
    assert out.images[0].size == (64, 64)
    d = pipe.embeddings.describe()
    assert d["loaded"]["myemb"] == {"step": None, "sd_checkpoint": None, "sd_checkpoint_name": None, "shape": 80,
                                    "vectors": 3}
    assert d["loaded"]["Zolqa"]["vectors"] == 1
    assert d["skipped"]["sd15thing"]["shape"] == 32 and d["skipped"]["sd15thing"]["vectors"] == 2
    assert "pickled" in d["skipped"]


@pytest.mark.parametrize("prompt, match", [
    ("embedding:myemv", "no embedding named 'myemv'.*nearest: myemb"),
    ("embedding:../myemb", "not a plain name"),
    ("embedding:/etc/passwd", "not a plain name"),
    ("embedding:sub/Zolqa", "not a plain name"),
    ("a embedding:sd15thing cat", "sd15thing.*cannot be used.*one tensor of width 32.*clip_l of width 32 \\+ clip_g of width 48"),
    ("embedding:pickled", "pickled.*convert|pickled.*refused"),
])
def test_refused_names(pipe, prompt, match):
    with pytest.raises(RequestError, match=match):
        pipe.resolve(GenerationRequest(prompt))
    with pytest.raises(RequestError, match=match) as e:
        pipe.resolve(GenerationRequest("a cat", negative_prompt=prompt))
    assert e.value.field == "negative_prompt"


def test_plain_unknown_word_is_text(pipe):
    pipe.resolve(GenerationRequest("a myemb2 of embedding_like text"))


def test_plain_name_of_a_skipped_file_is_text(pipe):
    """A1111 keeps the word as text when the file is for another model (a copied SD 1.5 negative prompt with
    "easynegative" still runs on SDXL); only `embedding:NAME` insists."""
    r = pipe.resolve(GenerationRequest("a sd15thing cat", negative_prompt="sd15thing"))
    assert r.prompt == "a sd15thing cat" and r.negative_prompt == "sd15thing"


def test_no_folder(tmp_path):
    p = Pipeline.from_pretrained("tiny-sdxl")
    with pytest.raises(RequestError, match="no embeddings folder"):
        p.resolve(GenerationRequest("embedding:foo"))


def test_symlink_out_of_folder(tmp_path, sdxl):
    _, emb, _, _ = sdxl
    outside = tmp_path / "outside"
    outside.mkdir()
    save_file({"clip_l": vectors(1, 32, 9), "clip_g": vectors(1, 48, 9)}, str(outside / "evil.safetensors"))
    inside = tmp_path / "emb"
    inside.mkdir()
    (inside / "evil.safetensors").symlink_to(outside / "evil.safetensors")
    e = Embeddings(inside, Pipeline.from_pretrained("tiny-sdxl").config)
    assert "evil" not in e.loaded and "outside" in e.skipped["evil"][0]
    with pytest.raises(EmbeddingError, match="outside the embedding folder"):
        e.check(["embedding:evil"])


@pytest.mark.parametrize("tensors, match", [
    ({"clip_l": vectors(2, 32, 1), "clip_g": vectors(3, 48, 1)}, "different vector counts"),
    ({"clip_l": vectors(2, 32, 1), "clip_g": vectors(2, 40, 1)}, "clip_g is 40 wide"),
    ({"clip_l": vectors(2, 32, 1)}, "no 'clip_g'"),
    ({"a": vectors(1, 32, 1), "b": vectors(1, 32, 1)}, "not a textual-inversion file"),
    ({"clip_l": torch.full((1, 32), float("nan")), "clip_g": vectors(1, 48, 1)}, "NaN"),
    ({"clip_l": vectors(80, 32, 1), "clip_g": vectors(80, 48, 1)}, "do not fit"),
])
def test_bad_files(tmp_path, tensors, match):
    path = tmp_path / "bad.safetensors"
    save_file(tensors, str(path))
    with pytest.raises(EmbeddingError, match=match):
        load_embedding(path, Pipeline.from_pretrained("tiny-sdxl").config)


def test_truncated_and_disguised_pickle(tmp_path):
    cfg = Pipeline.from_pretrained("tiny-sdxl").config
    good = tmp_path / "good.safetensors"
    save_file({"clip_l": vectors(1, 32, 1), "clip_g": vectors(1, 48, 1)}, str(good))
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(good.read_bytes()[:-10])
    with pytest.raises(EmbeddingError, match="truncated"):
        load_embedding(cut, cfg)
    disguised = tmp_path / "pickle.safetensors"
    torch.save({"emb_params": vectors(1, 32, 1)}, str(disguised))
    with pytest.raises(EmbeddingError, match="pickled"):
        load_embedding(disguised, cfg)


# ---- SD 1.5 -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("key", ["emb_params", "string_to_param.*", "<concept>"])
def test_sd15_matches_diffusers(tmp_path, key):
    import diffusers

    folder = tmp_path / "tiny-sd15"
    save_model(random_parts("tiny-sd15", seed=3), folder, "diffusers")
    emb = tmp_path / "embeddings"
    emb.mkdir()
    v = vectors(2, 32, 11)
    save_file({key: v}, str(emb / "qwstyle.safetensors"))
    save_file({"clip_l": vectors(1, 32, 1), "clip_g": vectors(1, 48, 1)}, str(emb / "xlstyle.safetensors"))
    pipe = Pipeline.from_pretrained(folder, embeddings_dir=emb)
    r = diffusers.StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, requires_safety_checker=False)
    r.load_textual_inversion(v, token="qwstyle", text_encoder=r.text_encoder, tokenizer=r.tokenizer)
    cond, _ = pipe.encode_prompt(["a house in qwstyle, at night"], None, size=SIZE)
    with torch.no_grad():
        want, _ = r.encode_prompt("a house in qwstyle, at night", "cpu", 1, False)
    assert close(cond.context, want)
    assert "SDXL embedding" in pipe.embeddings.skipped["xlstyle"][0]


def test_cli_embeddings_dir(tmp_path, sdxl, capsys):
    from PIL import Image

    from stablexl.cli import main

    folder, emb, _, _ = sdxl
    out = tmp_path / "e.png"
    assert main(["generate", "a photo of (myemb:1.1)", "--model", str(folder), "--embeddings-dir", str(emb),
                 "--steps", "1", "--width", "64", "--height", "64", "--output", str(out), "--quiet"]) == 0
    assert Image.open(out).size == (64, 64)
    assert main(["generate", "embedding:myemc", "--model", str(folder), "--embeddings-dir", str(emb),
                 "--steps", "1", "--quiet", "--output", str(out)]) == 2
    assert "PROMPT" in capsys.readouterr().err
