"""Fuzzing: Hypothesis builds requests from our own OpenAPI schema (plus wrong types, unknown fields, broken
JSON and hostile images) and fires them at every operation; no answer may be a 5xx, and every 4xx is a
JSON error. Runs on the real tiny-sdxl pipeline with tight limits, so requests that pass all checks
really generate (one or two steps at <= 64 px) and stay fast.

LoRAs: the server has a --lora-dir (a real LoRA, a broken file, a pickle, a symlink out of the folder) and a
decoy LoRA outside it; the `loras` field and `<lora:...>` prompt tags get hostile names (`..`, absolute
paths, separators), huge / negative / NaN weights and malformed tags. Every file opened while the requests
run is recorded (an audit hook on "open", plus safetensors' own opener, which bypasses Python's `open`):
none may lie outside the LoRA folder. Textual inversions likewise (an --embeddings-dir with a real one, a broken
one and a symlink out; prompts with file-name and `embedding:NAME` triggers), and A1111's hires-fix fields are
injected into txt2img bodies with values in and out of range. `STABLEXL_FUZZ_EXAMPLES` raises the request count
(e.g. 5000)."""

from __future__ import annotations

import base64
import io
import json
import os
import re
import sys
from collections import Counter
from pathlib import Path
from urllib.parse import quote

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from .conftest import client

N_EXAMPLES = int(os.environ.get("STABLEXL_FUZZ_EXAMPLES", 560))  # one request each; at least 500 must be sent


@pytest.fixture(autouse=True, scope="module")
def _subnormal_floats_representable():
    """Pipelines flush subnormal floats to zero in the thread that builds them (pipeline.py), and an earlier
    test in this process may have done so in this thread. Hypothesis draws floats here and refuses to run
    without subnormals, so the flag is cleared for this module and set again afterwards."""
    torch.set_flush_denormal(False)
    yield
    torch.set_flush_denormal(True)


def _png(size, mode="RGB") -> str:
    buf = io.BytesIO()
    Image.new(mode, size, 128).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def _jpeg_data_url() -> str:
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (10, 20, 30)).save(buf, format="JPEG")
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()


IMAGES = st.sampled_from([  # fitting, odd-sized, tiny, too big for the limits, and not images at all
    _png((64, 64)), _png((64, 64), "L"), _png((32, 48)), _png((7, 5)), _png((1, 1)), _png((64, 64), "RGBA"),
    _png((128, 64)), _jpeg_data_url(), "data:image/png;base64," + _png((64, 64)),
    base64.b64encode(b"GIF89a not really").decode(), base64.b64encode(b"\x89PNG\r\n\x1a\n broken").decode(),
    "%%% not base64 %%%", "", "AAAA", _png((64, 64))[:200],
]) | st.text(max_size=40)

JUNK = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(allow_nan=False),
                 st.text(max_size=30), st.lists(st.integers(), max_size=3),
                 st.dictionaries(st.text(max_size=5), st.integers(), max_size=2))

OUTSIDE: dict[str, str] = {}  # the decoy LoRA's absolute path (outside the folder), set by the test
LORA_NAMES = st.sampled_from(
    ["good"] * 6 + ["deep", "bad", "pickled", "escape", "secret", "../outside/secret", "..", ".", "", " good ",
                    "good.safetensors", "sub/deep", "sub\\deep", "GOOD", "goo", "nul\x00l", "C:secret", "~/secret",
                    "/etc/passwd", "ABS"]
).map(lambda n: OUTSIDE.get("path", n) if n == "ABS" else n) | st.text(max_size=12)
WEIGHTS = st.one_of(st.floats(), st.sampled_from([0, 1, -1, 0.5, 100, -100, 100.5, 1e308, -1e308, 5e-324]),
                    st.integers(-2**70, 2**70), st.text(max_size=5), st.none())
TAG_WEIGHTS = st.sampled_from(["0.8", "-1", "0", "100", "-100", "1e400", "nan", "inf", "-inf", "abc", "", " ", "1,5",
                               "te=0.5", "unet=-2", "dyn=4", "te=nan", "1e308"]) | st.floats().map(repr)
TAG = st.builds(lambda kind, name, args, close: f"<{kind}:{name}{''.join(':' + a for a in args)}{'>' if close else ''}",
                st.sampled_from(["lora"] * 4 + ["lyco", "LORA", "hypernet"]), LORA_NAMES,
                st.lists(TAG_WEIGHTS, max_size=4), st.booleans())
TAGGED = st.lists(st.one_of(
    st.text(max_size=10), TAG, st.sampled_from(["<lora:good:0.5>", "<lora:good:1:-1>", "<lora:>", "<lora::>",
                                                "<<lora:good>>", "<lora:good:0.5", "<lora:../outside/secret:1>"])),
    min_size=1, max_size=4).map(" ".join)
PROMPT = st.sampled_from([False] * 3 + [True]).flatmap(lambda tagged: TAGGED if tagged else st.text(max_size=40))
# what a generating request gets injected a third of the time: well-formed LoRAs of the folder, or any of the above
LORA_FIELD = st.sampled_from([[{"name": "good", "strength": 0.7}], [{"name": "deep", "strength": -1, "text_strength": 0.3}],
                              [{"name": "good"}, {"name": "deep", "strength": 2}]])
LORA_PROMPT = st.sampled_from(["a cat <lora:good:0.5>", "<lora:deep:1:-1> a dog", "<lora:good>", "<lyco:deep:0.3>"])
# textual-inversion triggers: the file name (A1111) and embedding:NAME (ComfyUI), with hostile names
EMBEDDING_PROMPT = st.lists(st.sampled_from(
    ["goodemb", "(goodemb:1.3)", "embedding:goodemb", "embedding:sub/deepemb", "embedding:../outside/secretemb",
     "embedding:/etc/passwd", "embedding:brokenemb", "brokenemb", "embedding:escapeemb", "escapeemb", "embedding:",
     "embedding:goodemb.safetensors", "embedding:GOODEMB", "a cat", "deepemb"]) | st.text(max_size=8),
    min_size=1, max_size=4).map(" ".join)
# A1111's hires fix on txt2img, with values in and out of range
HIRES = st.fixed_dictionaries({"enable_hr": st.just(True)}, optional={
    "hr_scale": st.sampled_from([1.0, 1.5, 2, 0, -1, 100, 1e308]), "hr_upscaler": st.sampled_from(
        ["Latent", "Latent (nearest)", "Latent (bicubic)", "R-ESRGAN 4x+", "", "None", "nope"]),
    "hr_second_pass_steps": st.integers(-2, 3), "denoising_strength": st.sampled_from([0.0, 0.5, 1.0, 2.0, -1]),
    "hr_resize_x": st.sampled_from([0, 64, 96, 100000]), "hr_resize_y": st.sampled_from([0, 64, 96]),
    "hr_sampler_name": st.sampled_from(["Euler", "nope", ""]), "hr_prompt": PROMPT})
LORAS = st.lists(st.fixed_dictionaries({"name": LORA_NAMES}, optional={"strength": WEIGHTS, "text_strength": WEIGHTS})
                 | JUNK, max_size=3) | JUNK

# values that pass the server's limits, so a share of the requests really runs the pipeline
SMALL = {"prompt": PROMPT, "negative_prompt": PROMPT, "hr_prompt": PROMPT, "loras": LORAS,"steps": st.integers(1, 2), "width": st.sampled_from([32, 64, 60, 0, 200]),
         "height": st.sampled_from([32, 64, 56, 72]), "batch": st.integers(1, 2), "batch_size": st.integers(1, 2),
         "n_iter": st.integers(1, 2), "model": st.sampled_from(["tiny-sdxl", "sd_xl_base_1.0"]),
         "sampler": st.sampled_from(["euler", "Euler a", "DPM++ 2M Karras", "nope"]),
         "sampler_name": st.sampled_from(["Euler", "Euler a", "DPM++ 2M", "DDIM", "UniPC"]),
         "scheduler": st.sampled_from(["Automatic", "Karras", "sgm_uniform", "polyexponential"]),
         "schedule": st.sampled_from(["karras", "leading", "cosine"]), "vae_tile": st.sampled_from([16, 32]),
         # fields whose other values are refused by design: keep them neutral half of the time
         "enable_hr": st.just(False), "restore_faces": st.just(False), "tiling": st.just(None),
         "alwayson_scripts": st.just({}), "script_name": st.none(), "subseed_strength": st.just(0.0),
         "image_prompt": st.none(), "latents": st.none(), "denoising_end": st.none(), "refiner": st.none(),
         "refiner_checkpoint": st.none(), "force_task_id": st.none(), "override_settings": st.none(),
         "init_images": st.lists(st.sampled_from([_png((64, 64)), _jpeg_data_url()]), min_size=1, max_size=1)}
IMAGE_FIELDS = {"init_image", "mask", "image_prompt", "image"}
GENERATING = {"/v1/generate", "/sdapi/v1/txt2img", "/sdapi/v1/img2img"}


def _resolve(schema: dict, components: dict) -> dict:
    while "$ref" in schema:
        schema = components[schema["$ref"].rsplit("/", 1)[1]]
    return schema


def from_schema(schema: dict, components: dict, name: str = "", depth: int = 0, junk: bool = False
                ) -> st.SearchStrategy:
    """A strategy for values that fit `schema` (JSON Schema as FastAPI writes it), mixed with domain hints;
    with `junk`, any object field may also be a value of the wrong type."""
    schema = _resolve(schema, components)
    if name in IMAGE_FIELDS:
        return IMAGES
    hint = SMALL.get(name)
    if name == "init_images":
        return st.lists(IMAGES, max_size=2) | hint
    for key in ("anyOf", "oneOf"):
        if key in schema:
            options = [from_schema(s, components, name, depth, junk) for s in schema[key]]
            return st.one_of(*options, *([hint] if hint is not None else []))
    base = _typed(schema, components, name, depth, junk)
    return base if hint is None else st.one_of(hint, base)


def _typed(schema: dict, components: dict, name: str, depth: int, junk: bool) -> st.SearchStrategy:
    if "enum" in schema:
        return st.sampled_from(schema["enum"])
    if "const" in schema:
        return st.just(schema["const"])
    t = schema.get("type")
    # typed values stay in the schema's bounds; with junk, out-of-range numbers and odd lists come too
    if t == "integer":
        inside = st.integers(schema.get("minimum"), schema.get("maximum"))
        return inside | st.integers(-(2**40), 2**40) if junk else inside
    if t == "number":
        lo = schema.get("minimum", schema.get("exclusiveMinimum"))
        hi = schema.get("maximum", schema.get("exclusiveMaximum"))
        inside = st.floats(lo, hi, allow_nan=False, exclude_min="exclusiveMinimum" in schema,
                           exclude_max="exclusiveMaximum" in schema)
        return inside | st.floats(allow_nan=False, allow_infinity=False) if junk else inside
    if t == "boolean":
        return st.booleans()
    if t == "null":
        return st.none()
    if t == "string":
        pattern = schema.get("pattern")
        if pattern:
            inside = st.from_regex(re.compile(pattern), fullmatch=True)
            return inside | st.text(max_size=20) if junk else inside
        return st.text(max_size=min(schema.get("maxLength", 40), 40))
    if t == "array":
        if "prefixItems" in schema:  # tuples, e.g. (height, width)
            items = [from_schema(s, components, "", depth + 1, junk) for s in schema["prefixItems"]]
            pairs = st.tuples(*items).map(list)
            return pairs | st.lists(st.integers(-5, 5000), max_size=3) if junk else pairs
        item = from_schema(schema.get("items", {}), components, "", depth + 1, junk) if depth < 3 else JUNK
        return st.lists(item, max_size=3)
    if t == "object" or "properties" in schema:
        props = schema.get("properties", {})
        if not props or depth >= 3:
            return st.dictionaries(st.text(max_size=12), JUNK, max_size=3)
        required = set(schema.get("required", ()))
        fields = {k: from_schema(v, components, k, depth + 1, junk) for k, v in props.items()}
        if junk:
            fields = {k: v | JUNK for k, v in fields.items()}
        return st.fixed_dictionaries({k: fields[k] for k in props if k in required},
                                     optional={k: fields[k] for k in props if k not in required})
    return JUNK


def sparse_body(schema: dict, components: dict) -> st.SearchStrategy:
    """A few typed fields of an object schema (plus its required ones, and init_images, which img2img needs):
    requests like real clients send, which mostly pass validation and run."""
    schema = _resolve(schema, components)
    props = schema.get("properties", {})
    if not props:  # a free-form object (POST /sdapi/v1/options)
        return from_schema(schema, components)
    always = set(schema.get("required", ())) | ({"init_images"} & set(props))
    names = st.sets(st.sampled_from(sorted(props)), max_size=5).map(lambda chosen: sorted(set(chosen) | always))
    return names.flatmap(lambda keys: st.fixed_dictionaries(
        {k: from_schema(props[k], components, k, 1) for k in keys}))


def _operations(spec: dict) -> list[dict]:
    ops = []
    for path, item in spec["paths"].items():
        for method, op in item.items():
            body = None
            if "requestBody" in op:
                body = op["requestBody"]["content"]["application/json"]["schema"]
            params = [p for p in op.get("parameters", ()) if p["in"] in ("path", "query")]
            ops.append({"path": path, "method": method.upper(), "body": body, "params": params})
    return ops


_OPENED: list[str] | None = None  # paths opened while recording (the audit hook below cannot be removed)


def _audit(event: str, args: tuple) -> None:
    if _OPENED is not None and event in ("open", "os.scandir", "os.listdir") and args and \
            isinstance(args[0], (str, bytes, os.PathLike)):
        _OPENED.append(os.fsdecode(args[0]))


def lora_folder(root: Path) -> Path:
    """LoRA folder: a real LoRA for tiny-sdxl (also one level down), a broken file, a pickle and a symlink to
    the decoy outside."""
    from stablexl.adapters.lora import save_lora, weight_modules

    from .conftest import tiny_loader

    parts = tiny_loader("tiny-sdxl").parts
    g = torch.Generator().manual_seed(0)
    layers = {}
    for path, m in weight_modules(parts.unet).items():
        if path.endswith(("attn1.to_q", "attn2.to_v")):
            w = m.weight
            layers[f"unet.{path}"] = (torch.randn(2, w.shape[1], generator=g) * 0.1, torch.randn(w.shape[0], 2, generator=g) * 0.1, None)
    folder, outside = root / "loras", root / "outside"
    (folder / "sub").mkdir(parents=True)
    outside.mkdir()
    save_lora(folder / "good.safetensors", parts, layers)
    save_lora(folder / "sub" / "deep.safetensors", parts, layers)
    save_lora(outside / "secret.safetensors", parts, layers)
    (folder / "bad.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not a header}")
    torch.save({"a": torch.zeros(1)}, folder / "pickled.pt")
    (folder / "escape.safetensors").symlink_to(outside / "secret.safetensors")
    OUTSIDE["path"] = str(outside / "secret")
    return folder


def embedding_folder(root: Path) -> Path:
    """Textual inversions for tiny-sdxl (one a level down), a broken file and a symlink to a decoy outside."""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(1)
    folder, outside = root / "embeddings", root / "outside"
    (folder / "sub").mkdir(parents=True)
    outside.mkdir(exist_ok=True)
    emb = lambda: {"clip_l": torch.randn(2, 32, generator=g), "clip_g": torch.randn(2, 48, generator=g)}  # noqa: E731
    save_file(emb(), str(folder / "goodemb.safetensors"))
    save_file(emb(), str(folder / "sub" / "deepemb.safetensors"))
    save_file(emb(), str(outside / "secretemb.safetensors"))
    (folder / "brokenemb.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not a header}")
    (folder / "escapeemb.safetensors").symlink_to(outside / "secretemb.safetensors")
    return folder


def test_fuzz_every_operation_no_5xx(tmp_path, monkeypatch):
    global _OPENED
    statuses: Counter = Counter()
    per_op: Counter = Counter()
    folder = lora_folder(tmp_path)
    emb_folder = embedding_folder(tmp_path)
    torch.set_flush_denormal(False)  # building the pipeline for the LoRA file set it again (see the fixture above)
    import stablexl.io.checkpoint as checkpoint

    real_safe_open = checkpoint.safe_open

    def recording_safe_open(path, *a, **kw):  # safetensors opens files in Rust, unseen by the audit hook
        if _OPENED is not None:
            _OPENED.append(os.fsdecode(path))
        return real_safe_open(path, *a, **kw)

    monkeypatch.setattr(checkpoint, "safe_open", recording_safe_open)
    if not getattr(sys, "_stablexl_fuzz_audit", False):
        sys.addaudithook(_audit)
        sys._stablexl_fuzz_audit = True
    with_loras = Counter()
    with_embeddings = Counter()
    _OPENED = []
    with client(max_width=64, max_height=64, max_steps=2, max_batch=2, queue_size=3, lora_dir=str(folder),
                embeddings_dir=str(emb_folder)) as c:
        spec = c.get("/openapi.json").json()
        components = spec["components"]["schemas"]
        ops = _operations(spec)
        assert len(ops) >= 18, [o["path"] for o in ops]
        known_ids: list[str] = []

        @settings(max_examples=N_EXAMPLES, deadline=None, derandomize=True, database=None,
                  suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
        @given(data=st.data())
        def one_request(data):
            op = data.draw(st.sampled_from(ops), label="operation")
            path = op["path"]
            query = {}
            for p in op["params"]:
                if p["in"] == "path":
                    # the same draws whatever happened before (Hypothesis replays them): text, a flag, an index
                    text = data.draw(st.text(alphabet=st.characters(blacklist_categories=["Cs"]), min_size=1,
                                             max_size=20), label=p["name"])
                    use_known = data.draw(st.booleans(), label="a real job id")
                    k = data.draw(st.integers(0, 10**6), label="which job")
                    if use_known and known_ids and not path.endswith("/events"):  # events on a live job stream on
                        text = known_ids[k % len(known_ids)]
                    value = quote(text, safe="")  # as any HTTP client would send it
                    path = path.replace("{" + p["name"] + "}", value)
                elif data.draw(st.booleans(), label=f"send {p['name']}"):
                    query[p["name"]] = data.draw(st.sampled_from(["true", "false", "1", "yes", "maybe", ""]))
            kwargs = {"params": query}
            injected = False  # embedding triggers put into the prompt
            if op["body"] is not None or op["method"] == "POST":
                how = data.draw(st.sampled_from(["sparse"] * 3 + ["typed"] * 2 + ["schema"] * 2 + ["junk", "broken"]),
                                label="body kind")
                if how in ("schema", "typed", "sparse") and op["body"] is not None:
                    strategy = (sparse_body(op["body"], components) if how == "sparse" else
                                from_schema(op["body"], components, junk=how == "schema"))
                    body = data.draw(strategy, label="body")
                    if op["path"] in GENERATING and isinstance(body, dict) and data.draw(st.sampled_from([0, 0, 1]),
                                                                                         label="inject a LoRA"):
                        if op["path"] == "/v1/generate" and data.draw(st.booleans(), label="as the loras field"):
                            body["loras"] = data.draw(LORA_FIELD | LORAS, label="loras")
                        else:
                            body["prompt"] = data.draw(LORA_PROMPT | TAGGED, label="prompt with tags")
                    if op["path"] in GENERATING and isinstance(body, dict) and data.draw(st.sampled_from([0] * 5 + [1]),
                                                                                         label="inject embeddings"):
                        body["prompt"] = data.draw(EMBEDDING_PROMPT, label="prompt with embeddings")
                        injected = True
                    if op["path"] == "/sdapi/v1/txt2img" and isinstance(body, dict) and \
                            data.draw(st.sampled_from([0] * 4 + [1]), label="inject hires"):
                        body.update(data.draw(HIRES, label="hires"))
                    if isinstance(body, dict) and data.draw(st.booleans(), label="unknown field"):
                        body["unknown_" + data.draw(st.text(max_size=5))] = data.draw(JUNK)
                    kwargs["content"] = json.dumps(body)
                elif how == "junk":
                    kwargs["content"] = json.dumps(data.draw(JUNK, label="junk body"))
                else:
                    kwargs["content"] = data.draw(st.binary(max_size=40), label="raw body")
                kwargs["headers"] = {"content-type": "application/json"}
            r = c.request(op["method"], path, **kwargs)
            if injected:
                with_embeddings[r.status_code] += 1
            content = kwargs.get("content", "")
            if isinstance(content, str) and ("<lora:" in content or '"loras": [{' in content):
                with_loras[r.status_code] += 1
            statuses[r.status_code] += 1
            per_op[(op["method"], op["path"], r.status_code)] += 1
            assert r.status_code < 500, (op["method"], path, kwargs.get("content", "")[:300], r.text[:500])
            if 400 <= r.status_code < 500:
                assert "detail" in r.json(), r.text[:300]
            elif op["path"] == "/v1/generate" and r.status_code == 202:
                known_ids.append(r.json()["id"])

        try:
            one_request()
        finally:
            opened, _OPENED = _OPENED, None
    print("fuzz statuses:", dict(statuses), "per operation:", dict(per_op))
    allowed = (folder.resolve(), emb_folder.resolve())
    # every weight file opened anywhere, and everything opened under this test's folder (the decoys' included)
    root = tmp_path.resolve()
    lora_files = [p for p in opened if p.endswith((".safetensors", ".pt", ".ckpt", ".pth", ".bin"))
                  or Path(p).resolve().is_relative_to(root)]
    outside = [p for p in lora_files if not any(Path(p).resolve().is_relative_to(a) for a in allowed)]
    print(f"LoRA requests by status: {dict(with_loras)}; LoRA-folder files opened: {len(lora_files)} "
          f"({len(set(lora_files))} distinct), outside the folder: {len(outside)}")
    assert not outside, sorted(set(outside))[:10]
    assert any(p.endswith("good.safetensors") for p in lora_files), "a LoRA was really read"
    assert any(p.endswith("goodemb.safetensors") for p in lora_files), "an embedding was really read"
    # how many of those also passed every other check varies with the server's state (queue, job ids); that
    # triggers generate is tests/server/test_hires_embeddings.py's job, reaching the folder is this one's
    print(f"embedding-trigger requests by status: {dict(with_embeddings)}")
    assert sum(with_embeddings.values()) >= 10, with_embeddings
    assert sum(n for code, n in with_loras.items() if code in (200, 202)) >= 1, with_loras
    assert sum(statuses.values()) >= 500, statuses
    assert {(m, p) for m, p, _ in per_op} == {(o["method"], o["path"]) for o in ops}, "every operation was exercised"
    generated = sum(n for (m, p, code), n in per_op.items() if code in (200, 202) and p in GENERATING)
    assert generated >= 40 and statuses[422] >= 100, per_op  # many requests really ran, many were refused
