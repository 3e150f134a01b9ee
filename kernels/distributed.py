"""torchrun / DDP plumbing, written once for the four methods.

Under `torchrun --nproc_per_node=N file.py` (one node) or `torchrun --nnodes=M --node_rank=i
--rdzv_endpoint=HOST:PORT ...` (several), torchrun sets RANK, WORLD_SIZE and LOCAL_RANK; `setup`
turns them into a process group (NCCL on GPU, Gloo on CPU) and the device of this rank. Without
torchrun everything runs in one process and no collective is ever called: every helper here
checks `is_distributed()` first.
"""
import os
import random

import numpy as np
import torch
import torch.distributed as dist


def is_distributed():
    return dist.is_available() and dist.is_initialized()


def rank():
    return dist.get_rank() if is_distributed() else 0


def world_size():
    return dist.get_world_size() if is_distributed() else 1


def is_main():
    return rank() == 0


def print0(*args, **kwargs):
    """print on rank 0 only."""
    if is_main():
        print(*args, **kwargs, flush=True)


def choose_device(name="auto"):
    """'auto' -> cuda if available, else mps, else cpu. Under torchrun each rank takes the GPU of
    its LOCAL_RANK."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("--device cuda was asked for but no CUDA GPU is available")
        local = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local)
        return torch.device("cuda", local)
    if name == "mps" and not torch.backends.mps.is_available():
        raise RuntimeError("--device mps was asked for but MPS is not available")
    return torch.device(name)


def setup(device="auto"):
    """Start the process group when torchrun launched us; return this rank's device."""
    dev = choose_device(device)
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ and not is_distributed():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, device_id=dev if dev.type == "cuda" else None)
    return dev


def cleanup():
    if is_distributed():
        dist.barrier()
        dist.destroy_process_group()


def seed_everything(seed):
    """Seed Python, NumPy and torch with the same seed on every rank, so that the model starts
    the same everywhere: DDP broadcasts the student's weights, not the teacher's. What must differ
    per rank (crops, masks, stochastic depth) is seeded per step and rank by the training loop."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def all_reduce_sum(x):
    """Sum over ranks in place (a no-op in one process); returns x."""
    if is_distributed():
        dist.all_reduce(x)
    return x


def all_gather_cat(x, dim=0):
    """Concatenate a tensor over ranks along dim, in rank order (sizes along dim may differ per
    rank, 0 included; the other dims are the same everywhere)."""
    if not is_distributed():
        return x
    x = x.movedim(dim, 0)
    sizes = all_gather_object(len(x))
    padded = torch.cat([x, x.new_zeros((max(sizes) - len(x), *x.shape[1:]))])   # the same shape on every rank
    out = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(out, padded)
    return torch.cat([o[:s] for o, s in zip(out, sizes)]).movedim(0, dim)


def all_gather_object(obj):
    """The list of every rank's Python object ([obj] in one process)."""
    if not is_distributed():
        return [obj]
    out = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj):
    """Rank 0's Python object on every rank."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def wrap_ddp(module, device):
    """DistributedDataParallel around a module when a process group runs, else the module."""
    if not is_distributed():
        return module
    ids = [device.index] if device.type == "cuda" else None
    return torch.nn.parallel.DistributedDataParallel(module, device_ids=ids)


def unwrap(module):
    return module.module if isinstance(module, torch.nn.parallel.DistributedDataParallel) else module
