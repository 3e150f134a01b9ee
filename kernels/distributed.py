"""torchrun / DDP / FSDP2 plumbing, written once for the four methods.

Under `torchrun --nproc_per_node=N file.py` (one node) or `torchrun --nnodes=M --node_rank=i
--rdzv_endpoint=HOST:PORT ...` (several), torchrun sets RANK, WORLD_SIZE and LOCAL_RANK; `setup`
turns them into a process group (NCCL on GPU, Gloo on CPU) and the device of this rank. Without
torchrun everything runs in one process and no collective is ever called: every helper here
checks `is_distributed()` first.
"""
import contextlib
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


def wrap_fsdp(student, teacher):
    """FSDP2 (torch.distributed.fsdp.fully_shard) on the student and the EMA teacher, in place and
    alike: one unit per transformer block plus the root (embeddings, tokens, final norm, heads); each
    parameter becomes a DTensor of which each rank holds a 1/world_size slice along dim 0. Sharded
    alike, the EMA (train.ema_update) lerps each rank's teacher slice with its student slice.
    The teacher has no backward, so its root too gives its gathered parameters back after each
    forward (FSDP2 keeps a root's for the backward); DINOv2's teacher_forward gathers as forward
    does. Call it before the optimiser is built: the parameters are replaced by their shards.
    Without a process group there is nothing to shard: a no-op."""
    if not is_distributed():
        return
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method
    for net in (student, teacher):
        for block in net.backbone.blocks:
            fully_shard(block)
        fully_shard(net, reshard_after_forward=True if net is teacher else None)
    if hasattr(teacher, "teacher_forward"):
        register_fsdp_forward_method(teacher, "teacher_forward")


def _is_dtensor(x):
    if not is_distributed():
        return False
    from torch.distributed.tensor import DTensor
    return isinstance(x, DTensor)


def full_state(state):
    """A (nested) state dict with each FSDP2 shard (DTensor) all-gathered into its full tensor, kept
    on the CPU by rank 0 (None on the other ranks, which must call it too); the rest as it is. So a
    checkpoint has the keys and shapes of a DDP run's. The identity without FSDP."""
    if isinstance(state, dict):
        return {k: full_state(v) for k, v in state.items()}
    if isinstance(state, list):
        return [full_state(v) for v in state]
    if _is_dtensor(state):
        full = state.full_tensor()
        return full.cpu() if is_main() else None
    return state


def _shard(full, like):
    """Each rank's slice of a full tensor (the same on every rank), as the DTensor `like` is cut."""
    from torch.distributed.tensor import distribute_tensor
    return distribute_tensor(full.to(like.device), like.device_mesh, like.placements, src_data_rank=None)


def shard_like(state, like):
    """full_state's inverse for a module: the full tensors of `state` cut into the shards of the
    DTensors of `like` (the module's own state dict); the rest as it is."""
    return {k: _shard(v, like[k]) if _is_dtensor(like.get(k)) else v for k, v in state.items()}


def shard_optimizer_state(optimizer):
    """After optimizer.load_state_dict of full tensors (a DDP or gathered FSDP checkpoint): each
    per-parameter state shaped like its sharded parameter (AdamW's moments) cut into its shards."""
    for p, state in optimizer.state.items():
        for k, v in state.items():
            if _is_dtensor(p) and torch.is_tensor(v) and not _is_dtensor(v) and v.shape == p.shape:
                state[k] = _shard(v, p)


def grad_norms(grads):
    """torch._foreach_norm of the gradients; of FSDP2 shards (DTensors), the norms of the full
    gradients all the same, as plain tensors (the clip of a DDP run): each rank's squared shard
    norms summed over the ranks in one all-reduce."""
    if not grads or not _is_dtensor(grads[0]):
        return torch._foreach_norm(grads)
    squares = torch.stack(torch._foreach_norm([g.to_local() for g in grads])).square()
    return list(all_reduce_sum(squares).sqrt().unbind())


def local(tensors):
    """Each FSDP2 shard's local tensor (an in-place op on it changes the shard); the rest as it is."""
    return [t.to_local() if _is_dtensor(t) else t for t in tensors]


@contextlib.contextmanager
def unsharded(module):
    """FSDP2: the teacher's full parameters on every rank for the duration, gathered once, then
    sharded again (all its units reshard after forward, as wrap_fsdp sets them). For evaluation,
    where ranks run different numbers of batches and each forward would otherwise gather (a
    collective). Nothing without FSDP."""
    units = []
    if is_distributed():
        from torch.distributed.fsdp import FSDPModule
        units = [m for m in module.modules() if isinstance(m, FSDPModule)]
    for m in units:
        m.set_reshard_after_forward(False, recurse=False)
        m.unshard()
    try:
        yield module
    finally:
        for m in units:
            m.set_reshard_after_forward(True, recurse=False)
            m.reshard()


def unwrap(module):
    return module.module if isinstance(module, torch.nn.parallel.DistributedDataParallel) else module
