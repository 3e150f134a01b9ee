"""DINO against the paper / official code on fixed inputs: the loss with its pair skipping and
averaging, the centre update, the teacher-temperature warm-up, the weight-normed prototypes,
the multi-crop forward, parameter groups."""
import math

import numpy as np
import torch
import torch.nn.functional as F

import dino
from dino import DINO, DINOConfig, DINOHead, WeightNormLinear, dino_loss, update_center


def paper_dino_loss(student, teacher, center, tau_s, tau_t, V, B):
    """A direct transcription of Algorithm 1 / Eq. 1, one sample and one pair at a time."""
    total, pairs = 0.0, 0
    for t in range(2):
        for s in range(V):
            if s == t:
                continue
            pair = 0.0
            for b in range(B):
                zt = (teacher[t * B + b] - center[0]) / tau_t
                pt = torch.exp(zt - zt.max()) / torch.exp(zt - zt.max()).sum()
                zs = student[s * B + b] / tau_s
                log_ps = zs - (zs.max() + torch.log(torch.exp(zs - zs.max()).sum()))
                pair += -(pt * log_ps).sum().item()
            total += pair / B
            pairs += 1
    assert pairs == 2 * V - 2
    return total / pairs


def test_dino_loss_matches_the_paper_formula():
    g = torch.Generator().manual_seed(0)
    V, B, K = 6, 5, 32
    student = torch.randn(V * B, K, generator=g, dtype=torch.float64) * 3
    teacher = torch.randn(2 * B, K, generator=g, dtype=torch.float64) * 3
    center = torch.randn(1, K, generator=g, dtype=torch.float64)
    for tau_t in (0.04, 0.07):
        ours = dino_loss(student, teacher, center, 0.1, tau_t).item()
        ref = paper_dino_loss(student, teacher, center, 0.1, tau_t, V, B)
        assert abs(ours - ref) < 1e-4 * max(1, abs(ref)), (ours, ref)


def test_dino_loss_skips_same_view_pairs():
    # Student equal to the teacher on every view: if the same-view pairs were counted the loss
    # would contain H(P, P) terms; with 2 global crops only and the views swapped the loss is
    # exactly the cross-entropy between the two different views.
    B, K = 4, 8
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(B, K, generator=g), torch.randn(B, K, generator=g)
    center = torch.zeros(1, K)
    loss = dino_loss(torch.cat([a, b]), torch.cat([a, b]), center, 0.1, 0.1)
    h = lambda p, q: -(F.softmax(p / 0.1, -1) * F.log_softmax(q / 0.1, -1)).sum(-1).mean()
    assert torch.allclose(loss, (h(a, b) + h(b, a)) / 2, atol=1e-5)
    assert not torch.allclose(loss, (h(a, a) + h(a, b) + h(b, a) + h(b, b)) / 4, atol=1e-3)


def test_teacher_gets_no_gradient_and_student_does():
    student = torch.randn(8, 16, requires_grad=True)
    teacher = torch.randn(4, 16, requires_grad=True)
    dino_loss(student, teacher, torch.zeros(1, 16), 0.1, 0.04).backward()
    assert teacher.grad is None and student.grad.abs().sum() > 0


def test_center_update():
    teacher = torch.arange(12.0).view(4, 3)
    center = torch.ones(1, 3)
    new = update_center(center, teacher, 0.9)
    assert torch.allclose(new, 0.9 * center + 0.1 * teacher.mean(0, keepdim=True))


def tiny_cfg(**kw):
    base = dict(arch="vit_pico", patch_size=8, global_crops_size=32, local_crops_size=16, out_dim=64,
                head_hidden_dim=32, head_bottleneck_dim=16, local_crops_number=2, epochs=100,
                warmup_teacher_temp=0.04, teacher_temp=0.07, warmup_teacher_temp_epochs=30)
    base.update(kw)
    return DINOConfig(**base)


def test_teacher_temperature_schedule_matches_official():
    method = DINO(tiny_cfg(), steps_per_epoch=10)
    official = np.concatenate((np.linspace(0.04, 0.07, 30), np.ones(100 - 30) * 0.07))
    for epoch in (0, 1, 15, 29, 30, 99):
        for it in (0, 9):
            assert abs(method.teacher_temp(epoch * 10 + it) - official[epoch]) < 1e-12
    flat = DINO(tiny_cfg(warmup_teacher_temp_epochs=0, teacher_temp=0.04), steps_per_epoch=10)
    assert flat.teacher_temp(0) == 0.04 and flat.teacher_temp(500) == 0.04


def test_weight_normed_prototypes():
    torch.manual_seed(0)
    layer = WeightNormLinear(16, 10, train_g=False)
    with torch.no_grad():
        layer.weight_v.mul_(torch.rand(10, 1) * 5)  # rows of arbitrary norm
    x = torch.randn(3, 16)
    w = layer.weight_v / layer.weight_v.norm(dim=1, keepdim=True)
    assert torch.allclose(layer(x), x @ w.T, atol=1e-6)            # unit-norm prototypes, g = 1
    assert not layer.weight_g.requires_grad
    # equals PyTorch's weight_norm parametrisation (dim 0) with the same v and g
    ref = torch.nn.utils.parametrizations.weight_norm(torch.nn.Linear(16, 10, bias=False), dim=0)
    with torch.no_grad():
        ref.parametrizations.weight.original0.copy_(torch.full((10, 1), 2.0))
        ref.parametrizations.weight.original1.copy_(layer.weight_v)
        layer.weight_g.fill_(2.0)
    assert torch.allclose(layer(x), ref(x), atol=1e-6)
    # the gradient of v is orthogonal to v (scale invariance of the normalised direction)
    layer(x).pow(2).sum().backward()
    assert torch.allclose((layer.weight_v.grad * layer.weight_v).sum(1), torch.zeros(10), atol=1e-4)
    assert WeightNormLinear(16, 10, train_g=True).weight_g.requires_grad


def test_head_shapes_and_normalised_bottleneck():
    head = DINOHead(96, 1000, hidden_dim=64, bottleneck_dim=32)
    y = head(torch.randn(5, 96))
    assert y.shape == (5, 1000)
    assert y.abs().max() <= 1.0 + 1e-5  # unit bottleneck · unit prototypes: cosine similarities


def test_multicrop_forward_groups_by_resolution():
    torch.manual_seed(0)
    method = DINO(tiny_cfg()).eval()
    B = 3
    crops = [torch.randn(B, 3, 32, 32), torch.randn(B, 3, 32, 32)] + [torch.randn(B, 3, 16, 16) for _ in range(2)]
    out = method.student(crops)
    assert out.shape == (4 * B, 64)
    one_by_one = torch.cat([method.student.head(method.student.backbone(c)) for c in crops])
    assert torch.allclose(out, one_by_one, atol=1e-5)


def test_step_updates_center_and_returns_logs():
    torch.manual_seed(0)
    method = DINO(tiny_cfg(), steps_per_epoch=5)
    crops = [torch.randn(4, 3, 32, 32)] * 2 + [torch.randn(4, 3, 16, 16)] * 2
    loss, logs = method(crops, step=0)
    logs = {k: float(v) for k, v in logs.items()}
    assert loss.requires_grad and math.isfinite(loss.item())
    assert set(logs) >= {"dino_loss", "teacher_temp"} and logs["teacher_temp"] == 0.04
    assert method.center.abs().sum() > 0
    loss.backward()
    assert all(p.grad is None for p in method.teacher.parameters())


def test_teacher_starts_equal_to_student_without_drop_path():
    method = DINO(tiny_cfg(drop_path_rate=0.2))
    for (n, s), t in zip(method.student.state_dict().items(), method.teacher.state_dict().values()):
        assert torch.equal(s, t), n
    assert all(b.drop_path.p == 0 for b in method.teacher.backbone.blocks)
    assert method.student.backbone.blocks[-1].drop_path.p > 0


def test_param_groups_official_rules():
    method = DINO(tiny_cfg(norm_last_layer=False))
    groups = method.param_groups()
    by_name = {id(p): n for n, p in method.student.named_parameters()}
    for g in groups:
        for p in g["params"]:
            name = by_name[id(p)]
            no_decay = name.endswith(".bias") or p.ndim == 1
            assert g["wd_mult"] == (0.0 if no_decay else 1.0), name
            assert g["is_last_layer"] == ("last_layer" in name), name
    n_params = sum(len(g["params"]) for g in groups)
    assert n_params == sum(1 for p in method.student.parameters() if p.requires_grad)
    # with norm_last_layer the norm g is frozen and left out
    frozen = DINO(tiny_cfg(norm_last_layer=True))
    assert sum(len(g["params"]) for g in frozen.param_groups()) == n_params - 1


def test_presets_trace_to_official_values():
    assert dino.PRESETS["official"] == {}
    cfg = DINOConfig()
    official = dict(arch="vit_small", patch_size=16, out_dim=65536, norm_last_layer=True, momentum_teacher=0.996,
                    warmup_teacher_temp=0.04, teacher_temp=0.04, warmup_teacher_temp_epochs=0, weight_decay=0.04,
                    weight_decay_end=0.4, clip_grad=3.0, batch_size_per_gpu=64, epochs=100, freeze_last_layer=1,
                    lr=0.0005, warmup_epochs=10, min_lr=1e-6, drop_path_rate=0.1, global_crops_scale=(0.4, 1.0),
                    local_crops_number=8, local_crops_scale=(0.05, 0.4), seed=0, saveckp_freq=20)
    for k, v in official.items():
        assert getattr(cfg, k) == v, k
    imagenet = DINOConfig(**dino.PRESETS["imagenet"])
    assert (imagenet.epochs, imagenet.teacher_temp, imagenet.warmup_teacher_temp_epochs,
            imagenet.norm_last_layer) == (300, 0.07, 30, False)


def test_head_layer_indices_match_official_with_and_without_bn():
    """Official DINOHead's Sequential indices, so official checkpoints' keys line up."""
    plain = [k for k in DINOHead(8, 16, 32, 4).state_dict() if k.startswith("mlp.")]
    assert plain == ["mlp.0.weight", "mlp.0.bias", "mlp.2.weight", "mlp.2.bias", "mlp.4.weight", "mlp.4.bias"]
    bn = DINOHead(8, 16, 32, 4, use_bn=True)
    assert isinstance(bn.mlp[1], torch.nn.BatchNorm1d) and isinstance(bn.mlp[4], torch.nn.BatchNorm1d)
    assert [type(m).__name__ for m in bn.mlp] == ["Linear", "BatchNorm1d", "GELU", "Linear", "BatchNorm1d", "GELU", "Linear"]
