"""Our `--preset official` (the Config defaults) and `--preset imagenet` against the official
configs, row by row. Each row is transcribed from an official file and names it, with the key,
the official value and our field:

    (file, key, official value, our field)                     ours must equal the official value
    (file, key, official value, our field, ours, why)          ours must equal `ours`: a conversion
                                                               (the official word for our value) or
                                                               an intended difference, said in `why`

Files are relative to the official repositories: facebookresearch/dino (DINO),
facebookresearch/dinov2 (DINOv2), RobinWu218/SimDINO (SimDINO: simdino/, SimDINOv2: simdinov2/).
Keys: `--flag` (argparse default in a .py file, the flag's value in a README command), a dotted
YAML path, `Class.__init__.arg` (a default argument), or `code:text` (code that appears in the
file). The imagenet table is the official table with the rows of the main run's own file over
it. With NANODINO_OFFICIAL_DINO, NANODINO_OFFICIAL_DINOV2, NANODINO_OFFICIAL_SIMDINO pointing to
checkouts, each transcribed value is also read back from its file."""
import ast
import os
import re

import pytest

import dino
import dinov2
import simdino
import simdinov2
import train
from official_dinov2 import parse_scalar, read_yaml


def override(table, rows):
    """table with the rows of `rows` replacing those of the same key, the others appended."""
    keys = {r[1] for r in rows}
    return [r for r in table if r[1] not in keys] + rows


AUTO = ("auto: bf16 where the device computes it natively, fp32 elsewhere, so the defaults run fast on any "
        "CPU (--use_fp16 true or --precision fp16 is the official fp16)")
BF16 = "bf16: the same range as fp32 and no grad scaler, on GPUs that compute it (fp16 is --precision fp16)"
EVAL = "k-NN on held-out data every epoch: the small default runs show their progress (official: none in training)"
EVAL_END = "k-NN once, after the last epoch (official: offline, after training)"
IMAGEFOLDER = "a root/class/image folder, as ImageNet's train/"


# ----------------------------------------------------------------------------------------------
# DINO: main_dino.py's argparse defaults; the README's ViT-S/16 run with its "boosts".

DINO = "main_dino.py"
DINO_OFFICIAL = [
    (DINO, "--arch", "vit_small", "arch"),
    (DINO, "--patch_size", 16, "patch_size"),
    (DINO, "--out_dim", 65536, "out_dim"),
    (DINO, "--norm_last_layer", True, "norm_last_layer"),
    (DINO, "--momentum_teacher", 0.996, "momentum_teacher"),
    (DINO, "--use_bn_in_head", False, "use_bn_in_head"),
    (DINO, "--warmup_teacher_temp", 0.04, "warmup_teacher_temp"),
    (DINO, "--teacher_temp", 0.04, "teacher_temp"),
    (DINO, "--warmup_teacher_temp_epochs", 0, "warmup_teacher_temp_epochs"),
    (DINO, "--use_fp16", True, "precision", "auto", AUTO),
    (DINO, "--weight_decay", 0.04, "weight_decay"),
    (DINO, "--weight_decay_end", 0.4, "weight_decay_end"),
    (DINO, "--clip_grad", 3.0, "clip_grad"),
    (DINO, "--batch_size_per_gpu", 64, "batch_size_per_gpu"),
    (DINO, "--epochs", 100, "epochs"),
    (DINO, "--freeze_last_layer", 1, "freeze_last_layer"),
    (DINO, "--lr", 0.0005, "lr"),
    (DINO, "code:args.lr * (args.batch_size_per_gpu * utils.get_world_size()) / 256.", "lr·B/256", "lr_scaling",
     "linear", "the official linear scaling rule"),
    (DINO, "--warmup_epochs", 10, "warmup_epochs"),
    (DINO, "--min_lr", 1e-6, "min_lr"),
    (DINO, "--drop_path_rate", 0.1, "drop_path_rate"),
    (DINO, "--global_crops_scale", (0.4, 1.0), "global_crops_scale"),
    (DINO, "--local_crops_number", 8, "local_crops_number"),
    (DINO, "--local_crops_scale", (0.05, 0.4), "local_crops_scale"),
    (DINO, "code:transforms.RandomResizedCrop(224, scale=global_crops_scale", 224, "global_crops_size"),
    (DINO, "code:transforms.RandomResizedCrop(96, scale=local_crops_scale", 96, "local_crops_size"),
    (DINO, "--saveckp_freq", 20, "saveckp_freq"),
    (DINO, "--seed", 0, "seed"),
    (DINO, "--num_workers", 10, "num_workers"),
    (DINO, "DINOLoss.__init__.student_temp", 0.1, "student_temp"),
    (DINO, "DINOLoss.__init__.center_momentum", 0.9, "center_momentum"),
    ("vision_transformer.py", "DINOHead.__init__.hidden_dim", 2048, "head_hidden_dim"),
    ("vision_transformer.py", "DINOHead.__init__.bottleneck_dim", 256, "head_bottleneck_dim"),
    ("eval_knn.py", "code:def knn_classifier", "offline", "eval_every", 1, EVAL),
]
DINO_IMAGENET = override(DINO_OFFICIAL, [   # README: run_with_submitit.py (2 nodes x 8 GPUs) --arch vit_small ...
    ("README.md", "--arch", "vit_small", "arch"),
    ("README.md", "--epochs", 300, "epochs"),
    ("README.md", "--teacher_temp", 0.07, "teacher_temp"),
    ("README.md", "--warmup_teacher_temp_epochs", 30, "warmup_teacher_temp_epochs"),
    ("README.md", "--norm_last_layer", False, "norm_last_layer"),
    ("README.md", "--data_path", "/path/to/imagenet/train", "data", "imagefolder", IMAGEFOLDER),
    (DINO, "--use_fp16", True, "precision", "bf16", BF16),
    ("eval_knn.py", "code:def knn_classifier", "offline", "eval_every", 300, EVAL_END),
])


# ----------------------------------------------------------------------------------------------
# SimDINO: simdino/main_dino.py's defaults; the README's ViT-B/16 command.

SIMDINO = "simdino/main_dino.py"
SIMDINO_OFFICIAL = [
    (SIMDINO, "--arch", "vit_small", "arch"),
    (SIMDINO, "--patch_size", 16, "patch_size"),
    (SIMDINO, "--momentum_teacher", 0.996, "momentum_teacher"),
    (SIMDINO, "--z_dim", 256, "head_bottleneck_dim"),
    (SIMDINO, "--hidden_dim", 2048, "head_hidden_dim"),
    (SIMDINO, "--compile", True, "compile", False,
     "off: compiling costs a minute or more and needs a C++ compiler on CPU; the same steps either way"),
    (SIMDINO, "--use_fp16", True, "precision", "auto", AUTO),
    (SIMDINO, "--weight_decay", 0.04, "weight_decay"),
    (SIMDINO, "--weight_decay_end", 0.4, "weight_decay_end"),
    (SIMDINO, "--clip_grad", 3.0, "clip_grad"),
    (SIMDINO, "--batch_size_per_gpu", 64, "batch_size_per_gpu"),
    (SIMDINO, "--epochs", 100, "epochs"),
    (SIMDINO, "--freeze_last_layer", 1, "freeze_last_layer"),
    (SIMDINO, "--lr", 0.0005, "lr"),
    (SIMDINO, "code:args.lr * (args.batch_size_per_gpu * utils.get_world_size()) / 256.", "lr·B/256",
     "lr_scaling", "linear", "the official linear scaling rule"),
    (SIMDINO, "--warmup_epochs", 10, "warmup_epochs"),
    (SIMDINO, "--min_lr", 1e-6, "min_lr"),
    (SIMDINO, "--drop_path_rate", 0.1, "drop_path_rate"),
    (SIMDINO, "--global_crops_scale", (0.4, 1.0), "global_crops_scale"),
    (SIMDINO, "--local_crops_number", 8, "local_crops_number"),
    (SIMDINO, "--local_crops_scale", (0.05, 0.4), "local_crops_scale"),
    (SIMDINO, "code:transforms.RandomResizedCrop(224, scale=global_crops_scale", 224, "global_crops_size"),
    (SIMDINO, "code:transforms.RandomResizedCrop(96, scale=local_crops_scale", 96, "local_crops_size"),
    (SIMDINO, "--saveckp_freq", 10, "saveckp_freq"),
    (SIMDINO, "--seed", 0, "seed"),
    (SIMDINO, "--num_workers", 10, "num_workers"),
    (SIMDINO, "--coeff", 1, "coeff"),
    (SIMDINO, "--eps", 0.5, "eps"),
    (SIMDINO, "--reduce_cov", 0, "reduce_cov"),
    (SIMDINO, "--expa_type", 1, "expa_type"),
    ("simdino/eval_knn.py", "code:def knn_classifier", "offline", "eval_every", 1, EVAL),
]
SIMDINO_IMAGENET = override(SIMDINO_OFFICIAL, [   # README: torchrun --nproc_per_node=8 main_dino.py --arch vit_base ...
    ("README.md", "--arch", "vit_base", "arch"),
    ("README.md", "--patch_size", 16, "patch_size"),
    ("README.md", "--local_crops_number", 10, "local_crops_number"),
    ("README.md", "--eps", 0.05, "eps"),
    ("README.md", "--coeff", 1, "coeff"),
    ("README.md", "--data_path", "<PATH/TO/DATASET/TRAIN>", "data", "imagefolder", IMAGEFOLDER),
    (SIMDINO, "--use_fp16", True, "precision", "bf16", BF16),
    ("simdino/eval_knn.py", "code:def knn_classifier", "offline", "eval_every", 100, EVAL_END),
])


# ----------------------------------------------------------------------------------------------
# DINOv2: ssl_default_config.yaml; the ImageNet-1k ViT-L/16 run, vitl16_short.yaml over it.

V2 = "dinov2/configs/ssl_default_config.yaml"
DINOV2_OFFICIAL = [
    (V2, "dino.head_n_prototypes", 65536, "out_dim"),
    (V2, "dino.head_bottleneck_dim", 256, "head_bottleneck_dim"),
    (V2, "dino.head_hidden_dim", 2048, "head_hidden_dim"),
    (V2, "dino.koleo_loss_weight", 0.1, "koleo_loss_weight"),
    (V2, "ibot.loss_weight", 1.0, "ibot_loss_weight"),
    (V2, "ibot.mask_sample_probability", 0.5, "mask_sample_probability"),
    (V2, "ibot.mask_ratio_min_max", (0.1, 0.5), "mask_ratio_min_max"),
    (V2, "ibot.separate_head", False, "ibot_separate_head"),
    (V2, "train.batch_size_per_gpu", 64, "batch_size_per_gpu"),
    (V2, "train.saveckp_freq", 20, "saveckp_freq"),
    (V2, "train.seed", 0, "seed"),
    (V2, "train.num_workers", 10, "num_workers"),
    (V2, "train.OFFICIAL_EPOCH_LENGTH", 1250, "official_epoch_length"),
    (V2, "train.centering", "centering", "centering"),
    (V2, "student.arch", "vit_large", "arch"),
    (V2, "student.patch_size", 16, "patch_size"),
    (V2, "student.drop_path_rate", 0.3, "drop_path_rate"),
    (V2, "student.layerscale", 1e-5, "layerscale"),
    (V2, "student.drop_path_uniform", True, "drop_path_uniform"),
    (V2, "student.ffn_layer", "mlp", "ffn_layer"),
    (V2, "student.num_register_tokens", 0, "num_register_tokens"),
    (V2, "student.interpolate_antialias", False, "interpolate_antialias"),
    (V2, "student.interpolate_offset", 0.1, "interpolate_offset"),
    (V2, "teacher.momentum_teacher", 0.992, "momentum_teacher"),
    (V2, "teacher.warmup_teacher_temp", 0.04, "warmup_teacher_temp"),
    (V2, "teacher.teacher_temp", 0.07, "teacher_temp"),
    (V2, "teacher.warmup_teacher_temp_epochs", 30, "warmup_teacher_temp_epochs"),
    (V2, "optim.epochs", 100, "epochs"),
    (V2, "optim.weight_decay", 0.04, "weight_decay"),
    (V2, "optim.weight_decay_end", 0.4, "weight_decay_end"),
    (V2, "optim.base_lr", 0.004, "lr"),
    (V2, "optim.warmup_epochs", 10, "warmup_epochs"),
    (V2, "optim.min_lr", 1e-6, "min_lr"),
    (V2, "optim.clip_grad", 3.0, "clip_grad"),
    (V2, "optim.freeze_last_layer_epochs", 1, "freeze_last_layer"),
    (V2, "optim.scaling_rule", "sqrt_wrt_1024", "lr_scaling", "sqrt", "lr·√(B/1024)"),
    (V2, "optim.patch_embed_lr_mult", 0.2, "patch_embed_lr_mult"),
    (V2, "optim.layerwise_decay", 0.9, "layerwise_decay"),
    (V2, "crops.global_crops_scale", (0.32, 1.0), "global_crops_scale"),
    (V2, "crops.local_crops_number", 8, "local_crops_number"),
    (V2, "crops.local_crops_scale", (0.05, 0.32), "local_crops_scale"),
    (V2, "crops.global_crops_size", 224, "global_crops_size"),
    (V2, "crops.local_crops_size", 96, "local_crops_size"),
    (V2, "compute_precision.student.backbone.mixed_precision.param_dtype", "fp16", "precision", "auto", AUTO),
    (V2, "evaluation.eval_period_iterations", 12500, "eval_every", 1, EVAL),
    ("dinov2/loss/dino_clstoken_loss.py", "DINOLoss.__init__.student_temp", 0.1, "student_temp"),
    ("dinov2/loss/dino_clstoken_loss.py", "DINOLoss.__init__.center_momentum", 0.9, "center_momentum"),
    ("dinov2/layers/dino_head.py", "code:self.last_layer.weight_g.data.fill_(1)", False, "norm_last_layer",
     False, "weight_g starts at 1 and is trained (never frozen): prototypes of learned norm"),
    ("dinov2/layers/block.py", "code:if self.training and self.sample_drop_ratio > 0.1:", True, "efficient_drop_path"),
]
DINOV2_IMAGENET = override(DINOV2_OFFICIAL, [
    ("dinov2/configs/train/vitl16_short.yaml", "train.batch_size_per_gpu", 64, "batch_size_per_gpu"),
    ("dinov2/configs/train/vitl16_short.yaml", "train.dataset_path", "ImageNet:split=TRAIN", "data", "imagefolder",
     IMAGEFOLDER),
    (V2, "compute_precision.student.backbone.mixed_precision.param_dtype", "fp16", "precision", "bf16", BF16),
    (V2, "evaluation.eval_period_iterations", 12500, "eval_every", 100, EVAL_END),
])


# ----------------------------------------------------------------------------------------------
# SimDINOv2: simdino_config.yaml over simdinov2's own ssl_default_config.yaml; the README's
# command (simdino_config.yaml alone: ViT-L/16).

S2 = "simdinov2/configs/ssl_default_config.yaml"
SIM = "simdinov2/configs/simdino_config.yaml"
SIMDINOV2_OFFICIAL = [
    (SIM, "compile", True, "compile", False,
     "off: compiling costs a minute or more and needs a C++ compiler on CPU; the same steps either way"),
    (SIM, "compute_precision.student.backbone.mixed_precision.param_dtype", "bf16", "precision", "auto", AUTO),
    (SIM, "dino.mcr.expa_type", 1, "expa_type"),
    (SIM, "dino.mcr.reduce_cov", 0, "reduce_cov"),
    (SIM, "dino.mcr.eps", 0.05, "eps"),
    (SIM, "dino.mcr.coeff", 1, "coeff"),
    (SIM, "dino.head_bottleneck_dim", 256, "head_bottleneck_dim"),
    (SIM, "dino.head_hidden_dim", 2048, "head_hidden_dim"),
    (SIM, "ibot.loss_weight", 1, "ibot_loss_weight"),
    (SIM, "ibot.separate_head", False, "ibot_separate_head"),
    (SIM, "student.arch", "vit_large", "arch"),
    (SIM, "student.drop_path_rate", 0.2, "drop_path_rate"),
    (SIM, "student.layerscale", 0.1, "layerscale"),
    (SIM, "teacher.momentum_teacher", 0.9, "momentum_teacher"),
    (SIM, "optim.epochs", 100, "epochs"),
    (SIM, "optim.weight_decay", 0.04, "weight_decay"),
    (SIM, "optim.weight_decay_end", 0.4, "weight_decay_end"),
    (SIM, "optim.base_lr", 0.004, "lr"),
    (SIM, "optim.warmup_epochs", 10, "warmup_epochs"),
    (SIM, "optim.min_lr", 1e-6, "min_lr"),
    ("simdinov2/train/train.py", 'code:start_warmup_value=cfg.optim["min_lr"]', 1e-6, "the lr at step 0"),
    (SIM, "optim.clip_grad", 3.0, "clip_grad"),
    (SIM, "optim.freeze_last_layer_epochs", 1, "freeze_last_layer"),
    (SIM, "optim.scaling_rule", "sqrt_wrt_1024", "lr_scaling", "sqrt", "lr·√(B/1024)"),
    (SIM, "optim.patch_embed_lr_mult", 0.2, "patch_embed_lr_mult"),
    (SIM, "optim.layerwise_decay", 0.9, "layerwise_decay"),
    (SIM, "crops.global_crops_scale", (0.4, 1), "global_crops_scale"),
    (SIM, "crops.local_crops_number", 10, "local_crops_number"),
    (SIM, "crops.local_crops_scale", (0.05, 0.4), "local_crops_scale"),
    (SIM, "crops.global_crops_size", 224, "global_crops_size"),
    (SIM, "crops.local_crops_size", 96, "local_crops_size"),
    (SIM, "evaluation.eval_period_epochs", 10, "eval_every", 1, EVAL),
    (S2, "train.batch_size_per_gpu", 128, "batch_size_per_gpu"),
    (S2, "train.saveckp_freq", 100, "saveckp_freq"),
    (S2, "train.seed", 0, "seed"),
    (S2, "train.num_workers", 10, "num_workers"),
    (S2, "train.OFFICIAL_EPOCH_LENGTH", -1, "the steps of an epoch of 1000-step passes", 1000,
     "-1: one pass over the data (do_train: len(dataset) // global batch)"),
    (S2, "student.patch_size", 16, "patch_size"),
    (S2, "student.drop_path_uniform", True, "drop_path_uniform"),
    (S2, "student.ffn_layer", "mlp", "ffn_layer"),
    (S2, "student.num_register_tokens", 4, "num_register_tokens"),
    (S2, "student.interpolate_antialias", True, "interpolate_antialias"),
    (S2, "student.interpolate_offset", 0.0, "interpolate_offset"),
    (S2, "ibot.mask_sample_probability", 0.5, "mask_sample_probability"),
    (S2, "ibot.mask_ratio_min_max", (0.1, 0.5), "mask_ratio_min_max"),
    ("simdinov2/layers/block.py", "code:if self.training and self.sample_drop_ratio > 0.1:", True,
     "efficient_drop_path"),
]
SIMDINOV2_IMAGENET = override(SIMDINOV2_OFFICIAL, [
    (SIM, "compute_precision.student.backbone.mixed_precision.param_dtype", "bf16", "precision"),
    ("README.md", "code:train.dataset_path=ImageNet:split=TRAIN", "ImageNet:split=TRAIN", "data", "imagefolder",
     IMAGEFOLDER),
    (SIM, "evaluation.eval_period_epochs", 10, "eval_every", 100, EVAL_END),
])

# What a row's field names when it is not a config field: a value computed from the config.
DERIVED = {
    "the lr at step 0": lambda cfg: train.schedules(cfg, 0, 1000)["lr"],
    "the steps of an epoch of 1000-step passes": lambda cfg: cfg.epoch_length(1000),
}

TABLES = {
    ("dino", "official"): (dino.RECIPE, DINO_OFFICIAL, "NANODINO_OFFICIAL_DINO"),
    ("dino", "imagenet"): (dino.RECIPE, DINO_IMAGENET, "NANODINO_OFFICIAL_DINO"),
    ("simdino", "official"): (simdino.RECIPE, SIMDINO_OFFICIAL, "NANODINO_OFFICIAL_SIMDINO"),
    ("simdino", "imagenet"): (simdino.RECIPE, SIMDINO_IMAGENET, "NANODINO_OFFICIAL_SIMDINO"),
    ("dinov2", "official"): (dinov2.RECIPE, DINOV2_OFFICIAL, "NANODINO_OFFICIAL_DINOV2"),
    ("dinov2", "imagenet"): (dinov2.RECIPE, DINOV2_IMAGENET, "NANODINO_OFFICIAL_DINOV2"),
    ("simdinov2", "official"): (simdinov2.RECIPE, SIMDINOV2_OFFICIAL, "NANODINO_OFFICIAL_SIMDINO"),
    ("simdinov2", "imagenet"): (simdinov2.RECIPE, SIMDINOV2_IMAGENET, "NANODINO_OFFICIAL_SIMDINO"),
}
ROWS = [(method, preset, row) for (method, preset), (_, table, _) in TABLES.items() for row in table]
IDS = [f"{m}-{p}-{row[1].split(':')[0] if row[1].startswith('code:') else row[1]}-{row[3]}" for m, p, row in ROWS]


def normal(v):
    """Lists as tuples and ints as floats where they stand for the same number (YAML's [0.4, 1])."""
    if isinstance(v, (list, tuple)):
        return tuple(normal(x) for x in v)
    if isinstance(v, int) and not isinstance(v, bool):
        return float(v)
    return v


@pytest.mark.parametrize("method, preset, row", ROWS, ids=IDS)
def test_preset_matches_the_official_config(method, preset, row):
    recipe = TABLES[(method, preset)][0]
    cfg = train.config_cli(recipe.Config, recipe.presets, ["--preset", preset])
    file, key, official, field = row[:4]
    expected = row[4] if len(row) > 4 else official
    if field in DERIVED:
        ours = DERIVED[field](cfg)
    else:
        assert hasattr(cfg, field), f"{method} has no flag --{field} for {key} = {official!r} ({file})"
        ours = getattr(cfg, field)
    assert normal(ours) == normal(expected), (
        f"--preset {preset}: {field} = {ours!r}, official {file} {key} = {official!r}"
        + (f" (ours should be {expected!r}: {row[5] if len(row) > 5 else ''})" if len(row) > 4 else ""))


def test_an_override_replaces_its_key():
    table = override([("a", "k", 1, "f"), ("a", "j", 2, "g")], [("b", "k", 3, "f")])
    assert table == [("a", "j", 2, "g"), ("b", "k", 3, "f")]


# ----------------------------------------------------------------------------------------------
# The transcription read back from the official files (where a checkout is given).

# The README command of each method's imagenet preset, by words it starts with.
COMMANDS = {"dino": "python run_with_submitit.py --arch vit_small --epochs 300",
            "simdino": "torchrun --nnodes=1 --nproc_per_node=8 main_dino.py"}


def read_back(path, key, method):
    """The value of `key` in the official file `path` (see the module docstring for the kinds)."""
    text = open(path).read()
    if key.startswith("code:"):
        return key[5:] in text
    if path.endswith((".yaml", ".yml")):
        value = read_yaml(path)
        for part in key.split("."):
            value = value[part]
        return value
    if key.startswith("--") and path.endswith(".md"):
        command = next(line for line in text.replace("\\\n", " ").splitlines() if COMMANDS[method] in line)
        found = re.findall(re.escape(key) + r"\s+([^\s\\]+)", command)
        if not found:
            raise KeyError(f"{key} in the command of {path}: {command}")
        return parse_scalar(found[0])
    tree = ast.parse(text)
    if key.startswith("--"):
        for node in ast.walk(tree):
            if (isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "add_argument" and node.args
                    and isinstance(node.args[0], ast.Constant) and node.args[0].value == key):
                return next(ast.literal_eval(k.value) for k in node.keywords if k.arg == "default")
        raise KeyError(f"{key} in {path}")
    cls, function, arg = key.split(".")
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef) and node.name == cls:
            for f in node.body:
                if isinstance(f, ast.FunctionDef) and f.name == function:
                    args = f.args.args[len(f.args.args) - len(f.args.defaults):]
                    return next(ast.literal_eval(d) for a, d in zip(args, f.args.defaults) if a.arg == arg)
    raise KeyError(f"{key} in {path}")


@pytest.mark.parametrize("method, preset, row", ROWS, ids=IDS)
def test_transcription_reads_back_from_the_official_file(method, preset, row):
    root = os.environ.get(TABLES[(method, preset)][2], "")
    file, key, official = row[:3]
    if not root or not os.path.isfile(os.path.join(root, file)):
        pytest.skip(f"set {TABLES[(method, preset)][2]} to a checkout holding {file}")
    found = read_back(os.path.join(root, file), key, method)
    if key.startswith("code:"):
        assert found, f"{file} no longer holds {key[5:]!r}"
    else:
        assert normal(found) == normal(official), f"{file} {key} = {found!r}, the table says {official!r}"
