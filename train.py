"""The training loop shared by the four methods: everything that is not in the papers.

`train(cfg, Method)` checks the configuration before any work, sets up torchrun / the device,
builds the data, the method, AdamW and the precision path, resumes from
`output_dir/checkpoint.pth` when one is there, and runs the step of the papers' Algorithm 1:
schedules (pure functions of the global step) → multi-crop → the method's loss → backward →
clip → last-layer freeze → AdamW → EMA teacher; then, per epoch, `log.jsonl`, k-NN, the collapse
alarm and an atomic checkpoint. It never asks which method it runs. The method contract
(docs/DESIGN.md):

    method = Method(cfg, steps_per_epoch)   # nn.Module with .student and .teacher
    loss, logs = method(crops, step)        # one step of the paper's algorithm; logs: floats
    method.param_groups()                   # dicts with params, lr_mult, wd_mult, is_last_layer
    method.below_random_vit                 # optional: what the summary says when k-NN ends
                                            # below the random ViT

Each method file declares `RECIPE = Recipe(name, Config, Method, PRESETS)`: its flags (a
dataclass whose `check()` names a bad flag), its method, and its named presets. `main(RECIPE)`
is its command line.
"""
import argparse
import contextlib
import dataclasses
from dataclasses import dataclass
import itertools
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


# Collapse alarms on the teacher's CLS features (eval.feature_stats), checked every epoch: a random
# ViT starts far above both, a collapsed run falls below (measurements: docs/RESULTS.md, "Collapse").
COLLAPSE_STD, COLLAPSE_RANK = 0.05, 2.0


class ConfigError(Exception):
    """A bad flag: reported to the user as one line, before any work."""


def need(ok, message):
    """Raise ConfigError(message) unless ok: the config checks read as a list of requirements."""
    if not ok:
        raise ConfigError(message)


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
    pack_crops: bool = flag(False, "the student's global and local crops in one backbone pass, concatenated "
                                   "along the tokens under a block-diagonal FlexAttention mask (DINOv2 §5); for GPUs")
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
    # official --use_fp16 defaults to true (fp16 + grad scaler); auto here: bf16 only where it is native
    precision: str = flag("auto", "auto (bf16 where the device multiplies bf16 natively, else fp32) | fp32 | "
                                  "bf16 | fp16 (autocast; fp16 with a grad scaler); official: fp16",
                          ("auto", "fp32", "bf16", "fp16"))
    # multi-crop
    global_crops_size: int = flag(224, "global crop size in pixels")
    local_crops_size: int = flag(96, "local crop size in pixels")
    global_crops_scale: tuple = flag((0.4, 1.0), "area range of global crops")
    local_crops_number: int = flag(8, "number of local crops (0 disables multi-crop)")
    local_crops_scale: tuple = flag((0.05, 0.4), "area range of local crops")
    blur_kernel_size: int = flag(0, "Gaussian blur taps at 224 px, scaled with the crop size as σ is "
                                    "(0: out to 3σ, DINO's PIL blur; DINOv2's torchvision blur: 9)")
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
    device: str = flag("auto", "auto | cpu | cuda | mps", ("auto", "cpu", "cuda", "mps"))
    max_steps: int = flag(0, "stop after this many steps in total (0: run all epochs)")
    eval_every: int = flag(1, "epochs between k-NN evaluations (0: never)")
    checkpoint_minutes: float = flag(15.0, "also write checkpoint.pth within an epoch when this many minutes "
                                           "have passed since the last write (0: at epoch ends only)")
    overwrite: bool = flag(False, "start afresh in an --output_dir holding a run with another config "
                                  "(its checkpoint and log are replaced)")
    skip_bad_images: bool = flag(False, "replace an unreadable image by the next readable one, with a "
                                        "warning, instead of stopping (image folders)")
    fsdp: bool = flag(False, "FSDP2 under torchrun: student and EMA teacher sharded per transformer block over the "
                             "ranks (ViT-L, ViT-g); checkpoints stay full (docs/SCALING.md). Off: DDP")
    lr_warmup_from_min_lr = False  # not a flag: SimDINOv2's official scheduler (see schedules)

    def check(self):
        """Every shared flag that can be checked before any work; raises ConfigError naming it. A
        method's config extends this with its own flags."""
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            for x in (v if isinstance(v, tuple) else (v,)):
                need(not isinstance(x, float) or math.isfinite(x), f"--{f.name} must be a finite number, got {v}")
            choices = f.metadata.get("choices") or (v,)
            need(v in choices, f"--{f.name} must be one of {', '.join(map(str, choices))}, got {v!r}")
        need(self.arch in ARCHS, f"unknown --arch {self.arch!r}; choose one of {', '.join(ARCHS)}")
        need(self.data in data_lib.DATASETS,
             f"unknown --data {self.data!r}; choose one of {', '.join(data_lib.DATASETS)}")
        for name in ("batch_size_per_gpu", "epochs", "patch_size", "global_crops_size", "local_crops_size"):
            need(getattr(self, name) > 0, f"--{name} must be positive, got {getattr(self, name)}")
        for name in ("global_crops_size", "local_crops_size"):
            need(getattr(self, name) % self.patch_size == 0,
                 f"--{name} {getattr(self, name)} is not divisible by --patch_size {self.patch_size}")
        if self.high_res_epochs:
            need(0 < self.high_res_epochs <= self.epochs,
                 f"--high_res_epochs must be in [0, --epochs {self.epochs}], got {self.high_res_epochs}")
            need(self.high_res_size > 0 and self.high_res_size % self.patch_size == 0,
                 f"--high_res_size {self.high_res_size} must be a positive multiple of --patch_size {self.patch_size}")
        need(self.local_crops_number >= 0, f"--local_crops_number must be >= 0, got {self.local_crops_number}")
        for name in ("global_crops_scale", "local_crops_scale"):
            lo, hi = getattr(self, name)
            need(0 < lo <= hi <= 1, f"--{name} must satisfy 0 < min <= max <= 1, got {lo} {hi}")
        self.check_nonnegative("lr", "min_lr", "weight_decay", "weight_decay_end", "clip_grad", "warmup_epochs",
                               "eval_every", "saveckp_freq", "num_workers", "max_steps", "freeze_last_layer",
                               "checkpoint_minutes")
        need(0 <= self.momentum_teacher <= 1, f"--momentum_teacher must be in [0, 1], got {self.momentum_teacher}")
        need(0 <= self.drop_path_rate < 1, f"--drop_path_rate must be in [0, 1), got {self.drop_path_rate}")
        need(self.output_dir != "", "--output_dir must not be empty")
        if self.data == "imagefolder":
            need(self.data_path != "", "--data imagefolder needs --data_path ROOT")
        if self.data == "list":
            need(os.path.isfile(self.data_path),
                 f"--data list needs --data_path FILE, a list of images; got {self.data_path!r}")
        elif self.data_path:
            need(os.path.isdir(self.data_path), f"--data_path {self.data_path!r} does not exist or is not a directory")

    def epoch_length(self, steps_per_pass):
        """Steps in one epoch, the unit of every schedule, of --epochs and of the per-epoch work
        (log line, k-NN, checkpoint): DINO's is one pass over the data; a method whose official code
        counts epochs otherwise overrides this (DINOv2: OFFICIAL_EPOCH_LENGTH iterations)."""
        return steps_per_pass

    def check_nonnegative(self, *names):
        for name in names:
            need(getattr(self, name) >= 0, f"--{name} must be >= 0, got {getattr(self, name)}")


# The default run of every method: a CPU run on the embedded synthetic data that learns in about
# 7-10 minutes on 2 cores, the same recipe for the four methods so that they compare directly (each
# method's "synthetic" preset adds its own few values). Every change from the official values is
# forced by that budget.
SYNTHETIC = dict(
    data="synthetic", arch="vit_pico", patch_size=8,     # 32x32 images: 16 patches + CLS
    global_crops_size=32, local_crops_size=16,           # the 224/96 ratio on 32-pixel images
    local_crops_number=4,                                # fewer crops: more steps in the budget
    head_hidden_dim=256, head_bottleneck_dim=64,         # 10 classes, a 96-wide ViT
    epochs=10, warmup_epochs=1, batch_size_per_gpu=128,  # 10 % warm-up, as 10 of 100 official
    eval_every=2,                                        # k-NN costs ~10 s a time on 2 cores
    lr=0.002,                                            # higher lr for a small model and short run
    drop_path_rate=0.0, num_workers=0, saveckp_freq=0)


@dataclass(frozen=True)
class Recipe:
    """What a method file declares, for its command line, tools/compare.py and benchmarks/."""
    name: str        # "dino": the file, runs/<name>
    Config: type     # the flags: a TrainConfig subclass
    Method: object   # Method(cfg, steps_per_epoch) -> the method (a class, or a function choosing one)
    presets: dict    # name -> {field: value}, applied before the explicit flags; "synthetic" by default


# ----------------------------------------------------------------------------------------------
# Schedules: pure functions of the global step (official `cosine_scheduler`, one value at a time).

def cosine_schedule(step, base, final, total_steps, warmup_steps=0, warmup_start=0.0, endpoint=True):
    """Linear warm-up from warmup_start to base over warmup_steps (np.linspace's endpoints, as
    official; endpoint False: step / warmup_steps, SimDINOv2's CosineScheduler), then a half cosine
    from base to final over the remaining steps."""
    if step < warmup_steps:
        if not endpoint:
            return warmup_start + (base - warmup_start) * step / warmup_steps
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
    warmup = cfg.warmup_epochs * steps_per_epoch
    if cfg.lr_warmup_from_min_lr:  # SimDINOv2's scheduler: from min_lr, by step / warm-up steps
        lr = cosine_schedule(step, peak, cfg.min_lr, total, warmup, cfg.min_lr, endpoint=False)
    else:                          # np.linspace(0, peak, warm-up steps)
        lr = cosine_schedule(step, peak, cfg.min_lr, total, warmup)
    return {"lr": lr,
            "wd": cosine_schedule(step, cfg.weight_decay, cfg.weight_decay_end, total),  # §3.2: 0.04 → 0.4
            "momentum": cosine_schedule(step, cfg.momentum_teacher, 1.0, total)}         # §3.1: λ 0.996 → 1


# ----------------------------------------------------------------------------------------------
# Pieces of the step that every method shares.

@torch.no_grad()
def ema_update(student, teacher, momentum):
    """DINO §3.1, "Teacher network": θ_t ← λ·θ_t + (1−λ)·θ_s with λ = momentum, all tensors at once."""
    s, t = list(student.parameters()), list(teacher.parameters())
    torch._foreach_lerp_(t, s, 1.0 - momentum)   # θ_t + (1−λ)·(θ_s − θ_t) = λ·θ_t + (1−λ)·θ_s


def clip_gradients(params, clip, together=False):
    """Clip the gradients' norms to `clip` (0: only measure); returns the per-parameter norms before
    clipping. Each parameter on its own (official DINO utils.clip_gradients), or `together`: one norm
    over all of them, every gradient scaled by the same factor (DINOv2's clip_grad_norm_)."""
    grads = [p.grad for p in params if p.grad is not None]
    norms = dist.grad_norms(grads)  # FSDP: the full gradients' norms, each rank's shards scaled below
    grads = dist.local(grads)
    if clip and grads and together:
        total = torch.linalg.vector_norm(torch.stack(norms))
        torch._foreach_mul_(grads, torch.clamp(clip / (total + 1e-6), max=1.0))
    elif clip and grads:
        torch._foreach_mul_(grads, [torch.clamp(clip / (n + 1e-6), max=1.0) for n in norms])
    return norms


def clip_groups(groups, clip):
    """Clip as each param group says: a group without a `clip_group` per parameter (DINO), the groups
    that share one together (DINOv2: backbone, DINO head, iBOT head). Returns the per-parameter norms
    before clipping, in the order of the groups' parameters that have a gradient."""
    sets, norms = {}, {}
    for i, g in enumerate(groups):
        sets.setdefault(g.get("clip_group") or i, []).extend(p for p in g["params"] if p.grad is not None)
    for key, params in sets.items():
        norms.update(zip(map(id, params), clip_gradients(params, clip, together=isinstance(key, str))))
    return [norms[id(p)] for g in groups for p in g["params"] if p.grad is not None]


def freeze_last_layer(groups):
    """The last-layer freeze of the first --freeze_last_layer epochs, as each group says: "grad",
    DINO's cancel_gradients_last_layer (the prototypes get no gradient, AdamW skips them); "lr",
    DINOv2's last-layer lr of 0 (their gradients still enter AdamW's moments and the clip norm)."""
    for g in groups:
        if g["is_last_layer"] and g.get("freeze", "grad") == "grad":
            for p in g["params"]:
                p.grad = None
        elif g["is_last_layer"]:
            g["lr"] = 0.0


def adamw(groups, device):
    """AdamW, with its fused kernel (one pass over all parameters) on GPU. Not on CPU, though it
    is faster there too: its rounding differs, and would change every deterministic number in
    docs/RESULTS.md (left for the next full re-measurement)."""
    return torch.optim.AdamW(groups, lr=0.0, weight_decay=0.0, fused=device.type == "cuda")


def speed_up(method, cfg):
    """--compile: each transformer block of the student and teacher compiled (in place: the same
    modules and state-dict keys, so checkpoints do not change). The blocks are where the time
    goes and are the same code at every depth and crop size, so a few graphs serve them all."""
    if cfg.compile:
        # a graph per drop-path rate (DINO's differ per block), crop size, grad mode and train / eval
        # mode: past dynamo's default limit of 8, the later graphs would run eager
        depth = len(method.student.backbone.blocks)
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 4 * depth + 16)
        for net in (method.student, method.teacher):
            for block in net.backbone.blocks:
                block.compile(dynamic=False)


def native_bf16(device):
    """Whether `device` multiplies bf16 matrices natively, and the reason (for the start banner).
    Elsewhere bf16 is emulated, ~10x slower than fp32 on an older CPU: --precision auto avoids it."""
    if device.type == "cuda":
        native = torch.cuda.is_bf16_supported(including_emulation=False)
        return native, f"{torch.cuda.get_device_name(device)} {'has' if native else 'has no'} native bf16"
    if device.type == "cpu":
        cpu = getattr(torch._C._cpu, "_get_cpu_capability", dict)()  # what torch's CPU dispatch detected
        found = [name for key, name in (("avx512_bf16", "AVX-512 BF16"), ("amx_bf16", "AMX-BF16")) if cpu.get(key)]
        if found and torch.backends.mkldnn.is_available():  # oneDNN runs the bf16 matrix products
            return True, f"this CPU has {' and '.join(found)}"
        return False, "this CPU has neither AVX-512 BF16 nor AMX-BF16 (as torch detects it)"
    return False, f"native bf16 is not detected on {device.type}"


def resolve_precision(precision, device):
    """--precision auto: bf16 where native_bf16, fp32 elsewhere. Returns (precision, the reason)."""
    if precision != "auto":
        return precision, "--precision " + precision
    native, why = native_bf16(device)
    return ("bf16" if native else "fp32"), f"--precision auto: {why}"


def autocast(device, precision):
    """The precision path: autocast in bf16 or fp16, nothing in fp32 (the loss side, the EMA and
    AdamW's state stay fp32 in every precision)."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


def seed_step(seed, step):
    """Every random draw of a step (crops, masks, stochastic depth) is a function of (seed, step,
    rank): a run resumed at any step repeats the uninterrupted one exactly. Seeds torch's global
    RNG and returns the generator of the augmentation."""
    step_seed = (seed * 1000003 + step) * 1009 + dist.rank()
    torch.manual_seed(step_seed)
    return torch.Generator().manual_seed(step_seed)


class NonFiniteGuard:
    """The stop at the first non-finite loss, loss term or gradient, kept on the device so that a
    step never waits for it: each step records on the device whether anything of it is
    non-finite, and the first such step, its terms and its gradient norms; `check` reads that (one
    host sync) when the loop prints and before every save, and stops the run naming the step and
    the bad terms, or the first bad parameter. Nothing after a bad step is ever saved. (In fp16
    the grad scaler skips an overflowing step and lowers its scale: no gradient check there.)"""

    def __init__(self, ckpt_path):
        self.ckpt_path, self.first = ckpt_path, None

    def update(self, step, loss, logs, norms, names):
        terms = {"loss": loss, **logs}
        values = torch.stack([v.detach().float() if torch.is_tensor(v) else torch.full((), v, device=loss.device)
                              for v in terms.values()])
        norms = torch.stack(norms) if norms else values.new_zeros(1)
        bad = ~(torch.isfinite(values).all() & torch.isfinite(norms).all())
        if self.first is None:
            self.first = {"step": torch.full((), -1, device=loss.device), "values": values, "norms": norms}
        new = bad & (self.first["step"] < 0)
        self.first = {"step": torch.where(new, step, self.first["step"]),
                      "values": torch.where(new, values, self.first["values"]),
                      "norms": torch.where(new, norms, self.first["norms"])}
        self.terms, self.names = list(terms), names  # the names of this step's values and norms

    def check(self):
        if self.first is None or int(self.first["step"]) < 0:
            return
        step, values = int(self.first["step"]), dict(zip(self.terms, self.first["values"].tolist()))
        bad = [k for k, v in values.items() if not math.isfinite(v)]
        if bad:
            terms = ", ".join(f"{k} = {values[k]}" for k in (b for b in bad if b != "loss" or len(bad) == 1))
            raise FloatingPointError(f"step {step}: non-finite loss ({terms}); stopping, the last good "
                                     f"checkpoint is kept in {self.ckpt_path}")
        norms = self.first["norms"].tolist()
        name = next(n for n, v in zip(self.names, norms) if not math.isfinite(v))
        raise FloatingPointError(f"step {step}: non-finite gradient in {name} (loss {values['loss']:.4f}); "
                                 f"stopping, the last good checkpoint is kept in {self.ckpt_path}")


# ----------------------------------------------------------------------------------------------
# Configuration: dataclass <-> command line.

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
            "checkpoint_minutes", "overwrite", "skip_bad_images", "compile", "fsdp", "pack_crops"}
    return {k: v for k, v in cfg_dict.items() if k not in skip}


# ----------------------------------------------------------------------------------------------
# Starting, resuming, the output folder.

def start(cfg):
    """The process group (under torchrun) and this rank's device; seeds; CPU threads per process."""
    try:
        device = dist.setup(cfg.device)
    except RuntimeError as e:  # e.g. --device cuda without a GPU
        raise ConfigError(str(e)) from None
    dist.seed_everything(cfg.seed)
    if device.type == "cuda":  # fp32 matrix products in TF32 on the tensor cores, as DINOv2's train.py
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    if device.type == "cpu" and "OMP_NUM_THREADS" not in os.environ and dist.world_size() > 1:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // dist.world_size()))
    return device


def resumable_checkpoint(cfg, ckpt_path):
    """The checkpoint to resume from, or None for a fresh start. A checkpoint of a run with another
    config is an error (unless --overwrite); flags added since it was written count as their defaults."""
    found = dist.all_gather_object(ckpt_path.exists())
    need(all(found) or not any(found), f"--output_dir {ckpt_path.parent} is not shared by all ranks (ranks "
         f"{[r for r, f in enumerate(found) if f]} see a checkpoint, the others do not): on several nodes it "
         f"must be one folder on a shared file system")
    if not found[0]:
        return None
    resume = load_checkpoint(ckpt_path)
    defaults = json.loads(json.dumps({f.name: f.default for f in dataclasses.fields(cfg)}))
    resume["config"] = {**defaults, **resume["config"]}
    ours = _comparable(json.loads(json.dumps(dataclasses.asdict(cfg))))
    if _comparable(resume["config"]) == ours:
        return resume
    if not cfg.overwrite:
        diff = sorted(k for k in ours if resume["config"].get(k) != ours[k])
        raise ConfigError(f"{ckpt_path.parent} holds a run with a different config ({', '.join(diff)}); use "
                          f"another --output_dir, or --overwrite true to replace it")
    return None  # replaced once the data and the model are built


def restore(resume, method, optimizer, scaler):
    """Load a checkpoint into the method, AdamW and the grad scaler; returns (step, epoch sums,
    count) to go on from ((0, {}, 0) for a fresh run)."""
    if resume is None:
        return 0, {}, 0
    method.load_state_dict(dist.shard_like(join_state(resume), method.state_dict()))  # FSDP: cut into shards
    optimizer.load_state_dict(resume["optimizer"])
    dist.shard_optimizer_state(optimizer)
    scaler.load_state_dict(resume["scaler"])
    return resume["step"], resume.get("epoch_sums", {}), resume.get("epoch_count", 0)


def prepare_output(cfg, out, resumed_step):
    """Rank 0: the output folder and config.json; a fresh run (or --overwrite) removes an older
    run's log and checkpoint, a resumed one drops the log lines written after its checkpoint."""
    if not dist.is_main():
        return
    out.mkdir(parents=True, exist_ok=True)
    if resumed_step is None:
        for name in ("log.jsonl", "checkpoint.pth"):
            (out / name).unlink(missing_ok=True)
    elif (out / "log.jsonl").exists():
        _truncate_log(out / "log.jsonl", resumed_step)
    (out / "config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=2) + "\n")


def load_data(cfg):
    """(train, held-out) sets. An image folder or list is scanned by rank 0 alone, and its file
    list sent to the other ranks (on many nodes, a scan per rank of ImageNet's 1.3M files is
    minutes of file-system load); an error there is every rank's."""
    load = lambda: data_lib.load_dataset(cfg.data, cfg.data_path, eval_size=cfg.global_crops_size)
    if cfg.data not in ("imagefolder", "list") or dist.world_size() == 1:
        return load()
    found = None
    if dist.is_main():
        try:
            found = load()
        except data_lib.DataError as e:
            found = e
    found = dist.broadcast_object(found)
    if isinstance(found, data_lib.DataError):
        raise found
    return found


def make_loader(cfg, train_set, eval_set, device):
    """The sharded training loader; an error when the data cannot fill one global batch."""
    if isinstance(train_set, data_lib.FolderImages):
        train_set.skip_bad = eval_set.skip_bad = cfg.skip_bad_images
    loader = data_lib.Loader(train_set, cfg.batch_size_per_gpu, cfg.seed, dist.rank(), dist.world_size(),
                             cfg.num_workers, pin_memory=device.type == "cuda")
    need(len(loader) > 0, f"the training set has {len(train_set)} images, fewer than one global batch "
                          f"of {cfg.batch_size_per_gpu * dist.world_size()}")
    return loader


def augmentation(cfg, train_set, epoch):
    """The multi-crop of an epoch: --high_res_size global crops in the last --high_res_epochs (the
    position embeddings interpolate to the larger grid), --global_crops_size before."""
    high = cfg.high_res_epochs and epoch >= cfg.epochs - cfg.high_res_epochs
    augment = data_lib.MultiCrop(cfg.high_res_size if high else cfg.global_crops_size, cfg.local_crops_size,
                                 cfg.global_crops_scale, cfg.local_crops_scale, cfg.local_crops_number,
                                 blur_kernel_size=cfg.blur_kernel_size)
    if isinstance(train_set, data_lib.FolderImages):  # crops are cut in the workers
        train_set.crops = augment.crop_plan()
    return augment


def batches(loader, start, stop):
    """The training batches of the global steps start, ..., stop − 1, pass after pass over the data
    (each pass in its own seeded order, Loader.epoch): an epoch need not be one pass."""
    step = start
    while step < stop:
        data_pass, first = divmod(step, len(loader))
        for images, _ in itertools.islice(loader.epoch(data_pass, first), stop - step):
            yield images
        step = min(stop, (data_pass + 1) * len(loader))


def to_device(images, device):
    """A batch of images (one tensor, or a list of crops cut by the workers) on the device."""
    if torch.is_tensor(images):
        return images.to(device, non_blocking=True)
    return [c.to(device, non_blocking=True) for c in images]


# ----------------------------------------------------------------------------------------------
# The end of an epoch, and of the run.

def end_of_epoch(cfg, method, train_set, eval_set, device, record, evaluate):
    """k-NN of the teacher's backbone (when due), the collapse alarm; returns the log record."""
    if evaluate:
        precision = resolve_precision(cfg.precision, device)[0]
        top1, top5 = eval_lib.knn_eval(method.teacher.backbone, train_set, eval_set, cfg.global_crops_size, device,
                                       batch_size=256, num_workers=cfg.num_workers,
                                       precision=lambda: autocast(device, precision))  # as the step's
        record.update(knn_top1=top1, knn_top5=top5)
        dist.print0(f"epoch {record['epoch']}: k-NN top-1 {top1:.2f} top-5 {top5:.2f}")
    stats = eval_lib.collapse_check(method.teacher.backbone, eval_set, cfg.global_crops_size, device)
    record.update(stats)
    if stats["feat_std"] < COLLAPSE_STD or stats["feat_rank"] < COLLAPSE_RANK:
        dist.print0(f"warning: epoch {record['epoch']}: the teacher's features look collapsed (std "
                    f"{stats['feat_std']:.3f}, effective rank {stats['feat_rank']:.1f}; alarms below "
                    f"{COLLAPSE_STD} / {COLLAPSE_RANK}): k-NN will be poor; see docs/RESULTS.md, 'Collapse'")
    return record


def cached_baselines(cfg, train_set, eval_set, device):
    """eval.baselines (k-NN on raw pixels and on a random-init ViT of the run's architecture) of
    this data, computed once and then read from baselines.json in data.cache_dir()."""
    key = "|".join(str(v) for v in (cfg.data, os.path.abspath(cfg.data_path) if cfg.data_path else "",
                                    len(train_set), len(eval_set), cfg.arch, cfg.patch_size, cfg.global_crops_size))
    path = Path(data_lib.cache_dir()) / "baselines.json"
    table = {}
    if dist.is_main() and path.exists():
        try:
            table = json.loads(path.read_text())
        except ValueError:  # a cut or foreign file: computed again
            pass
    found = dist.broadcast_object(table.get(key))  # rank 0 decides: every rank computes, or none
    if found is not None:
        return found
    found = eval_lib.baselines(cfg.arch, cfg.patch_size, train_set, eval_set, cfg.global_crops_size, device,
                               num_workers=cfg.num_workers)
    if dist.is_main():
        with contextlib.suppress(OSError):  # a cache that cannot be written only costs the time
            path.parent.mkdir(parents=True, exist_ok=True)
            path.with_suffix(".tmp").write_text(json.dumps({**table, key: found}, indent=1))
            os.replace(path.with_suffix(".tmp"), path)
    return found


def summary(cfg, method, top1, train_set, eval_set, device):
    """The run's last line: its final k-NN next to the two baselines of the same data and architecture."""
    if top1 is None:
        return (f"summary: no k-NN in this call (--eval_every 0, or nothing left to train); "
                f"python eval.py knn --checkpoint {cfg.output_dir}/checkpoint.pth --baselines evaluates it")
    base = cached_baselines(cfg, train_set, eval_set, device)
    pixels, random_vit = base["raw_pixels"][0], base["random_vit"][0]
    line = (f"summary: k-NN top-1 {top1:.2f} against raw pixels {pixels:.2f} and a random {cfg.arch}/"
            f"{cfg.patch_size} {random_vit:.2f} (same data and k-NN)")
    if top1 >= random_vit:
        return line + f": {top1 - random_vit:+.2f} over the random ViT"
    return line + ": below the random ViT. " + getattr(method, "below_random_vit", (
        "Nothing was learned beyond the random features: too few steps, or a collapse "
        "(docs/RESULTS.md, 'Collapse')"))


# ----------------------------------------------------------------------------------------------
# The loop.

def train(cfg, Method):
    """Train Method as cfg says, in this process or as one rank of torchrun; returns the method."""
    cfg.check()
    device = start(cfg)
    cfg_dict = json.loads(json.dumps(dataclasses.asdict(cfg)))  # tuples as lists, as config.json has them
    out = Path(cfg.output_dir)
    ckpt_path = out / "checkpoint.pth"
    resume = resumable_checkpoint(cfg, ckpt_path)
    train_set, eval_set = load_data(cfg)
    loader = make_loader(cfg, train_set, eval_set, device)
    steps_per_epoch = cfg.epoch_length(len(loader))

    method = Method(cfg, steps_per_epoch).to(device)
    if cfg.fsdp:  # before AdamW is built: FSDP2 replaces the parameters by their shards
        dist.wrap_fsdp(method.student, method.teacher)
    groups = method.param_groups()
    params = [p for g in groups for p in g["params"]]
    optimizer = adamw(groups, device)
    precision, why = resolve_precision(cfg.precision, device)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    step, sums, count = restore(resume, method, optimizer, scaler)
    speed_up(method, cfg)
    if not cfg.fsdp:
        method.student = dist.wrap_ddp(method.student, device)
    names = {id(p): n for n, p in dist.unwrap(method.student).named_parameters()}
    prepare_output(cfg, out, step if resume is not None else None)
    n_params = sum(p.numel() for p in dist.unwrap(method.student).parameters())
    dist.print0(f"{type(method).__name__}: {cfg.arch}/{cfg.patch_size}, {n_params / 1e6:.2f}M student "
                f"parameters, {cfg.data} ({len(train_set)} train / {len(eval_set)} held-out images), "
                f"{steps_per_epoch} steps/epoch x {cfg.epochs} epochs, world size {dist.world_size()}, "
                f"device {device}, {precision} ({why})\nconfig: " + json.dumps(cfg_dict))
    if resume is not None:
        dist.print0(f"resuming from {ckpt_path} at step {step} (epoch {step // steps_per_epoch})")

    def save(epoch):
        guard.check()  # nothing non-finite is saved
        model, optim = dist.full_state(method.state_dict()), dist.full_state(optimizer.state_dict())  # FSDP: gathered
        if dist.is_main():
            state = {**split_state(model), "optimizer": optim,
                     "scaler": scaler.state_dict(), "step": step, "epoch": epoch, "config": cfg_dict,
                     "epoch_sums": {k: float(v) for k, v in sums.items()}, "epoch_count": count}
            save_checkpoint(ckpt_path, state)
            if cfg.saveckp_freq and step % steps_per_epoch == 0 and (epoch + 1) % cfg.saveckp_freq == 0:
                save_checkpoint(out / f"checkpoint{epoch:04d}.pth", state)

    last_step = min(cfg.epochs * steps_per_epoch, cfg.max_steps or math.inf)
    t0, seen, last_save, top1 = time.time(), 0, time.time(), None
    guard = NonFiniteGuard(ckpt_path)
    while step < last_step:
        epoch = step // steps_per_epoch
        augment = augmentation(cfg, train_set, epoch)
        method.train()
        for images in batches(loader, step, min(last_step, (epoch + 1) * steps_per_epoch)):
            # The step of the papers' Algorithm 1: schedules, crops, loss, backward, clip, freeze, AdamW, EMA.
            sched = schedules(cfg, step, steps_per_epoch)
            for g in optimizer.param_groups:
                g["lr"], g["weight_decay"] = sched["lr"] * g["lr_mult"], sched["wd"] * g["wd_mult"]
            crops = augment(to_device(images, device), seed_step(cfg.seed, step))
            with autocast(device, precision):
                loss, logs = method(crops, step)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
            norms = clip_groups(groups, cfg.clip_grad)
            guard.update(step, loss, logs, [] if scaler.is_enabled() else norms,
                         [names.get(id(p), "?") for p in params if p.grad is not None])
            if epoch < cfg.freeze_last_layer:
                freeze_last_layer(optimizer.param_groups)
            scaler.step(optimizer)
            scaler.update()
            ema_update(dist.unwrap(method.student), method.teacher, sched["momentum"])

            logs = {"loss": loss.detach(), **logs}  # read on the host only when printed (below)
            as_sum = lambda v: v.double() if torch.is_tensor(v) else v  # float64, as Python's floats
            sums = {**sums, **{k: sums.get(k, 0.0) + as_sum(v) for k, v in logs.items()}}
            count, seen, step = count + 1, seen + cfg.batch_size_per_gpu * dist.world_size(), step + 1
            if step % max(1, steps_per_epoch // 4) == 0 or step == last_step:
                guard.check()
                rate = seen / (time.time() - t0)  # images/s, all ranks
                eta = (last_step - step) * cfg.batch_size_per_gpu * dist.world_size() / max(rate, 1e-9)
                dist.print0(f"epoch {epoch} step {step}/{last_step} " + " ".join(f"{k} {v:.4f}" for k, v in logs.items())
                            + f" lr {sched['lr']:.2e} | {rate:.0f} img/s, eta {eta / 60:.1f} min")
            minutes = (time.time() - last_save) / 60
            if step < last_step and step % steps_per_epoch and cfg.checkpoint_minutes and minutes > cfg.checkpoint_minutes:
                save(epoch)  # within the epoch (long epochs): resumes at this step
                last_save = time.time()

        done_epoch = step % steps_per_epoch == 0
        sums = {k: float(v) for k, v in sums.items()}
        record = {"epoch": epoch, "step": step, "train_loss": sums.get("loss", 0) / max(count, 1),
                  **{k: v / max(count, 1) for k, v in sums.items() if k != "loss"},
                  "lr": sched["lr"], "wd": sched["wd"], "momentum": sched["momentum"],
                  "global_crops_size": augment.global_size}
        evaluate = cfg.eval_every and ((done_epoch and (epoch + 1) % cfg.eval_every == 0) or step == last_step)
        with dist.unsharded(method.teacher):  # FSDP: gathered once, not per batch
            record = end_of_epoch(cfg, method, train_set, eval_set, device, record, evaluate)
        top1 = record.get("knn_top1", top1)
        record["time"] = time.time() - t0
        if done_epoch:
            sums, count = {}, 0
        if dist.is_main():
            with open(out / "log.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")
        save(epoch)
        last_save = time.time()
    dist.print0(f"done: {step} steps in {(time.time() - t0) / 60:.1f} min; outputs in {out}")
    dist.print0(summary(cfg, method, top1, train_set, eval_set, device))
    method.student = dist.unwrap(method.student)  # DDP gone before the process group (Gloo aborts otherwise)
    dist.cleanup()
    return method


def main(recipe, description=""):
    """Command-line entry point of a method file: one-line errors, non-zero exit."""
    cfg = config_cli(recipe.Config, recipe.presets, description=description)
    try:
        train(cfg, recipe.Method)
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
