"""`stablexl train lora`: step 0 is the base model, the loss falls on a tiny overfit set (tiny-sdxl and the
miniature), the kohya file loads unchanged in our loader and in diffusers' `load_lora_weights` with the same
latents, it is what was trained, text-encoder LoRAs train and save te keys, and resume is bit-identical."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import refconfigs as R
from stablexl.cli import build_parser
from stablexl.io.models import save_model
from stablexl.models.unet import TransformerBlock
from stablexl.pipeline import Pipeline
from stablexl.train.loop import Context, train
from stablexl.train.lora import LoraNetwork, LoraOptions, lora_targets
from stablexl.train.run import build_task, train_config
from stablexl.train.state import load_state

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "io"))
from test_layouts import random_parts  # noqa: E402


def _shapes_module():
    """tests/train/conftest.py by path ("conftest" in sys.modules may be another folder's)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("train_shapes", Path(__file__).with_name("conftest.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONHASHSEED": "0"}
GEN = dict(steps=3, cfg=5.0, seed=7, width=64, height=64, sampler="euler", schedule="leading")


@pytest.fixture
def overfit(tmp_path) -> Path:
    return _shapes_module().make_dataset(tmp_path / "data", n=4, sizes=((64, 64),))


def lora_args(data, out, *extra):
    return build_parser().parse_args(["train", "lora", "--data", str(data), "--output", str(out), "--batch-size", "4",
                                      "--quiet", "--sample-steps", "1", "--no-flip", "--log-every", "1", *extra])


def encode(te, ids) -> list[torch.Tensor]:
    """A text tower's last hidden state, and its pooled embedding when it has a projection."""
    out = te(ids, pooled=te.text_projection is not None)
    return [out.hidden] + ([out.pooled] if out.pooled is not None else [])


def held_out_loss(task, cfg) -> float:
    """The training loss on fixed draws (micro-steps 1000-1007: same images, noise and timesteps every call)."""
    ctx = Context(cfg, models={"lora": task.network})
    with torch.no_grad():
        return sum(float(task.loss(ctx, 1000 + k)[1]) for k in range(8)) / 8


def test_step_zero_is_the_base_model_and_targets_are_kohyas():
    parts = Pipeline.from_pretrained("tiny-sdxl", device="cpu", dtype="fp32").parts
    cfg = parts.config
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([10, 700])
    c, y = torch.randn(2, 77, cfg.unet.context_dim, generator=g), torch.randn(2, cfg.unet.vector_dim, generator=g)
    ids = torch.randint(0, 1000, (2, 77), generator=g)
    with torch.no_grad(), parts.unet.reusing_context():  # the plain k/v path, which LoRA layers take
        base = parts.unet(x, t, c, y)
    with torch.no_grad():
        base_text = [encode(te, ids) for te in parts.text_encoders]
    opt = LoraOptions(rank=4, alpha=2, modules=("attn", "ff", "proj", "conv"), text_encoders=True)
    targets = lora_targets(parts, opt)
    # kohya's defaults: the transformers' 10 linears per block + proj_in/out; 6 per text-encoder layer
    blocks = sum(isinstance(m, TransformerBlock) for m in parts.unet.modules())
    transformers = sum(p.endswith("proj_in") for p, _ in parts.unet.named_modules())
    assert len(lora_targets(parts, LoraOptions(modules=("attn", "ff", "proj")))) == 10 * blocks + 2 * transformers
    # every text layer whose output is used: CLIP-L's last is not (penultimate hidden state, no pooled vector)
    assert sum(k.startswith("text_encoders.") for k in targets) == 6 * (sum(te.config.layers for te in parts.text_encoders) - 1)
    assert f"text_encoders.0.encoder.layers.{parts.text_encoders[0].config.layers - 1}.mlp.fc2" not in targets
    assert not any(k.endswith(("conv_in", "conv_out")) or ".time_embedding." in k or ".add_embedding." in k for k in targets)
    net = LoraNetwork(parts, targets, seed=0)
    assert "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q" in net.layers
    assert "lora_unet_output_blocks_2_2_conv" in net.layers and "lora_unet_input_blocks_3_0_op" in net.layers
    assert "lora_te2_text_model_encoder_layers_0_mlp_fc2" in net.layers
    assert all(torch.count_nonzero(f.up.weight) == 0 and torch.count_nonzero(f.down.weight) > 0 for f in net.layers.values())
    assert {n.split(".", 2)[2] for n in net.state_dict()} == {"down.weight", "up.weight"}  # factors only
    assert not any(p.requires_grad for m in parts.modules().values() for n, p in m.named_parameters() if ".lora." not in n)
    with torch.no_grad():
        assert torch.equal(net(x, t, c, y), base)  # up = 0: exactly the base model
        for te, want in zip(parts.text_encoders, base_text):
            assert all(torch.equal(a, b) for a, b in zip(encode(te, ids), want))
    net.remove()
    assert type(parts.unet.down_blocks[1].attentions[0].transformer_blocks[0].attn1.to_q) is torch.nn.Linear
    with pytest.raises(ValueError, match="unknown group"):
        LoraOptions(modules=("attn", "mlp"))


@pytest.mark.parametrize("model,lr,rank,ratio", [("tiny-sdxl", "2e-2", "4", 0.95), ("mini", "1e-3", "8", 0.7)])
def test_loss_is_finite_and_falls_on_a_tiny_overfit_set(overfit, tmp_path, model, lr, rank, ratio):
    out = tmp_path / "run"
    a = lora_args(overfit, out, "--model", model, "--steps", "20", "--lr", lr, "--rank", rank, "--threads", "1")
    task, cfg = build_task(a), train_config(a)
    before = held_out_loss(task, cfg)
    path = train(task, cfg, out, progress=False)
    after = held_out_loss(task, cfg)
    print(model, "held-out loss before", before, "after", after)
    rows = [json.loads(ln) for ln in (out / "log.jsonl").read_text().splitlines()]
    assert len(rows) == 20 and all(torch.isfinite(torch.tensor(r["loss"])) for r in rows)
    assert after < ratio * before
    assert path == out / "lora.safetensors" and list((out / "samples").glob("step-*.png"))


def diffusers_latents(folder: Path, lora: Path, prompt: str):
    import diffusers

    ref = diffusers.StableDiffusionXLPipeline.from_pretrained(folder)
    ref.set_progress_bar_config(disable=True)
    ref.scheduler = diffusers.EulerDiscreteScheduler.from_config(ref.scheduler.config)
    if lora is not None:
        ref.load_lora_weights(lora.parent, weight_name=lora.name)
    return ref([prompt], num_inference_steps=3, guidance_scale=5.0, height=64, width=64,
               generator=[torch.Generator().manual_seed(7)], output_type="latent").images


def test_cli_file_loads_unchanged_in_ours_and_in_diffusers(overfit, tmp_path):
    """`stablexl train lora` on a tiny SDXL diffusers folder (UNet with LoCon convs, both text towers, fp16 file):
    kohya LDM names and ss_* metadata; our Pipeline.load_lora and diffusers' load_lora_weights give the same latents."""
    folder = tmp_path / "tiny-sdxl"
    save_model(random_parts("tiny-sdxl", seed=5), folder, "diffusers")
    out = tmp_path / "run"
    r = subprocess.run([sys.executable, "-m", "stablexl.cli", "train", "lora", "--model", str(folder), "--data", str(overfit),
                        "--output", str(out), "--steps", "6", "--batch-size", "4", "--lr", "2e-2", "--rank", "4",
                        "--alpha", "2", "--modules", "attn,ff,proj,conv", "--conv-rank", "2", "--text-encoders",
                        "--log-every", "1", "--sample-steps", "1", "--threads", "1", "--quiet"],
                       env=ENV, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    path = out / "lora.safetensors"
    with safe_open(str(path), "pt") as f:
        keys, meta = list(f.keys()), f.metadata()
        dtypes = {f.get_tensor(k).dtype for k in keys if not k.endswith(".alpha")}
    assert dtypes == {torch.float16}
    assert "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.lora_down.weight" in keys
    assert "lora_unet_input_blocks_1_0_in_layers_2.lora_up.weight" in keys  # LoCon 3x3
    assert any(k.startswith("lora_te1_") for k in keys) and any(k.startswith("lora_te2_") for k in keys)
    assert meta["ss_network_module"] == "networks.lora" and meta["ss_base_model_version"] == "sdxl_base_v1-0"
    assert (meta["ss_network_dim"], meta["ss_network_alpha"]) == ("4", "2.0")
    assert json.loads(meta["ss_network_args"]) == {"conv_dim": "2", "conv_alpha": "2.0"}
    assert meta["ss_network_train_unet_only"] == "False"

    prompt = "a red circle"
    pipe = Pipeline.from_pretrained(folder)
    base = pipe(prompt, **GEN).latents
    pipe.load_lora(path)
    ours = pipe(prompt, **GEN).latents
    want = diffusers_latents(folder, path, prompt)
    print("ours vs diffusers", R.rel_err(ours, want), "LoRA effect", R.rel_err(base, want))
    assert R.rel_err(ours, want) <= 1e-4
    assert R.rel_err(base, want) > 1e-3  # the trained LoRA changes the result


def test_text_encoder_lora_trains_and_the_file_is_what_was_trained(overfit, tmp_path):
    """Text-tower factors get gradients and are saved as lora_te1_/lora_te2_ keys; merging the saved fp32 file into
    the base model gives what the trained network computes."""
    out = tmp_path / "run"
    a = lora_args(overfit, out, "--model", "tiny-sdxl", "--steps", "3", "--lr", "1e-2", "--rank", "4",
                  "--text-encoders", "--save-dtype", "fp32", "--dropout-text", "0", "--modules", "attn,ff,proj,conv")
    task, cfg = build_task(a), train_config(a)
    assert not task.opt.cache_text and not task._text  # trained towers: captions encoded every step
    path = train(task, cfg, out, progress=False)
    ups = {n: f.up.weight for n, f in task.network.layers.items()}
    assert all(torch.count_nonzero(u) > 0 for n, u in ups.items() if n.startswith(("lora_te1_", "lora_te2_")))
    sd = load_file(str(path))
    te = {k for k in sd if k.startswith(("lora_te1_", "lora_te2_")) and k.endswith(".lora_up.weight")}
    assert len(te) == 6 * (sum(t.config.layers for t in task.parts.text_encoders) - 1)

    g = torch.Generator().manual_seed(3)
    cfgm = task.parts.config
    x, t = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([50, 900])
    c, y = torch.randn(2, 77, cfgm.unet.context_dim, generator=g), torch.randn(2, cfgm.unet.vector_dim, generator=g)
    ids = torch.randint(0, 1000, (2, 77), generator=g)
    with torch.no_grad():
        trained = task.network.eval()(x, t, c, y)
        trained_text = [h for te in task.parts.text_encoders for h in encode(te, ids)]
    pipe = Pipeline.from_pretrained("tiny-sdxl", device="cpu", dtype="fp32")
    with torch.no_grad():
        untouched = pipe.parts.unet(x, t, c, y)
    pipe.load_lora(path)
    with torch.no_grad():
        merged = pipe.parts.unet(x, t, c, y)
        merged_text = [h for te in pipe.parts.text_encoders for h in encode(te, ids)]
    assert R.rel_err(merged, trained) < 1e-5 and R.rel_err(untouched, trained) > 1e-4
    assert all(R.rel_err(m, w) < 1e-5 for m, w in zip(merged_text, trained_text))


def test_resume_is_bit_identical_to_an_uninterrupted_run(overfit, tmp_path):
    extra = ["--model", "tiny-sdxl", "--steps", "6", "--checkpoint-every", "3", "--lr", "1e-2", "--rank", "4",
             "--text-encoders", "--modules", "attn,ff,proj,conv", "--ema-decay", "0.9", "--cache-latents"]
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    a = lora_args(overfit, straight, *extra)
    train(build_task(a), train_config(a), straight, progress=False)
    b = lora_args(overfit, stopped, *extra)
    assert train(build_task(b), train_config(b), stopped, progress=False, stop_after=3) is None
    assert (stopped / "state-00000003.safetensors").is_file() and not (stopped / "lora.safetensors").exists()
    b = lora_args(overfit, stopped, *extra, "--resume")  # a fresh process's view: new model, new factors
    train(build_task(b), train_config(b), stopped, resume=b.resume, progress=False)
    wa, wb = load_file(str(straight / "lora.safetensors")), load_file(str(stopped / "lora.safetensors"))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)  # EMA factors, as saved
    sa, _ = load_state(straight / "state-00000006.safetensors")
    sb, _ = load_state(stopped / "state-00000006.safetensors")
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa if not k.startswith("rng."))
    assert not any(k.startswith("model.lora.") and ".base." in k for k in sa)  # factors only, no base weights


def test_two_processes_reach_the_factors_of_one(overfit, tmp_path):
    """DDP (torchrun, gloo) as the other tasks run it; the text towers' factors, used before the wrapped UNet
    forward, are reduced too."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    args = ["train", "lora", "--model", "tiny-sdxl", "--data", str(overfit), "--steps", "3", "--batch-size", "4",
            "--lr", "1e-2", "--rank", "4", "--text-encoders", "--save-dtype", "fp32", "--sample-steps", "1",
            "--threads", "1", "--quiet"]
    one, two = tmp_path / "one", tmp_path / "two"
    r = subprocess.run([sys.executable, "-m", "stablexl.cli", *args, "--output", str(one)], env=ENV,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                        str(port), "-m", "stablexl.cli", *args, "--output", str(two)], env=ENV, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    wa, wb = load_file(str(one / "lora.safetensors")), load_file(str(two / "lora.safetensors"))
    task = build_task(lora_args(overfit, tmp_path / "w0", *args[2:]))
    w0 = {f"{n}.lora_{k}.weight": getattr(f, k).weight.detach() for n, f in task.network.layers.items() for k in ("down", "up")}
    assert wa.keys() == wb.keys() == w0.keys() | {k.replace("lora_down.weight", "alpha") for k in w0 if "down" in k}
    diff = sum(((wa[k] - wb[k]) ** 2).sum() for k in w0).sqrt()
    update = sum(((wa[k] - w0[k]) ** 2).sum() for k in w0).sqrt()
    te_update = sum((wb[k] ** 2).sum() for k in w0 if k.startswith("lora_te") and "lora_up" in k).sqrt()
    print(f"1 vs 2 processes: |w2 - w1| / |w1 - w0| = {diff / update:.2e}; text up factors |w2| = {te_update:.2e}")
    assert update > 0 and te_update > 0 and diff / update < 1e-3


def test_gradient_checkpointing_gives_the_factors_the_same_gradients():
    """The frozen conv_in feeds the first checkpointed level an input without grad: the factors inside still get
    their gradients (non-reentrant checkpointing)."""
    parts = Pipeline.from_pretrained("tiny-sdxl", device="cpu", dtype="fp32").parts
    for m in parts.modules().values():
        m.requires_grad_(False)
    net = LoraNetwork(parts, lora_targets(parts, LoraOptions(rank=2, modules=("attn", "ff", "proj", "conv"))), 0)
    for f in net.layers.values():
        torch.nn.init.normal_(f.up.weight, std=0.1)
    cfg = parts.config
    g = torch.Generator().manual_seed(1)
    x, t = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([10, 700])
    c, y = torch.randn(2, 77, cfg.unet.context_dim, generator=g), torch.randn(2, cfg.unet.vector_dim, generator=g)
    grads = []
    net.train()
    for ckpt in (False, True):
        net.zero_grad()
        parts.unet.gradient_checkpointing = ckpt
        net(x, t, c, y).pow(2).mean().backward()
        grads.append({k: p.grad.clone() for k, p in net.named_parameters()})
    assert all(torch.count_nonzero(v) > 0 for v in grads[1].values())
    assert all(torch.allclose(grads[0][k], grads[1][k], rtol=1e-5, atol=1e-7) for k in grads[0])
