"""Parameter masks: overlap between tasks, compact storage, realised task-vector sparsity (METHODS §7).

A mask is a list of boolean tensors (or arrays), one per trainable parameter, in `model.named_parameters()`
order; `names` are the matching parameter names.

    jaccard(mask_a, mask_b)                        # |A and B| / |A or B|, summed over all parameters
    overlap_table({0: m0, 1: m1, 2: m2}, names)    # rows task_a, task_b, scope, jaccard (runs.MASK_COLUMNS)
    save_mask(path, mask, names); load_mask(path)  # packed bits: 1 bit per parameter entry (.npz)
    mask_counts(mask, names)                       # per-tensor active counts (layer, module, active, numel)
    moved_fraction(before, after)                  # fraction of entries that changed (task-vector density)

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


def intersection_union(mask_a, mask_b) -> tuple[int, int]:
    """(|A and B|, |A or B|) summed over all tensors of two masks."""
    _check_pair(mask_a, mask_b)
    inter = union = 0
    for a, b in zip(mask_a, mask_b):
        a, b = _np(a), _np(b)
        inter += int(np.count_nonzero(a & b))
        union += int(np.count_nonzero(a | b))
    return inter, union


def jaccard(mask_a, mask_b) -> float:
    """|A and B| / |A or B| over per-parameter boolean mask lists (one global number); 0 when both are empty."""
    inter, union = intersection_union(mask_a, mask_b)
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


def overlap_table(masks: dict, names) -> pd.DataFrame:
    """Jaccard overlap of every pair of task masks (task_a < task_b), globally and per layer / module type.

    masks: {task: mask list}. Returns a DataFrame with columns lab.runs.MASK_COLUMNS."""
    tasks = sorted(masks)
    rows = []
    groups = scopes(names)
    for i, a in enumerate(tasks):
        for b in tasks[i + 1:]:
            _check_pair(masks[a], masks[b])
            for scope, idx in groups.items():
                rows.append({"task_a": a, "task_b": b, "scope": scope,
                             "jaccard": jaccard([masks[a][k] for k in idx], [masks[b][k] for k in idx])})
    return pd.DataFrame(rows, columns=runs.MASK_COLUMNS)


def active_fraction(mask) -> float:
    """Fraction of all entries that are True."""
    total = sum(int(np.prod(m.shape)) for m in mask)
    return sum(int(np.count_nonzero(_np(m))) for m in mask) / total if total else 0.0


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


def mask_counts(mask, names, task=None) -> pd.DataFrame:
    """Per-tensor counts: task, name, layer, module, active, numel (what per-tensor plots need)."""
    return pd.DataFrame([{"task": task, "name": n, "layer": layer_of(n), "module": module_type(n),
                          "active": int(np.count_nonzero(_np(m))), "numel": int(np.prod(m.shape))}
                         for m, n in zip(mask, names)])
