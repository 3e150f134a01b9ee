"""Learning tests: a short default-recipe run on the synthetic data must lower its loss and lift
k-NN above both baselines (raw pixels, a randomly initialised ViT). Two to three minutes each on 2 cores."""
import json

import pytest
import torch

import data
import eval as eval_lib
import simdino
import train


@pytest.fixture(scope="module")
def baselines():
    """The default recipe's baselines (vit_pico/8 at 32 px), as the runs' summary lines cache them."""
    cfg = train.config_cli(simdino.SimDINOConfig, simdino.PRESETS, [])
    train_set, eval_set = data.load_dataset("synthetic", eval_size=32)
    out = train.cached_baselines(cfg, train_set, eval_set, torch.device("cpu"))
    return {name: top1 for name, (top1, _) in out.items()}


def short_run(tmp_path, module, Config, Method, epochs, extra=()):
    """In fp32: the numbers quoted below are fp32's, and --precision auto picks bf16 on some CPUs only."""
    cfg = train.config_cli(Config, module.PRESETS, ["--epochs", str(epochs), "--eval_every", str(epochs),
                                                    "--precision", "fp32", "--output_dir", str(tmp_path), *extra])
    train.train(cfg, Method)
    return [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def dinov2_run(tmp_path_factory):
    """The DINOv2 default recipe for 2 epochs: its log, and its checkpoint (the distillation teacher)."""
    import dinov2
    out = tmp_path_factory.mktemp("dinov2")
    return short_run(out, dinov2, dinov2.DINOv2Config, dinov2.DINOv2, epochs=2), out / "checkpoint.pth"


def test_simdino_learns(tmp_path, baselines, capsys):
    """The default 10-epoch recipe stopped after 240 steps (its first epoch and 84 steps; two whole
    epochs, 312 steps, cost a third more). Measured: k-NN 43.40, fast linear probe 47.35, against
    baselines 27.00 / 26.25."""
    log = short_run(tmp_path, simdino, simdino.SimDINOConfig, simdino.SimDINO, epochs=10,
                    extra=["--max_steps", "240"])
    assert log[-1]["train_loss"] < log[0]["train_loss"]
    assert log[-1]["knn_top1"] > max(baselines.values()) + 5, (log[-1]["knn_top1"], baselines)
    # the linear probe (fast mode) on the same checkpoint is above the k-NN baselines too
    capsys.readouterr()
    eval_lib.main(["linear", "--fast", "--checkpoint", str(tmp_path / "checkpoint.pth"), "--device", "cpu"])
    linear = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert linear["top1"] > max(baselines.values()) + 5, (linear, log[-1]["knn_top1"], baselines)


def test_dinov2_learns(dinov2_run, baselines):
    log, _ = dinov2_run
    assert log[-1]["train_loss"] < log[0]["train_loss"]
    assert log[-1]["knn_top1"] > max(baselines.values()) + 5, (log[-1]["knn_top1"], baselines)


def test_simdinov2_learns(tmp_path, baselines):
    """The default 10-epoch recipe stopped after 160 steps (its first epoch and 4 steps; a 2-epoch
    run costs 3.5 minutes on 2 cores). Measured: k-NN 50.10; loss -1.89 (epoch 0) -> -2.55 (the 4 steps after it)."""
    import simdinov2
    log = short_run(tmp_path, simdinov2, simdinov2.SimDINOv2Config, simdinov2.SimDINOv2, epochs=10,
                    extra=["--max_steps", "160"])
    assert log[-1]["train_loss"] < log[0]["train_loss"]
    assert log[-1]["knn_top1"] > max(baselines.values()) + 5, (log[-1]["knn_top1"], baselines)


def test_distilled_student_beats_the_same_student_from_scratch(dinov2_run, tmp_path, monkeypatch, capsys):
    """DINOv2 §5: a smaller ViT (64 wide, 3 blocks) trained 50 steps with the frozen 2-epoch
    ViT-pico above as its teacher, against the same ViT trained 50 steps from scratch; both with
    the same short recipe (no warm-ups, EMA momentum 0.9 so that the EMA, which is what k-NN
    evaluates, follows the student within 50 steps). Measured: 29.10 % from scratch, 29.85 %
    distilled; asserted: +0.5. A stronger teacher does not widen it at 50 steps (docs/SCALING.md,
    "Distillation": 27.20 with a 47.40 % teacher, 30.30 with 55.80 %): a weak test of a small gain."""
    import dinov2
    import vit
    monkeypatch.setitem(vit.ARCHS, "vit_test", (64, 3, 2))
    _, teacher = dinov2_run
    short = ["--arch", "vit_test", "--max_steps", "50", "--warmup_epochs", "0", "--freeze_last_layer", "0",
             "--warmup_teacher_temp_epochs", "0", "--momentum_teacher", "0.9"]
    scratch = short_run(tmp_path / "scratch", dinov2, dinov2.DINOv2Config, dinov2.DINOv2, 1, short)
    distilled = short_run(tmp_path / "distilled", dinov2, dinov2.DINOv2Config, dinov2.DINOv2Distillation, 1,
                          short + ["--distill_from", str(teacher)])
    with capsys.disabled():
        print(f"\nk-NN top-1 after 50 steps: from scratch {scratch[-1]['knn_top1']:.2f}, "
              f"distilled {distilled[-1]['knn_top1']:.2f}")
    assert distilled[-1]["knn_top1"] > scratch[-1]["knn_top1"] + 0.5, (distilled[-1], scratch[-1])


def test_curation_removes_planted_copies_and_retrieves_planted_neighbours(dinov2_run, tmp_path, capsys):
    """curate.py --demo with the 2-epoch DINOv2 backbone: a pool of 2,000 synthetic images with
    100 planted exact and 100 augmented copies, and an augmented copy of 100 of the 200 curated
    images. Measured with this backbone: exact copies all removed, augmented ones 66 %, precision
    0.99, planted neighbours retrieved 81 % (docs/SCALING.md, curation)."""
    from tools import curate
    _, checkpoint = dinov2_run
    curate.main(["--demo", str(tmp_path / "demo"), "--checkpoint", str(checkpoint)])
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["dedup_recall_exact"] == 1.0 and report["dedup_precision"] > 0.9, report
    assert report["dedup_recall_augmented"] > 0.4 and report["retrieval_recall_planted"] > 0.6, report
    train_set, held_out = data.load_dataset("list", str(tmp_path / "demo" / "curated.txt"), eval_size=32)
    assert len(train_set) + len(held_out) == report["written"] and train_set.classes == 10


@pytest.mark.parametrize("task,metric", [("retrieval", "mAP"), ("discover", "AP50")])
def test_trained_backbone_beats_random_init_on_other_tasks(dinov2_run, task, metric, tmp_path, capsys):
    """tasks.py on the 2-epoch DINOv2 backbone against a random ViT-pico/8 (--baselines). Measured
    on the 2-epoch state of the default 10-epoch run: retrieval mAP 2.6 vs 1.4, discover AP50 21.3
    vs 12.8. (seg, video and copy detection do not beat random init with these backbones yet:
    docs/EVALUATION.md, "Other evaluations".)"""
    _, checkpoint = dinov2_run
    capsys.readouterr()
    eval_lib.main([task, "--checkpoint", str(checkpoint), "--baselines", "--device", "cpu",
                   "--output_dir", str(tmp_path)])
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out[metric] > out[f"random_vit_{metric}"], out
