"""SimDINO: DINO simplified by coding-rate regularisation.

"Simplifying DINO via Coding Rate Regularization", Wu et al. 2025, arXiv 2502.10385; official code
RobinWu218/SimDINO, folder simdino/ (main_dino.py: MCRLoss; vision_transformer.py: DINOHead).

DINO's delta, and nothing else: the head stops at the L2-normalised bottleneck (no prototypes, no
weight norm), and the cross-entropy with its centring, sharpening and temperatures is replaced by
two explicit terms (paper Eq. 6 / Algorithm 1):

    alignment   pull each student view towards each teacher global view (cosine similarity,
                i.e. −½·squared ℓ2 distance between unit vectors, up to a constant);
    expansion   push the features of a batch apart: the coding rate R_ε of the global views.

    loss = −coeff · alignment − γ · R

The SimDINO paper's text was not available offline when these lines were written: its terms are
cited by name with their expression, not by equation number (docs/READING.md).

Everything else (multi-crop, EMA teacher, optimiser, schedules, the loop) is DINO's, imported.

Symbols (one notation across the four method files, docs/READING.md):
    x₁, x₂          the two global crops; x' the local crops        crops[:2], crops[2:]
    V               number of crops (2 + local)                     len(crops)
    B; W; n = W·B   batch per process; processes; global batch      cfg.batch_size_per_gpu; dist.world_size()
    z_s, z_t        L2-normalised head outputs of student, teacher  student_out, teacher_out
    d               feature dimension (head bottleneck)             cfg.head_bottleneck_dim
    ε²              the paper's quantisation error; the official    cfg.eps
                    code's `--eps` stands where ε² is, so R below uses it as is
    R_ε(Z)          ½·logdet(I + d/(n·ε²)·ZᵀZ), Z the (n, d) batch  kernels.coding_rate
    γ               (d + n)/(d·n), balances the two terms          gamma in expansion()
    coeff           weight of the alignment term                    cfg.coeff

Terms of the SimDINO loss:
    alignment   (1/(2V−2))·Σ_{t ∈ {x₁, x₂}} Σ_{s ≠ t} mean_batch cos(z_t, z_s)
                (= 1 − ½·‖z_t − z_s‖², the paper's squared distance, on unit vectors)   alignment
    expansion   γ·R_ε(Z), averaged over the two global views                          expansion
    loss        −coeff·alignment − γ·R_ε                                              SimDINO.forward

Commands:
    python simdino.py                                    # default CPU run on synthetic data (~7 min on 2 cores)
    torchrun --nproc_per_node=8 simdino.py --preset imagenet --data imagefolder \\
        --data_path /path/to/imagenet --output_dir runs/simdino_vitb16   # the official ViT-B/16 command
"""
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

import dino
import train as train_lib
from kernels import distributed as dist
from kernels.coding_rate import coding_rate
from train import flag
from vit import ARCHS


@dataclass
class SimDINOConfig(train_lib.TrainConfig):
    """TrainConfig plus SimDINO's loss; defaults are the official simdino/main_dino.py ones."""
    eps: float = flag(0.5, "ε² of the coding rate (official name --eps; official default 0.5, "
                           "ImageNet command 0.05)")
    coeff: float = flag(1.0, "weight of the alignment term against the coding rate")
    expa_type: int = flag(1, "coding rate of 1: the mean of student and teacher global features "
                             "(official), 0: the student's alone", (0, 1))
    reduce_cov: int = flag(0, "1: all-reduce the covariances, the coding rate of the global batch; "
                              "0: of each rank's batch (official default)", (0, 1))
    output_dir: str = flag("runs/simdino", "checkpoint.pth, config.json, log.jsonl go here; resumed if present")
    saveckp_freq: int = flag(10, "keep a numbered checkpoint every N epochs (0: never; official simdino: 10)")

    def check(self):
        super().check()
        train_lib.need(self.eps > 0, f"--eps must be positive, got {self.eps}")


PRESETS = {
    "official": {},
    # The default CPU run (train.SYNTHETIC, the same for the four methods). eps 0.05 (the official
    # ImageNet command's value, not main_dino.py's 0.5): with d = 64 and a batch of 128 the default
    # 0.5 leaves the coding rate too weak against the alignment, and the features collapse
    # (docs/RESULTS.md).
    "synthetic": dict(train_lib.SYNTHETIC, eps=0.05),
    # The official ViT-B/16 command of the official README (8 GPUs x 64): 10 local crops, eps 0.05, coeff 1;
    # bf16 instead of the official fp16; k-NN after the last epoch only (as dino.py's).
    "imagenet": dict(data="imagefolder", arch="vit_base", patch_size=16, local_crops_number=10,
                     eps=0.05, coeff=1.0, precision="bf16", eval_every=100, output_dir="runs/simdino_imagenet"),
}


class SimDINOHead(nn.Module):
    """DINO's 3-layer MLP to d dims, L2-normalised; no prototype layer: (B, D) -> (B, d)."""

    def __init__(self, in_dim, hidden_dim=2048, bottleneck_dim=256):
        super().__init__()
        self.mlp = dino.head_mlp(in_dim, hidden_dim, bottleneck_dim)

    def forward(self, x):
        return F.normalize(self.mlp(x), dim=-1)


# ----------------------------------------------------------------------------------------------
# Loss

def alignment(student_out, teacher_out):
    """Mean cosine similarity over the pairs (teacher global view, student view), the same view
    skipped, averaged over the 2V−2 pairs (official MCRLoss.calc_compression).

    student_out: (V·B, d); teacher_out: (2·B, d)."""
    V = student_out.shape[0] // (teacher_out.shape[0] // 2)
    zs, zt = student_out.chunk(V), teacher_out.detach().chunk(2)
    total, pairs = 0.0, 0
    for t, z_t in enumerate(zt):
        for s, z_s in enumerate(zs):
            if s == t:  # the same view: skipped
                continue
            total = total + F.cosine_similarity(z_t, z_s, dim=-1).mean()   # cos(z_t, z_s) = 1 − ½·‖z_t − z_s‖²
            pairs += 1
    return total / pairs                                                    # over the 2V−2 pairs, as DINO Eq. 3


def expansion(student_out, teacher_out, eps, expa_type=1, reduce_cov=False):
    """γ·R over the two global views, averaged over the views (official MCRLoss.calc_expansion).

    expa_type 1: R of the mean of student and teacher features of each global view; 0: student's.
    Returns (γ·R, R)."""
    B, d = teacher_out.shape[0] // 2, teacher_out.shape[1]
    z = student_out[:2 * B].view(2, B, d)
    if expa_type == 1:
        z = (z + teacher_out.detach().view(2, B, d)) / 2
    R = coding_rate(z, eps, reduce_cov=reduce_cov).mean()    # R_ε(Z) = ½·logdet(I + d/(n·ε²)·ZᵀZ), (2,) -> mean
    n = dist.world_size() * B                                  # the global batch
    gamma = (d + n) / (d * n)                                  # γ = (d + n)/(d·n), official MCRLoss
    return gamma * R, R


class SimDINO(nn.Module):
    def __init__(self, cfg, steps_per_epoch=1):
        super().__init__()
        self.cfg, self.steps_per_epoch = cfg, steps_per_epoch
        head = lambda: SimDINOHead(ARCHS[cfg.arch][0], cfg.head_hidden_dim, cfg.head_bottleneck_dim)
        self.student, self.teacher = dino.student_and_teacher(
            lambda dpr: dino.MultiCropNet(dino.backbone(cfg, dpr), head()), cfg.drop_path_rate)

    def forward(self, crops, step):
        cfg = self.cfg
        with torch.no_grad():
            teacher_out = self.teacher(crops[:2])      # (2·B, d): global crops only
        student_out = self.student(crops)              # (V·B, d): all crops
        align = alignment(student_out.float(), teacher_out.float())
        expa, R = expansion(student_out.float(), teacher_out.float(), cfg.eps, cfg.expa_type, bool(cfg.reduce_cov))
        loss = -cfg.coeff * align - expa               # SimDINO loss: −coeff·alignment − γ·R_ε
        return loss, {"comp_loss": align.detach(), "expa_loss": expa.detach(), "coding_rate": R.detach()}

    def param_groups(self):
        return dino.param_groups(self.student)


RECIPE = train_lib.Recipe("simdino", SimDINOConfig, SimDINO, PRESETS)

if __name__ == "__main__":
    train_lib.main(RECIPE, description=__doc__.split("\n")[0])
