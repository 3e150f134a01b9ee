"""Our DINOv2 step against the official one (facebookresearch/dinov2): same weights, crops and masks.

    python tests/official_dinov2.py /path/to/facebookresearch/dinov2 [steps] [--matched]

The official package (dinov2/) is imported at run time from that checkout (kept outside this
repository, never copied here) and runs in this one CPU process: SSLMetaArch.forward_backward
with its DinoVisionTransformer, DINOHead, DINOLoss, iBOTPatchLoss, KoLeoLoss and centring or
Sinkhorn-Knopp; collate_data_and_cast with MaskingGenerator; get_params_groups_with_decay and
fuse_params_groups; build_schedulers (CosineScheduler over OFFICIAL_EPOCH_LENGTH iterations per
epoch, the last layer's lr 0 in the freeze epochs) and apply_optim_scheduler; do_train's order
of the step. What stands in for the cluster (the same computation):
  - collectives: a Gloo process group of one process;
  - FSDP's clip_grad_norm_ of each student submodule: torch.nn.utils.clip_grad_norm_ of it;
  - update_teacher's FSDP parameter lists: each submodule's parameters, the same foreach ops;
  - xFormers (XFORMERS_DISABLED=1): the student's nested forward of [global, local] crops (one
    block-diagonal attention) runs as one forward per crop set, and fmha.BlockDiagonalMask for
    the head over [local CLS, global CLS, masked patches] is a concatenation and a split;
  - .cuda() is the identity; fvcore and omegaconf, where not installed, are a placeholder and a
    reader of the YAML subset of the config files (read_yaml).

Both sides: a ViT-pico/8 (width 96, 4 blocks, 3 heads) on 32-pixel global and 16-pixel local crops,
batch 8, 2 epochs of 10 steps (so every schedule runs from its warm-up to its end); everything
else is our default against the official ssl_default_config.yaml (VARIANTS: two configurations).
The official step, changed where ours still differs (MATCHED), must equal ours to float32 noise
(exit 1 otherwise). Then (unless --matched) each known difference (DIFFERENCES) runs alone, to
show what it changes, and the initial distributions of the parameters are compared (both runs
start from our weights)."""
import contextlib
import copy
import functools
import importlib
import importlib.util
import os
import random
import sys
import types
import warnings

import torch
import torch.distributed as tdist

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import data  # noqa: E402
import dinov2  # noqa: E402
import train  # noqa: E402
from vit import ARCHS  # noqa: E402

# Where ours differs from the official code, each as a change of the official side that makes it do
# what ours does (or did). MATCHED: those the test run applies, because ours still differs there;
# one goes once ours does what the official code does, so that the test checks our defaults.
# Each difference is also run alone, to show what it changes.
DIFFERENCES = {
    "epoch_length": "ours counting epochs of one pass over the data (10 steps), the official of "
                    "train.OFFICIAL_EPOCH_LENGTH (1250) iterations",
    "clip": "each parameter's gradient clipped alone (DINO), not clip_grad_norm_ of each student submodule",
    "freeze": "the last layer's gradients dropped in the freeze epoch, not its lr set to 0",
    "cls_token": "the CLS token drawn trunc-normal with std 0.02 (DINO), not normal with std 1e-6",
}
MATCHED = set()
# Configurations run on both sides. LayerScale 0.1 in the first: at DINOv2's 1e-5, with its CLS
# token of std 1e-6, the blocks start as the identity and the 8 CLS features of a crop are nearly
# equal, their dot products 1.0 in float32; KoLeo's nearest neighbours are then ties that the two
# sides break differently (the losses part by 1e-2 from step 3). The second keeps LayerScale
# 1e-5 without KoLeo, and runs the other centring, head and registers.
VARIANTS = [
    ("LayerScale 0.1", ["--layerscale", "0.1"], {"student": {"layerscale": 0.1}}),
    ("no KoLeo, sinkhorn_knopp, separate iBOT head, 4 registers",
     ["--koleo_loss_weight", "0", "--centering", "sinkhorn_knopp", "--ibot_separate_head", "true",
      "--num_register_tokens", "4"],
     {"dino": {"koleo_loss_weight": 0}, "train": {"centering": "sinkhorn_knopp"}, "ibot": {"separate_head": True},
      "student": {"num_register_tokens": 4}}),
]
# The sizes of both sides (flags of ours, the same values written into the official config): an
# epoch of 10 steps, 2 epochs, so that 20 steps run every schedule from its warm-up to its end.
SIZE = ["--arch", "vit_pico", "--patch_size", "8", "--global_crops_size", "32", "--local_crops_size", "16",
        "--local_crops_number", "2", "--batch_size_per_gpu", "8", "--out_dim", "256", "--head_hidden_dim", "256",
        "--head_bottleneck_dim", "64", "--drop_path_rate", "0", "--epochs", "2", "--warmup_epochs", "1",
        "--warmup_teacher_temp_epochs", "1", "--official_epoch_length", "10", "--data", "synthetic"]
STEPS_PER_PASS = 10   # the batches of our synthetic "dataset" in one pass
TOLERANCE = 1e-4      # float32 noise after 20 AdamW steps (both sides accumulate in different orders)


# ----------------------------------------------------------------------------------------------
# Running official code in one CPU process, next to ours (official_simdino.py, official_simdinov2.py
# and test_presets.py use these too).

def parse_scalar(text):
    """A YAML scalar or flow list of the official config files: bool, null, int, float, string."""
    text = text.strip()
    if text.startswith("[") and text.endswith("]"):
        return [parse_scalar(t) for t in text[1:-1].split(",") if t.strip()]
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"":
        return text[1:-1]
    lowered = text.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if lowered in ("", "null", "~"):
        return None
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def _strip_comment(line):
    quote = None
    for i, ch in enumerate(line):
        if ch in "'\"" and quote in (None, ch):
            quote = None if quote else ch
        elif ch == "#" and quote is None:
            return line[:i]
    return line


def read_yaml(path):
    """The YAML subset the official config files are written in: mappings nested by indentation,
    block lists (`- x`, at or below their key's indentation), flow lists ([a, b]), scalars and
    comments. -> nested dicts."""
    lines = []
    with open(path) as f:
        for raw in f:
            line = _strip_comment(raw.rstrip("\n")).rstrip()
            if line.strip():
                lines.append((len(line) - len(line.lstrip()), line.strip()))

    def mapping(i, indent):
        out = {}
        while i < len(lines) and lines[i][0] == indent and not lines[i][1].startswith("- "):
            key, sep, rest = lines[i][1].partition(":")
            if not sep:
                raise ValueError(f"{path}: cannot read {lines[i][1]!r}")
            key, i = key.strip(), i + 1
            if rest.strip():
                out[key] = parse_scalar(rest)
            elif i < len(lines) and lines[i][1].startswith("- ") and lines[i][0] >= indent:
                items, at = [], lines[i][0]
                while i < len(lines) and lines[i][0] == at and lines[i][1].startswith("- "):
                    items.append(parse_scalar(lines[i][1][2:]))
                    i += 1
                out[key] = items
            elif i < len(lines) and lines[i][0] > indent:
                out[key], i = mapping(i, lines[i][0])
            else:
                out[key] = None
        return out, i

    out, i = mapping(0, lines[0][0] if lines else 0)
    if i != len(lines):
        raise ValueError(f"{path}: cannot read line {lines[i][1]!r}")
    return out


class Node(dict):
    """A config mapping read by attribute or by key, as OmegaConf's DictConfig is by the official code."""

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None

    def __setattr__(self, name, value):
        self[name] = value

    @classmethod
    def of(cls, value):
        if isinstance(value, dict):
            return cls({k: cls.of(v) for k, v in value.items()})
        return value


def merged(base, override):
    """base with override's keys replaced or merged in, recursively (OmegaConf.merge)."""
    out = Node.of(copy.deepcopy(dict(base)))
    for key, value in override.items():
        out[key] = merged(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) \
            else Node.of(copy.deepcopy(value))
    return out


class OmegaConfReader:
    """What the official code asks of omegaconf.OmegaConf, where omegaconf is not installed."""
    load = staticmethod(lambda path: Node.of(read_yaml(path)))
    create = staticmethod(lambda cfg=None: Node.of(copy.deepcopy(dict(cfg or {}))))
    merge = staticmethod(lambda *cfgs: functools.reduce(merged, cfgs, Node()))


class Unavailable:
    """Stands for a name of a package that is not installed; the parity step never uses it."""

    def __init__(self, *args, **kwargs):
        raise RuntimeError(f"{type(self).__name__}: the package is not installed")


def stub_missing(modules):
    """For each dotted module name that does not import: an empty module holding `attrs` (name ->
    object, Unavailable by default), its parents created as needed. Installed modules stay."""
    for name, attrs in modules.items():
        try:
            importlib.import_module(name)
            continue
        except ImportError:
            pass
        parts = name.split(".")
        for i in range(1, len(parts) + 1):
            sub = ".".join(parts[:i])
            if sub not in sys.modules:
                sys.modules[sub] = types.ModuleType(sub)
                if i > 1:
                    setattr(sys.modules[".".join(parts[:i - 1])], parts[i - 1], sys.modules[sub])
        for attr, value in attrs.items():
            setattr(sys.modules[name], attr, value if value is not None else type(attr, (Unavailable,), {}))


class BlockDiagonalMask:
    """xFormers' fmha.BlockDiagonalMask as SSLMetaArch uses it: concatenate (1, n_i, D) tensors
    along the tokens, split the result back (the head acts on each token alone)."""

    def __init__(self, sizes):
        self.sizes = sizes

    @classmethod
    def from_tensor_list(cls, tensors):
        return cls([t.shape[1] for t in tensors]), torch.cat(tensors, dim=1)

    def split(self, x):
        return list(x.split(self.sizes, dim=1))


def hide_ours(name, folder):
    """Make room for an official package called as one of our files (dinov2, simdinov2): our module,
    already imported and bound, leaves sys.modules, and the official folder goes first on sys.path."""
    sys.modules.pop(name, None)
    sys.path.insert(0, os.path.abspath(folder))
    spec = importlib.util.find_spec(name)
    if spec is None or spec.submodule_search_locations is None:
        raise RuntimeError(f"no package {name}/ in {folder}")


def one_process_group(port):
    """A Gloo group of world size 1: the official losses call torch.distributed unguarded."""
    if not tdist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(port))
        tdist.init_process_group("gloo", rank=0, world_size=1)


def clip_each_parameter(params, clip):
    """DINO's clipping (official dino utils.clip_gradients): each gradient's norm to at most clip."""
    for p in params:
        if p.grad is not None:
            norm = p.grad.norm()
            coef = clip / (norm + 1e-6)
            if coef < 1:
                p.grad.mul_(coef)


def worst(a, b, key_map=lambda k: k):
    """The largest |a - b| over the tensors of two state dicts (b's keys through key_map)."""
    return max((a[k].float() - b[key_map(k)].float()).abs().max().item() for k in a)


def init_differences(pairs, threshold=0.25):
    """(name, official tensor, ours) -> lines for the tensors whose initial mean or std differ by more
    than `threshold` of the larger std (the values are random; their distributions should agree)."""
    sd = lambda x: x.float().std().item() if x.numel() > 1 else 0.0
    lines = []
    for name, theirs, ours in pairs:
        (mt, st), (mo, so) = (theirs.float().mean().item(), sd(theirs)), (ours.float().mean().item(), sd(ours))
        scale = max(st, so, 1e-12)
        if abs(st - so) > threshold * scale or abs(mt - mo) > threshold * scale + 1e-12:
            lines.append(f"  {name}: official mean {mt:.3g} std {st:.3g}, ours mean {mo:.3g} std {so:.3g}")
    return lines


def print_table(title, rows):
    """rows: per step (official loss, ours loss, {term: (official, ours)})."""
    print(title)
    terms = list(rows[0][2]) if rows else []
    print(f"{'step':>4} {'official':>11} {'ours':>11} {'|diff|':>9}  " + "  ".join(f"{t + ' off/ours':>23}" for t in terms))
    for it, (a, b, parts) in enumerate(rows):
        print(f"{it:>4} {a:11.6f} {b:11.6f} {abs(a - b):9.2e}  "
              + "  ".join(f"{parts[t][0]:11.6f}/{parts[t][1]:<11.6f}" for t in terms))


@contextlib.contextmanager
def official_masks(batch):
    """Our data.sample_masks hands out the official collate's masks of the step, once it is asked for
    as many masks, of the same grid, ratios and probability as the official collate drew."""
    masks, (ratio, probability) = batch["collated_masks"], batch["mask_args"]

    def sample_masks(n, h, w, ratio_min_max=(0.1, 0.5), p=0.5, g=None):
        asked, drawn = (n, h * w, tuple(ratio_min_max), p), (*masks.shape, ratio, probability)
        if asked != drawn:
            raise AssertionError(f"ours asks for masks (n, patches, ratios, probability) {asked}, the official "
                                 f"collate drew {drawn}")
        return masks
    original, data.sample_masks = data.sample_masks, sample_masks
    try:
        yield
    finally:
        data.sample_masks = original


def our_steps(method, cfg, steps_data, steps_per_epoch, terms):
    """train.train's step on the given crops, step by step: schedules, the method's loss, backward,
    clip as the groups say, the last-layer freeze, AdamW, EMA. steps_data: per step the crops and
    the official batch whose masks ours takes (or None); terms(logs) -> {name: value}.
    -> per step (loss, terms)."""
    method.train()
    groups = method.param_groups()
    optimizer = train.adamw(groups, torch.device("cpu"))
    losses = []
    for it, (crops, batch) in enumerate(steps_data):
        sched = train.schedules(cfg, it, steps_per_epoch)
        for g in optimizer.param_groups:
            g["lr"], g["weight_decay"] = sched["lr"] * g["lr_mult"], sched["wd"] * g["wd_mult"]
        with official_masks(batch) if batch is not None else contextlib.nullcontext():
            loss, logs = method(crops, it)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        train.clip_groups(groups, cfg.clip_grad)
        if it // steps_per_epoch < cfg.freeze_last_layer:
            train.freeze_last_layer(optimizer.param_groups)
        optimizer.step()
        train.ema_update(method.student, method.teacher, sched["momentum"])
        losses.append((loss.item(), terms({k: float(v) for k, v in logs.items()})))
    return losses


def fmt(d):
    return " ".join(f"{k} {v:.2e}" for k, v in d.items())


# ----------------------------------------------------------------------------------------------
# The official DINOv2

def load_official(folder):
    """The official modules (dinov2/ of a facebookresearch/dinov2 checkout), with ViT-pico added."""
    os.environ["XFORMERS_DISABLED"] = "1"
    hide_ours("dinov2", folder)
    stub_missing({"xformers.ops": {"fmha": types.SimpleNamespace(BlockDiagonalMask=BlockDiagonalMask)},
                  "fvcore.common.checkpoint": {"Checkpointer": None, "PeriodicCheckpointer": None},
                  "omegaconf": {"OmegaConf": OmegaConfReader}})
    torch.Tensor.cuda = lambda self, *args, **kwargs: self   # the official step moves its batch to the GPU
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import dinov2.configs as configs
        import dinov2.data as odata
        import dinov2.layers as layers
        import dinov2.models.vision_transformer as vits
        import dinov2.train.train as otrain
        import dinov2.utils.config as oconfig
        from dinov2.train.ssl_meta_arch import SSLMetaArch
    D, depth, heads = ARCHS["vit_pico"]
    vits.vit_pico = lambda patch_size=16, num_register_tokens=0, **kw: vits.DinoVisionTransformer(
        patch_size=patch_size, embed_dim=D, depth=depth, num_heads=heads, mlp_ratio=4,
        block_fn=functools.partial(layers.NestedTensorBlock, attn_class=layers.MemEffAttention),
        num_register_tokens=num_register_tokens, **kw)
    # The nested [global, local] forward needs xFormers; per crop set it is the same computation.
    vits.DinoVisionTransformer.forward_features_list = \
        lambda self, xs, masks: [self.forward_features(x, m) for x, m in zip(xs, masks)]
    return types.SimpleNamespace(default=configs.dinov2_default_config, data=odata, vits=vits, layers=layers,
                                 train=otrain, config=oconfig, SSLMetaArch=SSLMetaArch)


def official_config(O, cfg, overrides, changes):
    """ssl_default_config.yaml with our run's sizes (the values SIZE sets) and the variant's overrides."""
    size = {
        "compute_precision": {"grad_scaler": False},    # fp32 on both sides
        "student": {"arch": cfg.arch, "patch_size": cfg.patch_size, "drop_path_rate": cfg.drop_path_rate,
                    "block_chunks": 0},
        "crops": {"global_crops_size": cfg.global_crops_size, "local_crops_size": cfg.local_crops_size,
                  "local_crops_number": cfg.local_crops_number},
        "train": {"batch_size_per_gpu": cfg.batch_size_per_gpu, "OFFICIAL_EPOCH_LENGTH": cfg.epoch_length(STEPS_PER_PASS)},
        "dino": {"head_n_prototypes": cfg.out_dim, "head_hidden_dim": cfg.head_hidden_dim,
                 "head_bottleneck_dim": cfg.head_bottleneck_dim},
        "ibot": {"head_n_prototypes": cfg.out_dim, "head_hidden_dim": cfg.head_hidden_dim,
                 "head_bottleneck_dim": cfg.head_bottleneck_dim},
        "optim": {"epochs": cfg.epochs, "warmup_epochs": cfg.warmup_epochs},
        "teacher": {"warmup_teacher_temp_epochs": cfg.warmup_teacher_temp_epochs},
    }
    c = merged(merged(O.default, size), overrides)
    if "epoch_length" in changes:   # the official 1250-iteration epoch against ours of one pass
        c.train.OFFICIAL_EPOCH_LENGTH = O.default.train.OFFICIAL_EPOCH_LENGTH
    return O.config.apply_scaling_rules_to_cfg(c)   # lr = base_lr·√(B/1024)


def batches(O, c, steps):
    """Per step: our multi-crop of the synthetic images (sizes and scales of the official config c),
    collated with its masks by the official collate. -> [(crops, batch)]."""
    B, size, patch = c.train.batch_size_per_gpu, c.crops.global_crops_size, c.student.patch_size
    images, _ = data.make_synthetic(B * steps, seed=5)
    augment = data.MultiCrop(size, c.crops.local_crops_size, tuple(c.crops.global_crops_scale),
                             tuple(c.crops.local_crops_scale), c.crops.local_crops_number)
    grid = size // patch
    masking = O.data.MaskingGenerator(input_size=(grid, grid), max_num_patches=0.5 * grid * grid)
    out = []
    for it in range(steps):
        crops = augment(images[it * B:(it + 1) * B], torch.Generator().manual_seed(it))
        samples = [({"global_crops": [x[i] for x in crops[:2]], "local_crops": [x[i] for x in crops[2:]]}, ())
                   for i in range(B)]
        random.seed(1000 + it)   # the official masks are drawn with Python's random
        batch = O.data.collate_data_and_cast(samples, tuple(c.ibot.mask_ratio_min_max), c.ibot.mask_sample_probability,
                                             torch.float32, n_tokens=grid * grid, mask_generator=masking)
        batch["mask_args"] = (tuple(c.ibot.mask_ratio_min_max), c.ibot.mask_sample_probability)
        out.append((crops, batch))
    return out


def official_key(key):
    """Our student / teacher state-dict key -> SSLMetaArch's (its ModuleDict calls the head dino_head)."""
    return "dino_" + key if key.startswith("head.") else key


def run_official(O, cfg, overrides, init, steps_data, changes):
    """do_train's loop, changed where `changes` (keys of DIFFERENCES) say. -> (losses per step, the model)."""
    c = official_config(O, cfg, overrides, changes)
    model = O.SSLMetaArch(c)
    for part in ("student", "teacher"):
        mine = {k[len(part) + 1:]: v for k, v in init.items() if k.startswith(part + ".")}
        getattr(model, part).load_state_dict({official_key(k): v for k, v in mine.items()}, strict=True)
    if "cls_token" in changes:
        with torch.no_grad():
            cls = torch.nn.init.trunc_normal_(torch.empty_like(model.student.backbone.cls_token), std=0.02,
                                              generator=torch.Generator().manual_seed(0))
            model.student.backbone.cls_token.copy_(cls)
            model.teacher.backbone.cls_token.copy_(cls)
    model.need_to_synchronize_fsdp_streams = False   # CUDA streams of FSDP
    model.train()
    optimizer = O.train.build_optimizer(c, model.get_params_groups())
    lr_s, wd_s, mom_s, temp_s, last_lr_s = O.train.build_schedulers(c)
    freeze_iters = c.optim.freeze_last_layer_epochs * c.train.OFFICIAL_EPOCH_LENGTH
    total = []
    model.backprop_loss = lambda loss: (total.append(loss.item()), loss.backward())
    losses = []
    for it, (_, batch) in enumerate(steps_data):
        lr = lr_s[it]
        O.train.apply_optim_scheduler(optimizer, lr, wd_s[it], lr if "freeze" in changes else last_lr_s[it])
        optimizer.zero_grad(set_to_none=True)
        parts = model.forward_backward(batch, teacher_temp=temp_s[it])
        for v in model.student.values():
            if "clip" in changes:
                clip_each_parameter(v.parameters(), c.optim.clip_grad)
            else:
                torch.nn.utils.clip_grad_norm_(v.parameters(), c.optim.clip_grad)
        if "freeze" in changes and it < freeze_iters:
            for g in optimizer.param_groups:
                if g["is_last_layer"]:
                    for p in g["params"]:
                        p.grad = None
        optimizer.step()
        with torch.no_grad():   # update_teacher, on each submodule's parameters
            for k in model.student.keys():
                t, s = list(model.teacher[k].parameters()), list(model.student[k].parameters())
                torch._foreach_mul_(t, mom_s[it])
                torch._foreach_add_(t, s, alpha=1 - mom_s[it])
        # the official loss_dict shows KoLeo and iBOT halved; back to the terms of the loss
        losses.append((total[-1], {
            "dino": (parts["dino_local_crops_loss"] + parts["dino_global_crops_loss"]).item(),
            "koleo": (2 * parts["koleo_loss"] / c.dino.koleo_loss_weight).item() if "koleo_loss" in parts else 0.0,
            "ibot": (2 * parts["ibot_loss"]).item()}))
    if c.train.centering == "centering":   # the centres' last update is applied at the next step
        model.dino_loss.apply_center_update()
        model.ibot_patch_loss.apply_center_update()
    return losses, model


def run_ours(cfg, init, steps_data):
    """Our DINOv2 on the same crops and masks. -> (losses per step, the method)."""
    steps_per_epoch = cfg.epoch_length(STEPS_PER_PASS)
    ours = dinov2.DINOv2(cfg, steps_per_epoch)
    ours.load_state_dict(init)
    losses = our_steps(ours, cfg, steps_data, steps_per_epoch,
                       lambda logs: {"dino": logs["dino_loss"], "koleo": logs["koleo_loss"] if cfg.koleo_loss_weight else 0.0,
                                     "ibot": logs["ibot_loss"]})
    return losses, ours


def compare(ours_run, official_run):
    """Worst differences of the losses, student, teacher and centres."""
    (ol, ours), (fl, model) = ours_run, official_run
    d = {"loss": max(abs(a[0] - b[0]) for a, b in zip(fl, ol)),
         "student": worst(ours.student.state_dict(), model.student.state_dict(), official_key),
         "teacher": worst(ours.teacher.state_dict(), model.teacher.state_dict(), official_key),
         "center": (ours.center - model.dino_loss.center.flatten(1)).abs().max().item(),
         "center_patch": (ours.center_patch - model.ibot_patch_loss.center.flatten(1)).abs().max().item()}
    return d


def initialisation(O, cfg, overrides):
    """Parameters whose initial distributions differ: a fresh SSLMetaArch student against ours."""
    torch.manual_seed(0)
    theirs = O.SSLMetaArch(official_config(O, cfg, overrides, set())).student.state_dict()
    ours = dinov2.DINOv2(cfg, cfg.epoch_length(STEPS_PER_PASS)).student.state_dict()
    return init_differences([(k, theirs[official_key(k)], v) for k, v in ours.items()])


def main(official_dir, steps=20, differences=True):
    one_process_group(29534)
    O = load_official(official_dir)
    failed = False
    for name, flags, overrides in VARIANTS:
        cfg = train.config_cli(dinov2.DINOv2Config, dinov2.PRESETS, ["--preset", "official", *SIZE, *flags])
        torch.manual_seed(0)
        init = copy.deepcopy(dinov2.DINOv2(cfg, cfg.epoch_length(STEPS_PER_PASS)).state_dict())
        steps_data = batches(O, official_config(O, cfg, overrides, set()), steps)
        ours = run_ours(cfg, init, steps_data)
        matched = run_official(O, cfg, overrides, init, steps_data, MATCHED)
        rows = [(f[0], o[0], {t: (f[1][t], o[1][t]) for t in o[1]}) for f, o in zip(matched[0], ours[0])]
        print_table(f"\n== {name}: the official step{' changed by ' + ', '.join(sorted(MATCHED)) if MATCHED else ''}"
                    f" against ours", rows)
        d = compare(ours, matched)
        ok = max(d.values()) < TOLERANCE
        failed |= not ok
        print(f"max |ours - official| after {steps} steps: {fmt(d)} -> {'float32 noise' if ok else 'DIFFERENT'}")
        if differences and name == VARIANTS[0][0]:
            for change, what in DIFFERENCES.items():
                run = run_official(O, cfg, overrides, init, steps_data, MATCHED ^ {change})
                print(f"  official {'without' if change in MATCHED else 'with'} {change} ({what}): "
                      f"{fmt(compare(ours, run))}")
    if differences:
        name, flags, overrides = VARIANTS[1]   # with registers
        cfg = train.config_cli(dinov2.DINOv2Config, dinov2.PRESETS, ["--preset", "official", *SIZE, *flags])
        lines = initialisation(O, cfg, overrides)
        print("\ninitialisation, official against ours:" + ("\n" + "\n".join(lines) if lines else " the same distributions"))
    tdist.destroy_process_group()
    return 1 if failed else 0


if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if a != "--matched"]
    sys.exit(main(args[0], int(args[1]) if len(args) > 1 else 20, differences="--matched" not in sys.argv))
