"""Run directories: the lab's only interface between experiments, notebooks and the dashboard.

A run is a folder `runs/<run_id>/` of plain files:

    config.yaml        everything needed to rerun (method, model, benchmark, seed, lab version, ...)
    trace.parquet      one row per optimizer step (columns: lab.runs.TRACE_COLUMNS and method extras)
    eval.jsonl         one JSON object per evaluation point (step/epoch/task/checkpoint + metric values)
    eval_rows.parquet  per-row evaluation outputs (question, answer, generation, prob, rouge, ...)
    summary.json       status ("running" | "done" | "failed" | "diverged"), final metrics, timings
    masks.parquet      continual runs: mask overlap between tasks (columns MASK_COLUMNS)
    mask_counts.parquet  continual ALKN runs: active coordinates per task and tensor (lab.masks.mask_counts)

Every file is written atomically (temp file in the same folder + os.replace), so a reader never sees a
half-written file. A run that fails before it produced anything is removed; a run stopped by a
`RunStopped` (e.g. divergence) keeps what it has with the status it names.
"""
from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import json
import os
import re
import shutil
import tempfile
from pathlib import Path

import pandas as pd
import yaml

import lab

CONFIG, TRACE, EVAL, EVAL_ROWS, SUMMARY, MASKS, MASK_COUNTS = (
    "config.yaml", "trace.parquet", "eval.jsonl", "eval_rows.parquet", "summary.json", "masks.parquet",
    "mask_counts.parquet")

# Trace columns every step (METHODS §7). Method-specific extras (GRU cos_pre/cos_post/projected, NGDiff
# c_t, BLUR xi, ...) are added by the engine; the dashboard imports this list to know what to plot.
TRACE_COLUMNS = [
    "step", "epoch", "task", "loss_f", "loss_r", "grad_norm_f", "grad_norm_r", "cos_fr",
    "align_f", "align_r", "cos_update_f", "cos_update_r", "lr",
]
# Method extras written by the engine when they apply (same file, same step rows).
TRACE_EXTRA_COLUMNS = {
    "gru": ["cos_pre", "cos_post", "projected"],   # GRU Alg. 1: cos(g_u, gbar_r) before/after, projection fired
    "ngdiff": ["c_t"],
    # AutoLR (any "<method>+autolr"; NGDiff Alg. 1): on probe steps only, NaN elsewhere
    "autolr": ["autolr_probe", "autolr_accepted", "autolr_lr", "autolr_loss_minus", "autolr_loss_0",
               "autolr_loss_plus"],
    "blur": ["xi"],                                  # BLUR eq. 14: <g_f,g_r>/||g_f||^2
    "alkn": ["active_fraction"],                     # ALKN DGS: fraction of coordinates allowed to move
}
# Continual runs: Jaccard overlap of task masks, globally and per layer / module type.
# scope is "global", "layer.<i>" or "module.<type>" (e.g. "module.mlp", "module.attn").
MASK_COLUMNS = ["task_a", "task_b", "scope", "jaccard"]
# eval.jsonl records: {step, epoch, task, eval_task, checkpoint, <metric>: value, ...}
#   checkpoint: "target" | "retain" (prepare runs), "initial" (theta_0 before unlearning), "unlearned",
#   "uwc" (the run's weights interpolated towards theta_0 to a utility goal, GRU App. F: uwc_target,
#   uwc_alpha, uwc_n_evals; written afterwards by lab.experiments.uwc_table via append_eval).
#   Continual runs: `task` = index of the last finished task (-1 for "initial"), `eval_task` = whose
#   forget set the forget_* metrics describe (None for utility-only records). Cascading degradation
#   (ALKN fig. 2a) for task k = forget_prob at checkpoint "initial" vs after task k-1.
EVAL_INDEX = ["step", "epoch", "task", "eval_task", "checkpoint"]
# Columns identifying a run in list/long-form tables (read from config.yaml).
RUN_KEYS = ["kind", "method", "model", "benchmark", "protocol", "seed"]


# ---------------------------------------------------------------- atomic file writes
def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_text(path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=_jsonable) + "\n")


def atomic_write_parquet(path, df: pd.DataFrame) -> None:
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        df.to_parquet(tmp, index=False)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _jsonable(x):
    """JSON fallback for numpy / torch scalars and paths."""
    if hasattr(x, "item"):
        return x.item()
    if isinstance(x, Path):
        return str(x)
    if hasattr(x, "tolist"):
        return x.tolist()
    raise TypeError(f"not JSON serialisable: {type(x).__name__}")


# ---------------------------------------------------------------- writing a run
class RunStopped(Exception):
    """Raised inside a run to stop it while KEEPING what it wrote (e.g. status='diverged')."""

    def __init__(self, message: str, status: str = "stopped"):
        super().__init__(message)
        self.status = status


def make_run_id(config: dict) -> str:
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    label = "-".join(str(config.get(k)) for k in ("kind", "method", "model") if config.get(k))
    label = re.sub(r"[^A-Za-z0-9_.+-]+", "_", label)[:60] or "run"
    digest = hashlib.sha1(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:6]
    return f"{stamp}-{label}-{digest}"


class Run:
    """A run directory being written. Use through `create_run`."""

    def __init__(self, path: Path, config: dict, flush_every: int = 50):
        self.path, self.config = path, config
        self.flush_every = flush_every
        self._trace: list[dict] = []
        self._unflushed = 0
        self._rows: list[pd.DataFrame] = []
        self.summary: dict = {"status": "running", "started": _now()}

    # trace: buffered, the whole table rewritten atomically every `flush_every` rows and at close
    def log_step(self, row: dict) -> None:
        self._trace.append({k: _scalar(v) for k, v in row.items()})
        self._unflushed += 1
        if self._unflushed >= self.flush_every:
            self.flush()

    def flush(self) -> None:
        if self._trace:
            atomic_write_parquet(self.path / TRACE, pd.DataFrame(self._trace))
        if self._rows:
            atomic_write_parquet(self.path / EVAL_ROWS, pd.concat(self._rows, ignore_index=True))
        self._unflushed = 0

    def log_eval(self, record: dict, rows: pd.DataFrame | None = None) -> None:
        """Append one evaluation point to eval.jsonl (and its per-row outputs to eval_rows.parquet)."""
        record = _append_eval_line(self.path, record)
        if rows is not None and len(rows):
            keys = {k: record[k] for k in EVAL_INDEX if k in record}
            self._rows.append(rows.assign(**keys))
            self.flush()

    def log_masks(self, overlap: pd.DataFrame) -> None:
        """Write (replace) the mask-overlap table of a continual run (columns MASK_COLUMNS)."""
        missing = set(MASK_COLUMNS) - set(overlap.columns)
        if missing:
            raise ValueError(f"log_masks: missing columns {sorted(missing)}; need {MASK_COLUMNS}")
        atomic_write_parquet(self.path / MASKS, overlap)

    def write_summary(self, **fields) -> None:
        self.summary.update({k: _scalar(v) for k, v in fields.items()})
        atomic_write_json(self.path / SUMMARY, self.summary)

    @property
    def has_output(self) -> bool:
        return bool(self._trace) or (self.path / EVAL).exists()


def _append_eval_line(path: Path, record: dict) -> dict:
    record = {k: _scalar(v) for k, v in record.items()}
    line = json.dumps(record, sort_keys=True, default=_jsonable) + "\n"
    old = (path / EVAL).read_text() if (path / EVAL).exists() else ""
    atomic_write_text(path / EVAL, old + line)
    return record


def append_eval(path: str | os.PathLike, record: dict) -> None:
    """Add an evaluation record to a FINISHED run's eval.jsonl (an analysis made after the run, e.g. a
    UWC calibration of its weights: checkpoint "uwc"). The file is rewritten atomically."""
    path = Path(path)
    if not (path / CONFIG).is_file():
        raise FileNotFoundError(f"append_eval: {path} is not a run directory (no {CONFIG})")
    if not record.get("checkpoint"):
        raise ValueError("append_eval: the record needs a 'checkpoint' (which model it evaluates)")
    _append_eval_line(path, record)


@contextlib.contextmanager
def create_run(config: dict, root: str | os.PathLike = "runs", run_id: str | None = None):
    """Create `root/<run_id>/`, write config.yaml, yield a `Run`; finish summary.json on exit.

    On an ordinary exception the directory is removed (no half-written run is left behind); on
    `RunStopped` it is kept with that status and the error message, then the exception propagates.
    """
    config = {**config, "lab_version": lab.__version__}
    Path(root).mkdir(parents=True, exist_ok=True)
    if run_id:
        path = Path(root) / run_id
        path.mkdir(exist_ok=False)
    else:  # the same config started within the same second (parallel notebooks): -2, -3, ...
        stem = make_run_id(config)
        for n in range(1, 1000):
            path = Path(root) / (stem if n == 1 else f"{stem}-{n}")
            try:
                path.mkdir()
                break
            except FileExistsError:
                continue
        else:
            raise FileExistsError(f"create_run: {stem} and 998 numbered variants exist in {root}")
    run = Run(path, config)
    try:
        atomic_write_text(path / CONFIG, yaml.safe_dump(_plain(config), sort_keys=False))
        run.write_summary()
        yield run
    except RunStopped as stop:
        run.flush()
        run.write_summary(status=stop.status, error=str(stop), finished=_now())
        raise
    except BaseException:
        shutil.rmtree(path, ignore_errors=True)
        raise
    else:
        run.flush()
        run.write_summary(status="done", finished=_now())


def _now() -> str:
    return dt.datetime.now().isoformat(timespec="seconds")


def _scalar(v):
    if hasattr(v, "item") and getattr(v, "ndim", 0) == 0:
        return v.item()
    return v


def _plain(obj):
    """Config to YAML-safe builtins (tuples -> lists, numpy/torch scalars -> numbers, paths -> str)."""
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "item") and getattr(obj, "ndim", 1) == 0:
        return obj.item()
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    return str(obj)


# ---------------------------------------------------------------- reading runs
class RunRecord:
    """One run directory as read back: config, trace, evals, rows, summary and any read errors.

    Missing or corrupt files do not raise: they become entries in `errors` so a dashboard can warn
    and still render the rest.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.run_id = self.path.name
        self.errors: list[str] = []
        self.config = self._read(CONFIG, lambda p: yaml.safe_load(p.read_text()) or {}, {})
        if not isinstance(self.config, dict):
            self.errors.append(f"{self.path / CONFIG}: not a mapping")
            self.config = {}
        self.summary = self._read(SUMMARY, lambda p: json.loads(p.read_text()), {})
        self.trace = self._read(TRACE, pd.read_parquet, pd.DataFrame(), required=False)
        self.evals = self._read(EVAL, _read_jsonl, pd.DataFrame(), required=False)
        self.masks = self._read(MASKS, pd.read_parquet, pd.DataFrame(), required=False)

    def _read(self, name, reader, default, required=True):
        p = self.path / name
        if not p.exists():
            if required:
                self.errors.append(f"{p}: missing")
            return default
        try:
            return reader(p)
        except Exception as e:  # corrupt file: report, keep going
            self.errors.append(f"{p}: unreadable ({type(e).__name__}: {e})")
            return default

    @property
    def rows(self) -> pd.DataFrame:
        """Per-row eval outputs (read lazily: they can be large)."""
        return self._read_lazily(EVAL_ROWS)

    @property
    def mask_counts(self) -> pd.DataFrame:
        """Continual ALKN runs: per task and tensor active counts (task, name, layer, module, active, numel)."""
        return self._read_lazily(MASK_COUNTS)

    def _read_lazily(self, name) -> pd.DataFrame:
        before = len(self.errors)
        df = self._read(name, pd.read_parquet, pd.DataFrame(), required=False)
        if len(self.errors) > before and self.errors[-1] in self.errors[:before]:
            self.errors.pop()  # a corrupt file read twice is reported once
        return df

    @property
    def status(self) -> str:
        if self.errors and not self.summary:
            return "broken"
        return self.summary.get("status", "unknown")

    def meta(self) -> dict:
        return {"run_id": self.run_id, "path": str(self.path), "status": self.status,
                **{k: self.config.get(k) for k in RUN_KEYS}}


def _read_jsonl(p: Path) -> pd.DataFrame:
    records = []
    for i, line in enumerate(p.read_text().splitlines(), 1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f"line {i}: {e}") from None
    return pd.DataFrame(records)


def find_runs(root: str | os.PathLike = "runs") -> list[Path]:
    """Run directories under root (any folder holding a config.yaml or summary.json), sorted by name."""
    root = Path(root)
    if not root.exists():
        return []
    return sorted(p for p in root.iterdir()
                  if p.is_dir() and not p.name.startswith(".")
                  and ((p / CONFIG).exists() or (p / SUMMARY).exists()))


def load_run(path) -> RunRecord:
    return RunRecord(path)


def list_runs(root: str | os.PathLike = "runs") -> pd.DataFrame:
    """One row per run: run_id, path, status, kind, method, model, benchmark, protocol, seed, errors."""
    recs = [load_run(p) for p in find_runs(root)]
    cols = ["run_id", "path", "status", *RUN_KEYS, "errors"]
    return pd.DataFrame([{**r.meta(), "errors": "; ".join(r.errors)} for r in recs], columns=cols)


def load_runs(root: str | os.PathLike = "runs", kinds=("trace", "eval")) -> pd.DataFrame:
    """Many runs in long form: one row per (run, source, step, metric) with the run's identifying keys.

    Columns: run_id, source ('trace' | 'eval'), step, epoch, task, checkpoint (which model of the run was
    evaluated, e.g. 'target' / 'retain' / 'unlearned'), metric, value, plus RUN_KEYS.
    Non-numeric values (e.g. strings) are left out of the long table; read them via `load_run`.
    """
    unknown = set(kinds) - {"trace", "eval"}
    if unknown:
        raise ValueError(f"load_runs: unknown kinds {sorted(unknown)}; valid: 'trace', 'eval'")
    frames = []
    index_cols = EVAL_INDEX
    for path in find_runs(root):
        rec = load_run(path)
        meta = {k: rec.config.get(k) for k in RUN_KEYS}
        for source, df in (("trace", rec.trace), ("eval", rec.evals)):
            if source not in kinds or df.empty:
                continue
            ids = [c for c in index_cols if c in df.columns]
            values = df.drop(columns=ids).select_dtypes("number")
            if values.empty:
                continue
            long = pd.concat([df[ids], values], axis=1).melt(
                id_vars=ids, var_name="metric", value_name="value")
            frames.append(long.assign(run_id=rec.run_id, source=source, **meta))
    cols = ["run_id", "source", *index_cols, "metric", "value", *RUN_KEYS]
    if not frames:
        return pd.DataFrame(columns=cols)
    out = pd.concat(frames, ignore_index=True)
    return out.reindex(columns=cols)
