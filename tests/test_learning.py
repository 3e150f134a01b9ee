"""Learning tests: a short default-recipe run on the synthetic data must lower its loss and lift
k-NN above both baselines (raw pixels, a randomly initialised ViT). About a minute each on 2 cores."""
import json

import pytest
import torch

import data
import eval as eval_lib
import simdino
import train


@pytest.fixture(scope="module")
def baselines():
    train_set, eval_set = data.load_dataset("synthetic")
    out = eval_lib.baselines("vit_pico", 8, train_set, eval_set, 32, torch.device("cpu"))
    return {name: top1 for name, (top1, _) in out.items()}


def short_run(tmp_path, module, Config, Method, epochs):
    cfg = train.config_cli(Config, module.PRESETS, ["--epochs", str(epochs), "--eval_every", str(epochs),
                                                    "--output_dir", str(tmp_path)])
    train.train(cfg, Method)
    return [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]


def test_simdino_learns(tmp_path, baselines, capsys):
    log = short_run(tmp_path, simdino, simdino.SimDINOConfig, simdino.SimDINO, epochs=2)
    assert log[-1]["train_loss"] < log[0]["train_loss"]
    assert log[-1]["knn_top1"] > max(baselines.values()) + 5, (log[-1]["knn_top1"], baselines)
    # the linear probe (fast mode) on the same checkpoint is above the k-NN baselines too
    capsys.readouterr()
    eval_lib.main(["linear", "--fast", "--checkpoint", str(tmp_path / "checkpoint.pth"), "--device", "cpu"])
    linear = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert linear["top1"] > max(baselines.values()) + 5, (linear, log[-1]["knn_top1"], baselines)


def test_dinov2_learns(tmp_path, baselines):
    import dinov2
    log = short_run(tmp_path, dinov2, dinov2.DINOv2Config, dinov2.DINOv2, epochs=2)
    assert log[-1]["train_loss"] < log[0]["train_loss"]
    assert log[-1]["knn_top1"] > max(baselines.values()) + 5, (log[-1]["knn_top1"], baselines)


def test_simdinov2_learns(tmp_path, baselines):
    import simdinov2
    log = short_run(tmp_path, simdinov2, simdinov2.SimDINOv2Config, simdinov2.SimDINOv2, epochs=2)
    assert log[-1]["train_loss"] < log[0]["train_loss"]
    assert log[-1]["knn_top1"] > max(baselines.values()) + 5, (log[-1]["knn_top1"], baselines)
