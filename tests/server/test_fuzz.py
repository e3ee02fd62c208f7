"""Fuzzing: Hypothesis builds requests from our own OpenAPI schema (plus wrong types, unknown fields, broken
JSON and hostile images) and fires them at every operation; no answer may be a 5xx, and every 4xx is a
JSON error. Runs on the real tiny-sdxl pipeline with tight limits, so requests that pass all checks
really generate (one or two steps at <= 64 px) and stay fast."""

from __future__ import annotations

import base64
import io
import json
import re
from collections import Counter
from urllib.parse import quote

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from .conftest import client

N_EXAMPLES = 560  # one request each; the test checks at least 500 were sent


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

# values that pass the server's limits, so a share of the requests really runs the pipeline
SMALL = {"steps": st.integers(1, 2), "width": st.sampled_from([32, 64, 60, 0, 200]),
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


def test_fuzz_every_operation_no_5xx():
    statuses: Counter = Counter()
    per_op: Counter = Counter()
    with client(max_width=64, max_height=64, max_steps=2, max_batch=2, queue_size=3) as c:
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
            if op["body"] is not None or op["method"] == "POST":
                how = data.draw(st.sampled_from(["sparse"] * 3 + ["typed"] * 2 + ["schema"] * 2 + ["junk", "broken"]),
                                label="body kind")
                if how in ("schema", "typed", "sparse") and op["body"] is not None:
                    strategy = (sparse_body(op["body"], components) if how == "sparse" else
                                from_schema(op["body"], components, junk=how == "schema"))
                    body = data.draw(strategy, label="body")
                    if isinstance(body, dict) and data.draw(st.booleans(), label="unknown field"):
                        body["unknown_" + data.draw(st.text(max_size=5))] = data.draw(JUNK)
                    kwargs["content"] = json.dumps(body)
                elif how == "junk":
                    kwargs["content"] = json.dumps(data.draw(JUNK, label="junk body"))
                else:
                    kwargs["content"] = data.draw(st.binary(max_size=40), label="raw body")
                kwargs["headers"] = {"content-type": "application/json"}
            r = c.request(op["method"], path, **kwargs)
            statuses[r.status_code] += 1
            per_op[(op["method"], op["path"], r.status_code)] += 1
            assert r.status_code < 500, (op["method"], path, kwargs.get("content", "")[:300], r.text[:500])
            if 400 <= r.status_code < 500:
                assert "detail" in r.json(), r.text[:300]
            elif op["path"] == "/v1/generate" and r.status_code == 202:
                known_ids.append(r.json()["id"])

        one_request()
    print("fuzz statuses:", dict(statuses), "per operation:", dict(per_op))
    assert sum(statuses.values()) >= 500, statuses
    assert {(m, p) for m, p, _ in per_op} == {(o["method"], o["path"]) for o in ops}, "every operation was exercised"
    generated = sum(n for (m, p, code), n in per_op.items() if code in (200, 202) and p in GENERATING)
    assert generated >= 40 and statuses[422] >= 100, per_op  # many requests really ran, many were refused
