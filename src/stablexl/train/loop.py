"""The one training loop: every trainer (UNet, VAE, CLIP) is a `Task` run by `train()`.

The loop owns what is common: processes (torchrun / DDP; gloo on CPU, NCCL on GPUs; FSDP is not wired yet), optimizers with
linear warm-up then constant LR (sgm `LambdaLinearScheduler`), gradient accumulation and clipping, bf16
autocast, EMA, atomic checkpoints with resume, the JSONL log, the loss plot, sample grids and a progress
line. A task owns its models, data and loss.

Determinism: every random draw of micro-step k (data order, augmentation, noise, timesteps, dropout)
comes from generators seeded with (seed, k) over the *global* batch, and each rank takes its slice, so
1 process and N processes with the same global batch follow the same trajectory, and a resumed run
continues exactly where the killed one was.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ..memory import reuse_freed_memory
from .ema import EMA
from .state import (
    latest_state,
    load_optimizer,
    load_state,
    optimizer_tensors,
    restore_rng,
    rng_tensors,
    save_state,
)


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 1000
    batch_size: int = 16  # global images per micro-step (split over processes)
    grad_accum: int = 1  # micro-steps per optimizer step
    lr: float = 1e-4
    warmup_steps: int = 0
    decay_steps: int = 0  # cosine LR decay to zero over the run's last N steps (0: constant after warm-up)
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.999)
    grad_clip: float = 1.0  # max global grad norm; 0 disables
    ema_decay: float = 0.0  # 0 disables EMA
    seed: int = 0
    precision: str = "fp32"  # fp32 | bf16 (autocast)
    device: str = "cpu"  # single process: auto | cpu | cuda | cuda:N | mps (under torchrun: each rank's GPU)
    checkpoint_every: int = 500
    keep_checkpoints: int = 2
    log_every: int = 10
    sample_every: int = 0  # 0: only at the end
    fsdp: bool = False  # shard parameters, gradients, optimizer and EMA state over the processes (FSDP2)

    def __post_init__(self):
        if self.steps < 1 or self.batch_size < 1 or self.grad_accum < 1:
            raise ValueError("steps, batch size and gradient accumulation must be at least 1")
        if self.precision not in ("fp32", "bf16"):
            raise ValueError(f"precision must be 'fp32' or 'bf16', got {self.precision!r}")
        if self.lr <= 0:
            raise ValueError(f"learning rate must be positive, got {self.lr}")
        if not 0 <= self.decay_steps <= self.steps:
            raise ValueError(f"decay steps must be between 0 and the run's {self.steps} steps, got {self.decay_steps}")


def lr_factor(cfg: TrainConfig, step: int) -> float:
    """The LR multiplier of optimizer step `step` (0-based): linear warm-up, constant, then an optional cosine
    decay over the last `decay_steps` steps ("warmup-stable-decay", Hägele et al. 2024, arXiv:2405.18392). The
    constant part does not depend on the run's length, so a run extended (--resume --steps N) before its decay
    began matches a longer one; extended after, its LR would jump back up."""
    scale = min(1.0, (step + 1) / cfg.warmup_steps) if cfg.warmup_steps else 1.0
    start = cfg.steps - cfg.decay_steps
    if cfg.decay_steps and step >= start:
        scale *= 0.5 * (1.0 + math.cos(math.pi * (step - start) / cfg.decay_steps))
    return scale


@dataclass
class Context:
    """What a task sees of the run."""

    config: TrainConfig
    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")
    models: dict[str, nn.Module] = field(default_factory=dict)  # possibly DDP-wrapped, for forward passes

    def generator(self, *key: int) -> torch.Generator:
        """A CPU generator that depends only on (seed, key): draw over the global batch, then `local()`."""
        g = torch.Generator()
        g.manual_seed(hash((self.config.seed,) + key) & 0x7FFFFFFFFFFFFFFF)
        return g

    def local(self, t: Tensor) -> Tensor:
        """This rank's slice of a tensor drawn over the global batch (dim 0)."""
        n = t.shape[0] // self.world
        return t[self.rank * n:(self.rank + 1) * n].to(self.device)


@dataclass
class OptimizerSpec:
    name: str
    modules: list[str]  # task.modules() keys whose parameters this optimizer updates
    lr: float | None = None  # None: the run's --lr
    betas: tuple[float, float] | None = None
    weight_decay: float | None = None


class Task(Protocol):
    name: str

    def modules(self) -> dict[str, nn.Module]: ...  # trainable modules (wrapped for DDP)
    def optimizers(self) -> list[OptimizerSpec]: ...
    def images_per_step(self) -> int: ...
    def loss(self, ctx: Context, micro_step: int) -> tuple[str, Tensor, dict[str, float]]: ...
    def sample_grid(self, ctx: Context, step: int): ...  # PIL image or None
    def save(self, out: Path, ctx: Context) -> Path: ...  # final weights in our model format
    def config_json(self) -> dict: ...


# --------------------------------------------------------------------------------------------------
# Processes
# --------------------------------------------------------------------------------------------------


def init_distributed(device_name: str = "auto") -> tuple[int, int, torch.device]:
    """(rank, world, device) from torchrun's environment; a single process when not launched by it, on
    `device_name` (auto: CUDA, then MPS, then CPU). Under torchrun each process takes the GPU of its
    LOCAL_RANK (NCCL) unless `device_name` is "cpu" (gloo)."""
    from ..device import resolve_device

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1, resolve_device(device_name)
    use_cuda = torch.cuda.is_available() and str(device_name) != "cpu"
    if not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    rank, local = dist.get_rank(), int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local) if use_cuda else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return rank, world, device


def _wrap(module: nn.Module, cfg: TrainConfig, world: int, device: torch.device) -> nn.Module:
    if world == 1 or not any(p.requires_grad for p in module.parameters()):
        return module
    if cfg.fsdp:
        return _fully_shard(module, world, device)
    from torch.nn.parallel import DistributedDataParallel as DDP

    return DDP(module, device_ids=[device.index] if device.type == "cuda" else None)


def _fully_shard(module: nn.Module, world: int, device: torch.device) -> nn.Module:
    """FSDP2 in place. The units are the innermost repeated blocks (the entries of ModuleLists that hold no
    ModuleList themselves: resnet and transformer blocks, CLIP layers), whose parameters are gathered only
    around their own forward and backward; everything else belongs to the root unit. Blocks that take a
    list they consume (the UNet's up levels pop their skips) are never units: FSDP's input hooks would hand
    them a copy. Parameters, gradients, Adam moments and the EMA live as 1/world shards."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (world,))
    for m in list(module.modules()):
        if isinstance(m, nn.ModuleList):
            for c in m:
                if not any(isinstance(x, nn.ModuleList) for x in c.modules()) and \
                        any(p.requires_grad for p in c.parameters()):
                    fully_shard(c, mesh=mesh)
    fully_shard(module, mesh=mesh)
    return module


def _reshard(raw: dict[str, nn.Module]) -> None:
    """FSDP leaves a root unit gathered after a forward that had no backward; shard it again (no-op otherwise)."""
    for m in raw.values():
        for sub in m.modules():
            if hasattr(sub, "reshard"):
                sub.reshard()


def _adam_kernel(device: torch.device, sharded: bool) -> dict:
    """AdamW's one-kernel (fused) update where PyTorch has it. The default on CPU is a Python loop of ~10 ops per
    tensor: 118 ms of a 1.0 s step for the miniature UNet's 618 tensors (torch profiler, batch 64). Sharded
    (DTensor) parameters take the multi-tensor (foreach) path."""
    if not sharded and device.type in ("cpu", "cuda"):
        return {"fused": True, "foreach": None}
    return {"fused": None, "foreach": True}


def _is_sharded(t) -> bool:
    if not (dist.is_available() and dist.is_initialized()):  # single process: no import, no cost per step
        return False
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def _full(t: Tensor) -> Tensor:
    """A sharded (FSDP) tensor gathered whole on every rank (a collective: all ranks call it in the same order)."""
    return t.full_tensor() if _is_sharded(t) else t


def _like(full: Tensor, ref) -> Tensor:
    """`full` cut into `ref`'s sharding when `ref` is sharded (every rank holds `full`: no communication)."""
    if not _is_sharded(ref):
        return full
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(full.to(ref.dtype), ref.device_mesh, ref.placements, src_data_rank=None)


# --------------------------------------------------------------------------------------------------
# Outputs: log, plot, progress
# --------------------------------------------------------------------------------------------------


class Progress:
    def __init__(self, total: int, start: int, stream=sys.stderr):
        self.total, self.start, self.stream, self.t0 = total, start, stream, time.perf_counter()

    def __call__(self, step: int, logs: dict[str, float], images_per_step: int) -> None:
        done = step + 1 - self.start
        dt = time.perf_counter() - self.t0
        rate = done / dt if dt > 0 else 0.0
        eta = (self.total - step - 1) / rate if rate > 0 else 0.0
        losses = " ".join(f"{k}={v:.4g}" for k, v in logs.items() if k.startswith("loss"))
        bar = "#" * int(20 * (step + 1) / self.total)
        self.stream.write(f"\r[{bar:<20}] {step + 1}/{self.total} {losses} {rate:.2f} it/s "
                          f"{rate * images_per_step:.1f} img/s ETA {eta:.0f}s ")
        if step + 1 == self.total:
            self.stream.write("\n")
        self.stream.flush()


def _trim_log(path: Path, step: int) -> None:
    """On resume, drop log lines written after the checkpoint the run continues from."""
    if not path.is_file():
        return
    keep = [ln for ln in path.read_text().splitlines() if ln.strip() and json.loads(ln).get("step", 0) <= step]
    path.write_text("".join(ln + "\n" for ln in keep))


# --------------------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------------------


def train(task: Task, cfg: TrainConfig, out: str | os.PathLike, *, resume: str | bool | None = None,
          progress: bool = True, stop_after: int | None = None,
          on_step: Callable[[int, dict], None] | None = None) -> Path | None:
    """Run `task` for `cfg.steps` optimizer steps, writing into `out`. Returns the final weights' path
    (on rank 0). `resume`: True/"auto" = the latest state in `out`, or a state file path."""
    out = Path(out)
    reuse_freed_memory()  # activations reuse freed heap blocks (stablexl/memory.py): no page faults per step
    rank, world, device = init_distributed(cfg.device)
    if cfg.batch_size % world:
        raise ValueError(f"--batch-size {cfg.batch_size} must be a multiple of the number of processes ({world})")
    existing = latest_state(out) if out.is_dir() else None
    if existing is not None and not resume:
        raise ValueError(f"{out} already holds a run ({existing.name}); pass --resume to continue it "
                         "or choose another --output")
    out.mkdir(parents=True, exist_ok=True)

    raw = task.modules()
    for m in raw.values():
        m.to(device).train()
    models = {k: _wrap(m, cfg, world, device) for k, m in raw.items()}
    sharded = any(_is_sharded(p) for m in raw.values() for p in m.parameters())
    ctx = Context(cfg, rank, world, device, models)
    opts: dict[str, torch.optim.Optimizer] = {}
    kernel = _adam_kernel(device, sharded)
    for spec in task.optimizers():
        params = [p for k in spec.modules for p in raw[k].parameters() if p.requires_grad]
        decay = [p for p in params if p.ndim >= 2]  # no weight decay on biases and norms (nanoGPT)
        rest = [p for p in params if p.ndim < 2]
        wd = cfg.weight_decay if spec.weight_decay is None else spec.weight_decay
        opts[spec.name] = torch.optim.AdamW(
            [{"params": decay, "weight_decay": wd}, {"params": rest, "weight_decay": 0.0}],
            lr=spec.lr or cfg.lr, betas=spec.betas or cfg.betas, **kernel)
    base_lrs = {n: [g["lr"] for g in o.param_groups] for n, o in opts.items()}
    ema_keys = getattr(task, "ema_modules", tuple(raw))  # e.g. the VAE but not its discriminator
    emas = {k: EMA(raw[k], cfg.ema_decay) for k in ema_keys} if cfg.ema_decay > 0 else {}

    start = 0
    if resume:
        path = latest_state(out) if resume in (True, "auto") else Path(resume)
        if path is None:
            raise ValueError(f"--resume: no state-*.safetensors in {out}; start without --resume")
        tensors, meta = load_state(path)
        for k, m in raw.items():
            _load_module(m, tensors, f"model.{k}.")
        for name, o in opts.items():
            load_optimizer(o, name, _shard_optimizer_tensors(o, name, tensors), meta["optim"][name])
            for g in o.param_groups:  # the kernel is this machine's choice, not the saved run's
                g.update(kernel)
        for k, e in emas.items():
            pre = f"ema.{k}."
            e.load_state_tensors({pre + n: _like(tensors[pre + n], sh) for n, sh in e.shadow.items() if pre + n in tensors},
                                 pre, meta["ema_updates"])
        restore_rng(tensors, meta["rng"])
        start = meta["step"]
        if rank == 0:
            _trim_log(out / "log.jsonl", start)
            print(f"resumed {path} at step {start}", file=sys.stderr)
    if rank == 0:
        (out / "run.json").write_text(json.dumps({"task": task.name, "train": _jsonable(dataclasses.asdict(cfg)),
                                                  "world": world, **task.config_json()}, indent=1))

    show = Progress(cfg.steps, start) if progress and rank == 0 else None
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if cfg.precision == "bf16" else contextlib.nullcontext()
    log = open(out / "log.jsonl", "a") if rank == 0 else None
    t_last, steps_since = time.perf_counter(), 0
    window: dict[str, list[float]] = {}  # logged values averaged over the steps between log lines
    step = start
    try:
        for step in range(start, cfg.steps):
            lr_scale = lr_factor(cfg, step)
            logs: dict[str, float] = {}
            used: set[str] = set()
            for micro in range(cfg.grad_accum):
                last = micro == cfg.grad_accum - 1
                syncs = [m.no_sync() for m in models.values() if hasattr(m, "no_sync") and not last]
                for m in models.values():
                    if hasattr(m, "set_requires_gradient_sync"):  # FSDP: reduce-scatter on the last micro-step only
                        m.set_requires_gradient_sync(last)
                with contextlib.ExitStack() as stack:
                    for s in syncs:
                        stack.enter_context(s)
                    with autocast:
                        name, loss, parts = task.loss(ctx, step * cfg.grad_accum + micro)
                    if not torch.isfinite(loss):
                        raise FloatingPointError(f"step {step}: loss is {loss.item()}; lower --lr or use --precision fp32")
                    (loss / cfg.grad_accum).backward()
                used.add(name)
                for k, v in parts.items():
                    logs[k] = logs.get(k, 0.0) + v / cfg.grad_accum
            for name in used:
                o = opts[name]
                for g, base in zip(o.param_groups, base_lrs[name]):
                    g["lr"] = base * lr_scale
                params = [p for g in o.param_groups for p in g["params"]]
                if cfg.grad_clip > 0:
                    norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip, foreach=None if sharded else True)
                    logs[f"grad_norm/{name}"] = float(_full(norm))
                o.step()
            for o in opts.values():
                o.zero_grad(set_to_none=True)
            if sharded:
                _reshard(raw)  # e.g. the VAE's no-grad forward in a discriminator step
            for k, e in emas.items():
                e.update(raw[k])
            steps_since += 1
            logs["lr"] = cfg.lr * lr_scale
            for k, v in logs.items():
                window.setdefault(k, []).append(v)
            if show:
                show(step, logs, task.images_per_step() * cfg.grad_accum)
            if on_step:
                on_step(step, logs)
            done = step + 1
            if log and (done % cfg.log_every == 0 or done == cfg.steps):
                now = time.perf_counter()
                rate = steps_since / (now - t_last)
                means = {k: round(sum(v) / len(v), 6) for k, v in window.items()}
                log.write(json.dumps({"step": done, **means, "it_s": round(rate, 4),
                                      "images_s": round(rate * task.images_per_step() * cfg.grad_accum, 3),
                                      "time": round(time.time(), 1)}) + "\n")
                log.flush()
                t_last, steps_since, window = now, 0, {}
            if cfg.sample_every and done % cfg.sample_every == 0 and done != cfg.steps:
                _samples(task, ctx, emas, raw, out, done, sharded)
            if done % cfg.checkpoint_every == 0 or done == cfg.steps:
                _checkpoint(out, done, raw, opts, emas, cfg, rank)
            if stop_after is not None and done >= stop_after:
                return None
    finally:
        if log:
            log.close()
    _samples(task, ctx, emas, raw, out, cfg.steps, sharded)
    result = None
    with _ema_weights(emas, raw), _gathered(raw, sharded, rank):
        if rank == 0:
            from .plot import plot_log

            plot_log(out / "log.jsonl", out / "loss.png")
            result = task.save(out, ctx)
    if world > 1:
        dist.barrier()
    return result


def _shard_optimizer_tensors(o: torch.optim.Optimizer, name: str, tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    """A state's whole Adam moments cut like their (possibly sharded) parameters."""
    params = [p for g in o.param_groups for p in g["params"]]
    prefix = f"optim.{name}."
    out = {}
    for k, v in tensors.items():
        if k.startswith(prefix):
            idx, key = k[len(prefix):].split(".", 1)
            p = params[int(idx)] if int(idx) < len(params) else None
            out[k] = _like(v, p) if p is not None and v.shape == p.shape else v
    return out


def _jsonable(d):
    return json.loads(json.dumps(d, default=str))


@contextlib.contextmanager
def _ema_weights(emas: dict[str, EMA], raw: dict[str, nn.Module]):
    with contextlib.ExitStack() as stack:
        for k, e in emas.items():
            stack.enter_context(e.swapped_in(raw[k]))
        yield


@contextlib.contextmanager
def _gathered(raw: dict[str, nn.Module], sharded: bool, rank: int):
    """With FSDP, each module's `state_dict()` on rank 0 returns whole tensors (gathered here by all ranks),
    so a task's `save` writes the same file as without sharding."""
    if not sharded:
        yield
        return
    full = {k: {n: _full(t) for n, t in m.state_dict().items()} for k, m in raw.items()}
    if rank != 0:
        yield
        return
    for k, m in raw.items():
        m.state_dict = lambda *a, _sd=full[k], **kw: dict(_sd)  # instance attribute, removed below
    try:
        yield
    finally:
        for m in raw.values():
            del m.state_dict


def _samples(task: Task, ctx: Context, emas, raw, out: Path, step: int, sharded: bool = False) -> None:
    if ctx.rank != 0 and not sharded:  # sharded forwards are collective: every rank runs them
        return
    with _ema_weights(emas, raw), torch.no_grad():
        for m in raw.values():
            m.eval()
            for sub in m.modules() if sharded else ():  # whole weights: tasks may call methods other than forward
                if hasattr(sub, "unshard"):
                    sub.unshard()
        try:
            grid = task.sample_grid(ctx, step)
        finally:
            for m in raw.values():
                m.train()
            if sharded:
                _reshard(raw)
    if grid is not None and ctx.rank == 0:
        (out / "samples").mkdir(exist_ok=True)
        grid.save(out / "samples" / f"step-{step:07d}.png")


def _load_module(m: nn.Module, tensors: dict[str, Tensor], prefix: str) -> None:
    own = m.state_dict()
    sd = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
    sd = {k: v.reshape(own[k].shape) if k in own and v.numel() == own[k].numel() == 1 else v for k, v in sd.items()}
    sd = {k: _like(v, own[k]) if k in own else v for k, v in sd.items()}  # (states before the VAE's logvar was 1-d)
    missing, unexpected = m.load_state_dict(sd, strict=False)
    if missing or unexpected:
        raise ValueError(f"training state does not match the model ({len(missing)} missing, {len(unexpected)} "
                         f"unexpected tensors under {prefix!r}); resume with the same task and --config")


def _checkpoint(out: Path, step: int, raw, opts, emas, cfg: TrainConfig, rank: int) -> None:
    tensors: dict[str, Tensor] = {}
    for k, m in raw.items():  # sharded tensors are gathered whole: the file is the same with or without FSDP
        tensors.update({f"model.{k}.{n}": _full(t) for n, t in m.state_dict().items()})
    for k, e in emas.items():
        tensors.update({n: _full(t) for n, t in e.state_tensors(f"ema.{k}.").items()})
    optim_meta = {}
    for name, o in opts.items():
        t, m = optimizer_tensors(o, name)
        tensors.update({n: _full(v) for n, v in t.items()})
        optim_meta[name] = m
    rt, rmeta = rng_tensors()
    tensors.update(rt)
    if rank != 0:
        return
    meta = {"step": step, "optim": optim_meta, "rng": rmeta,
            "ema_updates": next(iter(emas.values())).updates if emas else 0}
    save_state(out / f"state-{step:08d}.safetensors", tensors, meta)
    states = sorted(out.glob("state-*.safetensors"))
    for old in states[:-cfg.keep_checkpoints] if cfg.keep_checkpoints > 0 else []:
        old.unlink()

