"""Distribution, all in one place (METHODS §9): process groups from the launcher's environment, the
sampling split, wrapping for DDP / FSDP2, gathers and rank-0 writes.

The engine, geometry, ALKN and eval see a process `group` (None in one process) and LOCAL tensors
(`local`: a DTensor's shard, any other tensor itself), nothing more.
"""
from __future__ import annotations

import torch


def local(t):
    """The local tensor of a DTensor (FSDP2's shard of a parameter or gradient), else t itself. The
    same object on every call, so an optimizer over local tensors keeps its state keys."""
    return t._local_tensor if hasattr(t, "_local_tensor") else t


def local_list(params):
    return [local(p) for p in params]
