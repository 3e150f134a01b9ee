"""SimDINOv2: DINOv2 with its cross-entropies replaced by cosine alignment, plus the coding rate.

"Simplifying DINO via Coding Rate Regularization", Wu et al. 2025, arXiv 2502.10385; official code
RobinWu218/SimDINO, folder simdinov2/ (train/ssl_meta_arch_sim.py, loss/dino_clstoken_loss.py's
MCRLoss, loss/ibot_patch_loss.py's CosinePatchLoss, configs/simdino_config.yaml).

As DINOv2's delta that reuses SimDINO's pieces: DINOv2's masking, backbone (mask token,
LayerScale, registers), student / teacher networks and layer-wise parameter groups (dinov2.py);
SimDINO's normalised head without prototypes, alignment over crop pairs and γ-balanced coding rate
(simdino.py, kernels/coding_rate.py). What the paper changes, written out here: on the CLS token,
SimDINO's loss (−coeff·alignment − γ·R) replaces DINO's cross-entropy; on the masked patches,
the negative cosine between student and teacher head outputs replaces iBOT's cross-entropy,
weighted per image as iBOT's. No prototypes, temperatures, centring, Sinkhorn–Knopp or KoLeo.

Symbols (one notation across the four method files, docs/READING.md):
    z_s, z_t          normalised head outputs of student / teacher  student / teacher outputs
    M, w_i            block masks, 1 / #masked patches of image i   masks, weights
    R(Z), ε², γ       coding rate, its ε², the balancing factor     simdino.expansion, cfg.eps
    coeff, λ_patch    alignment weight, patch-loss weight           cfg.coeff, cfg.ibot_loss_weight

SimDINOv2's loss (SimDINO paper; cited by name, as in simdino.py):
    CLS         −coeff·alignment − γ·R_ε(Z), SimDINO's terms on the CLS     simdino.alignment, expansion
    patches     −λ_patch·Σ_masked w·cos(z_t, z_s) / #global crops          patch_alignment

Commands:
    python simdinov2.py                                  # default CPU run on synthetic data (~9 min on 2 cores)
    torchrun --nproc_per_node=8 simdinov2.py --preset imagenet --data_path /path/to/imagenet
"""
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

import dinov2
import simdino
import train as train_lib
from train import flag
from vit import ARCHS


@dataclass
class SimDINOv2Config(simdino.SimDINOConfig, dinov2.MaskedViTFlags):
    """SimDINO's flags plus DINOv2's backbone / masking / optimiser flags, with the defaults of the
    official simdinov2 simdino_config.yaml over its ssl_default_config.yaml."""
    arch: str = flag("vit_large", "backbone (official simdino_config.yaml: ViT-L/16)")
    drop_path_rate: float = flag(0.2, "stochastic depth rate of the student")
    layerscale: float = flag(0.1, "LayerScale initial value (0: no LayerScale)")
    num_register_tokens: int = flag(4, "register tokens")
    momentum_teacher: float = flag(0.9, "λ, base teacher EMA momentum, cosine to 1 (official: 0.9)")
    eps: float = flag(0.05, "ε² of the coding rate (official simdino_config.yaml: 0.05)")
    lr: float = flag(0.004, "peak lr for a global batch of 1024, scaled as lr·√(B/1024)")
    lr_scaling: str = flag("sqrt", "linear: lr·B/256 (DINO) | sqrt: lr·√(B/1024) (DINOv2)", ("linear", "sqrt"))
    batch_size_per_gpu: int = flag(128, "images per GPU (per process) and step (official ssl_default_config.yaml)")
    global_crops_scale: tuple = flag((0.4, 1.0), "area range of global crops (official: 0.4, not DINOv2's 0.32)")
    local_crops_number: int = flag(10, "number of local crops (official ssl_default_config.yaml: 10)")
    local_crops_scale: tuple = flag((0.05, 0.4), "area range of local crops (official: 0.4, not DINOv2's 0.32)")
    blur_kernel_size: int = flag(9, "Gaussian blur taps at 224 px (official GaussianBlur(kernel_size=9))")
    interpolate_offset: float = flag(0.0, "position-embedding resize: offset in the scale factor (official: 0)")
    interpolate_antialias: bool = flag(True, "position-embedding resize with antialiasing (official: true)")
    output_dir: str = flag("runs/simdinov2", "checkpoint.pth, config.json, log.jsonl go here; resumed if present")
    saveckp_freq: int = flag(100, "keep a numbered checkpoint every N epochs (0: never; ssl_default_config.yaml: "
                                  "100, a key its loop does not read)")
    lr_warmup_from_min_lr = True   # its CosineScheduler: min_lr + (lr − min_lr)·step / warm-up steps

    def check(self):
        super().check()
        self.check_masked_vit()


PRESETS = {
    "official": {},
    # The default CPU run (train.SYNTHETIC, the same for the four methods) with SimDINO's eps (see
    # simdino.py) and DINOv2's lr; registers and LayerScale as official.
    "synthetic": dict(train_lib.SYNTHETIC, eps=0.05, lr=0.004),
    # The official README's command: simdino_config.yaml alone (ViT-L/16, 128 per GPU on 8 GPUs), in
    # bf16; k-NN after the last epoch only (as dino.py's).
    "imagenet": dict(data="imagefolder", precision="bf16", eval_every=100, output_dir="runs/simdinov2_imagenet"),
}


def patch_alignment(student_patch_out, teacher_patch_out, weights, n_images):
    """Mean cosine between student and teacher head outputs at the masked patches, each image's
    patches weighted 1/#masked, summed and divided by the number of global crops (official
    CosinePatchLoss.forward_masked, whose loss is the negative of this)."""
    cos = F.cosine_similarity(teacher_patch_out.detach().float(), student_patch_out.float(), dim=-1)  # (M,)
    return (weights * cos).sum() / n_images      # Σ_masked w·cos(z_t, z_s) / #global crops


class SimDINOv2(nn.Module):
    def __init__(self, cfg, steps_per_epoch=1):
        super().__init__()
        self.cfg, self.steps_per_epoch = cfg, steps_per_epoch
        head = lambda: simdino.SimDINOHead(ARCHS[cfg.arch][0], cfg.head_hidden_dim, cfg.head_bottleneck_dim)
        self.student, self.teacher = dinov2.student_and_teacher(cfg, head)

    def forward(self, crops, step):
        cfg = self.cfg
        B = crops[0].shape[0]
        global_crops = torch.cat(crops[:2])
        local_crops = torch.cat(crops[2:]) if len(crops) > 2 else None
        masks, weights = dinov2.masks_and_weights(cfg, crops)
        t_cls, t_patch = self.teacher.teacher_forward(global_crops, masks, len(weights))   # unmasked globals
        s_cls, s_patch, _ = self.student(global_crops, local_crops, masks, len(weights))   # (V·B, d) globals first
        align = simdino.alignment(s_cls.float(), t_cls.float())
        expa, R = simdino.expansion(s_cls.float(), t_cls.float(), cfg.eps, cfg.expa_type, bool(cfg.reduce_cov))
        patch = patch_alignment(s_patch, t_patch, weights, 2 * B)
        loss = -cfg.coeff * align - expa - cfg.ibot_loss_weight * patch   # CLS terms + patch term
        return loss, {"comp_loss": align.detach(), "expa_loss": expa.detach(), "coding_rate": R.detach(),
                      "patch_loss": -patch.detach()}

    def param_groups(self):
        return dinov2.param_groups(self.student, self.cfg.layerwise_decay, self.cfg.patch_embed_lr_mult)


RECIPE = train_lib.Recipe("simdinov2", SimDINOv2Config, SimDINOv2, PRESETS)

if __name__ == "__main__":
    train_lib.main(RECIPE, description=__doc__.split("\n")[0])
