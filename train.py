"""The training loop shared by the four methods: everything that is not in the papers.

`train(cfg, Method)` sets up torchrun / the device, checks the configuration and the data before
any work, builds the data, the method, AdamW and the precision path, resumes from
`output_dir/checkpoint.pth` when one is there, and runs: schedules (pure functions of the global
step), multi-crop augmentation, one step of the method's algorithm, gradient clipping, the last
layer's freeze, the EMA teacher, `log.jsonl`, k-NN evaluation and atomic checkpoints. It never
asks which method it runs (the method contract, DESIGN.md):

    method = Method(cfg, steps_per_epoch)   # nn.Module with .student and .teacher
    loss, logs = method(crops, step)        # one step of the paper's algorithm
    method.param_groups()                   # dicts with params, lr_mult, wd_mult, is_last_layer

`config_cli` turns a method's dataclass into its command line (flags = fields).
"""
import argparse
import contextlib
import dataclasses
from dataclasses import dataclass
import json
import math
import os
import sys
import time
from pathlib import Path

import torch

import data as data_lib
import eval as eval_lib
from kernels import distributed as dist
from vit import ARCHS


# Collapse alarms on the teacher's CLS features (eval.feature_stats), checked every epoch. Measured
# on the synthetic held-out images with ViT-pico/8: random init std 0.14-0.15, effective rank 38-40;
# trained (10 epochs) DINO 0.61 / 11, SimDINO 0.95 / 51; DINO without centring (--center_momentum 1)
# falls to std 0.05 after 60 steps and 0.03 after 150 (its rank stays ~40: full collapse shrinks
# the spread, dimensional collapse lowers the rank).
COLLAPSE_STD, COLLAPSE_RANK = 0.05, 2.0


class ConfigError(Exception):
    """A bad flag: reported to the user as one line, before any work."""


def flag(default, help="", choices=None):
    """A config field with its --help text (and allowed values)."""
    return dataclasses.field(default=default, metadata={"help": help, "choices": choices})


@dataclass
class TrainConfig:
    """The flags every method shares; defaults are the official DINO main_dino.py ones. Each method
    file subclasses it with its own loss flags (DINOConfig, SimDINOConfig, ...)."""
    # model
    arch: str = flag("vit_small", "backbone: vit_pico | vit_nano | vit_tiny | vit_small | vit_base | vit_large")
    patch_size: int = flag(16, "patch size in pixels (smaller: better, slower)")
    drop_path_rate: float = flag(0.1, "stochastic depth rate of the student")
    head_hidden_dim: int = flag(2048, "head MLP width (official DINOHead: 2048)")
    head_bottleneck_dim: int = flag(256, "head bottleneck (official DINOHead: 256)")
    compile: bool = flag(False, "torch.compile the transformer blocks (student and teacher): faster steps "
                                "after a compile of a minute or so; needs a C++ compiler on CPU")
    attn_backend: str = flag("sdpa", "attention kernel (kernels/attention.py): sdpa (PyTorch fused) | "
                                         "triton (ours, FlashAttention-2; needs a GPU) | math (reference)",
                             ("sdpa", "triton", "math"))
    # teacher
    momentum_teacher: float = flag(0.996, "λ, base teacher EMA momentum, cosine to 1; 0.9995 for batch 256")
    # optimisation
    epochs: int = flag(100, "training epochs")
    batch_size_per_gpu: int = flag(64, "images per GPU (per process) and step")
    lr: float = flag(0.0005, "peak lr before scaling with the global batch B (--lr_scaling)")
    lr_scaling: str = flag("linear", "linear: lr·B/256 (DINO) | sqrt: lr·√(B/1024) (DINOv2)", ("linear", "sqrt"))
    min_lr: float = flag(1e-6, "final lr of the cosine schedule")
    warmup_epochs: int = flag(10, "epochs of linear lr warm-up")
    weight_decay: float = flag(0.04, "initial weight decay (cosine schedule)")
    weight_decay_end: float = flag(0.4, "final weight decay")
    clip_grad: float = flag(3.0, "per-parameter gradient norm clip; 0 disables")
    freeze_last_layer: int = flag(1, "epochs during which the prototypes (head last layer) stay fixed")
    # official --use_fp16 defaults to true (fp16 + grad scaler); fp32 here so the defaults run on any CPU
    precision: str = flag("fp32", "fp32 | bf16 | fp16 (autocast; fp16 with a grad scaler); official: fp16",
                          ("fp32", "bf16", "fp16"))
    # multi-crop
    global_crops_size: int = flag(224, "global crop size in pixels")
    local_crops_size: int = flag(96, "local crop size in pixels")
    global_crops_scale: tuple = flag((0.4, 1.0), "area range of global crops")
    local_crops_number: int = flag(8, "number of local crops (0 disables multi-crop)")
    local_crops_scale: tuple = flag((0.05, 0.4), "area range of local crops")
    high_res_epochs: int = flag(0, "DINOv2 §4, 'Adapting the resolution': the last N epochs train on "
                                   "--high_res_size global crops (0: never)")
    high_res_size: int = flag(0, "global crop size of the high-resolution phase (DINOv2: 518 at patch 14)")
    # data and run
    data: str = flag("imagefolder", "synthetic | fashion-mnist | cifar10 | cifar100 | stl10 | imagefolder | "
                                     "list (a file of image paths, as tools/curate.py writes)")
    data_path: str = flag("", "dataset root")
    output_dir: str = flag("runs/dino", "checkpoint.pth, config.json, log.jsonl go here; resumed if present")
    saveckp_freq: int = flag(20, "keep a numbered checkpoint every N epochs (0: never)")
    seed: int = flag(0, "random seed")
    num_workers: int = flag(10, "data loading workers per process (image folders)")
    device: str = flag("auto", "auto | cpu | cuda | mps")
    max_steps: int = flag(0, "stop after this many steps in total (0: run all epochs)")
    eval_every: int = flag(1, "epochs between k-NN evaluations (0: never)")
    checkpoint_minutes: float = flag(15.0, "also write checkpoint.pth within an epoch when this many minutes "
                                           "have passed since the last write (0: at epoch ends only)")
    overwrite: bool = flag(False, "start afresh in an --output_dir holding a run with another config "
                                  "(its checkpoint and log are replaced)")
    skip_bad_images: bool = flag(False, "replace an unreadable image by the next readable one, with a "
                                        "warning, instead of stopping (image folders)")


# ----------------------------------------------------------------------------------------------
# Schedules: pure functions of the global step (official `cosine_scheduler`, one value at a time).

def cosine_schedule(step, base, final, total_steps, warmup_steps=0, warmup_start=0.0):
    """Linear warm-up from warmup_start to base over warmup_steps (np.linspace's endpoints, as
    official), then a half cosine from base to final over the remaining steps."""
    if step < warmup_steps:
        return warmup_start + (base - warmup_start) * (step / (warmup_steps - 1) if warmup_steps > 1 else 0.0)
    t = min(step - warmup_steps, total_steps - warmup_steps - 1) / max(1, total_steps - warmup_steps)
    return final + 0.5 * (base - final) * (1 + math.cos(math.pi * t))


def linear_warmup_epochs(epoch, start, end, warmup_epochs):
    """Official teacher-temperature schedule: np.linspace(start, end, warmup_epochs) indexed by
    the epoch, then constant at end."""
    if epoch >= warmup_epochs:
        return end
    return start + (end - start) * (epoch / (warmup_epochs - 1) if warmup_epochs > 1 else 0.0)


def schedules(cfg, step, steps_per_epoch):
    """lr, weight decay and teacher momentum at a global step. The peak lr scales with the global
    batch B: linearly, lr·B/256 (official main_dino.py), or lr·√(B/1024) (DINOv2's sqrt_wrt_1024)."""
    total = cfg.epochs * steps_per_epoch
    batch = cfg.batch_size_per_gpu * dist.world_size()
    # DINO §3.2: lr = 0.0005·B/256, "linearly ramped up during the first 10 epochs", then cosine
    peak = cfg.lr * batch / 256 if cfg.lr_scaling == "linear" else cfg.lr * math.sqrt(batch / 1024)
    return {"lr": cosine_schedule(step, peak, cfg.min_lr, total, cfg.warmup_epochs * steps_per_epoch),
            "wd": cosine_schedule(step, cfg.weight_decay, cfg.weight_decay_end, total),  # §3.2: 0.04 → 0.4
            "momentum": cosine_schedule(step, cfg.momentum_teacher, 1.0, total)}         # §3.1: λ 0.996 → 1


# ----------------------------------------------------------------------------------------------
# Pieces of the step that every method shares.

@torch.no_grad()
def ema_update(student, teacher, momentum):
    """DINO §3.1, "Teacher network": θ_t ← λ·θ_t + (1−λ)·θ_s with λ = momentum, all tensors at once."""
    s, t = list(student.parameters()), list(teacher.parameters())
    torch._foreach_lerp_(t, s, 1.0 - momentum)   # θ_t + (1−λ)·(θ_s − θ_t) = λ·θ_t + (1−λ)·θ_s


def clip_gradients(params, clip):
    """Official DINO clipping: each parameter's gradient norm is clipped to `clip` on its own
    (not one global norm). Returns the norms before clipping."""
    grads = [p.grad for p in params if p.grad is not None]
    norms = torch._foreach_norm(grads)
    torch._foreach_mul_(grads, [torch.clamp(clip / (n + 1e-6), max=1.0) for n in norms])
    return norms


def adamw(groups, device):
    """AdamW, with its fused kernel (one pass over all parameters) on GPU. On CPU the fused kernel
    is 4-5x faster too (36 vs 178 ms for ViT-tiny/4 with DINO's 65,536 prototypes, 2 threads) but
    only 2-3 % of a step, and its rounding would change every deterministic number in the README:
    left for the next full re-measurement."""
    return torch.optim.AdamW(groups, lr=0.0, weight_decay=0.0, fused=device.type == "cuda")


def speed_up(method, cfg):
    """--compile: each transformer block of the student and teacher compiled (in place: the same
    modules and state-dict keys, so checkpoints do not change). The blocks are where the time
    goes and are the same code at every depth and crop size, so a few graphs serve them all."""
    if cfg.compile:
        for net in (method.student, method.teacher):
            for block in net.backbone.blocks:
                block.compile(dynamic=False)


def autocast(device, precision):
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


# ----------------------------------------------------------------------------------------------
# Configuration: dataclass <-> command line, checks.

def _parse_bool(s):
    if s.lower() in ("1", "true", "yes", "on"):
        return True
    if s.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {s!r}")


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2
        sys.exit(f"{self.prog}: error: {message}")


def config_cli(Config, presets, argv=None, description=""):
    """Parse argv into Config: dataclass defaults, then `--preset`'s values, then explicit flags."""
    p = _Parser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="synthetic", choices=sorted(presets),
                   help="a named recipe applied before the explicit flags")
    p.add_argument("--use_fp16", type=_parse_bool, default=None,
                   help="official flag name: true is --precision fp16")
    for f in dataclasses.fields(Config):
        default = f.default
        shown = {k: v for k, v in presets.get("synthetic", {}).items()}.get(f.name, default)
        kw = {"default": argparse.SUPPRESS,
              "help": f"{f.metadata.get('help', '')} [official: {default}; default run: {shown}]".replace("%", "%%")}
        if isinstance(default, bool):
            kw["type"] = _parse_bool
        elif isinstance(default, tuple):
            kw.update(type=type(default[0]), nargs=len(default))
        else:
            kw["type"] = type(default)
        if f.metadata.get("choices"):
            kw["choices"] = f.metadata["choices"]
        p.add_argument(f"--{f.name}", **kw)
    args = vars(p.parse_args(argv))
    values = dict(presets[args.pop("preset")])
    use_fp16 = args.pop("use_fp16")
    if use_fp16 is not None:
        values["precision"] = "fp16" if use_fp16 else "fp32"
    values.update({k: tuple(v) if isinstance(v, list) else v for k, v in args.items()})
    return Config(**values)


def check_config(cfg):
    """Every flag that can be checked before any work; raises ConfigError naming it."""
    def need(ok, msg):
        if not ok:
            raise ConfigError(msg)
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        for x in (v if isinstance(v, tuple) else (v,)):
            need(not isinstance(x, float) or math.isfinite(x), f"--{f.name} must be a finite number, got {v}")
    need(cfg.arch in ARCHS, f"unknown --arch {cfg.arch!r}; choose one of {', '.join(ARCHS)}")
    need(cfg.data in data_lib.DATASETS, f"unknown --data {cfg.data!r}; choose one of {', '.join(data_lib.DATASETS)}")
    for name in ("batch_size_per_gpu", "epochs", "patch_size", "global_crops_size", "local_crops_size", "out_dim",
                 "eps"):
        if hasattr(cfg, name):
            need(getattr(cfg, name) > 0, f"--{name} must be positive, got {getattr(cfg, name)}")
    for name in ("global_crops_size", "local_crops_size"):
        need(getattr(cfg, name) % cfg.patch_size == 0,
             f"--{name} {getattr(cfg, name)} is not divisible by --patch_size {cfg.patch_size}")
    if cfg.high_res_epochs:
        need(0 < cfg.high_res_epochs <= cfg.epochs,
             f"--high_res_epochs must be in [0, --epochs {cfg.epochs}], got {cfg.high_res_epochs}")
        need(cfg.high_res_size > 0 and cfg.high_res_size % cfg.patch_size == 0,
             f"--high_res_size {cfg.high_res_size} must be a positive multiple of --patch_size {cfg.patch_size}")
    need(cfg.local_crops_number >= 0, f"--local_crops_number must be >= 0, got {cfg.local_crops_number}")
    for name in ("global_crops_scale", "local_crops_scale"):
        lo, hi = getattr(cfg, name)
        need(0 < lo <= hi <= 1, f"--{name} must satisfy 0 < min <= max <= 1, got {lo} {hi}")
    for name in ("lr", "min_lr", "weight_decay", "weight_decay_end", "clip_grad", "warmup_epochs",
                 "eval_every", "saveckp_freq", "num_workers", "max_steps", "freeze_last_layer",
                 "checkpoint_minutes"):
        if hasattr(cfg, name):
            need(getattr(cfg, name) >= 0, f"--{name} must be >= 0, got {getattr(cfg, name)}")
    if hasattr(cfg, "mask_ratio_min_max"):  # DINOv2 / SimDINOv2
        lo, hi = cfg.mask_ratio_min_max
        need(0 <= lo <= hi <= 1, f"--mask_ratio_min_max must satisfy 0 <= min <= max <= 1, got {lo} {hi}")
        need(0 <= cfg.mask_sample_probability <= 1,
             f"--mask_sample_probability must be in [0, 1], got {cfg.mask_sample_probability}")
        need(0 < cfg.layerwise_decay <= 1, f"--layerwise_decay must be in (0, 1], got {cfg.layerwise_decay}")
        for name in ("patch_embed_lr_mult", "koleo_loss_weight", "ibot_loss_weight", "num_register_tokens", "layerscale"):
            need(getattr(cfg, name, 0) >= 0, f"--{name} must be >= 0, got {getattr(cfg, name, 0)}")
        need(getattr(cfg, "koleo_loss_weight", 0) == 0 or cfg.batch_size_per_gpu >= 2,
             "KoLeo needs at least 2 images per process (--batch_size_per_gpu >= 2, or --koleo_loss_weight 0)")
    if hasattr(cfg, "center_momentum"):
        need(0 <= cfg.center_momentum <= 1, f"--center_momentum must be in [0, 1], got {cfg.center_momentum}")
    need(0 <= cfg.momentum_teacher <= 1, f"--momentum_teacher must be in [0, 1], got {cfg.momentum_teacher}")
    need(0 <= cfg.drop_path_rate < 1, f"--drop_path_rate must be in [0, 1), got {cfg.drop_path_rate}")
    need(cfg.precision in ("fp32", "bf16", "fp16"), f"--precision must be fp32, bf16 or fp16, got {cfg.precision!r}")
    need(cfg.device in ("auto", "cpu", "cuda", "mps"), f"--device must be auto, cpu, cuda or mps, got {cfg.device!r}")
    need(cfg.output_dir != "", "--output_dir must not be empty")
    if cfg.data == "imagefolder":
        need(cfg.data_path != "", "--data imagefolder needs --data_path ROOT")
    if cfg.data == "list":
        need(os.path.isfile(cfg.data_path),
             f"--data list needs --data_path FILE, a list of images; got {cfg.data_path!r}")
    elif cfg.data_path:
        need(os.path.isdir(cfg.data_path), f"--data_path {cfg.data_path!r} does not exist or is not a directory")


# ----------------------------------------------------------------------------------------------
# Checkpoints and logs.

def save_checkpoint(path, state):
    """Atomic: write to a temporary file, flush to disk, then rename over the old checkpoint."""
    tmp = f"{path}.tmp"
    with open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load_checkpoint(path):
    """A checkpoint of ours: tensors, numbers, strings, lists and dicts only (read with
    weights_only: loading never runs code from the file). A truncated or foreign file is an
    error, never a fresh start."""
    try:
        state = eval_lib.read_checkpoint(path)
    except ValueError as e:
        raise ConfigError(f"{e}; move it away to start afresh") from None
    if not isinstance(state, dict) or not {"student", "teacher", "method", "optimizer", "step", "config"} <= set(state):
        raise ConfigError(f"{path} is not a nanodino training checkpoint; move it away to start afresh")
    return state


def split_state(method_state):
    """The method's state dict in the official checkpoint layout: `student` and `teacher` with
    `backbone.` / `head.` keys (what the official eval_knn.py --checkpoint_key teacher reads),
    `method` the rest (DINO's centre)."""
    out = {"student": {}, "teacher": {}, "method": {}}
    for key, value in method_state.items():
        part, _, rest = key.replace("student.module.", "student.").partition(".")
        if part in ("student", "teacher"):
            out[part][rest] = value
        else:
            out["method"][key] = value
    return out


def join_state(ckpt):
    """split_state's inverse: the method's state dict from a checkpoint."""
    return {**ckpt["method"], **{f"student.{k}": v for k, v in ckpt["student"].items()},
            **{f"teacher.{k}": v for k, v in ckpt["teacher"].items()}}


def _truncate_log(path, step):
    """Keep the log lines of steps <= step (those a resumed run will not write again)."""
    keep = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["step"] <= step:
                keep.append(line + "\n")
        except (ValueError, KeyError, TypeError):  # a line cut by the kill
            pass
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(keep))
    os.replace(tmp, path)


def _comparable(cfg_dict):
    """Config fields whose change makes a run a different run (not the run-control ones)."""
    skip = {"output_dir", "max_steps", "eval_every", "saveckp_freq", "num_workers", "device", "data_path",
            "checkpoint_minutes", "overwrite", "skip_bad_images", "compile"}
    return {k: v for k, v in cfg_dict.items() if k not in skip}


# ----------------------------------------------------------------------------------------------
# The loop.

def train(cfg, Method):
    check_config(cfg)
    try:
        device = dist.setup(cfg.device)
    except RuntimeError as e:  # e.g. --device cuda without a GPU
        raise ConfigError(str(e)) from None
    dist.seed_everything(cfg.seed)
    if device.type == "cpu" and "OMP_NUM_THREADS" not in os.environ and dist.world_size() > 1:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // dist.world_size()))
    out = Path(cfg.output_dir)
    ckpt_path = out / "checkpoint.pth"
    cfg_dict = json.loads(json.dumps(dataclasses.asdict(cfg)))
    resume = load_checkpoint(ckpt_path) if ckpt_path.exists() else None
    if resume is not None:  # flags added since the checkpoint was written ran at their defaults
        defaults = json.loads(json.dumps({f.name: f.default for f in dataclasses.fields(cfg)}))
        resume["config"] = {**defaults, **resume["config"]}
    if resume is not None and _comparable(resume["config"]) != _comparable(cfg_dict):
        diff = sorted(k for k in _comparable(cfg_dict) if resume["config"].get(k) != cfg_dict.get(k))
        if not cfg.overwrite:
            raise ConfigError(f"{out} holds a run with a different config ({', '.join(diff)}); use another "
                              f"--output_dir, or --overwrite true to replace it")
        resume = None  # replaced below, once the data and the model are built

    train_set, eval_set = data_lib.load_dataset(cfg.data, cfg.data_path, eval_size=cfg.global_crops_size)

    def augmentation(epoch):
        """The multi-crop of an epoch: --high_res_size global crops in the last --high_res_epochs
        (the position embeddings interpolate to the larger grid), --global_crops_size before."""
        high = cfg.high_res_epochs and epoch >= cfg.epochs - cfg.high_res_epochs
        augment = data_lib.MultiCrop(cfg.high_res_size if high else cfg.global_crops_size, cfg.local_crops_size,
                                     cfg.global_crops_scale, cfg.local_crops_scale, cfg.local_crops_number)
        if isinstance(train_set, data_lib.FolderImages):  # crops are cut in the workers
            train_set.crops = augment.crop_plan()
        return augment

    if isinstance(train_set, data_lib.FolderImages):
        train_set.skip_bad = eval_set.skip_bad = cfg.skip_bad_images
    loader = data_lib.Loader(train_set, cfg.batch_size_per_gpu, cfg.seed, dist.rank(), dist.world_size(),
                             cfg.num_workers, pin_memory=device.type == "cuda")
    if len(loader) == 0:
        raise ConfigError(f"the training set has {len(train_set)} images, fewer than one global batch "
                          f"of {cfg.batch_size_per_gpu * dist.world_size()}")
    steps_per_epoch = len(loader)

    method = Method(cfg, steps_per_epoch).to(device)
    groups = method.param_groups()
    optimizer = adamw(groups, device)
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.precision == "fp16")
    params = [p for g in groups for p in g["params"]]
    start_step, sums, count = 0, {}, 0
    if resume is not None:
        method.load_state_dict(join_state(resume))
        optimizer.load_state_dict(resume["optimizer"])
        scaler.load_state_dict(resume["scaler"])
        start_step, sums, count = resume["step"], resume.get("epoch_sums", {}), resume.get("epoch_count", 0)
    speed_up(method, cfg)
    method.student = dist.wrap_ddp(method.student, device)

    if dist.is_main():
        out.mkdir(parents=True, exist_ok=True)
        if resume is None:  # a fresh run (or --overwrite): no log lines of an older run
            for name in ("log.jsonl", "checkpoint.pth"):
                (out / name).unlink(missing_ok=True)
        elif (out / "log.jsonl").exists():  # drop what a killed run logged after its last checkpoint
            _truncate_log(out / "log.jsonl", start_step)
        (out / "config.json").write_text(json.dumps(cfg_dict, indent=2) + "\n")
        n_params = sum(p.numel() for p in dist.unwrap(method.student).parameters())
        dist.print0(f"{type(method).__name__}: {cfg.arch}/{cfg.patch_size}, {n_params / 1e6:.2f}M student "
                    f"parameters, {cfg.data} ({len(train_set)} train / {len(eval_set)} held-out images), "
                    f"{steps_per_epoch} steps/epoch x {cfg.epochs} epochs, world size {dist.world_size()}, "
                    f"device {device}, {cfg.precision}")
        dist.print0("config: " + json.dumps(cfg_dict))
        if resume is not None:
            dist.print0(f"resuming from {ckpt_path} at step {start_step} (epoch {start_step // steps_per_epoch})")

    total_steps = cfg.epochs * steps_per_epoch
    last_step = min(total_steps, cfg.max_steps) if cfg.max_steps else total_steps
    names = {id(p): n for n, p in dist.unwrap(method.student).named_parameters()}
    step, t0, seen, last_save = start_step, time.time(), 0, time.time()

    def save(epoch):
        if dist.is_main():
            state = {**split_state(method.state_dict()), "optimizer": optimizer.state_dict(),
                     "scaler": scaler.state_dict(), "step": step, "epoch": epoch, "config": cfg_dict,
                     "epoch_sums": sums, "epoch_count": count}
            save_checkpoint(ckpt_path, state)
            if cfg.saveckp_freq and step % steps_per_epoch == 0 and (epoch + 1) % cfg.saveckp_freq == 0:
                save_checkpoint(out / f"checkpoint{epoch:04d}.pth", state)

    while step < last_step:
        epoch, first = divmod(step, steps_per_epoch)
        augment = augmentation(epoch)
        method.train()
        for images, _ in loader.epoch(epoch, first):
            sched = schedules(cfg, step, steps_per_epoch)
            for g in optimizer.param_groups:
                g["lr"] = sched["lr"] * g["lr_mult"]
                g["weight_decay"] = sched["wd"] * g["wd_mult"]
            # every random draw of the step (crops, stochastic depth) is a function of (seed, step,
            # rank): a run resumed at any step repeats the uninterrupted one exactly
            step_seed = (cfg.seed * 1000003 + step) * 1009 + dist.rank()
            torch.manual_seed(step_seed)
            gen = torch.Generator().manual_seed(step_seed)
            crops = augment(images.to(device, non_blocking=True) if torch.is_tensor(images)
                            else [c.to(device, non_blocking=True) for c in images], gen)
            try:
                with autocast(device, cfg.precision):
                    loss, logs = method(crops, step)
            except ValueError as e:  # the coding rate refuses NaN / inf features
                raise FloatingPointError(f"step {step}: {e}; stopping, the last good checkpoint is kept "
                                         f"in {ckpt_path}") from None
            if not torch.isfinite(loss):
                bad = [k for k, v in logs.items() if not math.isfinite(v)] or ["loss"]
                raise FloatingPointError(f"step {step}: non-finite loss ({', '.join(f'{k} = {logs.get(k, loss.item())}' for k in bad)}); "
                                         f"stopping, the last good checkpoint is kept in {ckpt_path}")
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
            grads = [p for p in params if p.grad is not None]
            norms = clip_gradients(grads, cfg.clip_grad) if cfg.clip_grad else torch._foreach_norm([p.grad for p in grads])
            if not scaler.is_enabled() and not torch.isfinite(torch.stack(norms)).all():
                # (fp16: the scaler skips overflowing steps and lowers its scale; not an error)
                bad = next(names.get(id(p), "?") for p, n in zip(grads, norms) if not torch.isfinite(n))
                raise FloatingPointError(f"step {step}: non-finite gradient in {bad} (loss {loss.item():.4f}); "
                                         f"stopping, the last good checkpoint is kept in {ckpt_path}")
            if epoch < cfg.freeze_last_layer:  # official: the prototypes stay fixed in epoch 0
                for g in groups:
                    if g["is_last_layer"]:
                        for p in g["params"]:
                            p.grad = None
            scaler.step(optimizer)
            scaler.update()
            ema_update(dist.unwrap(method.student), method.teacher, sched["momentum"])

            logs = {"loss": loss.item(), **logs}
            for k, v in logs.items():
                sums[k] = sums.get(k, 0.0) + v
            count, seen, step = count + 1, seen + cfg.batch_size_per_gpu, step + 1
            if step % max(1, steps_per_epoch // 4) == 0 or step == last_step:
                rate = seen * dist.world_size() / (time.time() - t0)
                eta = (last_step - step) * cfg.batch_size_per_gpu * dist.world_size() / max(rate, 1e-9)
                dist.print0(f"epoch {epoch} step {step}/{last_step} " +
                            " ".join(f"{k} {v:.4f}" for k, v in logs.items()) +
                            f" lr {sched['lr']:.2e} | {rate:.0f} img/s, eta {eta / 60:.1f} min")
            if step == last_step or step % steps_per_epoch == 0:
                break
            if cfg.checkpoint_minutes and time.time() - last_save > 60 * cfg.checkpoint_minutes:
                save(epoch)  # within the epoch (long epochs): resumes at this step
                last_save = time.time()

        # end of an epoch (or of --max_steps): log, evaluate, watch for collapse, checkpoint
        done_epoch = step % steps_per_epoch == 0
        record = {"epoch": epoch, "step": step, "train_loss": sums.get("loss", 0) / max(count, 1),
                  **{k: v / max(count, 1) for k, v in sums.items() if k != "loss"},
                  "lr": sched["lr"], "wd": sched["wd"], "momentum": sched["momentum"],
                  "global_crops_size": augment.global_size}
        if cfg.eval_every and ((done_epoch and (epoch + 1) % cfg.eval_every == 0) or step == last_step):
            top1, top5 = eval_lib.knn_eval(method.teacher.backbone, train_set, eval_set, cfg.global_crops_size,
                                           device, batch_size=256, num_workers=cfg.num_workers)
            record.update(knn_top1=top1, knn_top5=top5)
            dist.print0(f"epoch {epoch}: k-NN top-1 {top1:.2f} top-5 {top5:.2f}")
        stats = eval_lib.collapse_check(method.teacher.backbone, eval_set, cfg.global_crops_size, device)
        record.update(stats)
        if stats["feat_std"] < COLLAPSE_STD or stats["feat_rank"] < COLLAPSE_RANK:
            dist.print0(f"warning: epoch {epoch}: the teacher's features look collapsed (std {stats['feat_std']:.3f}, "
                        f"effective rank {stats['feat_rank']:.1f}; alarms below {COLLAPSE_STD} / {COLLAPSE_RANK}): "
                        f"k-NN will be poor; see README, 'Collapse'")
        record["time"] = time.time() - t0
        if done_epoch:
            sums, count = {}, 0
        if dist.is_main():
            with open(out / "log.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")
        save(epoch)
        last_save = time.time()
    dist.print0(f"done: {step} steps in {(time.time() - t0) / 60:.1f} min; outputs in {out}")
    method.student = dist.unwrap(method.student)  # DDP gone before the process group (Gloo aborts otherwise)
    dist.cleanup()
    return method


def main(Config, Method, presets, description=""):
    """Command-line entry point of a method file: one-line errors, non-zero exit."""
    cfg = config_cli(Config, presets, description=description)
    try:
        train(cfg, Method)
    except (ConfigError, data_lib.DataError, FloatingPointError) as e:
        sys.exit(f"error: {e}")
    except KeyboardInterrupt:
        sys.exit(f"interrupted; run the same command again to resume from {cfg.output_dir}/checkpoint.pth "
                 f"(written at the end of each epoch)")
    except RuntimeError as e:
        if "DataError" in str(e) or "cannot read image" in str(e):  # re-raised from a worker
            line = [l for l in str(e).splitlines() if "cannot read image" in l]
            sys.exit(f"error: {line[-1].split('DataError: ')[-1] if line else e}")
        raise
