"""eval.py's pictures (attention maps, PCA of patch features, curves) from each method's
checkpoint, strict checkpoint loading, and DINO's 60 %-mass attention threshold."""
import dataclasses
import json
import os

import pytest
import torch
from PIL import Image

import dino
import dinov2
import eval as eval_lib
import simdino
import simdinov2
import train

METHODS = {"dino": (dino, dino.DINOConfig, dino.DINO), "simdino": (simdino, simdino.SimDINOConfig, simdino.SimDINO),
           "dinov2": (dinov2, dinov2.DINOv2Config, dinov2.DINOv2),
           "simdinov2": (simdinov2, simdinov2.SimDINOv2Config, simdinov2.SimDINOv2)}


def checkpoint(tmp_path, name, flags=()):
    module, Config, Method = METHODS[name]
    cfg = train.config_cli(Config, module.PRESETS, list(flags))
    method = Method(cfg)
    path = tmp_path / f"{name}.pth"
    train.save_checkpoint(path, {**train.split_state(method.state_dict()), "optimizer": {}, "step": 0,
                                 "config": json.loads(json.dumps(dataclasses.asdict(cfg)))})
    return str(path)


@pytest.mark.parametrize("name, flags", [("dino", []), ("simdino", []),
                                         ("dinov2", ["--num_register_tokens", "2", "--layerscale", "1e-5"]),
                                         ("simdinov2", [])])
def test_pictures_are_written_for_each_method(name, flags, tmp_path, capsys):
    ckpt = checkpoint(tmp_path, name, flags)
    for command in ("attention", "pca"):
        eval_lib.main([command, "--checkpoint", ckpt, "--output_dir", str(tmp_path), "--device", "cpu",
                       "--num_images", "3"])
        png = tmp_path / f"{command}.png"
        assert png.stat().st_size > 5000
        w, h = Image.open(png).size
        assert w > 200 and h > 200


def test_curves_picture(tmp_path):
    for run, losses in (("a", [5.0, 4.0, 3.5]), ("b", [6.0, 5.0, 4.5])):
        (tmp_path / run).mkdir()
        with open(tmp_path / run / "log.jsonl", "w") as f:
            for e, l in enumerate(losses):
                f.write(json.dumps({"epoch": e, "step": e, "train_loss": l, "knn_top1": 20.0 + 5 * e}) + "\n")
    eval_lib.main(["curves", "--logs", str(tmp_path / "a"), str(tmp_path / "b" / "log.jsonl"),
                   "--output_dir", str(tmp_path)])
    assert (tmp_path / "curves.png").stat().st_size > 5000


def test_keep_mass_keeps_the_smallest_set_with_60_percent():
    a = torch.tensor([[0.5, 0.05, 0.3, 0.15], [0.25, 0.25, 0.25, 0.25]])
    assert eval_lib.keep_mass(a).tolist() == [[True, False, False, False], [True, True, False, False]]
    assert eval_lib.keep_mass(torch.tensor([0.1, 0.9])).tolist() == [False, True]   # at least the top one


def test_wrong_checkpoints_are_one_line_errors(tmp_path):
    ckpt = torch.load(checkpoint(tmp_path, "dino"), weights_only=True)
    ckpt["config"]["patch_size"] = 4                      # a config that does not match the weights
    torch.save(ckpt, tmp_path / "wrong.pth")
    with pytest.raises(ValueError, match="do not fit|do not match"):
        eval_lib.load_backbone(str(tmp_path / "wrong.pth"), torch.device("cpu"))
    (tmp_path / "text.pth").write_text("not a checkpoint")
    with pytest.raises(ValueError, match="cannot read checkpoint"):
        eval_lib.load_backbone(str(tmp_path / "text.pth"), torch.device("cpu"))
    torch.save({"weights": torch.zeros(2)}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match="holds no ViT backbone"):
        eval_lib.load_backbone(str(tmp_path / "other.pth"), torch.device("cpu"))


def test_checkpoint_with_pickled_code_is_refused_by_eval(tmp_path):
    from test_robust import RunsCode
    marker = tmp_path / "ran"
    torch.save({"config": {}, "method": RunsCode(marker)}, tmp_path / "evil.pth")
    with pytest.raises(ValueError, match="could run code"):
        eval_lib.load_backbone(str(tmp_path / "evil.pth"), torch.device("cpu"))
    assert not marker.exists()
