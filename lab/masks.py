"""Parameter masks: overlap between tasks, compact storage, realised task-vector sparsity (METHODS §7).

A mask is a list of boolean tensors (or arrays), one per trainable parameter, in `model.named_parameters()`
order; `names` are the matching parameter names.

    jaccard(mask_a, mask_b)                        # |A and B| / |A or B|, summed over all parameters
    overlap_table({0: m0, 1: m1, 2: m2}, names)    # rows task_a, task_b, scope, jaccard (runs.MASK_COLUMNS)
    save_mask(path, mask, names); load_mask(path)  # packed bits: 1 bit per parameter entry (.npz)
    mask_counts(mask, names)                       # per-tensor active counts (layer, module, active, numel)
    moved_fraction(before, after)                  # fraction of entries that changed (task-vector density)

Shards (lab.continual under --parallel fsdp): the mask lists hold this rank's shards of every tensor;
`reduce` (jaccard, overlap_table, active_fraction, mask_counts) sums a list of per-rank counts over the
group (lab.distributed.shard_sums), so the numbers are those of the whole masks.

In a continual run directory (lab.continual):
    masks.parquet        overlap of every pair of task masks, globally and per layer / module type
    masks/task_<t>.npz   the task's final mask as packed bits (one array per parameter + its shape)
    mask_counts.parquet  per task and tensor: name, layer, module, active, numel (for per-tensor plots)
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import torch

from lab import runs
from lab.models import layer_of, module_type


def _np(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy().astype(bool, copy=False)
    return np.asarray(x, dtype=bool)


def _check_pair(mask_a, mask_b):
    if len(mask_a) != len(mask_b):
        raise ValueError(f"masks have {len(mask_a)} and {len(mask_b)} tensors; they must describe the "
                         "same parameters")
    for i, (a, b) in enumerate(zip(mask_a, mask_b)):
        if tuple(a.shape) != tuple(b.shape):
            raise ValueError(f"mask tensor {i}: shapes {tuple(a.shape)} and {tuple(b.shape)} differ")


def _tensor_counts(mask_a, mask_b) -> list[tuple[int, int]]:
    """(|A and B|, |A or B|) of each tensor pair."""
    _check_pair(mask_a, mask_b)
    out = []
    for a, b in zip(mask_a, mask_b):
        a, b = _np(a), _np(b)
        out.append((int(np.count_nonzero(a & b)), int(np.count_nonzero(a | b))))
    return out


def intersection_union(mask_a, mask_b, reduce=None) -> tuple[int, int]:
    """(|A and B|, |A or B|) summed over all tensors of two masks (reduce: and over the shards)."""
    counts = _tensor_counts(mask_a, mask_b)
    inter, union = sum(c[0] for c in counts), sum(c[1] for c in counts)
    return tuple(reduce([inter, union])) if reduce is not None else (inter, union)


def jaccard(mask_a, mask_b, reduce=None) -> float:
    """|A and B| / |A or B| over per-parameter boolean mask lists (one global number); 0 when both are empty."""
    inter, union = intersection_union(mask_a, mask_b, reduce)
    return inter / union if union else 0.0


def scopes(names) -> dict[str, list[int]]:
    """Scope name -> indices of the parameters in it: 'global', 'layer.<i>', 'module.<type>'."""
    out: dict[str, list[int]] = {"global": list(range(len(names)))}
    for i, name in enumerate(names):
        layer = layer_of(name)
        if layer is not None:
            out.setdefault(f"layer.{layer}", []).append(i)
        out.setdefault(f"module.{module_type(name)}", []).append(i)
    return out


def overlap_table(masks: dict, names, reduce=None) -> pd.DataFrame:
    """Jaccard overlap of every pair of task masks (task_a < task_b), globally and per layer / module type.

    masks: {task: mask list}; reduce: sums the per-tensor counts of every pair over the shards (one call).
    Returns a DataFrame with columns lab.runs.MASK_COLUMNS."""
    tasks = sorted(masks)
    for t in tasks:
        if len(masks[t]) != len(names):
            raise ValueError(f"overlap_table: task {t}'s mask has {len(masks[t])} tensors but {len(names)} names")
    pairs = [(a, b) for i, a in enumerate(tasks) for b in tasks[i + 1:]]
    counts = [c for a, b in pairs for c in _tensor_counts(masks[a], masks[b])]   # pair-major, per tensor
    if reduce is not None:
        flat = reduce([x for c in counts for x in c])
        counts = list(zip(flat[0::2], flat[1::2]))
    rows = []
    groups = scopes(names)
    for p, (a, b) in enumerate(pairs):
        pair = counts[p * len(names):(p + 1) * len(names)]
        for scope, idx in groups.items():
            inter, union = sum(pair[k][0] for k in idx), sum(pair[k][1] for k in idx)
            rows.append({"task_a": a, "task_b": b, "scope": scope, "jaccard": inter / union if union else 0.0})
    return pd.DataFrame(rows, columns=runs.MASK_COLUMNS)


def active_fraction(mask, reduce=None) -> float:
    """Fraction of all entries that are True (reduce: of every shard's)."""
    active, total = sum(int(np.count_nonzero(_np(m))) for m in mask), sum(int(np.prod(m.shape)) for m in mask)
    if reduce is not None:
        active, total = reduce([active, total])
    return active / total if total else 0.0


def union(mask_a, mask_b) -> list[torch.Tensor]:
    _check_pair(mask_a, mask_b)
    return [torch.as_tensor(_np(a)) | torch.as_tensor(_np(b)) for a, b in zip(mask_a, mask_b)]


def moved_fraction(before, after) -> float:
    """Realised task-vector density: fraction of parameter entries whose value changed (before != after)."""
    _check_pair(before, after)
    moved = sum(int((a != b).sum()) for a, b in zip(before, after))
    total = sum(a.numel() for a in before)
    return moved / total if total else 0.0


# ---------------------------------------------------------------- storage
def save_mask(path, mask, names) -> None:
    """One bit per entry (numpy.packbits), one array per parameter, written atomically as .npz."""
    import io
    if len(mask) != len(names):
        raise ValueError(f"save_mask: {len(mask)} tensors but {len(names)} names")
    arrays = {}
    for i, (m, name) in enumerate(zip(mask, names)):
        a = _np(m)
        arrays[f"bits_{i}"] = np.packbits(a.reshape(-1))
        arrays[f"shape_{i}"] = np.asarray(a.shape, dtype=np.int64)
    arrays["names"] = np.asarray(list(names))
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    runs.atomic_write_bytes(path, buf.getvalue())


def load_mask(path) -> tuple[list[torch.Tensor], list[str]]:
    """(mask list of bool tensors, parameter names) from a save_mask file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no mask file {path}")
    with np.load(path) as z:
        names = [str(n) for n in z["names"]]
        mask = []
        for i in range(len(names)):
            shape = tuple(int(s) for s in z[f"shape_{i}"])
            n = int(np.prod(shape))
            mask.append(torch.from_numpy(np.unpackbits(z[f"bits_{i}"], count=n).astype(bool).reshape(shape)))
    return mask, names


def mask_counts(mask, names, task=None, reduce=None, shapes=None) -> pd.DataFrame:
    """Per-tensor counts: task, name, layer, module, active, numel (what per-tensor plots need).
    Shards: reduce sums the active counts over the group, shapes are the whole tensors' (numel)."""
    active = [int(np.count_nonzero(_np(m))) for m in mask]
    if reduce is not None:
        active = [int(a) for a in reduce(active)]
    shapes = shapes if shapes is not None else [m.shape for m in mask]
    return pd.DataFrame([{"task": task, "name": n, "layer": layer_of(n), "module": module_type(n),
                          "active": a, "numel": int(np.prod(shape))}
                         for a, shape, n in zip(active, shapes, names)])
