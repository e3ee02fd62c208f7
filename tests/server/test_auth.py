"""--api-key: every route but the page's static files needs the key."""

from __future__ import annotations

import base64

import pytest

from .conftest import client

KEY = "s3cret-key"
PROTECTED = [("GET", "/v1/models"), ("GET", "/v1/samplers"), ("GET", "/v1/server"), ("POST", "/v1/generate"),
             ("GET", "/v1/jobs/abc"), ("DELETE", "/v1/jobs/abc"), ("GET", "/v1/jobs/abc/events"),
             ("POST", "/sdapi/v1/txt2img"), ("POST", "/sdapi/v1/img2img"), ("GET", "/sdapi/v1/progress"),
             ("POST", "/sdapi/v1/interrupt"), ("GET", "/sdapi/v1/options"), ("POST", "/sdapi/v1/options"),
             ("GET", "/sdapi/v1/sd-models"), ("GET", "/sdapi/v1/samplers"), ("GET", "/sdapi/v1/schedulers"),
             ("POST", "/sdapi/v1/png-info"), ("GET", "/openapi.json"), ("GET", "/docs"), ("GET", "/nonexistent")]


@pytest.fixture(scope="module")
def c():
    with client(api_key=KEY) as c:
        yield c


@pytest.mark.parametrize("method,path", PROTECTED)
def test_routes_need_the_key(c, method, path):
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Bearer {KEY}x"},
                    {"Authorization": KEY}, {"Authorization": "Basic " + base64.b64encode(b"u:wrong").decode()}):
        r = c.request(method, path, headers=headers, json={})
        assert r.status_code == 401, (headers, r.status_code)
        assert r.headers["www-authenticate"].startswith("Bearer") and "API key" in r.json()["detail"]


def test_right_key_opens_routes(c):
    ok = {"Authorization": f"Bearer {KEY}"}
    assert c.get("/v1/models", headers=ok).status_code == 200
    assert c.get("/openapi.json", headers=ok).json()["info"]["title"] == "stablexl"
    assert c.get("/v1/jobs/abc", headers=ok).status_code == 404
    r = c.post("/v1/generate", json={"prompt": "x", "steps": 1}, headers=ok)
    assert r.status_code == 202
    # A1111 clients send credentials as HTTP Basic; the key is accepted as the password
    basic = {"Authorization": "Basic " + base64.b64encode(f"anyone:{KEY}".encode()).decode()}
    assert c.get("/sdapi/v1/sd-models", headers=basic).status_code == 200


def test_websocket_handshake_without_key_is_closed(c):
    from starlette.websockets import WebSocketDisconnect

    with pytest.raises(WebSocketDisconnect) as e, c.websocket_connect("/v1/anything"):
        pass
    assert e.value.code == 1008  # policy violation


@pytest.mark.parametrize("path", ["/", "/web/app.js", "/web/style.css"])
def test_page_static_files_are_open(c, path):
    r = c.get(path)
    assert r.status_code == 200 and len(r.content) > 100
