"""nanodino kernels: fused attention, the coding-rate op, torchrun / DDP setup. Never imports a method."""
