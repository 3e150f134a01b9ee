"""Training-step benchmark: median step time, images/s, peak memory, and MFU on a GPU.

    python benchmarks/bench.py                          # CPU: the default synthetic config, and ViT-S/16 2x224+10x96 at batch 8
    python benchmarks/bench.py --device cuda            # GPU: ViT-S/16, 2x224 + 10x96, batch 64, bf16
    python benchmarks/bench.py --method simdino ...     # any method file with the same contract
    python benchmarks/bench.py --drop_path 0.4          # stochastic depth: the branches on the kept samples only vs all
    torchrun --nproc_per_node=2 benchmarks/bench.py --threads 1 --config default   # scaling: DDP over processes

A step is everything the loop does per batch: multi-crop augmentation of uint8 images, teacher
and student forward, loss, backward, clipping, AdamW, EMA. Numbers are printed, never asserted.
"""
import argparse
import dataclasses
import importlib
import json
import os
import resource
import statistics
import sys
import time
import warnings

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root

import torch

import data as data_lib
import train as train_lib
from kernels import distributed as dist
from vit import ARCHS, build_vit


def vit_forward_flops(arch, patch, size, batch):
    """Matmul FLOPs of one ViT forward: per block 24·T·D² (qkv, proj, MLP) + 4·T²·D (QKᵀ, AV)."""
    D, depth, _ = ARCHS[arch]
    T = 1 + (size // patch) ** 2
    return batch * (depth * (24 * T * D * D + 4 * T * T * D) + 2 * (T - 1) * 3 * patch * patch * D)


# Dense bf16 tensor-core peaks from the datasheets (FLOP/s, without sparsity), by device name.
DATASHEET_BF16 = {"H200": 989.4e12, "H100 SXM": 989.4e12, "H100 NVL": 835.5e12, "H100 PCIe": 756.5e12,
                  "H100": 989.4e12, "A100": 312e12, "L40S": 362.05e12, "L4": 121e12, "A10": 125e12}


def datasheet_peak(device):
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in DATASHEET_BF16.items() if key in name), None)


def head_flops(method, batch, crops):
    """Matmul FLOPs of the student's heads forward on the CLS tokens of all crops (DINOv2's iBOT
    patch logits not counted): 2 per weight of each 2-D head matrix per token."""
    head = dist.unwrap(method.student).head
    weights = sum(p.numel() for n, p in head.named_parameters() if p.dim() == 2 and min(p.shape) > 1)
    return 2 * weights * batch * crops


def matmul_peak(device, dtype=torch.bfloat16, n=8192, reps=20):
    """Measured dense matmul throughput (FLOP/s), the denominator of MFU."""
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    torch.cuda.synchronize()
    return 2 * n ** 3 * reps / (time.perf_counter() - t)


def coding_rate_ms(coding_rate, cfg, device, sync, reps=20):
    """Median forward + backward time of the coding rate on one step's shapes: 2 global views of
    B unit vectors of the head's width."""
    B, d = cfg.batch_size_per_gpu, cfg.head_bottleneck_dim
    Z = torch.nn.functional.normalize(torch.randn(2, B, d, device=device), dim=-1)
    times = []
    for _ in range(reps + 3):
        Zi = Z.clone().requires_grad_()
        sync()
        t = time.perf_counter()
        coding_rate(Zi, cfg.eps).mean().backward()
        sync()
        times.append(time.perf_counter() - t)
    return 1e3 * statistics.median(times[3:])


def bench(module, overrides, device, steps=10, warmup=3):
    recipe = module.RECIPE
    names = {f.name for f in dataclasses.fields(recipe.Config)}
    cfg = recipe.Config(**{k: v for k, v in {**recipe.presets["synthetic"], **overrides, "device": device.type}.items()
                           if k in names})
    method = recipe.Method(cfg, steps_per_epoch=1000).to(device)
    groups = method.param_groups()
    method.student = dist.wrap_ddp(method.student, device)   # under torchrun: DDP, as train.py
    opt = torch.optim.AdamW(groups, lr=1e-4, fused=device.type == "cuda")
    precision, why = train_lib.resolve_precision(cfg.precision, device)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    guard = train_lib.NonFiniteGuard("-")
    augment = data_lib.MultiCrop(cfg.global_crops_size, cfg.local_crops_size, cfg.global_crops_scale,
                                 cfg.local_crops_scale, cfg.local_crops_number, blur_kernel_size=cfg.blur_kernel_size)
    B = cfg.batch_size_per_gpu
    images = torch.randint(0, 256, (B, 3, cfg.global_crops_size, cfg.global_crops_size), dtype=torch.uint8)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    images = images.to(device)

    def one_step(i):  # train.py's step: crops, loss, backward, clip, the non-finite guard, AdamW, EMA
        crops = augment(images, torch.Generator().manual_seed(i))
        with train_lib.autocast(device, precision):
            loss, logs = method(crops, i)
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
        norms = train_lib.clip_groups(groups, cfg.clip_grad)
        guard.update(i, loss, logs, [] if scaler.is_enabled() else norms, [])
        scaler.step(opt)
        scaler.update()
        train_lib.ema_update(dist.unwrap(method.student), method.teacher, 0.996)

    times, syncs = [], None
    for i in range(warmup + steps):
        if device.type == "cuda" and i == warmup - 1:  # the host-device synchronisations of one step
            torch.cuda.synchronize()
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                torch.cuda.set_sync_debug_mode("warn")
                one_step(i)
                torch.cuda.set_sync_debug_mode("default")
            syncs = [str(w.message).split("\n")[0] for w in caught if "synchroniz" in str(w.message)]
            continue
        sync()
        t = time.perf_counter()
        one_step(i)
        sync()
        if i >= warmup:
            times.append(time.perf_counter() - t)
    guard.check()
    step = statistics.median(times)
    if syncs is not None:
        res_syncs = {"host_syncs_per_step": len(syncs), "host_syncs": sorted(set(syncs))[:5]}
    peak = (torch.cuda.max_memory_allocated() if device.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    res = {"method": module.__name__, "arch": f"{cfg.arch}/{cfg.patch_size}",
           "crops": f"2x{cfg.global_crops_size}+{cfg.local_crops_number}x{cfg.local_crops_size}",
           "batch": B, "precision": f"{precision} ({why})", "device": str(device), "median_step_s": round(step, 4),
           "images_per_s": round(B / step, 1), "processes": dist.world_size(),
           "images_per_s_all_processes": round(B * dist.world_size() / step, 1), "peak_memory_MiB": round(peak / 2 ** 20),
           "peak_is": "max allocated" if device.type == "cuda" else "process max RSS"}
    # model FLOPs: student forward + backward (3x) on all crops, teacher forward on the globals;
    # the backbones' matmuls and the heads' on the CLS tokens
    g = vit_forward_flops(cfg.arch, cfg.patch_size, cfg.global_crops_size, B)
    l = vit_forward_flops(cfg.arch, cfg.patch_size, cfg.local_crops_size, B) * cfg.local_crops_number
    heads = head_flops(method, B, 2 + cfg.local_crops_number)
    flops = 3 * (2 * g + l + heads) + 2 * g + heads * 2 / (2 + cfg.local_crops_number)
    res["model_TFLOP_per_step"] = round(flops / 1e12, 3)
    if hasattr(module, "coding_rate"):   # SimDINO's expansion term: its share of the step
        res["coding_rate_ms"] = round(coding_rate_ms(module.coding_rate, cfg, device, sync), 3)
        res["coding_rate_percent_of_step"] = float(f"{100 * res['coding_rate_ms'] / 1e3 / step:.2g}")
    if device.type == "cuda":
        peak_flops = matmul_peak(device)
        res["matmul_peak_TFLOPs"] = round(peak_flops / 1e12, 1)
        res["MFU"] = round(flops / step / peak_flops, 3)
        if datasheet_peak(device):
            res["datasheet_peak_TFLOPs"] = round(datasheet_peak(device) / 1e12, 1)
            res["MFU_datasheet"] = round(flops / step / datasheet_peak(device), 3)
        res.update(res_syncs)
    return res


def drop_path_bench(rate, device, arch="vit_small", patch=16, size=224, batch=16, reps=10):
    """Forward + backward of a ViT in training mode with uniform stochastic depth at `rate`:
    DINOv2's efficient version (the residual branches computed for the kept samples only) against
    the plain one (computed for all, the dropped zeroed), same weights, alternating A/B."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    models = {e: build_vit(arch, patch, img_size=size, drop_path_rate=rate, drop_path_uniform=True,
                           efficient_drop_path=e).to(device).train() for e in (True, False)}
    models[False].load_state_dict(models[True].state_dict())
    x = torch.randn(batch, 3, size, size, device=device)
    times = {True: [], False: []}
    for i in range(2 * (reps + 2)):
        e = i % 2 == 0
        sync()
        t = time.perf_counter()
        models[e](x).sum().backward()
        sync()
        if i >= 4:
            times[e].append(time.perf_counter() - t)
    eff, plain = statistics.median(times[True]), statistics.median(times[False])
    ratios = sorted(a / b for a, b in zip(times[True], times[False]))
    return {"bench": "stochastic depth", "arch": f"{arch}/{patch}", "size": size, "batch": batch, "rate": rate,
            "device": str(device), "plain_median_s": round(plain, 4), "efficient_median_s": round(eff, 4),
            "ratio_efficient_over_plain": round(eff / plain, 3),
            "pair_ratios_min_median_max": [round(ratios[0], 3), round(statistics.median(ratios), 3), round(ratios[-1], 3)]}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--method", default="dino")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--drop_path", type=float, default=0.0, help="benchmark stochastic depth at this rate instead")
    p.add_argument("--config", default="all", choices=("all", "default", "vits16"),
                   help="CPU: the default synthetic config, ViT-S/16 at batch 8, or both")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.drop_path:
        batch = 16 if args.device == "cpu" else 128
        print(json.dumps(drop_path_bench(args.drop_path, torch.device(args.device), batch=batch)), flush=True)
        return
    module = importlib.import_module(args.method)
    device = dist.setup(args.device)     # a process group under torchrun (Gloo on CPU), else nothing
    vits16 = dict(arch="vit_small", patch_size=16, global_crops_size=224, local_crops_size=96,
                  local_crops_number=10, out_dim=65536, head_hidden_dim=2048, head_bottleneck_dim=256,
                  drop_path_rate=0.1)
    if device.type == "cpu":
        configs = {"all": [{}, dict(vits16, batch_size_per_gpu=8)], "default": [{}],
                   "vits16": [dict(vits16, batch_size_per_gpu=8)]}[args.config]
    else:
        configs = [dict(vits16, batch_size_per_gpu=64, precision="bf16"),
                   dict(vits16, arch="vit_base", batch_size_per_gpu=64, precision="bf16")]
    for overrides in configs:
        dist.print0(json.dumps(bench(module, overrides, device, steps=args.steps)))
    dist.cleanup()


if __name__ == "__main__":
    main()
