"""No host-device synchronisation inside a training step: the augmentation copies its random
parameters to the device once, and a step of each method (forward, loss, backward, clipping, the
non-finite guard, AdamW, EMA) reads nothing back on the host; the loop reads the logs and the
guard once per logging interval."""
import importlib

import pytest
import torch
from torch.overrides import TorchFunctionMode

import data
import train
from host_syncs import HostSyncs


class Copies(TorchFunctionMode):
    """Counts the host -> device copies: .to() of a CPU tensor to another device, torch.tensor(device=)."""
    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        src = args[0] if args and torch.is_tensor(args[0]) else None
        if torch.is_tensor(out) and out.device.type != "cpu" and (
                (getattr(func, "__name__", "") in ("to", "cuda", "copy_") and src is not None and src.device.type == "cpu")
                or func in (torch.tensor, torch.as_tensor)):
            self.count += 1
        return out


@pytest.mark.parametrize("local_number, blur_kernel_size", [(3, 0), (0, 9)])
def test_multicrop_copies_its_draws_to_the_device_once(local_number, blur_kernel_size):
    """On the meta device (shapes only, no values: any read of a value on the host fails), every
    parameter of a step's crops reaches the device in one copy."""
    images = torch.randint(0, 256, (6, 3, 40, 40), dtype=torch.uint8).to("meta")
    augment = data.MultiCrop(32, 16, local_number=local_number, blur_kernel_size=blur_kernel_size)
    augment(images, torch.Generator().manual_seed(0))   # the ImageNet mean and std reach the device once
    with Copies() as copies:
        crops = augment(images, torch.Generator().manual_seed(1))
    assert copies.count == 1 and len(crops) == 2 + local_number and crops[0].device.type == "meta"


# The host-side draws: on the CPU by design, before their one copy to the device.
HOST = {"photometric_draws", "random_resized_crop_boxes", "sample_masks", "block_mask", "ibot_weights",
        "seed_step", "schedules"}


@pytest.mark.parametrize("name", ["dino", "simdino", "dinov2", "simdinov2"])
def test_a_training_step_reads_nothing_back_on_the_host(name, tmp_path, monkeypatch):
    """Three steps of train.train under HostSyncs, the calls sorted by step (a mark at each step's
    seeding): the first two steps (no log line: the loop prints every quarter epoch and at the
    end) make none; the third prints and reads its logs and the guard."""
    recipe = importlib.import_module(name).RECIPE
    cfg = train.config_cli(recipe.Config, recipe.presets, [
        "--max_steps", "3", "--batch_size_per_gpu", "16", "--local_crops_number", "2", "--eval_every", "0",
        "--precision", "fp32", "--checkpoint_minutes", "0", "--output_dir", str(tmp_path)])
    syncs = HostSyncs(host=HOST)
    seed_step = train.seed_step
    monkeypatch.setattr(train, "seed_step", lambda *a: (syncs.mark(), seed_step(*a))[1])
    with syncs:
        train.train(cfg, recipe.Method)
    assert len(syncs.marks) == 3
    assert syncs.section(1) == [] and syncs.section(2) == [], syncs.section(1) + syncs.section(2)
    assert any(call == "item" or call == "__float__" or "format" in call for call, _ in syncs.section(3))
