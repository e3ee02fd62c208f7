"""The web page end to end in a real browser: Debian's chromium driven by Playwright, against a live server.

Chromium comes from apt (`.ci/run` installs it); Playwright's own browser download is never used. Locally
the tests skip when /usr/bin/chromium is missing; in CI (env CI set) they fail instead.
"""

from __future__ import annotations

import base64
import io
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from .conftest import config, live_server

CHROMIUM = "/usr/bin/chromium"
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"

if not os.path.exists(CHROMIUM) and not os.environ.get("CI"):
    pytest.skip(f"{CHROMIUM} not installed (apt-get install chromium); CI fails here instead", allow_module_level=True)


@pytest.fixture(scope="module")
def site():
    with live_server(config(max_width=128, max_height=128, max_steps=300)) as (url, _app):
        yield url


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        yield b
        b.close()


@pytest.fixture
def page(browser, site):
    ctx = browser.new_context(viewport={"width": 1280, "height": 1000})
    pg = ctx.new_page()
    errors: list[str] = []
    pg.on("pageerror", lambda e: errors.append(str(e)))
    pg.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    pg.goto(site)
    pg.wait_for_selector("#model option[value='tiny-sdxl']", state="attached")
    pg.console_errors = errors  # a test that provokes an HTTP error on purpose removes its own entry
    yield pg
    ctx.close()
    assert errors == [], errors


def _save_screenshot(pg, tmp_path: Path, name: str) -> Path:
    shot = tmp_path / name
    pg.screenshot(path=str(shot), full_page=True)
    ARTIFACTS.mkdir(exist_ok=True)
    shutil.copy(shot, ARTIFACTS / name)
    assert shot.stat().st_size > 1000
    return shot


def _gallery_pixels(pg, index: int = 0) -> np.ndarray:
    src = pg.locator("#gallery li img").nth(index).get_attribute("src")
    assert src.startswith("data:image/png;base64,")
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1]))).convert("RGB"))


def test_type_prompt_generate_and_see_result_in_gallery(page, tmp_path):
    pg = page
    assert pg.input_value("#width") == "64" and pg.input_value("#size_preset") == "64x64"  # the model's resolution
    assert pg.locator("#size_preset option[value='1024x1024']").is_disabled()  # over this server's limit
    pg.click("#prompt")
    pg.keyboard.type("a lighthouse at dusk")
    pg.fill("#steps", "4")
    pg.uncheck("#random_seed")
    pg.fill("#seed", "1234")
    pg.focus("#prompt")
    pg.keyboard.press("Control+Enter")  # keyboard submit
    pg.wait_for_selector("#gallery li img", timeout=60_000)
    assert pg.locator("#gallery li").count() == 1
    assert pg.evaluate("document.querySelector('#gallery li img').naturalWidth") == 64
    info = pg.inner_text("#gallery li pre.infotext")
    assert info.startswith("a lighthouse at dusk") and "Seed: 1234" in info and "Steps: 4" in info
    assert pg.get_attribute("#gallery li a.download", "download") == "stablexl-1234.png"
    assert "done: 1 image" in pg.inner_text("#status")
    _save_screenshot(pg, tmp_path, "web-txt2img.png")

    # reuse the settings: change them, then take them back from the result
    pg.fill("#prompt", "something else")
    pg.fill("#steps", "7")
    pg.check("#random_seed")
    pg.click("#gallery li button.reuse")
    assert pg.input_value("#prompt") == "a lighthouse at dusk" and pg.input_value("#steps") == "4"
    assert pg.input_value("#seed") == "1234" and not pg.is_checked("#random_seed")
    pg.click("#generate")  # same settings -> the same picture
    pg.wait_for_function("document.querySelectorAll('#gallery li').length === 2", timeout=60_000)
    assert np.array_equal(_gallery_pixels(pg, 0), _gallery_pixels(pg, 1))


def test_inpainting_with_a_painted_mask(page, tmp_path):
    pg = page
    src = tmp_path / "src.png"
    Image.new("RGB", (64, 64), (30, 160, 40)).save(src)
    pg.check("#mode-inpaint")
    pg.set_input_files("#init_image", str(src))
    pg.wait_for_selector("#mask-canvas", state="visible")
    pg.locator("#mask-canvas").scroll_into_view_if_needed()  # mouse events need it on screen
    box = pg.locator("#mask-canvas").bounding_box()
    # paint a stroke across the middle of the picture
    pg.mouse.move(box["x"] + box["width"] * 0.35, box["y"] + box["height"] * 0.5)
    pg.mouse.down()
    pg.mouse.move(box["x"] + box["width"] * 0.65, box["y"] + box["height"] * 0.5, steps=8)
    pg.mouse.up()
    pg.fill("#prompt", "a red flower")
    pg.fill("#steps", "4")
    pg.fill("#strength", "1")
    pg.click("#generate")
    pg.wait_for_selector("#gallery li img", timeout=60_000)
    px = _gallery_pixels(pg)
    assert tuple(px[2, 2]) == (30, 160, 40), "outside the painted mask the picture is unchanged"
    assert tuple(px[32, 32]) != (30, 160, 40), "the painted stroke was repainted"
    assert "Denoising strength: 1.0" in pg.inner_text("#gallery li pre.infotext")
    _save_screenshot(pg, tmp_path, "web-inpaint.png")


def test_live_preview_and_cancel_with_escape(page):
    pg = page
    pg.fill("#prompt", "slow one")
    pg.fill("#steps", "300")  # long enough to still be running when Escape arrives
    pg.focus("#steps")
    pg.keyboard.press("Enter")  # Enter in a field submits the form
    pg.wait_for_selector("#preview:not([hidden])", timeout=30_000)
    assert pg.evaluate("document.getElementById('preview').naturalWidth") == 64
    assert "step" in pg.inner_text("#status")
    assert pg.is_enabled("#cancel") and pg.is_disabled("#generate")
    pg.keyboard.press("Escape")
    pg.wait_for_function("document.getElementById('status').textContent === 'cancelled'", timeout=30_000)
    assert pg.locator("#gallery li").count() == 0 and pg.is_enabled("#generate")


def test_bad_input_is_reported_on_the_field(page):
    pg = page
    pg.fill("#prompt", "x")
    pg.fill("#width", "60")  # not a multiple of 8: the server's 422 names the field, the page marks it
    pg.click("#generate")
    pg.wait_for_selector("#form-error:not([hidden])")
    assert "width" in pg.inner_text("#form-error")
    assert pg.get_attribute("#width", "aria-invalid") == "true"
    assert pg.evaluate("document.activeElement.id") == "width"  # focus moves to the field to fix
    expected = [e for e in pg.console_errors if "status of 422" in e]
    assert len(expected) == 1  # the browser logs the refused request; nothing else went wrong
    pg.console_errors.remove(expected[0])


def test_every_control_is_labelled_and_reachable_by_keyboard(page):
    pg = page
    unlabelled = pg.evaluate("""() => [...document.querySelectorAll('input, select, textarea, button, canvas[role]')]
        .filter(el => !(el.labels && el.labels.length) && !el.getAttribute('aria-label') && !el.textContent.trim())
        .map(el => el.id)""")
    assert unlabelled == []
    pg.focus("#prompt")
    seen = []
    for _ in range(12):
        pg.keyboard.press("Tab")
        seen.append(pg.evaluate("document.activeElement.id"))
    assert seen[:4] == ["negative_prompt", "model", "sampler", "schedule"], seen
