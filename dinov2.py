"""DINOv2: DINO + iBOT's masked-patch loss + KoLeo, as DINO's delta.

"DINOv2: Learning Robust Visual Features without Supervision", Oquab et al. 2023, arXiv 2304.07193;
official code facebookresearch/dinov2 (train/ssl_meta_arch.py, loss/, layers/, data/masking.py,
data/collate.py, configs/ssl_default_config.yaml).

What DINOv2 keeps from DINO (imported from dino.py): the student / EMA-teacher pair, the DINO head,
the cross-entropy over crop pairs on the CLS token, centring. What it adds (written out here):
  - iBOT: about half of the student's global crops have blocks of patches replaced by a mask
    token; the teacher sees the unmasked crops; at each masked position the student's patch token
    must predict the teacher's (same head as the CLS by default, `--ibot_separate_head`);
  - KoLeo on the student's backbone CLS of each global crop: spreads the features in the batch;
  - optional Sinkhorn–Knopp centring of the teacher instead of the EMA centre;
  - LayerScale, uniform stochastic depth, registers, SwiGLU (vit.py); layer-wise lr decay and a
    smaller lr on the patch embedding; lr = base·√(B/1024).
The step reads: masks → teacher forward (CLS + masked patches) → centre / Sinkhorn–Knopp →
one student forward → DINO + KoLeo + iBOT losses.

The paper's scaling recipe: `--distill_from` (§5, "Model distillation": a frozen larger
teacher, no masking and no stochastic depth, iBOT on the global crops' patches, the student's EMA
as the final model); `--high_res_epochs` / `--high_res_size` (§4, "Adapting the resolution", in the
shared loop); efficient stochastic depth (§5, vit.drop_add_residual); data curation (§3, tools/curate.py).

Symbols (one notation across the four method files, docs/READING.md; DINOv2 paper §4, arXiv v2,
whose equations are not numbered: cited by the name of their paragraph):
    x₁, x₂, x'        global crops, local crops                  crops[:2], crops[2:]
    B; n              batch per process; the global batch        cfg.batch_size_per_gpu
    M                 block masks of the global crops (2B, N)    masks
    u                 the learned mask token                     backbone.mask_token
    P_t, P_s          teacher / student softmax outputs          teacher_probs, log_softmax
    τ_s, τ_t          student / teacher temperature              cfg.student_temp, teacher_temp(step)
    C, C_p            centres of the CLS and patch outputs       self.center, self.center_patch
    w_i               1 / (number of masked patches of image i)  weights in ibot_loss
    λ_KoLeo, λ_iBOT   loss weights                               cfg.koleo_loss_weight, cfg.ibot_loss_weight
    ρ                 layer-wise lr decay                        cfg.layerwise_decay

Equations (DINOv2 §4):
    image-level objective   ℒ_DINO = −Σ p_t·log p_s  (DINO Eq. 3 on the CLS)    dino.cross_entropy_pairs
    patch-level objective   ℒ_iBOT = −Σᵢ p_ti·log p_si, i the masked patches  ibot_loss
    KoLeo regularizer       ℒ_koleo = −(1/n)·Σᵢ log d_n,i, d_n,i = min_{j≠i} ‖xᵢ − xⱼ‖   koleo_loss
    Sinkhorn-Knopp centering  (SwAV) 3 iterations                          sinkhorn_knopp
    total                   ℒ_DINO + λ_KoLeo·ℒ_koleo + λ_iBOT·ℒ_iBOT          DINOv2.forward

Commands:
    python dinov2.py                                     # default CPU run on synthetic data (~8 min on 2 cores)
    python dinov2.py --arch vit_nano --output_dir runs/dinov2_nano   # then distil it into a ViT-pico:
    python dinov2.py --distill_from runs/dinov2_nano/checkpoint.pth --output_dir runs/dinov2_distilled
    torchrun --nproc_per_node=8 dinov2.py --preset imagenet --data_path /path/to/imagenet
"""
import dataclasses
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

import data as data_lib
import dino
import eval as eval_lib
import train as train_lib
from train import flag, need
from kernels import distributed as dist
from vit import build_vit


@dataclass
class MaskedViTFlags:
    """What DINOv2 adds to the backbone, the optimiser and the masking (shared with SimDINOv2);
    defaults from DINOv2's ssl_default_config.yaml."""
    layerscale: float = flag(1e-5, "LayerScale initial value (0: no LayerScale)")
    drop_path_uniform: bool = flag(True, "the same stochastic depth rate in every block")
    num_register_tokens: int = flag(0, "register tokens (Darcet et al. 2023; the _reg models use 4)")
    ffn_layer: str = flag("mlp", "mlp | swiglufused (SwiGLU, ViT-g)", ("mlp", "swiglufused"))
    interpolate_offset: float = flag(0.1, "position-embedding resize: offset in the scale factor (0: exact size)")
    interpolate_antialias: bool = flag(False, "position-embedding resize with antialiasing")
    ibot_loss_weight: float = flag(1.0, "λ_iBOT, weight of the masked-patch loss")
    mask_sample_probability: float = flag(0.5, "fraction of the global crops that are masked")
    mask_ratio_min_max: tuple = flag((0.1, 0.5), "range of the masked fraction of a masked crop's patches")
    ibot_separate_head: bool = flag(False, "a separate head for the masked patches (default: the CLS head)")
    layerwise_decay: float = flag(0.9, "ρ: block i of L gets lr·ρ^(L+1−i); patch embedding, tokens ρ^(L+1)")
    patch_embed_lr_mult: float = flag(0.2, "extra lr factor of the patch embedding")
    efficient_drop_path: bool = flag(True, "stochastic depth above 0.1 runs the blocks on the kept samples only "
                                           "(official DINOv2 Block; false: compute all, zero the dropped)")

    def check_masked_vit(self):
        """The checks of these flags (DINOv2Config.check and SimDINOv2Config.check call it)."""
        lo, hi = self.mask_ratio_min_max
        need(0 <= lo <= hi <= 1, f"--mask_ratio_min_max must satisfy 0 <= min <= max <= 1, got {lo} {hi}")
        need(0 <= self.mask_sample_probability <= 1,
             f"--mask_sample_probability must be in [0, 1], got {self.mask_sample_probability}")
        need(0 < self.layerwise_decay <= 1, f"--layerwise_decay must be in (0, 1], got {self.layerwise_decay}")
        self.check_nonnegative("patch_embed_lr_mult", "ibot_loss_weight", "num_register_tokens", "layerscale")


@dataclass
class DINOv2Config(dino.DINOConfig, MaskedViTFlags):
    """DINOConfig with the defaults of DINOv2's ssl_default_config.yaml, and DINOv2's additions."""
    arch: str = flag("vit_large", "backbone (DINOv2 default config: ViT-L/16)")
    drop_path_rate: float = flag(0.3, "stochastic depth rate of the student")
    momentum_teacher: float = flag(0.992, "λ, base teacher EMA momentum, cosine to 1")
    lr: float = flag(0.004, "peak lr for a global batch of 1024, scaled as lr·√(B/1024)")
    lr_scaling: str = flag("sqrt", "linear: lr·B/256 (DINO) | sqrt: lr·√(B/1024) (DINOv2)", ("linear", "sqrt"))
    norm_last_layer: bool = flag(False, "DINOv2's head learns the prototypes' norms (weight_g)")
    teacher_temp: float = flag(0.07, "final τ_t (reached per step, linearly, after the warm-up)")
    warmup_teacher_temp_epochs: int = flag(30, "epochs of the τ_t warm-up 0.04 → 0.07")
    global_crops_scale: tuple = flag((0.32, 1.0), "area range of global crops")
    local_crops_scale: tuple = flag((0.05, 0.32), "area range of local crops")
    blur_kernel_size: int = flag(9, "Gaussian blur taps at 224 px (official GaussianBlur(kernel_size=9))")
    output_dir: str = flag("runs/dinov2", "checkpoint.pth, config.json, log.jsonl go here; resumed if present")
    centering: str = flag("centering", "teacher centring: centering (EMA centre, as DINO) | sinkhorn_knopp",
                          ("centering", "sinkhorn_knopp"))
    koleo_loss_weight: float = flag(0.1, "λ_KoLeo")
    distill_from: str = flag("", "§5 distillation: a dinov2.py checkpoint whose (larger) teacher, frozen, teaches "
                                 "this student; no masking, no stochastic depth, iBOT on every patch")
    official_epoch_length: int = flag(1250, "OFFICIAL_EPOCH_LENGTH: the iterations of an epoch, the unit of every "
                                            "schedule and of --epochs, whatever the batch (1,250: one ImageNet-1k "
                                            "pass at batch 1,024); 0: one pass over the data")

    def epoch_length(self, steps_per_pass):
        return self.official_epoch_length or steps_per_pass

    def check(self):
        super().check()
        self.check_masked_vit()
        self.check_nonnegative("koleo_loss_weight", "official_epoch_length")
        need(self.koleo_loss_weight == 0 or self.batch_size_per_gpu >= 2,
             "KoLeo needs at least 2 images per process (--batch_size_per_gpu >= 2, or --koleo_loss_weight 0)")


PRESETS = {
    "official": {},
    # The default CPU run (train.SYNTHETIC, the same for the four methods) with DINO's K; the τ_t
    # warm-up scaled with the run (30 of 100 epochs official: 3 of 10). No LayerScale: with γ = 1e-5
    # the 4-block ViT-pico starts as an identity map whose CLS ignores the image, the DINO term falls
    # to the uniform teacher (loss ln K) before the blocks wake up and never leaves it, and k-NN
    # falls in the second half of the run (docs/RESULTS.md).
    # An epoch is a pass over the data here (official_epoch_length 0): 1,250 steps would be 8 passes.
    "synthetic": dict(train_lib.SYNTHETIC, out_dim=1024, warmup_teacher_temp_epochs=3, lr=0.004, layerscale=0.0,
                      official_epoch_length=0),
    # ssl_default_config.yaml: ViT-L/16, ImageNet-1k, batch 64 per GPU, 100 epochs, in bf16.
    # k-NN after the last epoch only (the official loop evaluates after training; a full ImageNet
    # k-NN costs about a training epoch).
    "imagenet": dict(data="imagefolder", precision="bf16", eval_every=100, output_dir="runs/dinov2_imagenet"),
}


# ----------------------------------------------------------------------------------------------
# The losses DINOv2 adds

def koleo_loss(x, eps=1e-8):
    """DINOv2 §4, "KoLeo regularizer" (Sablayrolles et al. 2019): ℒ_koleo = −(1/n)·Σᵢ log d_n,i,
    d_n,i = ‖x_i − x_nn(i)‖ on L2-normalised x (B, D),
    nn(i) the nearest other point; in fp32, autocast off (official KoLeoLoss, PairwiseDistance's eps
    included): a bf16 dot product would pick wrong neighbours among close points."""
    with torch.autocast(x.device.type, enabled=False):
        x = F.normalize(x.float(), dim=-1, eps=eps)
        dots = x @ x.T
        dots.fill_diagonal_(-1)                       # never one's own neighbour
        nn_index = dots.argmax(dim=1)                 # nearest = largest dot product on the sphere
        distance = (x - x[nn_index] + eps).norm(dim=-1)   # d_n,i = min_{j≠i} ‖xᵢ − xⱼ‖
        return -torch.log(distance + eps).mean()          # ℒ_koleo = −(1/n)·Σᵢ log d_n,i


def ibot_loss(student_patch_out, teacher_patch_probs, weights, n_images, student_temp):
    """DINOv2 §4, "Patch-level objective": ℒ_iBOT = −Σᵢ p_ti·log p_si over the masked patches i of
    all global crops, each weighted w = 1/#masked of its image, divided by the number of global
    crops n_images (official iBOTPatchLoss.forward_masked)."""
    log_ps = (student_patch_out.float() / student_temp).log_softmax(dim=-1)              # log p_s, (M, K)
    return -(weights * (teacher_patch_probs * log_ps).sum(dim=-1)).sum() / n_images   # −Σᵢ wᵢ·Σ_k p_ti·log p_si


@torch.no_grad()
def sinkhorn_knopp(logits, teacher_temp, n_iterations=3):
    """DINOv2 §4, "Sinkhorn-Knopp centering" (SwAV, Caron et al. 2020; 3 iterations): teacher
    targets Q = exp(logits/τ_t) normalised so that
    each of the K prototypes gets 1/K of the mass of the global batch and each sample sums to 1.
    logits (b, K), the b samples of this rank; sums are all-reduced, so the marginals hold over all
    ranks (b summed over ranks is the global count). fp32."""
    Q = torch.exp(logits.float() / teacher_temp).T                  # (K, b)
    K = Q.shape[0]
    total = dist.all_reduce_sum(Q.new_full((), Q.shape[1]))  # samples, all ranks (no host copy)
    Q /= dist.all_reduce_sum(Q.sum())
    for _ in range(n_iterations):
        Q /= dist.all_reduce_sum(Q.sum(dim=1, keepdim=True))        # rows: mass 1/K per prototype
        Q /= K
        Q /= Q.sum(dim=0, keepdim=True)                              # columns: 1/total per sample
        Q /= total
    return (Q * total).T                                                 # (b, K), rows sum to 1


@torch.no_grad()
def mean_over_ranks(x):
    """The mean of x (b, K) over the rows of this rank, then averaged over ranks (official iBOT centre)."""
    return dist.all_reduce_sum(x.float().mean(dim=0, keepdim=True)) / dist.world_size()


# ----------------------------------------------------------------------------------------------
# The networks

class DINOv2Net(nn.Module):
    """Backbone + DINO head (+ iBOT head): the student's whole forward in one call, as DDP needs."""

    def __init__(self, backbone, head, ibot_head=None):
        super().__init__()
        self.backbone, self.head, self.ibot_head = backbone, head, ibot_head

    def heads(self, cls, patches):
        """(cls (V·B, D), patches (M, D)) -> logits: one head call when the head is shared."""
        if self.ibot_head is not None:
            return self.head(cls), self.ibot_head(patches)
        out = self.head(torch.cat([cls, patches]))
        return out[:len(cls)], out[len(cls):]

    def forward(self, global_crops, local_crops, masks, n_masked=None):
        """Student: global crops with the masked patches replaced by the mask token (a backbone
        without one, distillation's, only selects them), local crops; n_masked: see masked_rows.
        -> CLS logits of all crops (globals first), masked-patch logits, global CLS features."""
        g, *l = self.backbone.forward_features_list([x for x in (global_crops, local_crops) if x is not None],
                                                    [masks if self.backbone.mask_token is not None else None, None])
        cls_g, patches = g["x_norm_clstoken"], masked_rows(g["x_norm_patchtokens"], masks, n_masked)  # (2B, D), (M, D)
        cls = torch.cat([cls_g, *(o["x_norm_clstoken"] for o in l)])
        cls_out, patch_out = self.heads(cls, patches)
        return cls_out, patch_out, cls_g

    @torch.no_grad()
    def teacher_forward(self, global_crops, masks, n_masked=None):
        """Teacher: the unmasked global crops; logits of the CLS and of the patches at the masked positions."""
        g = self.backbone.forward_features(global_crops)
        return self.heads(g["x_norm_clstoken"], masked_rows(g["x_norm_patchtokens"], masks, n_masked))


def masked_rows(tokens, masks, n_masked=None):
    """tokens (2B, N, D) at the masked positions, in order -> (M, D). With M = n_masked known on
    the host, without the device sync of tokens[masks] (whose size the host must wait for)."""
    if n_masked is None:
        return tokens[masks]
    return tokens.flatten(0, 1)[torch.nonzero_static(masks.flatten(), size=n_masked).squeeze(1)]


def param_groups(student, layerwise_decay, patch_embed_lr_mult):
    """AdamW groups as DINOv2's get_params_groups_with_decay: lr multiplier ρ^(L+1−layer) with
    layer 0 for the patch embedding, position embedding and tokens, i+1 for block i, L+1 for the
    final norm and the heads; ×patch_embed_lr_mult on the patch embedding; no weight decay on
    biases, norms and LayerScale gammas; gradients clipped to one norm per student submodule
    (backbone, DINO head, iBOT head: official clip_grad_norm_ of each); the prototypes frozen in the
    first epoch by a learning rate of 0 (official last_layer_lr_schedule), their gradients still
    counted by AdamW and the clip."""
    L = len(student.backbone.blocks)

    def lr_mult(name):
        layer = L + 1
        if name.startswith("backbone."):
            if any(t in name for t in ("pos_embed", "patch_embed", "mask_token", "cls_token", "register_tokens")):
                layer = 0
            elif ".blocks." in name:
                layer = int(name.split(".blocks.")[1].split(".")[0]) + 1
        return layerwise_decay ** (L + 1 - layer) * (patch_embed_lr_mult if "patch_embed" in name else 1.0)
    return dino.param_groups(student, lr_mult, no_decay=lambda name, p: "norm" in name or "gamma" in name,
                             clip_group=lambda name: name.split(".")[0], freeze="lr")


# ----------------------------------------------------------------------------------------------
# The method

def student_and_teacher(cfg, make_head, mask_token=True):
    """DINOv2Net student and teacher (dino.student_and_teacher) on the DINOv2 backbone: mask
    token, LayerScale, registers, SwiGLU, uniform drop path."""
    def net(drop_path_rate):
        backbone = build_vit(cfg.arch, cfg.patch_size, img_size=cfg.global_crops_size,
                             drop_path_rate=drop_path_rate, drop_path_uniform=cfg.drop_path_uniform,
                             layerscale=cfg.layerscale or None, num_register_tokens=cfg.num_register_tokens,
                             ffn_layer=cfg.ffn_layer, use_mask_token=mask_token, attn_backend=cfg.attn_backend,
                             interpolate_offset=cfg.interpolate_offset, efficient_drop_path=cfg.efficient_drop_path,
                             interpolate_antialias=cfg.interpolate_antialias, cls_token_std=1e-6,
                             pack_crops=cfg.pack_crops)
        return DINOv2Net(backbone, make_head(), make_head() if cfg.ibot_separate_head else None)
    return dino.student_and_teacher(net, cfg.drop_path_rate)


def pretrained_teacher(cfg):
    """DINOv2 §5: the frozen teacher for distillation, the EMA teacher (backbone and heads) of the
    dinov2.py checkpoint --distill_from, with its centres C, C_p. It must share the student's patch
    size (iBOT compares patch tokens one to one) and number of prototypes K."""
    path = cfg.distill_from
    try:
        ckpt = eval_lib.read_checkpoint(path)
    except ValueError as e:
        raise train_lib.ConfigError(f"--distill_from: {e}") from None
    saved = ckpt.get("config", {}) if isinstance(ckpt, dict) else {}
    if "centering" not in saved or not {"teacher", "method"} <= set(ckpt):
        raise train_lib.ConfigError(f"--distill_from {path} is not a dinov2.py training checkpoint")
    fields = {f.name for f in dataclasses.fields(DINOv2Config)}
    tcfg = DINOv2Config(**{k: tuple(v) if isinstance(v, list) else v for k, v in saved.items() if k in fields})
    for name in ("patch_size", "out_dim"):
        if getattr(tcfg, name) != getattr(cfg, name):
            raise train_lib.ConfigError(f"--distill_from {path}: its teacher has {name} {getattr(tcfg, name)}; "
                                        f"the student needs the same (--{name} {getattr(tcfg, name)})")
    _, teacher = student_and_teacher(tcfg, lambda: dino.dino_head(tcfg))
    teacher.load_state_dict(ckpt["teacher"])
    dist.print0(f"distilling from {path}: frozen teacher {tcfg.arch}/{tcfg.patch_size} "
                f"({sum(p.numel() for p in teacher.parameters()) / 1e6:.2f}M parameters)")
    return teacher.eval(), ckpt["method"]["center"], ckpt["method"]["center_patch"]


def masks_and_weights(cfg, crops):
    """Block masks M (2B, N) of the global crops, drawn from the step's seeded global RNG, and
    the iBOT weight w_i = 1 / #masked of the image of each masked patch (M_total,)."""
    B, grid = crops[0].shape[0], crops[0].shape[-1] // cfg.patch_size
    masks = data_lib.sample_masks(2 * B, grid, grid, cfg.mask_ratio_min_max, cfg.mask_sample_probability)
    return on_device(masks, crops[0].device)


def on_device(masks, device):
    """Host masks and their iBOT weights, both computed on the host, on the device in one copy."""
    moved = data_lib.to_device({"masks": masks, "weights": ibot_weights(masks)}, device)
    return moved["masks"], moved["weights"]


def ibot_weights(masks):
    """w_i = 1 / #masked of the image, for each masked patch: (M_total,)."""
    return (1.0 / masks.sum(-1).clamp(min=1)).unsqueeze(-1).expand_as(masks)[masks]


class DINOv2(nn.Module):
    use_mask_token = True

    def __init__(self, cfg, steps_per_epoch=1):
        super().__init__()
        self.cfg, self.steps_per_epoch = cfg, steps_per_epoch
        self.student, self.teacher = student_and_teacher(cfg, lambda: dino.dino_head(cfg), self.use_mask_token)
        self.register_buffer("center", torch.zeros(1, cfg.out_dim))        # C
        self.register_buffer("center_patch", torch.zeros(1, cfg.out_dim))  # C_p

    def teacher_temp(self, step):
        """τ_t: linear per step from warmup_teacher_temp over the warm-up epochs, then constant
        (DINOv2's CosineScheduler with equal base and final values)."""
        cfg = self.cfg
        return train_lib.cosine_schedule(step, cfg.teacher_temp, cfg.teacher_temp, cfg.epochs * self.steps_per_epoch,
                                         cfg.warmup_teacher_temp_epochs * self.steps_per_epoch, cfg.warmup_teacher_temp)

    def masks_and_weights(self, crops):
        """iBOT's block masks M (2B, N) of the global crops and the weights w_i of the masked patches."""
        return masks_and_weights(self.cfg, crops)

    def target_net(self):
        """The network whose outputs are the targets: the EMA teacher."""
        return self.teacher

    def forward(self, crops, step):
        cfg = self.cfg
        B = crops[0].shape[0]
        global_crops = torch.cat(crops[:2])
        local_crops = torch.cat(crops[2:]) if len(crops) > 2 else None
        masks, weights = self.masks_and_weights(crops)                    # M (2B, N), w_i
        tau_t = self.teacher_temp(step)

        t_cls, t_patch = self.target_net().teacher_forward(global_crops, masks, len(weights))
        if cfg.centering == "centering":
            p_cls = dino.centred_softmax(t_cls, self.center, tau_t)           # P_t = softmax((g_θt − C)/τ_t)
            p_patch = dino.centred_softmax(t_patch, self.center_patch, tau_t)
            self.center.copy_(dino.update_center(self.center, t_cls, cfg.center_momentum))
            if len(t_patch):
                m = cfg.center_momentum
                self.center_patch.copy_(self.center_patch * m + mean_over_ranks(t_patch) * (1 - m))
        else:
            p_cls = sinkhorn_knopp(t_cls, tau_t)
            p_patch = sinkhorn_knopp(t_patch, tau_t)

        s_cls, s_patch, s_cls_backbone = self.student(global_crops, local_crops, masks, len(weights))
        dino_term = dino.cross_entropy_pairs(s_cls, p_cls, cfg.student_temp)   # §4 image-level: ℒ_DINO
        koleo = sum(koleo_loss(x) for x in s_cls_backbone.chunk(2))  # §4 ℒ_koleo, per global crop, not across them
        ibot = ibot_loss(s_patch, p_patch, weights, 2 * B, cfg.student_temp)   # §4 patch-level: ℒ_iBOT
        loss = dino_term + cfg.koleo_loss_weight * koleo + cfg.ibot_loss_weight * ibot
        return loss, {"dino_loss": dino_term.detach(), "koleo_loss": koleo.detach(), "ibot_loss": ibot.detach(),
                      "teacher_temp": tau_t}

    def param_groups(self):
        return param_groups(self.student, self.cfg.layerwise_decay, self.cfg.patch_embed_lr_mult)


class DINOv2Distillation(DINOv2):
    """DINOv2 §5, "Model distillation": a larger pretrained model, frozen, teaches a smaller student
    with DINOv2's losses; "we remove the masking and stochastic depth", so the iBOT term covers
    every patch of the global crops. self.teacher stays the EMA of the student ("a spare EMA ...
    that we use as our final model"): it is what is evaluated and saved. The frozen model is
    re-read from --distill_from (its centres C, C_p start from its own run's), never saved."""
    use_mask_token = False

    def __init__(self, cfg, steps_per_epoch=1):
        super().__init__(dataclasses.replace(cfg, drop_path_rate=0.0), steps_per_epoch)
        self.frozen, center, center_patch = pretrained_teacher(cfg)
        self.center.copy_(center)
        self.center_patch.copy_(center_patch)

    def masks_and_weights(self, crops):
        B, grid = crops[0].shape[0], crops[0].shape[-1] // self.cfg.patch_size
        return on_device(torch.ones(2 * B, grid * grid, dtype=torch.bool), crops[0].device)   # every patch

    def target_net(self):
        return self.frozen

    def train(self, mode=True):  # the frozen teacher stays in eval mode
        super().train(mode)
        self.frozen.eval()
        return self

    def state_dict(self, *args, **kwargs):  # without the frozen teacher
        return {k: v for k, v in super().state_dict(*args, **kwargs).items() if not k.startswith("frozen.")}

    def load_state_dict(self, state, strict=True):
        frozen = {f"frozen.{k}": v for k, v in self.frozen.state_dict().items()}
        return super().load_state_dict({**state, **frozen}, strict)


def make_method(cfg, steps_per_epoch=1):
    """DINOv2 (§4), or its distillation (§5) with --distill_from."""
    return (DINOv2Distillation if cfg.distill_from else DINOv2)(cfg, steps_per_epoch)


RECIPE = train_lib.Recipe("dinov2", DINOv2Config, make_method, PRESETS)

if __name__ == "__main__":
    train_lib.main(RECIPE, description=__doc__.split("\n")[0])
