"""The memory policy: released weights leave RSS and come back unchanged; nothing else is touched."""

from __future__ import annotations

import os

import torch
from safetensors.torch import save_file
from torch import nn

from stablexl.io.checkpoint import SafetensorsSource
from stablexl.memory import MemoryPolicy, release


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        return int(f.read().split("VmRSS:")[1].split()[0]) / 1024


def test_released_file_backed_weights_leave_rss_and_read_back_unchanged(tmp_path):
    w = torch.randn(16, 1024, 1024)  # 64 MB
    save_file({"weight": w}, str(tmp_path / "w.safetensors"))
    src = SafetensorsSource(tmp_path / "w.safetensors")
    lin = nn.Linear(1024, 1024, bias=False)
    lin.weight = nn.Parameter(src.get("weight")[0], requires_grad=False)  # zero-copy view into the mapping
    big = nn.Module()
    big.register_buffer("all", src.get("weight"))
    expect = w.clone()
    float(big.all.sum())  # fault every page in
    before = _rss_mb()
    freed = release(big)
    assert freed >= 60 * 2**20
    assert _rss_mb() < before - 50  # the pages left this process's RSS
    assert torch.equal(big.all, expect) and torch.equal(lin.weight, expect[0])  # and fault back unchanged


def test_anonymous_and_trainable_weights_are_kept():
    lin = nn.Linear(256, 256)
    expect = lin.weight.detach().clone()
    assert release(lin) == 0  # trainable: never released
    lin.requires_grad_(False)
    assert release(lin) == 0  # anonymous memory: DONTNEED would zero it, so it is skipped
    assert torch.equal(lin.weight, expect)


def test_policy_names():
    assert MemoryPolicy.named("low").release_after_use and not MemoryPolicy.named(None).release_after_use
    try:
        MemoryPolicy.named("tiny")
    except ValueError as e:
        assert "'keep'" in str(e)
    else:
        raise AssertionError("unknown policy accepted")


def test_low_memory_pipeline_gives_the_same_images(tmp_path):
    from stablexl.io.models import save_model
    from stablexl.pipeline import Pipeline

    path = save_model(Pipeline.from_pretrained("tiny-sdxl").parts, tmp_path / "tiny.safetensors")
    keep = Pipeline.from_pretrained(path)
    low = Pipeline.from_pretrained(path, memory="low")
    for _ in range(2):  # the second call faults the released weights back in
        a = keep("a red apple", steps=3, seed=5).latents
        b = low("a red apple", steps=3, seed=5).latents
        assert torch.equal(a, b)


def test_folder_load_checks_each_component_once_and_releases_it_before_the_next(tmp_path, monkeypatch):
    from stablexl.io import models as io_models
    from stablexl.pipeline import Pipeline

    folder = io_models.save_model(Pipeline.from_pretrained("tiny-sdxl").parts, tmp_path / "tiny", "diffusers")
    events = []
    real_check = io_models.check_finite
    monkeypatch.setattr(io_models, "check_finite", lambda m, what: (events.append(("check", id(m))), real_check(m, what)))
    parts = io_models.load_model(folder, after_check=lambda m: events.append(("release", id(m))))
    ids = [id(m) for m in parts.modules().values()]
    assert sorted(i for kind, i in events if kind == "check") == sorted(ids)  # once each, not twice
    # every component is handed over right after its own check, before the next component is loaded
    assert events == [e for i in [i for kind, i in events if kind == "check"] for e in (("check", i), ("release", i))]


def test_release_takes_several_modules_at_once(tmp_path):
    w = torch.randn(4, 1024, 1024)  # 16 MB
    save_file({"a": w[:2].clone(), "b": w[2:].clone()}, str(tmp_path / "w.safetensors"))
    src = SafetensorsSource(tmp_path / "w.safetensors")
    mods = []
    for k in "ab":
        m = nn.Module()
        m.register_buffer("w", src.get(k))
        float(m.w.sum())  # fault the pages in
        mods.append(m)
    assert release(*mods, None) >= 15 * 2**20
    assert torch.equal(mods[0].w, w[:2]) and torch.equal(mods[1].w, w[2:])



_FAULTS = r"""
import resource, sys, torch
from stablexl import memory
applied = memory.reuse_freed_memory() if sys.argv[1] == "reuse" else False
torch.manual_seed(0)
net = torch.nn.Sequential(torch.nn.Conv2d(8, 16, 3, padding=1), torch.nn.GroupNorm(4, 16), torch.nn.SiLU(),
                          torch.nn.Conv2d(16, 8, 3, padding=1))
# 38 MB in, 75 MB activations: above the 32 MB that glibc's own mmap threshold can rise to, so by
# default every one of them is a fresh mapping
x = torch.randn(2, 8, 768, 768)
def faults_per_call(reps=3):
    f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    with torch.no_grad():
        for _ in range(reps):
            y = net(x) + x
    return (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0) / reps
def rss_mb():
    return int(open("/proc/self/status").read().split("VmRSS:")[1].split()[0]) / 1024
faults_per_call()  # warm-up: the heap grows to the working set
f = faults_per_call()
held = rss_mb()
memory.trim()
print(applied, f, held - rss_mb())
"""


def test_freed_activations_are_reused_instead_of_faulted_in_again():
    """A conv block's forward pass, repeated. By default glibc maps each 38-75 MB activation afresh and the
    kernel zero-fills it: 129k faulted 4 KB pages per call, the same in every run. With the thresholds
    raised, freed blocks are reused: 0 faults per call run directly, 3k-6k under pytest (now and then a
    block does not fit a freed one and the heap grows once). trim() then hands the held memory back."""
    import subprocess
    import sys

    def run(mode, **env):
        out = subprocess.run([sys.executable, "-c", _FAULTS, mode], capture_output=True, text=True, check=True,
                             env={**os.environ, **env}).stdout.split()
        return out[0] == "True", float(out[1]), float(out[2])

    applied, default_faults, _ = run("default")
    assert not applied and default_faults > 100_000
    applied, faults, trimmed = run("reuse")
    print(f"page faults per call: {default_faults:.0f} by default, {faults:.0f} reusing freed blocks")
    assert applied and faults < 0.1 * default_faults
    assert trimmed > 100  # MB
    applied, faults, _ = run("reuse", MALLOC_MMAP_THRESHOLD_="131072")  # the user's own setting wins
    assert not applied and faults > 100_000
