"""The emoji dataset builder on a fake npm package (same layout as emoji-datasource-*, a few drawn PNGs):
the three kinds of item, boxes against the pixels, captions, licences, checksums, the npm cache, the CLI.
Nothing is fetched: the packages are pre-seeded in a cache dir or handed over by a stand-in for `npm pack`."""

import io
import json
import shutil
import tarfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from stablexl.cli import main
from stablexl.mini import emoji as E

# (name, short_name, unified, category, shape, colour); name "" exercises the short_name fallback
FAKE = [
    ("GRINNING FACE", "grinning", "1F600", "Smileys & Emotion", "circle", (250, 200, 30)),
    ("RED APPLE", "apple", "1F34E", "Food & Drink", "circle", (220, 30, 40)),
    ("", "thumbs_up", "1F44D", "People & Body", "square", (240, 180, 60)),
    ("FATHER CHRISTMAS", "santa", "1F385", "People & Body", "triangle", (200, 20, 20)),
    ("Ascension Island Flag", "flag-ac", "1F1E6-1F1E8", "Flags", "square", (20, 40, 160)),
    ("GREEN SALAD", "green_salad", "1F957", "Food & Drink", "triangle", (40, 160, 60)),
    ("BLUE HEART", "blue_heart", "1F499", "Smileys & Emotion", "circle", (30, 90, 220)),
    ("GHOST", "ghost", "1F47B", "Smileys & Emotion", "missing", None),  # listed, but no PNG in the tarball
]
SKIN = {"1F3FB": (250, 220, 200), "1F3FD": (190, 140, 90)}  # skin variations of the father christmas


def _png(shape: str, colour, inset: int, palette: bool = False) -> bytes:
    img = Image.new("RGBA", (64, 64), (0, 0, 0, 0))
    d = ImageDraw.Draw(img)
    box = (inset, inset + 2, 63 - inset, 61 - inset)
    if shape == "circle":
        d.ellipse(box, fill=colour + (255,), outline=colour + (120,), width=2)  # half-transparent rim
    elif shape == "square":
        d.rectangle(box, fill=colour + (255,))
        d.rectangle((box[0] + 8, box[1] + 8, box[0] + 20, box[1] + 20), fill=(255, 255, 255, 255))  # white inside
    else:
        d.polygon([(32, box[1]), (box[2], box[3]), (box[0], box[3])], fill=colour + (255,))
    buf = io.BytesIO()
    (img.convert("P") if palette else img).save(buf, "PNG")
    return buf.getvalue()


def _entry(name, short, unified, category, i):
    return {"name": name, "short_name": short, "short_names": [short], "unified": unified, "category": category,
            "image": unified.lower() + ".png", "sort_order": i, "has_img_twitter": True, "has_img_google": True}


def make_tarball(path: Path, img_set: str) -> Path:
    entries, files = [], {}
    for i, (name, short, unified, category, shape, colour) in enumerate(FAKE):
        e = _entry(name, short, unified, category, i)
        if shape != "missing":
            files[e["image"]] = _png(shape, colour, inset=2 + 3 * (i % 3), palette=(i == 1))
        if short == "santa":
            e["skin_variations"] = {k: {"unified": f"{unified}-{k}", "image": f"{unified}-{k}.png".lower(),
                                        "has_img_twitter": True, "has_img_google": True} for k in SKIN}
            for k, c in SKIN.items():
                files[e["skin_variations"][k]["image"]] = _png(shape, c, inset=4)
        entries.append(e)
    members = {"package/emoji.json": json.dumps(entries).encode(), "package/LICENSE": b"The MIT License (MIT)\n",
               f"package/img/{img_set}/sheets/64.png": _png("circle", (0, 0, 0), 0)}
    members.update({f"package/img/{img_set}/64/{k}": v for k, v in files.items()})
    with tarfile.open(path, "w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


@pytest.fixture(scope="module")
def fake(tmp_path_factory):
    """(packages, cache dir): fake tarballs under the real file names, with their own checksums."""
    cache = tmp_path_factory.mktemp("cache")
    packages = {}
    for style, pkg in E.PACKAGES.items():
        path = make_tarball(cache / pkg.filename, pkg.img_set)
        sha512, sha256 = E.file_checksums(path)
        packages[style] = replace(pkg, sha512=sha512, sha256=sha256)
    return packages, cache


@pytest.fixture(scope="module")
def built(fake, tmp_path_factory):
    packages, cache = fake
    out = tmp_path_factory.mktemp("ds") / "emoji"
    summary = E.build_dataset(out, upscaled_share=0.5, margin_share=0.5, compositions=30, seed=3,
                              cache_dir=cache, packages=packages)
    items = [json.loads(line) for line in (out / "metadata.jsonl").read_text().splitlines()]
    return out, summary, items


def _load(out, item) -> np.ndarray:
    img = Image.open(out / item["file"])
    assert img.mode == "RGB"
    return np.asarray(img)


def _sharpness(arr: np.ndarray) -> float:
    """Gradient energy: blur spreads an edge over more pixels, so the sum of squared steps drops."""
    a = arr.astype(np.float64)
    return float((np.diff(a, axis=0) ** 2).sum() + (np.diff(a, axis=1) ** 2).sum())


def test_builds_all_three_kinds_per_style(built):
    out, summary, items = built
    assert {(it["style"], it["kind"]) for it in items} == {(s, k) for s in ("twemoji", "noto")
                                                           for k in ("single", "upscaled", "composition")}
    n = len(FAKE) - 1  # the ghost has no PNG
    for style in ("twemoji", "noto"):
        assert summary.emoji[style] == n and summary.missing[style] == 1 and summary.blank[style] == 0
        assert summary.counts[style, "single"] == n + round(0.5 * n)
        assert summary.counts[style, "upscaled"] == round(0.5 * n)
        assert summary.counts[style, "composition"] == 30
    assert len(items) == summary.total == len(list((out / "images").glob("*.png")))
    assert [it["file"] for it in items] == [f"images/{i:06d}.png" for i in range(len(items))]
    keys = ["file", "caption", "name", "style", "unified", "category", "kind", "original_size", "bbox"]
    assert all(list(it) == keys for it in items)


def test_boxes_cover_exactly_the_non_white_pixels(built):
    out, _, items = built
    for it in items:
        arr = _load(out, it)
        h, w = arr.shape[:2]
        mask = (arr < 255).any(-1)
        cover = np.zeros_like(mask)
        for top, left, bottom, right in it["bbox"]:
            assert 0 <= top < bottom <= h and 0 <= left < right <= w, it
            box = mask[top:bottom, left:right]
            assert box[0].any() and box[-1].any() and box[:, 0].any() and box[:, -1].any(), f"loose box: {it}"
            assert not cover[top:bottom, left:right].any(), f"overlapping boxes: {it}"
            cover[top:bottom, left:right] = True
        assert not (mask & ~cover).any(), f"non-white pixels outside every box: {it}"


def test_white_background_and_transparency_composited(built):
    out, _, items = built
    it = next(i for i in items
              if i["kind"] == "single" and i["name"] == "grinning face" and i["original_size"] == [64, 64])
    arr = _load(out, it)
    assert (arr[0, 0] == 255).all() and (arr[32, 32] == (250, 200, 30)).all()
    rim = arr[(arr < 255).any(-1) & ~(arr == (250, 200, 30)).all(-1)]
    assert len(rim) and (rim > (250, 200, 30)).any(-1).all(), "the half-transparent rim is blended toward white"


def test_single_and_margin_sizes(built):
    out, _, items = built
    for it in items:
        if it["kind"] != "single":
            continue
        h, w = _load(out, it).shape[:2]
        assert it["original_size"] == [h, w]
        assert (h, w) == (64, 64) or (h in E.MARGIN_SIDES and w in E.MARGIN_SIDES)
        assert len(it["bbox"]) == 1 and " and " not in it["name"]
    assert any(it["kind"] == "single" and it["original_size"] != [64, 64] for it in items)


def test_upscaled_items_record_their_small_size_and_are_blurry(built):
    out, _, items = built
    singles = {(it["style"], it["unified"]): it for it in items if it["kind"] == "single"}
    ups = [it for it in items if it["kind"] == "upscaled"]
    for it in ups:
        arr = _load(out, it)
        s = it["original_size"]
        assert arr.shape[:2] == (64, 64) and s[0] == s[1] and 16 <= s[0] <= 48
        sharp = _load(out, singles[it["style"], it["unified"]])
        assert _sharpness(arr) < 0.95 * _sharpness(sharp), f"upscaled item not blurrier than its original: {it}"
    assert len({tuple(it["original_size"]) for it in ups}) > 1


def test_compositions_sizes_order_and_names(built):
    out, _, items = built
    comps = [it for it in items if it["kind"] == "composition"]
    assert {len(it["bbox"]) for it in comps} == {1, 2}
    for it in comps:
        h, w = _load(out, it).shape[:2]
        assert it["original_size"] == [h, w] and h % 8 == 0 and w % 8 == 0 and abs(h * w - 64 * 64) <= 0.1 * 64 * 64
        names = it["name"].split(" and ")
        assert len(names) == len(it["bbox"]) == len(it["unified"].split(" "))
        assert all(n in it["caption"] for n in names)
        if len(names) == 2:
            assert names[0] != names[1]
            assert it["caption"].index(names[0]) < it["caption"].index(names[1])
            (_, _, b0, r0), (t1, l1, _, _) = it["bbox"]
            if w > h:
                assert r0 + E.COMPOSITION_GAP <= l1, "left to right"
            elif h > w:
                assert b0 + E.COMPOSITION_GAP <= t1, "top to bottom"
            else:
                assert r0 + E.COMPOSITION_GAP <= l1 or b0 + E.COMPOSITION_GAP <= t1
    assert len({tuple(it["original_size"]) for it in comps}) >= 4


def test_captions_names_and_templates(built):
    _, _, items = built
    for it in items:
        assert it["style"] in ("twemoji", "noto")
        assert it["caption"].startswith((it["name"], "an emoji of " + it["name"]))
        assert it["name"] == it["name"].lower()
    singles = {it["unified"]: it for it in items if it["kind"] == "single"}
    assert singles["1F600"]["name"] == "grinning face" and singles["1F600"]["category"] == "Smileys & Emotion"
    assert singles["1F44D"]["name"] == "thumbs up", "empty name falls back to short_name"
    assert singles["1F1E6-1F1E8"]["name"] == "ascension island flag"
    forms = {it["caption"].replace(it["name"], "X").replace(it["style"], "S") for it in items}
    assert {"X, S style", "X", "an emoji of X, S style", "X emoji in S style"} <= forms
    assert sum(it["style"] in it["caption"] for it in items) > len(items) / 2
    assert "ghost" not in {it["name"] for it in items}


def test_names_readme_licences(built):
    out, summary, _ = built
    names = json.loads((out / "names.json").read_text())
    assert set(names) == {"twemoji", "noto"}
    assert names["twemoji"] == sorted(["grinning face", "red apple", "thumbs up", "father christmas",
                                       "ascension island flag", "green salad", "blue heart"])
    readme = (out / "README.md").read_text()
    assert f"{summary.total} images" in readme and "| twemoji | 7 | 11 (4 with margin) | 4 | 30 | 1 | 0 |" in readme
    assert '"seed": 3' in readme and "emoji-datasource-google@16.0.0" in readme
    tw = (out / "LICENSE-twemoji.txt").read_text()
    assert "Creative Commons Attribution 4.0" in tw and "Twitter" in tw and "contributors" in tw
    noto = (out / "LICENSE-noto.txt").read_text()
    assert "Apache License" in noto and "TERMS AND CONDITIONS FOR USE, REPRODUCTION, AND DISTRIBUTION" in noto
    assert "END OF TERMS AND CONDITIONS" in noto
    attribution = (out / "ATTRIBUTION.md").read_text()
    assert "Twemoji" in attribution and "CC BY 4.0" in attribution and "Noto Emoji" in attribution
    assert (out / "LICENSE-emoji-data.txt").read_text().startswith("The MIT License")
    assert Image.open(out / "contact_sheet.png").size[0] > 0


def test_same_seed_same_dataset_other_seed_differs(fake, built, tmp_path):
    packages, cache = fake
    out, _, items = built
    again = tmp_path / "again"
    E.build_dataset(again, upscaled_share=0.5, margin_share=0.5, compositions=30, seed=3, cache_dir=cache,
                    packages=packages)
    assert (again / "metadata.jsonl").read_text() == (out / "metadata.jsonl").read_text()
    for it in items[::7]:
        assert (again / it["file"]).read_bytes() == (out / it["file"]).read_bytes()
    other = tmp_path / "other"
    E.build_dataset(other, upscaled_share=0.5, margin_share=0.5, compositions=30, seed=4, cache_dir=cache,
                    packages=packages)
    assert (other / "metadata.jsonl").read_text() != (out / "metadata.jsonl").read_text()


def test_options_skin_tones_categories_limit(fake, tmp_path):
    packages, cache = fake
    s = E.build_dataset(tmp_path / "a", ["noto"], skin_tones=True, compositions=0, cache_dir=cache, packages=packages)
    names = json.loads((tmp_path / "a" / "names.json").read_text())["noto"]
    assert "father christmas: light skin tone" in names and "father christmas: medium skin tone" in names
    assert s.emoji == {"noto": len(FAKE) - 1 + len(SKIN)}
    s = E.build_dataset(tmp_path / "b", ["twemoji"], categories=["food & drink"], cache_dir=cache, packages=packages)
    assert json.loads((tmp_path / "b" / "names.json").read_text()) == {"twemoji": ["green salad", "red apple"]}
    assert s.counts["twemoji", "composition"] == 2
    s = E.build_dataset(tmp_path / "c", ["twemoji"], limit=2, upscaled_share=0, margin_share=0, cache_dir=cache,
                        packages=packages)
    assert s.emoji == {"twemoji": 2} and s.total == 4
    with pytest.raises(ValueError, match="unknown emoji categories .*known: .*Food & Drink"):
        E.build_dataset(tmp_path / "d", categories=["Food"], cache_dir=cache, packages=packages)
    with pytest.raises(ValueError, match="already holds a dataset"):
        E.build_dataset(tmp_path / "c", ["twemoji"], cache_dir=cache, packages=packages)
    E.build_dataset(tmp_path / "c", ["twemoji"], limit=1, overwrite=True, cache_dir=cache, packages=packages)
    lines = (tmp_path / "c" / "metadata.jsonl").read_text().splitlines()
    assert len(list((tmp_path / "c" / "images").glob("*.png"))) == len(lines), "old images are removed"


def test_checksum_mismatch_is_a_clear_error(fake, tmp_path, monkeypatch):
    packages, cache = fake
    bad = {s: replace(p, sha256="0" * 64) for s, p in packages.items()}
    with pytest.raises(E.PackageError, match=r"checksum mismatch for cached .*emoji-datasource-twitter-16\.0\.0\.tgz"):
        E.build_dataset(tmp_path / "out", cache_dir=cache, packages=bad)
    # a download that does not match is refused and never takes the cached name
    empty = tmp_path / "empty-cache"
    monkeypatch.setattr(E, "_npm_pack", lambda spec, dest: shutil.copy(cache / bad["twemoji"].filename, dest / "x.tgz"))
    with pytest.raises(E.PackageError, match="checksum mismatch for downloaded"):
        E.fetch_package(bad["twemoji"], empty)
    assert list(empty.iterdir()) == []
    # the recorded real checksums reject the fake tarball too
    with pytest.raises(E.PackageError, match="sha512-7F\\+uCuHH"):
        E.verify_package(cache / packages["twemoji"].filename, E.PACKAGES["twemoji"], "cached")


def test_fetches_once_then_reuses_the_cache(fake, tmp_path, monkeypatch):
    packages, seeded = fake
    calls = []

    def npm_pack(spec, dest):
        calls.append(spec)
        pkg = next(p for p in packages.values() if p.spec == spec)
        return Path(shutil.copy(seeded / pkg.filename, dest / pkg.filename))

    monkeypatch.setattr(E, "_npm_pack", npm_pack)
    cache = tmp_path / "cache"
    for _ in range(2):
        E.build_dataset(tmp_path / "out", limit=2, overwrite=True, cache_dir=cache, packages=packages)
    assert calls == ["emoji-datasource-twitter@16.0.0", "emoji-datasource-google@16.0.0"]
    assert sorted(p.name for p in cache.iterdir()) == sorted(p.filename for p in packages.values())


def test_cache_dir_default_env_and_missing_npm(tmp_path, monkeypatch):
    monkeypatch.setenv("STABLEXL_CACHE", str(tmp_path / "c"))
    assert E.default_cache_dir() == tmp_path / "c" / "npm"
    monkeypatch.delenv("STABLEXL_CACHE")
    assert E.default_cache_dir() == Path.home() / ".cache" / "stablexl" / "npm"
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(E.PackageError, match="npm was not found"):
        E.fetch_package(E.PACKAGES["noto"], tmp_path / "cache")


def test_cli_data_emoji_end_to_end(fake, tmp_path, monkeypatch, capsys):
    packages, cache = fake
    for style, pkg in packages.items():
        monkeypatch.setitem(E.PACKAGES, style, pkg)
    out = tmp_path / "ds"
    assert main(["data", "emoji", str(out), "--cache", str(cache), "--styles", "noto", "--limit", "4",
                 "--compositions", "3", "--upscaled-share", "0.5", "--seed", "1"]) == 0
    printed = capsys.readouterr().out
    assert "noto: 4 emoji -> 5 single, 2 upscaled, 3 composition (1 single with margin)" in printed
    assert "10 images in" in printed
    items = [json.loads(line) for line in (out / "metadata.jsonl").read_text().splitlines()]
    assert len(items) == 10 and {it["style"] for it in items} == {"noto"}
    assert (out / "LICENSE-noto.txt").exists() and not (out / "LICENSE-twemoji.txt").exists()
    assert main(["data", "emoji", str(out), "--cache", str(cache)]) == 2
    assert "already holds a dataset; pass overwrite=True (CLI: --overwrite)" in capsys.readouterr().err
    assert main(["data", "emoji", str(tmp_path / "x"), "--cache", str(cache), "--upscaled-share", "2"]) == 2
    assert "upscaled_share must be within [0, 1]" in capsys.readouterr().err
