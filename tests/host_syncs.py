"""HostSyncs: the calls that make the host wait for the device, recorded while it is active.

On a GPU the host runs ahead of the device until it needs a value the device has not computed
yet: .item(), bool() / float() / int() of a tensor, .tolist(), nonzero() and indexing with a
boolean mask (whose result's size the host must know), copies to pageable host memory. The
tests run on a CPU, where none of these waits; a torch function mode sees each such call anyway,
so a test can ask that a step makes none. Not counted: calls made in the host-side functions named
in `host` (drawing random parameters on the CPU before they are copied over), and those inside
torch.optim (AdamW reads its step counter, a host tensor unless fused; on a GPU it is fused).
"""
import sys

import torch
from torch.overrides import TorchFunctionMode

READS = {"item", "__bool__", "__float__", "__int__", "__index__", "tolist", "numpy", "nonzero", "cpu",
         "masked_select", "unique"}


class HostSyncs(TorchFunctionMode):
    def __init__(self, host=()):
        super().__init__()
        self.host, self.calls, self.marks = set(host), [], []

    def _where(self):
        """file:line of the innermost caller in the repository, or None inside a host function."""
        frame, where = sys._getframe(2), None
        while frame is not None:
            if frame.f_code.co_name in self.host or "torch/optim/" in frame.f_code.co_filename:
                return None
            path = frame.f_code.co_filename
            if where is None and "site-packages" not in path and "host_syncs" not in path and "<" not in path:
                where = f"{path.rsplit('/', 1)[-1]}:{frame.f_lineno} ({frame.f_code.co_name})"
            frame = frame.f_back
        return where or "?"

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        bool_index = name == "__getitem__" and any(
            torch.is_tensor(i) and i.dtype == torch.bool for i in (args[1] if isinstance(args[1], tuple) else (args[1],)))
        if name in READS or bool_index:
            where = self._where()
            if where is not None:
                self.calls.append((len(self.marks), "tensor[bool mask]" if bool_index else name, where))
        return func(*args, **(kwargs or {}))

    def mark(self):
        """Start counting the next section (e.g. the next step): calls are tagged by section."""
        self.marks.append(len(self.calls))

    def section(self, k):
        return [c[1:] for c in self.calls if c[0] == k]
