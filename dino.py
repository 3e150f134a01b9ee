"""DINO: self-distillation with no labels.

"Emerging Properties in Self-Supervised Vision Transformers", Caron et al. 2021, arXiv 2104.14294;
official code facebookresearch/dino (main_dino.py, vision_transformer.py).

A student network learns to match the output distribution of a teacher network on different views
of the same image. The teacher is an exponential moving average of the student and sees only the
two global crops; the student sees all crops. Collapse is avoided by centring (subtract a running
mean C of the teacher's outputs) and sharpening (a low teacher temperature). The step reads:
teacher forward → student forward → cross-entropy over crop pairs → centre update.

Symbols (one notation across the four method files, docs/READING.md; DINO paper §3.1, arXiv v2):
    x₁, x₂          the two global crops; x' the local crops      crops[:2], crops[2:]
    V               number of crops (2 + local)                   len(crops)
    B; W; n = W·B   batch per process; processes; global batch    cfg.batch_size_per_gpu; dist.world_size()
    g_θs, g_θt      student, teacher (backbone + head)            self.student, self.teacher
    K               number of prototypes (head output dim)        cfg.out_dim
    P_s, P_t        softmax outputs of student and teacher        log_softmax / softmax in dino_loss
    τ_s, τ_t        student / teacher temperature                 cfg.student_temp, teacher_temp(step)
    C               centre of the teacher outputs                 self.center
    m               centre momentum                               cfg.center_momentum
    λ               teacher EMA momentum (cosine 0.996 → 1)       cfg.momentum_teacher

Equations (DINO paper):
    Eq. 1   P_s(x)⁽ⁱ⁾ = exp(g_θs(x)⁽ⁱ⁾/τ_s) / Σ_k exp(g_θs(x)⁽ᵏ⁾/τ_s)          cross_entropy_pairs
    Eq. 2   H(a, b) = −a·log b                                                cross_entropy_pairs
    Eq. 3   Σ_{x ∈ {x₁, x₂}} Σ_{x' ∈ V, x' ≠ x} H(P_t(x), P_s(x'))             cross_entropy_pairs
    §3.1    P_t(x) = softmax((g_θt(x) − C)/τ_t)  (centring, sharpening)      dino_loss
    Eq. 4   C ← m·C + (1−m)·(1/n)·Σᵢ g_θt(xᵢ)                                 update_center
    §3.1    θ_t ← λ·θ_t + (1−λ)·θ_s                                           train.ema_update

Commands:
    python dino.py                                       # default CPU run on synthetic data (~7 min on 2 cores)
    python dino.py --data cifar10 --device cuda          # one GPU
    torchrun --nproc_per_node=8 dino.py --preset imagenet --data imagefolder \\
        --data_path /path/to/imagenet --output_dir runs/dino_vits16   # the official ViT-S/16 recipe (at
        # batch 512; its README trains on 2 nodes x 8 GPUs, batch 1,024: torchrun --nnodes=2 ...)
"""
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

import train as train_lib
from train import flag
from kernels import distributed as dist
from vit import ARCHS, build_vit


@dataclass
class DINOConfig(train_lib.TrainConfig):
    """TrainConfig plus DINO's head and loss; defaults are the official main_dino.py defaults;
    PRESETS below change some of them."""
    out_dim: int = flag(65536, "K, number of prototypes; 65536 works well for complex data like ImageNet")
    norm_last_layer: bool = flag(True, "weight-normalise the prototypes with fixed norm 1 "
                                       "(official: false is better for ViT-S but can be unstable)")
    use_bn_in_head: bool = flag(False, "BatchNorm in the head's MLP (official flag; per process, not "
                                       "synchronised, under torchrun)")
    # DINO §3.2: "τ_s is set to 0.1 while we use a linear warm-up for τ_t from 0.04 to 0.07 during
    # the first 30 epochs"; main_dino.py's defaults keep τ_t at 0.04 (no warm-up), as here.
    warmup_teacher_temp: float = flag(0.04, "initial τ_t, linearly warmed up to --teacher_temp")
    teacher_temp: float = flag(0.04, "final τ_t; above 0.07 is unstable")
    warmup_teacher_temp_epochs: int = flag(0, "epochs of the τ_t warm-up (paper: 30)")
    student_temp: float = flag(0.1, "τ_s (official DINOLoss: 0.1)")
    center_momentum: float = flag(0.9, "m of the centre EMA (official DINOLoss: 0.9)")

    def check(self):
        super().check()
        train_lib.need(self.out_dim > 0, f"--out_dim must be positive, got {self.out_dim}")
        train_lib.need(0 <= self.center_momentum <= 1,
                       f"--center_momentum must be in [0, 1], got {self.center_momentum}")


PRESETS = {
    # The official defaults of main_dino.py, untouched.
    "official": {},
    # The default CPU run (train.SYNTHETIC, the same for the four methods), with K for 10 classes.
    "synthetic": dict(train_lib.SYNTHETIC, out_dim=1024),
    # Official ViT-S/16 recipe (the official README, "boosts": 300 epochs, τ_t 0.04 → 0.07 over 30 epochs,
    # unnormalised last layer; 2 nodes x 8 GPUs x 64 = batch 1024), bf16 instead of fp16; k-NN after
    # the last epoch only, as the official code evaluates after training (a full ImageNet k-NN costs
    # about a training epoch).
    "imagenet": dict(
        data="imagefolder", arch="vit_small", patch_size=16, epochs=300, teacher_temp=0.07,
        warmup_teacher_temp_epochs=30, norm_last_layer=False, precision="bf16", eval_every=300,
        output_dir="runs/dino_imagenet"),
}


# ----------------------------------------------------------------------------------------------
# Head

class WeightNormLinear(nn.Module):
    """Linear layer without bias whose rows are w_k = g_k · v_k / ‖v_k‖ (Salimans & Kingma 2016):
    the K prototypes (DINO §3.1, "Network architecture": "a weight normalized fully connected layer
    with K dimensions"). With norm_last_layer, g is fixed at 1 (unit-norm prototypes)."""

    def __init__(self, in_dim, out_dim, train_g=False):
        super().__init__()
        v = torch.empty(out_dim, in_dim)
        nn.init.kaiming_uniform_(v, a=5 ** 0.5)  # nn.Linear's default init, as official
        self.weight_v = nn.Parameter(v)
        self.weight_g = nn.Parameter(torch.ones(out_dim, 1), requires_grad=train_g)

    def forward(self, x):
        # fp32 under autocast: bf16 logits, divided by τ_t = 0.04, would carry ~5 % noise into P_t
        with torch.autocast(x.device.type, enabled=False):
            return F.linear(x.float(), self.weight_g * F.normalize(self.weight_v, dim=1))  # w_k = g_k·v_k/‖v_k‖


def head_mlp(in_dim, hidden_dim, out_dim, use_bn=False):
    """The DINO head's 3-layer MLP (DINO §3.1 and App. C: hidden 2048, then a bottleneck of 256;
    Linear-GELU-Linear-GELU-Linear, BatchNorm after the first two
    Linear layers with `use_bn`), official init: trunc-normal weights (std 0.02), zero biases.
    SimDINO's head is this MLP alone."""
    layers = []
    for a, b in ((in_dim, hidden_dim), (hidden_dim, hidden_dim)):   # layer indices as official
        layers += [nn.Linear(a, b)] + ([nn.BatchNorm1d(b)] if use_bn else []) + [nn.GELU()]
    mlp = nn.Sequential(*layers, nn.Linear(hidden_dim, out_dim))
    for m in mlp:
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            nn.init.zeros_(m.bias)
    return mlp


class DINOHead(nn.Module):
    """3-layer MLP (GELU) to a bottleneck, L2-normalise, weight-normed prototypes: (B, D) -> (B, K)."""

    def __init__(self, in_dim, out_dim, hidden_dim=2048, bottleneck_dim=256, norm_last_layer=True, use_bn=False):
        super().__init__()
        self.mlp = head_mlp(in_dim, hidden_dim, bottleneck_dim, use_bn)
        self.last_layer = WeightNormLinear(bottleneck_dim, out_dim, train_g=not norm_last_layer)

    def forward(self, x):
        return self.last_layer(F.normalize(self.mlp(x), dim=-1))  # §3.1: MLP → ℓ2-normalise → K prototypes


def dino_head(cfg):
    """The DINO head at the flags' sizes (DINOv2 uses it too)."""
    return DINOHead(ARCHS[cfg.arch][0], cfg.out_dim, cfg.head_hidden_dim, cfg.head_bottleneck_dim,
                    cfg.norm_last_layer, cfg.use_bn_in_head)


def backbone(cfg, drop_path_rate):
    """The ViT of DINO and SimDINO at the flags' size."""
    return build_vit(cfg.arch, cfg.patch_size, img_size=cfg.global_crops_size, drop_path_rate=drop_path_rate,
                     attn_backend=cfg.attn_backend, pack_crops=cfg.pack_crops)


class MultiCropNet(nn.Module):
    """backbone + head over a list of crops: one backbone forward per run of same-size crops
    (2 global, then the locals; one pass for all with --pack_crops), one head forward on all CLS tokens. -> (V·B, K).
    DINO §3.1, multi-crop; the official MultiCropWrapper."""

    def __init__(self, backbone, head):
        super().__init__()
        self.backbone, self.head = backbone, head

    def forward(self, crops):
        feats, start = [], 0
        while start < len(crops):
            end = start
            while end < len(crops) and crops[end].shape[-1] == crops[start].shape[-1]:
                end += 1
            feats.append(torch.cat(crops[start:end]))  # (crops in the run · B, 3, S, S)
            start = end
        return self.head(torch.cat([o["x_norm_clstoken"] for o in self.backbone.forward_features_list(feats)]))


# ----------------------------------------------------------------------------------------------
# Loss

def dino_loss(student_out, teacher_out, center, student_temp, teacher_temp):
    """DINO Eq. 3 / Algorithm 1: H(P_t, P_s) summed over all pairs (teacher global view, student
    view) except a view with itself, averaged over the 2V−2 pairs.

    student_out: (V·B, K) logits of all V crops; teacher_out: (2·B, K) of the 2 global crops."""
    return cross_entropy_pairs(student_out, centred_softmax(teacher_out, center, teacher_temp), student_temp)


def centred_softmax(teacher_out, center, teacher_temp):
    """DINO §3.1, centring and sharpening of the teacher, in fp32: P_t = softmax((g_θt − C)/τ_t)."""
    return ((teacher_out.float() - center) / teacher_temp).softmax(dim=-1)


def cross_entropy_pairs(student_out, teacher_probs, student_temp):
    """Mean over the pairs (teacher global view t, student view s ≠ t) of the batch mean of
    H(P_t, P_s) = −Σ_k P_t log P_s, with P_s = softmax(student_out / τ_s). teacher_probs: (2·B, K)."""
    V = student_out.shape[0] // (teacher_probs.shape[0] // 2)
    log_ps = (student_out.float() / student_temp).log_softmax(dim=-1).chunk(V)   # Eq. 1: log P_s, V x (B, K)
    pt = teacher_probs.detach().chunk(2)
    total, pairs = 0.0, 0
    for t, p in enumerate(pt):
        for s, log_p in enumerate(log_ps):
            if s == t:  # the same view: skipped
                continue
            total = total + (-p * log_p).sum(dim=-1).mean()   # Eq. 2: H(P_t, P_s) = −Σ_k P_t·log P_s
            pairs += 1
    return total / pairs                                          # Eq. 3, averaged over the 2V−2 pairs


@torch.no_grad()
def update_center(center, teacher_out, momentum):
    """DINO Eq. 4: C ← m·C + (1−m)·mean of the teacher outputs over the global batch (all ranks)."""
    batch_sum = dist.all_reduce_sum(teacher_out.float().sum(dim=0, keepdim=True))
    batch_center = batch_sum / (teacher_out.shape[0] * dist.world_size())
    return center * momentum + batch_center * (1 - momentum)    # Eq. 4: C ← m·C + (1−m)·(1/n)·Σᵢ g_θt(xᵢ)


# ----------------------------------------------------------------------------------------------
# Student, teacher, optimiser groups (shared by the methods built on DINO)

def student_and_teacher(make_net, drop_path_rate):
    """Student and teacher: the same network, the teacher a frozen copy of the student at the start
    (then its EMA) and without stochastic depth, as official. make_net(drop_path_rate) -> network."""
    student, teacher = make_net(drop_path_rate), make_net(0.0)
    teacher.load_state_dict(student.state_dict())
    teacher.requires_grad_(False)
    return student, teacher


def param_groups(student, lr_mult=lambda name: 1.0, no_decay=lambda name, p: p.ndim == 1,
                 clip_group=lambda name: None, freeze="grad"):
    """AdamW groups: no weight decay on biases and 1-d parameters (norms), as official; each
    parameter's gradient clipped on its own (clip_group None: official utils.clip_gradients); the
    prototypes (last layer) tagged for the freeze of the first epoch(s), by dropping their
    gradients (official cancel_gradients_last_layer). DINOv2 passes its own rules for all four."""
    groups = {}
    for name, p in student.named_parameters():
        if not p.requires_grad:
            continue
        decay, last, mult = not (name.endswith(".bias") or no_decay(name, p)), "last_layer" in name, lr_mult(name)
        g = groups.setdefault((mult, decay, last, clip_group(name)), {
            "params": [], "lr_mult": mult, "wd_mult": 1.0 if decay else 0.0, "is_last_layer": last,
            "clip_group": clip_group(name), "freeze": freeze})
        g["params"].append(p)
    return list(groups.values())


# ----------------------------------------------------------------------------------------------
# The method

class DINO(nn.Module):
    # The run's summary line when k-NN ends below the random-init ViT (DINO on the default synthetic data).
    below_random_vit = ("DINO can only sharpen what the random network already sees the same way in every "
                        "crop; on the synthetic shapes that is the background level, not the shape. SimDINO's "
                        "coding rate and DINOv2's KoLeo spread the features instead: python tools/compare.py "
                        "shows it; docs/RESULTS.md, 'Why DINO does not learn the synthetic shapes', measures it")

    def __init__(self, cfg, steps_per_epoch=1):
        super().__init__()
        self.cfg, self.steps_per_epoch = cfg, steps_per_epoch
        self.student, self.teacher = student_and_teacher(lambda dpr: MultiCropNet(backbone(cfg, dpr), dino_head(cfg)),
                                                         cfg.drop_path_rate)
        self.register_buffer("center", torch.zeros(1, cfg.out_dim))  # C

    def teacher_temp(self, step):
        """τ_t: linear warm-up from warmup_teacher_temp over warmup_teacher_temp_epochs (per epoch;
        DINO §3.2: 0.04 → 0.07 over the first 30 epochs)."""
        epoch = step // self.steps_per_epoch
        return train_lib.linear_warmup_epochs(epoch, self.cfg.warmup_teacher_temp, self.cfg.teacher_temp,
                                              self.cfg.warmup_teacher_temp_epochs)

    def forward(self, crops, step):
        cfg = self.cfg
        with torch.no_grad():
            teacher_out = self.teacher(crops[:2])      # (2·B, K): global crops only (§3.1)
        student_out = self.student(crops)              # (V·B, K): all crops
        tau_t = self.teacher_temp(step)
        loss = dino_loss(student_out, teacher_out, self.center, cfg.student_temp, tau_t)   # Eq. 3
        self.center.copy_(update_center(self.center, teacher_out, cfg.center_momentum))  # Eq. 4
        return loss, {"dino_loss": loss.detach(), "teacher_temp": tau_t}

    def param_groups(self):
        return param_groups(self.student)


RECIPE = train_lib.Recipe("dino", DINOConfig, DINO, PRESETS)

if __name__ == "__main__":
    train_lib.main(RECIPE, description=__doc__.split("\n")[0])
