"""Checkpoints in the official layouts (DINO, DINOv2, SimDINO) read by eval.load_backbone, and the
linear probe's pieces. The official code itself is not needed: the layouts are written out here
as the official scripts save them."""
import argparse
import json

import pytest
import torch

import eval as eval_lib
from vit import build_vit

CPU = torch.device("cpu")

# The official parameter names (facebookresearch/dino vision_transformer.py; dinov2
# models/vision_transformer.py and layers/): our state dict must use exactly these.
DINO_KEYS = {"cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias", "norm.weight", "norm.bias"}
BLOCK_KEYS = {f"{m}.{p}" for m in ("norm1", "norm2", "attn.qkv", "attn.proj") for p in ("weight", "bias")}
MLP_KEYS = {f"mlp.{m}.{p}" for m in ("fc1", "fc2") for p in ("weight", "bias")}
SWIGLU_KEYS = {f"mlp.{m}.{p}" for m in ("w12", "w3") for p in ("weight", "bias")}


def dinov2_style():
    """A DINOv2 backbone with everything: 4 registers, LayerScale, SwiGLU, the mask token."""
    return build_vit("vit_pico", 8, img_size=32, num_register_tokens=4, layerscale=0.1, ffn_layer="swiglufused",
                     use_mask_token=True, interpolate_offset=0.0, interpolate_antialias=True)


def randomised(model):
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


def test_our_keys_are_the_official_ones():
    depth = 4
    dino = set(build_vit("vit_pico", 8, img_size=32).state_dict())
    assert dino == DINO_KEYS | {f"blocks.{i}.{k}" for i in range(depth) for k in BLOCK_KEYS | MLP_KEYS}
    v2 = set(dinov2_style().state_dict())
    assert v2 == DINO_KEYS | {"register_tokens", "mask_token"} | {
        f"blocks.{i}.{k}" for i in range(depth) for k in BLOCK_KEYS | SWIGLU_KEYS | {"ls1.gamma", "ls2.gamma"}}


def official_files(model, tmp_path):
    """The model's weights saved in each official layout: {name: path}."""
    sd, head = model.state_dict(), {"head.mlp.0.weight": torch.zeros(3, 3), "head.last_layer.weight_g": torch.ones(3, 1)}
    teacher = {**{f"backbone.{k}": v for k, v in sd.items()}, **head}
    chunked = {}  # DINOv2's FSDP block chunks: blocks.<chunk>.<i>. with 2 blocks per chunk
    for k, v in sd.items():
        if k.startswith("blocks."):
            i = int(k.split(".")[1])
            k = f"blocks.{i // 2}.{i}." + k.split(".", 2)[2]
        chunked[k] = v
    layouts = {
        "released_backbone": sd,                                                        # dino_vits16 / dinov2_vits14_reg
        "dino_checkpoint": {"teacher": teacher, "epoch": 3,                              # main_dino.py checkpoint.pth
                            "student": {f"module.{k}": torch.zeros_like(v) for k, v in teacher.items()},
                            "args": argparse.Namespace(arch="vit_pico", patch_size=8, lr=5e-4)},
        "dinov2_training": {"model": {**{f"teacher.backbone.{k}": v for k, v in chunked.items()},   # fvcore model_final.pth
                                      "teacher.dino_head.mlp.0.weight": torch.zeros(3, 3),
                                      **{f"student.backbone.{k}": torch.zeros_like(v) for k, v in chunked.items()}},
                            "iteration": 10},
        "dinov2_teacher_checkpoint": {"teacher": {**{f"backbone.{k}": v for k, v in sd.items()},   # eval/*/teacher_checkpoint.pth
                                                  "dino_head.mlp.0.weight": torch.zeros(3, 3)}},
    }
    paths = {}
    for name, obj in layouts.items():
        paths[name] = str(tmp_path / f"{name}.pth")
        torch.save(obj, paths[name])
    return paths


@pytest.mark.parametrize("style", ["dino", "dinov2"])
def test_round_trip_through_the_official_layouts(style, tmp_path):
    model = randomised(build_vit("vit_pico", 8, img_size=32) if style == "dino" else dinov2_style())
    x, x_big = torch.randn(2, 3, 32, 32), torch.randn(2, 3, 48, 48)   # 48: interpolated position embedding
    masks = torch.rand(2, 16) < 0.4
    for name, path in official_files(model, tmp_path).items():
        loaded, cfg = eval_lib.load_backbone(path, CPU)
        assert cfg is None
        assert loaded.num_register_tokens == model.num_register_tokens, name
        with torch.no_grad():
            for inp in (x, x_big):
                a, b = model.forward_features(inp), loaded.forward_features(inp)
                for k in ("x_norm_clstoken", "x_norm_regtokens", "x_norm_patchtokens"):
                    assert torch.equal(a[k], b[k]), (name, k, inp.shape)
            if style == "dinov2":
                assert torch.equal(model.forward_features(x, masks)["x_norm_patchtokens"],
                                   loaded.forward_features(x, masks)["x_norm_patchtokens"])
    student, _ = eval_lib.load_backbone(official_files(model, tmp_path)["dino_checkpoint"], CPU, key="student")
    assert all((p == 0).all() for p in student.parameters())   # the other network of the file


def test_our_checkpoint_has_the_official_layout(tmp_path):
    import dino
    import train
    cfg = train.config_cli(dino.DINOConfig, dino.PRESETS, [])
    method = dino.DINO(cfg)
    state = train.split_state(method.state_dict())
    assert set(state["method"]) == {"center"}
    assert set(state["teacher"]) == {f"backbone.{k}" for k in method.teacher.backbone.state_dict()} | {
        f"head.{k}" for k in method.teacher.head.state_dict()}
    assert train.join_state(state).keys() == method.state_dict().keys()


def test_wrong_official_checkpoints_are_one_line_errors(tmp_path):
    path = official_files(randomised(build_vit("vit_pico", 8, img_size=32)), tmp_path)["released_backbone"]
    with pytest.raises(ValueError, match=r"holds a vit_pico/8, not the requested vit_small/8"):
        eval_lib.load_backbone(path, CPU, arch="vit_small")
    with pytest.raises(ValueError, match=r"holds a vit_pico/8, not the requested vit_pico/16"):
        eval_lib.load_backbone(path, CPU, patch_size=16)
    sd = build_vit("vit_pico", 8, img_size=32).state_dict()
    torch.save({k: v for k, v in sd.items() if not k.startswith("blocks.3.")} | {"blocks.3.norm1.weight": torch.ones(96)},
               tmp_path / "partial.pth")
    with pytest.raises(ValueError, match="keys do not match.*missing"):
        eval_lib.load_backbone(str(tmp_path / "partial.pth"), CPU)
    torch.save({k: v for k, v in sd.items() if not k.startswith("blocks.3.")}, tmp_path / "depth3.pth")
    with pytest.raises(ValueError, match="width 96 and depth 3 is none of"):
        eval_lib.load_backbone(str(tmp_path / "depth3.pth"), CPU)
    with pytest.raises(ValueError, match="does not exist"):
        eval_lib.load_backbone(str(tmp_path / "nothing.pth"), CPU)
    torch.save([1, 2], tmp_path / "list.pth")
    with pytest.raises(ValueError, match="not a state dict"):
        eval_lib.load_backbone(str(tmp_path / "list.pth"), CPU)


def test_eval_cli_on_an_official_backbone(tmp_path, capsys):
    path = official_files(randomised(build_vit("vit_pico", 8, img_size=32)), tmp_path)["released_backbone"]
    with pytest.raises(SystemExit, match="give --data"):
        eval_lib.main(["knn", "--checkpoint", path, "--device", "cpu"])
    with pytest.raises(SystemExit, match="not divisible by the patch size 8"):
        eval_lib.main(["knn", "--checkpoint", path, "--device", "cpu", "--data", "synthetic", "--image_size", "36"])
    eval_lib.main(["pca", "--checkpoint", path, "--device", "cpu", "--data", "synthetic", "--output_dir",
                   str(tmp_path), "--num_images", "2"])
    assert (tmp_path / "pca.png").stat().st_size > 1000


def test_probe_features_follow_the_official_recipe():
    model = randomised(dinov2_style())
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        layers = model.get_intermediate_layers(x, 4)
        f = eval_lib.probe_features(model, x, 4, avgpool=True)
        assert f.shape == (2, 5 * 96)
        assert torch.equal(f[:, 3 * 96:4 * 96], model(x))                          # last block's CLS
        assert torch.allclose(f[:, 4 * 96:], layers[-1][:, 5:].mean(1))             # patches, not registers
    assert eval_lib.probe_recipe(model) == (4, False)
    assert eval_lib.probe_recipe(build_vit("vit_base", 16)) == (1, True)


def test_accuracy_and_logistic_regression():
    logits = torch.tensor([[3.0, 2, 1, 0, 0, 0], [0, 0, 0, 1, 2, 3], [1, 2, 3, 4, 5, 6]])
    labels = torch.tensor([0, 4, 0])
    top1, top5 = eval_lib._accuracy(logits, labels)
    assert top1 == pytest.approx(100 / 3) and top5 == pytest.approx(200 / 3)
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(4, 16, generator=g) * 3
    y = torch.randint(0, 4, (400,), generator=g)
    x = centres[y] + torch.randn(400, 16, generator=g)
    (top1, _), wd = eval_lib.logistic_regression(x[:300], y[:300], x[300:], y[300:], 4)
    assert top1 == 100.0
    (top1, _), _ = eval_lib.logistic_regression(x[:300], y[:300], x[300:], y[torch.randperm(100, generator=g) + 300], 4)
    assert top1 < 60   # shuffled labels: chance level, not a probe that cannot fail


def test_linear_cli_runs_both_modes(tmp_path, capsys):
    import data
    import dino
    import train
    from PIL import Image
    images, labels = data.make_synthetic(80, seed=1)
    for i, (im, y) in enumerate(zip(images, labels.tolist())):   # a small image folder: fast, and the
        (tmp_path / "imgs" / str(y)).mkdir(parents=True, exist_ok=True)   # probe's crops come from workers
        Image.fromarray(im.permute(1, 2, 0).numpy()).save(tmp_path / "imgs" / str(y) / f"{i}.png")
    cfg = train.config_cli(dino.DINOConfig, dino.PRESETS, ["--data", "imagefolder", "--data_path", str(tmp_path / "imgs")])
    path = tmp_path / "ckpt.pth"
    train.save_checkpoint(path, {**train.split_state(dino.DINO(cfg).state_dict()), "optimizer": {}, "step": 0,
                                 "config": json.loads(json.dumps(vars(cfg)))})
    for flags in (["--fast"], ["--epochs", "2", "--batch_size_per_gpu", "16", "--num_workers", "1"]):
        eval_lib.main(["linear", "--checkpoint", str(path), "--device", "cpu", *flags])
        out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        assert out["n_last_blocks"] == 4 and out["avgpool_patchtokens"] is False
        assert 0 <= out["top1"] <= out["top5"] <= 100
