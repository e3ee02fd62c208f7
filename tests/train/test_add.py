"""Adversarial Diffusion Distillation (`stablexl train add`) and how distilled models are recognised and sampled."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import refconfigs as R

from stablexl.config import FEW_STEP_SAMPLING, PRESETS, TURBO_SAMPLING
from stablexl.io.models import load_model, save_model
from stablexl.models.parts import build_parts
from stablexl.train.add import ADDOptions, ADDTask, BatchNormLocal, DiscHead, diff_augment, load_features
from stablexl.train.data import TrainData, scan_dataset
from stablexl.train.loop import Context, TrainConfig

CLI = [sys.executable, "-m", "stablexl.cli"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONHASHSEED": "0"}


def run(args):
    return subprocess.run(CLI + args, env=ENV, capture_output=True, text=True, timeout=600)


def weights(path):
    return load_file(str(path))


def _task(data_dir, **opts) -> ADDTask:
    torch.manual_seed(0)
    parts = build_parts(PRESETS["tiny-sdxl"], device="cpu").eval()
    recs = [r for r in scan_dataset(data_dir).records if r.size == (64, 64)]
    data = TrainData(recs, [(64, 64)], 8, 0)
    return ADDTask(parts, data, load_features("mini"), ADDOptions(**opts))


def _ctx(task: ADDTask) -> Context:
    raw = task.modules()
    return Context(TrainConfig(batch_size=8), models=raw)


def test_augmentation_is_the_same_for_reals_and_fakes_and_cuts_out():
    x = torch.rand(6, 3, 16, 16) + 0.5  # no zeros of its own
    y = x.flip(1)
    g = torch.Generator().manual_seed(3)
    state = g.get_state()
    ax = diff_augment(x, g, 6)
    g.set_state(state)
    ay = diff_augment(y, g, 6)
    assert torch.equal(ax == 0, ay == 0)  # the same shift and cutout for both
    zeros = (ax[:, 0] == 0).float().mean(dim=(1, 2))
    assert (zeros >= 0.06).all() and (zeros < 0.7).all()  # a half-side square (up to 1/4, less at the edges) + the shift
    kept = ax != 0
    assert torch.isin(ax[kept], x).all()  # moved pixels, not blended ones


def test_local_batch_norm_normalises_each_virtual_batch():
    bn = BatchNormLocal(4, virtual=8)
    x = torch.randn(16, 4, 10)
    x[8:] = x[8:] * 5 + 3  # the second virtual batch has other statistics
    y = bn(x)
    for half in (y[:8], y[8:]):
        assert half.mean(dim=(0, 2)).abs().max() < 1e-5
        assert (half.var(dim=(0, 2), unbiased=False) - 1).abs().max() < 1e-3


def test_head_is_projection_conditioned():
    torch.manual_seed(0)
    head = DiscHead(16, 5, cmap_dim=8).eval()  # eval: no power-iteration step between the two calls
    torch.nn.init.zeros_(head.cmapper.bias)
    x, c = torch.randn(8, 16, 12), torch.randn(8, 5)
    out = head(x, c)
    assert out.shape == (8, 12)
    assert torch.allclose(head(x, -c), -out, atol=1e-6)  # the token features projected on Linear(c)


def test_student_input_at_999_is_pure_noise(shapes_data):
    task = _task(shapes_data)
    ctx = _ctx(task)
    seen = []
    real_forward = task.student.forward
    task.student.forward = lambda x, t, *a: seen.append((x.clone(), t.clone())) or real_forward(x, t, *a)
    cond = task._cond(["a red circle"] * 8, 8, "cpu")
    z0a, z0b = torch.randn(8, 4, 8, 8), torch.randn(8, 4, 8, 8)
    for z0 in (z0a, z0b):
        task._student(ctx, torch.Generator().manual_seed(5), z0, cond, 8, grad=False)
    (xa, ta), (xb, tb) = seen
    assert torch.equal(ta, tb) and set(ta.tolist()) <= {999, 749, 499, 249}
    top = ta == 999
    assert top.any() and (~top).any()
    assert torch.equal(xa[top], xb[top])  # no signal at 999: the input does not depend on the image
    assert not torch.equal(xa[~top], xb[~top])


def test_discriminator_and_student_steps_alternate_with_r1(shapes_data):
    task = _task(shapes_data)
    ctx = _ctx(task)
    name, loss, logs = task.loss(ctx, 0)
    assert name == "heads" and {"loss_d", "r1", "signs_real", "signs_fake"} <= set(logs) and logs["r1"] > 0
    loss.backward()
    assert all(p.grad is None for p in task.student.parameters())  # the student is not updated by D's loss
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in task.heads.parameters())
    task.heads.zero_grad(set_to_none=True)
    name, loss, logs = task.loss(ctx, 1)
    assert name == "student" and {"distill", "loss_g_adv"} <= set(logs)
    loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in task.student.parameters())
    assert all(p.requires_grad is False for p in task.teacher.parameters())


def test_distillation_target_is_the_teachers_cfg_prediction(shapes_data):
    """With a stub teacher whose ε̂ is known, the target is x̂ψ = (z_t − σ_t·(ε_u + w(ε_c − ε_u)))/α_t, weighted by α_t."""
    task = _task(shapes_data, adv_weight=0.0, distill_space="latent", teacher_cfg=3.0)
    ctx = _ctx(task)

    class Stub(torch.nn.Module):
        def forward(self, x, t, context, vector):
            uncond = (context.abs().sum(dim=(1, 2)) == 0).float().reshape(-1, 1, 1, 1)
            return 0.5 * x * uncond + 0.2 * (1 - uncond) * torch.ones_like(x)

    task.teacher = Stub()
    captured = {}
    real = task._weight
    task._weight = lambda t, like: captured.setdefault("t", t) is not None and real(t, like)
    name, loss, logs = task.loss(ctx, 1)
    assert name == "student"
    # recompute by hand from the same draws: the student's x̂ is what the loss compared against the target
    g = ctx.generator(1)
    z0, captions, *_ = task.latents(ctx, 1, g)
    cond = task._cond(captions, z0.shape[0], "cpu")
    x0 = task._student(ctx, g, z0, cond, 8, grad=False)
    t = torch.randint(0, 1000, (8,), generator=g)
    eps = torch.randn(x0.shape, generator=g)
    assert torch.equal(t, captured["t"])
    a = task._alpha[t].reshape(-1, 1, 1, 1)
    s = task._sigma[t].reshape(-1, 1, 1, 1)
    z_t = a * x0 + s * eps
    e_u, e_c = 0.5 * z_t, 0.2 * torch.ones_like(z_t)
    target = (z_t - s * (e_u + 3.0 * (e_c - e_u))) / a
    want = (a.reshape(-1) * (x0 - target).pow(2).mean(dim=(1, 2, 3))).mean()
    assert abs(logs["distill"] - float(want)) <= 1e-5 * float(want)


def test_train_add_cli_resumes_exactly_and_writes_a_few_step_model(shapes_data, tmp_path):
    common = ["train", "add", "--teacher", "tiny-sdxl", "--data", str(shapes_data), "--batch-size", "8",
              "--threads", "1", "--quiet", "--log-every", "2", "--sample-prompt", "a red circle"]
    a, b = tmp_path / "a", tmp_path / "b"
    r = run(common + ["--steps", "6", "--output", str(a)])
    assert r.returncode == 0, r.stderr
    assert run(common + ["--steps", "6", "--output", str(b), "--checkpoint-every", "4"],
               ).returncode == 0
    # the same run killed after step 4 and resumed
    c = tmp_path / "c"
    assert run(common + ["--steps", "4", "--output", str(c)]).returncode == 0
    (c / "model.safetensors").unlink()
    r = run(common + ["--steps", "6", "--output", str(c), "--resume"])
    assert r.returncode == 0, r.stderr
    wa, wc = weights(a / "model.safetensors"), weights(c / "model.safetensors")
    assert all(torch.equal(wa[k], wc[k]) for k in wa)
    log = [json.loads(ln) for ln in (a / "log.jsonl").read_text().splitlines()]
    assert all("loss_d" in e and "distill" in e for e in log)
    run_json = json.loads((a / "run.json").read_text())
    assert run_json["task"] == "add" and run_json["add"]["teacher_cfg"] == 3.0
    parts = load_model(a / "model.safetensors")
    assert parts.config.sampling == FEW_STEP_SAMPLING
    torch.manual_seed(0)  # the teacher's weights, as `from_pretrained("tiny-sdxl")` builds them
    teacher = build_parts(PRESETS["tiny-sdxl"], device="cpu")
    assert any(not torch.equal(parts.unet.state_dict()[k], v) for k, v in teacher.unet.state_dict().items())

    from stablexl.pipeline import Pipeline

    pipe = Pipeline.from_pretrained(str(a / "model.safetensors"))
    out = pipe("a red circle", seed=1)
    assert out.request.steps == 1 and out.request.cfg == 0.0 and out.request.sampler == "lcm"
    assert out.request.schedule == "trailing"


def test_bad_add_options_are_refused(shapes_data, tmp_path):
    with pytest.raises(ValueError, match="nothing to train"):
        ADDOptions(distill_weight=0, adv_weight=0)
    with pytest.raises(ValueError, match="student-timesteps"):
        ADDOptions(student_timesteps=(1000,))
    r = run(["train", "add", "--teacher", "tiny-sdxl", "--data", str(shapes_data), "--output", str(tmp_path / "x"),
             "--features", str(tmp_path / "missing.safetensors"), "--steps", "1", "--quiet"])
    assert r.returncode != 0 and "--features" in r.stderr and "Traceback" not in r.stderr


# --------------------------------------------------------------------------------------------------
# Recognising distilled models
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("base,file_name,meta,turbo", [
    ("sdxl-base", "sd_xl_turbo_1.0_fp16.safetensors", {}, "sdxl-turbo"),
    ("sdxl-base", "model.safetensors", {"modelspec.title": "SDXL Turbo"}, "sdxl-turbo"),
    ("sd21", "sd_turbo.safetensors", {}, "sd-turbo"),
    ("sdxl-base", "sd_xl_base_1.0.safetensors", {"modelspec.title": "SDXL 1.0 Base"}, None),
])
def test_turbo_single_files_get_turbo_defaults(base, file_name, meta, turbo):
    """The official files (keys and shapes of the full-size layouts) named or titled as Turbo models."""
    from stablexl.io.models import detect_single_file

    src = R.KeysOnly(R.single_file_keys(PRESETS[base]))
    src.path, src.metadata = file_name, meta
    cfg = detect_single_file(src)
    if turbo:
        assert cfg.name == turbo and cfg.sampling == TURBO_SAMPLING and cfg.resolution == 512 and cfg.prediction == "eps"
        assert cfg.unet == PRESETS[base].unet
    else:
        assert cfg.sampling is None and cfg.name == base


def test_few_step_models_round_trip_through_diffusers_folders(tmp_path):
    torch.manual_seed(0)
    parts = build_parts(PRESETS["tiny-sdxl"], device="cpu")
    parts.config = dataclasses.replace(parts.config, sampling=FEW_STEP_SAMPLING)
    save_model(parts, tmp_path / "student", "diffusers")
    sched = json.loads((tmp_path / "student" / "scheduler" / "scheduler_config.json").read_text())
    assert sched["timestep_spacing"] == "trailing" and sched["_class_name"] == "LCMScheduler"
    assert load_model(tmp_path / "student").config.sampling == FEW_STEP_SAMPLING
    # the hub's SDXL-Turbo scheduler: Euler ancestral, trailing
    sched.update({"_class_name": "EulerAncestralDiscreteScheduler"})
    (tmp_path / "student" / "scheduler" / "scheduler_config.json").write_text(json.dumps(sched))
    assert load_model(tmp_path / "student").config.sampling == TURBO_SAMPLING
    # trailing on a v-prediction zero-SNR model is not a distilled model
    sched.update({"prediction_type": "v_prediction", "rescale_betas_zero_snr": True})
    (tmp_path / "student" / "scheduler" / "scheduler_config.json").write_text(json.dumps(sched))
    assert load_model(tmp_path / "student").config.sampling is None
    # a base model's folder stays as it was
    base = build_parts(PRESETS["tiny-sdxl"], device="cpu")
    save_model(base, tmp_path / "base", "diffusers")
    assert json.loads((tmp_path / "base" / "scheduler" / "scheduler_config.json").read_text())["timestep_spacing"] == "leading"
    assert load_model(tmp_path / "base").config.sampling is None


def test_a_shipped_variant_shares_minis_networks_and_keeps_its_own_unet_and_defaults(tmp_path):
    from stablexl.mini.weights import ASSET_DIR, MODEL_FILE, load_mini_parts, load_shipped, ship_variant

    student = load_mini_parts()
    with torch.no_grad():
        for p in student.unet.parameters():
            p.add_(0.01)
    student.config = dataclasses.replace(student.config, sampling=FEW_STEP_SAMPLING)
    save_model(student, tmp_path / "student.safetensors")
    root = tmp_path / "assets"
    root.mkdir()
    (root / MODEL_FILE).symlink_to(ASSET_DIR / MODEL_FILE)
    size, _ = ship_variant("mini-turbo", tmp_path / "student.safetensors", root)
    assert size < 30e6  # the UNet alone, fp16
    parts = load_shipped("mini-turbo", root=root)
    assert parts.config.name == "mini-turbo" and parts.config.sampling == FEW_STEP_SAMPLING
    want = student.unet.state_dict()
    assert all(torch.equal(v, want[k].half().float()) for k, v in parts.unet.state_dict().items())
    mini = load_mini_parts()
    assert all(torch.equal(v, mini.vae.state_dict()[k]) for k, v in parts.vae.state_dict().items())
    # a model with another VAE is not a variant of mini
    with torch.no_grad():
        next(student.vae.parameters()).add_(1.0)
    save_model(student, tmp_path / "other.safetensors")
    with pytest.raises(ValueError, match="VAE differs"):
        ship_variant("mini-turbo", tmp_path / "other.safetensors", root)
    with pytest.raises(ValueError, match="no shipped model"):
        load_shipped("mini-nope", root=root)


# --------------------------------------------------------------------------------------------------
# LCM, the comparison method
# --------------------------------------------------------------------------------------------------


def test_lcm_boundary_condition_and_grid():
    from stablexl.train.lcm import LCMOptions, boundary_scalings

    skip, out = boundary_scalings(torch.tensor([0, 19, 999]))
    assert skip[0] == 1 and out[0] == 0  # f(z, 0) = z
    assert skip[1] < 1e-5 and skip[2] < 1e-8 and abs(out[1] - 1) < 1e-5  # elsewhere f is the x̂ prediction
    with pytest.raises(ValueError, match="ddim-steps"):
        LCMOptions(ddim_steps=48)


def test_train_lcm_cli_resumes_exactly_and_moves_its_target(shapes_data, tmp_path):
    common = ["train", "lcm", "--teacher", "tiny-sdxl", "--data", str(shapes_data), "--batch-size", "8",
              "--threads", "1", "--quiet", "--log-every", "2", "--sample-prompt", "a red circle", "--lr", "1e-3"]
    a, c = tmp_path / "a", tmp_path / "c"
    r = run(common + ["--steps", "4", "--output", str(a), "--checkpoint-every", "4"])
    assert r.returncode == 0, r.stderr
    assert run(common + ["--steps", "2", "--output", str(c)]).returncode == 0
    r = run(common + ["--steps", "4", "--output", str(c), "--resume"])
    assert r.returncode == 0, r.stderr
    wa, wc = weights(a / "model.safetensors"), weights(c / "model.safetensors")
    assert all(torch.equal(wa[k], wc[k]) for k in wa)
    state = load_file(str(a / "state-00000004.safetensors"))
    student = {k[len("model.student."):]: v for k, v in state.items() if k.startswith("model.student.")}
    target = {k[len("model.target."):]: v for k, v in state.items() if k.startswith("model.target.")}
    torch.manual_seed(0)  # the teacher's weights: `from_pretrained("tiny-sdxl")` builds them from seed 0
    teacher = build_parts(PRESETS["tiny-sdxl"], device="cpu").unet.state_dict()
    moved = lambda w: max((w[k] - teacher[k]).abs().max().item() for k in teacher)  # noqa: E731
    assert student.keys() == target.keys() == teacher.keys()
    assert 0 < moved(target) < moved(student)  # the EMA target trails the student
    assert load_model(a / "model.safetensors").config.sampling == FEW_STEP_SAMPLING
