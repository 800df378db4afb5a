"""Run directories: the lab's only interface between experiments, notebooks and the dashboard.

A run is a folder `runs/<run_id>/` of plain files:

    config.yaml        everything needed to rerun (method, model, benchmark, seed, lab version, ...)
    trace.parquet      one row per optimizer step (columns: lab.runs.TRACE_COLUMNS and method extras)
    eval.jsonl         one JSON object per evaluation point (step/epoch/task/checkpoint + metric values)
    eval_rows.parquet  per-row evaluation outputs (question, answer, generation, prob, rouge, ...)
    summary.json       status ("running" | "done" | "failed" | "diverged"), final metrics, timings
    masks.parquet      continual runs: mask overlap between tasks (columns MASK_COLUMNS)
    mask_counts.parquet  continual ALKN runs: active coordinates per task and tensor (lab.masks.mask_counts)

    writer.lock        while a process writes the run: {pid, host, started}; flock-ed by the writer (the
                       kernel drops the lock when the process dies, kill -9 included); its mtime is the
                       writer's heartbeat. Removed when the writer finishes.

Every file is written atomically (temp file in the same folder + os.replace, with the umask's permissions),
so a reader never sees a half-written file; the trace is flushed every `flush_every` rows or
`FLUSH_SECONDS`, whichever comes first. An ordinary exception removes the run (nothing half-written is
left behind); Ctrl-C keeps it with status "interrupted" and everything written so far (`RunInterrupted`);
a `RunStopped` (e.g. divergence) keeps it with the status it names. A run whose summary says "running"
but whose writer is gone reads back with status "stale" (`RunRecord.status_note` says why).
A run has one writer: a second process that tries to write it gets `RunLocked` naming the first one's pid.
Every file is validated on read: a broken file becomes an entry in `RunRecord.errors`, never an exception.
"""
from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import hashlib
import json
import os
import re
import secrets
import shutil
import socket
import time
from pathlib import Path

import pandas as pd
import yaml

import lab

CONFIG, TRACE, EVAL, EVAL_ROWS, SUMMARY, MASKS, MASK_COUNTS = (
    "config.yaml", "trace.parquet", "eval.jsonl", "eval_rows.parquet", "summary.json", "masks.parquet",
    "mask_counts.parquet")
LOCK = "writer.lock"
FLUSH_SECONDS = 5.0          # the trace reaches the disk at least this often (a kill -9 loses at most this)
HEARTBEAT_SECONDS = 5.0      # the writer touches writer.lock at most this often (log_step, log_eval, summary)
STALE_AFTER_SECONDS = 1800   # a writer on ANOTHER host counts as gone after this long without a heartbeat

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
#   "probe:<name>" (lab.probes, METHODS §8): the final model under a robustness probe (relearn, quant8, ...).
EVAL_INDEX = ["step", "epoch", "task", "eval_task", "checkpoint"]
PROBE_PREFIX = "probe:"
PROBES = ("relearn", "quant8", "quant4", "paraphrase", "fewshot")   # lab.probes, in report order
# Columns identifying a run in list/long-form tables (read from config.yaml).
RUN_KEYS = ["kind", "method", "model", "benchmark", "protocol", "seed", "experiment"]
# The experiment a run belongs to (config.yaml `experiment`): "<notebook>/<section>" for runs a notebook
# made (lab.report.run_notebook sets the env var in its kernel, lab.experiments adds the section), a
# user's `--tag` for lab unlearn / continual, else none. The dashboard picks runs by it.
EXPERIMENT_ENV = "LAB_EXPERIMENT"
REUSE_ENV = "LAB_REUSE_RUNS"   # set (lab report --reuse-runs): run_grid also reuses finished runs under runs_root
_experiments: list[str] = []


@contextlib.contextmanager
def experiment(tag: str | None):
    """Every run created inside the block gets `experiment: tag` in its config (None: no change)."""
    _experiments.append(tag)
    try:
        yield
    finally:
        _experiments.pop()


def current_experiment() -> str | None:
    """The innermost experiment() tag, else $LAB_EXPERIMENT, else None."""
    tags = [t for t in _experiments if t]
    return tags[-1] if tags else os.environ.get(EXPERIMENT_ENV) or None


# ---------------------------------------------------------------- atomic file writes
def _temp_path(path: Path) -> Path:
    return path.parent / f".{path.name}.{secrets.token_hex(4)}.tmp"


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    path = Path(path)
    tmp = _temp_path(path)
    try:  # os.open with 0o666: the umask decides the permissions, as for any tool (mkstemp forces 0600)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
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
    tmp = _temp_path(path)
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


class RunInterrupted(KeyboardInterrupt):
    """Ctrl-C inside a run: the run is kept (status "interrupted"); the message says where it is."""

    def __init__(self, message: str, run_dir: Path):
        super().__init__(message)
        self.run_dir = run_dir


class RunLocked(RuntimeError):
    """The run already has a live writer (another process): it is not written by two at once."""


def make_run_id(config: dict) -> str:
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    label = "-".join(str(config.get(k)) for k in ("kind", "method", "model") if config.get(k))
    label = re.sub(r"[^A-Za-z0-9_.+-]+", "_", label)[:60] or "run"
    digest = hashlib.sha1(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:6]
    return f"{stamp}-{label}-{digest}"


class WriterLock:
    """One process owns a run directory while it writes it: `<run>/writer.lock` holds {pid, host, started},
    is flock-ed for the writer's lifetime (released by the kernel when the process dies, even on kill -9)
    and its mtime is the writer's heartbeat (`beat`, at most every HEARTBEAT_SECONDS)."""

    def __init__(self, run_dir: str | os.PathLike):
        self.path = Path(run_dir) / LOCK
        self._fd: int | None = None
        self._beat = 0.0

    def acquire(self) -> "WriterLock":
        for attempt in range(20):
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
            flocked = None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                flocked = False       # read_writer's sense: nobody else holds it
            except BlockingIOError:
                os.close(fd)
                if attempt < 5:     # a reader probing the lock holds it for microseconds: retry briefly
                    time.sleep(0.05)
                    continue
                raise RunLocked(f"{self.path.parent} is being written by {describe_writer(read_writer(self.path.parent))}; "
                                "wait for it to finish or stop that process first") from None
            except OSError:         # a file system without flock (some network mounts): pid + heartbeat only
                pass
            try:    # the file we locked may have been unlinked by a writer that just finished: lock the live one
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if not same:
                os.close(fd)
                continue
            old = read_writer(self.path.parent)
            if old and old.get("pid") not in (None, os.getpid()) and _writer_alive(old, held=flocked):
                os.close(fd)   # flock not shared (another host, or no flock here): trust its pid / heartbeat
                raise RunLocked(f"{self.path.parent} is being written by {describe_writer(old)}; wait for it to "
                                "finish or stop that process first")
            info = {"pid": os.getpid(), "host": socket.gethostname(), "started": _now()}
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(info).encode(), 0)
            self._fd, self._beat = fd, time.monotonic()
            return self
        raise RunLocked(f"{self.path}: could not take the writer lock (it keeps being replaced)")

    def beat(self) -> None:
        """Refresh the heartbeat (the lock file's mtime); one clock read when it is not due."""
        if self._fd is not None and time.monotonic() - self._beat >= HEARTBEAT_SECONDS:
            os.utime(self._fd)
            self._beat = time.monotonic()

    def release(self) -> None:
        if self._fd is None:
            return
        with contextlib.suppress(OSError):
            if os.fstat(self._fd).st_ino == os.stat(self.path).st_ino:
                os.unlink(self.path)
        os.close(self._fd)
        self._fd = None


def read_writer(run_dir: str | os.PathLike) -> dict | None:
    """The writer of a run as its lock file says: {pid, host, started, heartbeat, heartbeat_age, alive},
    or None when no lock file exists (a finished run, or one written before runs had locks).
    alive: the flock is held (same host; without flock support: the pid exists), or, for a writer on
    another host, a heartbeat within STALE_AFTER_SECONDS."""
    path = Path(run_dir) / LOCK
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        st = os.fstat(fd)
        try:
            info = json.loads(os.pread(fd, 4096, 0) or b"{}")
            info = info if isinstance(info, dict) else {}
        except ValueError:
            info = {}
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            held = False
            fcntl.flock(fd, fcntl.LOCK_UN)
        except BlockingIOError:
            held = True
        except OSError:      # no flock on this file system
            held = None
    finally:
        os.close(fd)
    info.update(heartbeat=dt.datetime.fromtimestamp(st.st_mtime).isoformat(timespec="seconds"),
                heartbeat_age=time.time() - st.st_mtime)
    info["alive"] = _writer_alive(info, held)
    return info


def _writer_alive(info: dict, held: bool | None) -> bool:
    """held: the flock probe (None: no flock here). Same host: the flock, else the pid; another host: the
    heartbeat's age."""
    if held:
        return True
    if info.get("host") not in (None, socket.gethostname()):
        return info["heartbeat_age"] < STALE_AFTER_SECONDS
    pid = info.get("pid")
    if held is False or not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError):
        return False
    except PermissionError:   # another user's live process
        return True
    return True


def describe_writer(info: dict | None) -> str:
    if not info:
        return "another process"
    return (f"pid {info.get('pid', '?')} on {info.get('host', '?')} (started {info.get('started', '?')}, "
            f"last heartbeat {info.get('heartbeat', '?')})")


class Run:
    """A run directory being written. Use through `create_run`.

    writer: the directory's WriterLock (taken here when not given); `close` releases it."""

    def __init__(self, path: Path, config: dict, flush_every: int = 50, writer: WriterLock | None = None):
        self.path, self.config = path, config
        self.flush_every = flush_every
        self.writer = writer or WriterLock(path).acquire()
        self._trace: list[dict] = []
        self._unflushed = 0
        self._flushed_at = float("-inf")     # the first row reaches the disk at once
        self._rows: list[pd.DataFrame] = []
        self.summary: dict = {"status": "running", "started": _now(), "pid": os.getpid(),
                              "host": socket.gethostname()}

    # trace: buffered, the whole table rewritten atomically every `flush_every` rows or FLUSH_SECONDS
    # (at most one rewrite per that many rows or seconds) and at close
    def log_step(self, row: dict) -> None:
        self._trace.append({k: _scalar(v) for k, v in row.items()})
        self._unflushed += 1
        if self._unflushed >= self.flush_every or time.monotonic() - self._flushed_at >= FLUSH_SECONDS:
            self.flush()
        self.writer.beat()

    def flush(self) -> None:
        if self._trace:
            atomic_write_parquet(self.path / TRACE, pd.DataFrame(self._trace))
        if self._rows:
            atomic_write_parquet(self.path / EVAL_ROWS, pd.concat(self._rows, ignore_index=True))
        self._unflushed = 0
        self._flushed_at = time.monotonic()

    def log_eval(self, record: dict, rows: pd.DataFrame | None = None) -> None:
        """Append one evaluation point to eval.jsonl (and its per-row outputs to eval_rows.parquet)."""
        record = _append_eval_line(self.path, record)
        if rows is not None and len(rows):
            keys = {k: record[k] for k in EVAL_INDEX if k in record}
            self._rows.append(rows.assign(**keys))
            self.flush()
        self.writer.beat()

    def log_masks(self, overlap: pd.DataFrame) -> None:
        """Write (replace) the mask-overlap table of a continual run (columns MASK_COLUMNS)."""
        missing = set(MASK_COLUMNS) - set(overlap.columns)
        if missing:
            raise ValueError(f"log_masks: missing columns {sorted(missing)}; need {MASK_COLUMNS}")
        atomic_write_parquet(self.path / MASKS, overlap)

    def write_summary(self, **fields) -> None:
        self.summary.update({k: _scalar(v) for k, v in fields.items()})
        atomic_write_json(self.path / SUMMARY, self.summary)
        self.writer.beat()

    def close(self) -> None:
        """Give up the directory (the writer lock); the run is finished as far as this process goes."""
        self.writer.release()

    def interrupted(self) -> None:
        """Ctrl-C: flush what was logged and mark the run "interrupted" (the caller re-raises)."""
        where = f" after {len(self._trace)} trace rows (last step {self._trace[-1].get('step')})" if self._trace else ""
        self.flush()
        self.write_summary(status="interrupted", error=f"interrupted (Ctrl-C){where}", finished=_now())

    @property
    def has_output(self) -> bool:
        return bool(self._trace) or (self.path / EVAL).exists()


def _append_eval_line(path: Path, record: dict) -> dict:
    record = {k: _scalar(v) for k, v in record.items()}
    line = json.dumps(record, sort_keys=True, default=_jsonable) + "\n"
    old = (path / EVAL).read_text() if (path / EVAL).exists() else ""
    atomic_write_text(path / EVAL, old + line)
    return record


def append_eval(path: str | os.PathLike, record: dict, rows: pd.DataFrame | None = None) -> None:
    """Add an evaluation record to a FINISHED run's eval.jsonl (an analysis made after the run, e.g. a
    UWC calibration of its weights: checkpoint "uwc"; a robustness probe: "probe:<name>"), and its per-row
    outputs to eval_rows.parquet. Each file is rewritten atomically."""
    path = Path(path)
    if not (path / CONFIG).is_file():
        raise FileNotFoundError(f"append_eval: {path} is not a run directory (no {CONFIG})")
    writer = read_writer(path)
    if writer and writer["alive"]:
        raise RunLocked(f"append_eval: {path} is still being written by {describe_writer(writer)}")
    if not record.get("checkpoint"):
        raise ValueError("append_eval: the record needs a 'checkpoint' (which model it evaluates)")
    record = _append_eval_line(path, record)
    if rows is not None and len(rows):
        rows = rows.assign(**{k: record[k] for k in EVAL_INDEX if k in record})
        old = pd.read_parquet(path / EVAL_ROWS) if (path / EVAL_ROWS).exists() else None
        atomic_write_parquet(path / EVAL_ROWS, rows if old is None else pd.concat([old, rows], ignore_index=True))


def update_summary(path: str | os.PathLike, **fields) -> None:
    """Merge fields into a finished run's summary.json (atomically)."""
    p = Path(path) / SUMMARY
    summary = json.loads(p.read_text()) if p.exists() else {}
    atomic_write_json(p, {**(summary if isinstance(summary, dict) else {}), **fields})


@contextlib.contextmanager
def create_run(config: dict, root: str | os.PathLike = "runs", run_id: str | None = None):
    """Create `root/<run_id>/`, write config.yaml, yield a `Run`; finish summary.json on exit.

    On an ordinary exception the directory is removed (no half-written run is left behind); on
    `RunStopped` it is kept with that status and the error message, then the exception propagates;
    on Ctrl-C it is kept with status "interrupted" (if it wrote anything) and `RunInterrupted` (a
    KeyboardInterrupt naming the directory) propagates.
    """
    config = {**config, "lab_version": lab.__version__}
    if not config.get("experiment") and current_experiment():
        config["experiment"] = current_experiment()
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
    except KeyboardInterrupt as e:
        if not run.has_output:
            shutil.rmtree(path, ignore_errors=True)
            raise
        run.interrupted()
        if isinstance(e, RunInterrupted):
            raise
        raise RunInterrupted(f"interrupted; the run so far is kept in {path} (status interrupted)", path) from e
    except BaseException:
        shutil.rmtree(path, ignore_errors=True)
        raise
    else:
        run.flush()
        run.write_summary(status="done", finished=_now())
    finally:
        run.close()


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

    Missing or corrupt files do not raise: every file is validated (config.yaml a mapping, summary.json
    an object, each eval.jsonl line an object, trace.parquet a table with a step column, none empty) and
    a bad one becomes an entry in `errors` (and its default: {} or an empty table), so a dashboard can
    warn and still render the rest. `writer` is read_writer(path) (None once the writer finished).
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.run_id = self.path.name
        self.errors: list[str] = []
        self.config = self._read(CONFIG, _read_config, {})
        self.summary = self._read(SUMMARY, _read_summary, {})
        self.trace = self._read(TRACE, _read_trace, pd.DataFrame(), required=False)
        self.evals = self._read(EVAL, _read_jsonl, pd.DataFrame(), required=False)
        self.masks = self._read(MASKS, pd.read_parquet, pd.DataFrame(), required=False)
        self.writer = read_writer(self.path) if self.summary.get("status") == "running" else None

    def _read(self, name, reader, default, required=True):
        p = self.path / name
        if not p.exists():
            if required:
                self.errors.append(f"{p}: missing")
            return default
        try:
            if p.stat().st_size == 0:
                raise ValueError("empty file")
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

    @property
    def probe_evals(self) -> pd.DataFrame:
        """The robustness-probe records of eval.jsonl (checkpoint "probe:<name>", lab.probes) with a
        `probe` column; empty when the run has none."""
        return probe_evals(self.evals)

    def _read_lazily(self, name) -> pd.DataFrame:
        before = len(self.errors)
        df = self._read(name, pd.read_parquet, pd.DataFrame(), required=False)
        if len(self.errors) > before and self.errors[-1] in self.errors[:before]:
            self.errors.pop()  # a corrupt file read twice is reported once
        return df

    @property
    def status(self) -> str:
        """summary.json's status; "stale" for a "running" run whose writer is gone; "broken" without a summary."""
        if self.errors and not self.summary:
            return "broken"
        status = self.summary.get("status", "unknown")
        if status == "running" and self.writer is not None and not self.writer["alive"]:
            return "stale"
        return status

    @property
    def status_note(self) -> str:
        """Why the status is what it is, in a few words ("" for done / running runs)."""
        if self.status == "stale":
            return f"stale: writer gone ({describe_writer(self.writer)})"
        if self.status == "running" and self.writer:
            return f"written by {describe_writer(self.writer)}"
        if self.status == "broken":
            return "; ".join(self.errors)
        return str(self.summary.get("error") or "")

    def meta(self) -> dict:
        return {"run_id": self.run_id, "path": str(self.path), "status": self.status,
                **{k: self.config.get(k) for k in RUN_KEYS}}


def _read_config(p: Path) -> dict:
    config = yaml.safe_load(p.read_text())
    if not isinstance(config, dict):
        raise ValueError(f"expected a YAML mapping, got {type(config).__name__}")
    return config


def _read_summary(p: Path) -> dict:
    summary = json.loads(p.read_text())
    if not isinstance(summary, dict):
        raise ValueError(f"expected a JSON object, got {type(summary).__name__}")
    for key, kind in (("status", str), ("metrics", dict), ("error", str)):
        if summary.get(key) is not None and not isinstance(summary[key], kind):
            raise ValueError(f"{key!r} is a {type(summary[key]).__name__}, expected a {kind.__name__}")
    return summary


def _read_trace(p: Path) -> pd.DataFrame:
    df = pd.read_parquet(p)
    if len(df) and "step" not in df.columns:
        raise ValueError(f"no 'step' column; columns: {list(df.columns)[:10]}")
    return df


def probe_evals(evals: pd.DataFrame | None) -> pd.DataFrame:
    """The probe records (checkpoint "probe:<name>") of an eval table, with a `probe` column."""
    if evals is None or evals.empty or "checkpoint" not in evals:
        return pd.DataFrame()
    probe = evals[evals["checkpoint"].astype(str).str.startswith(PROBE_PREFIX)].copy()
    probe["probe"] = probe["checkpoint"].str[len(PROBE_PREFIX):]
    return probe.reset_index(drop=True)


def _read_jsonl(p: Path) -> pd.DataFrame:
    records = []
    for i, line in enumerate(p.read_text().splitlines(), 1):
        if line.strip():
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"line {i}: {e}") from None
            if not isinstance(record, dict):
                raise ValueError(f"line {i}: expected a JSON object, got {type(record).__name__}")
            records.append(record)
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
    """One row per run: run_id, path, status, kind, method, model, benchmark, protocol, seed, note, errors.

    note: RunRecord.status_note (a stale run's vanished writer, a stopped run's error)."""
    recs = [load_run(p) for p in find_runs(root)]
    cols = ["run_id", "path", "status", *RUN_KEYS, "note", "errors"]
    return pd.DataFrame([{**r.meta(), "note": r.status_note if r.status != "broken" else "",
                          "errors": "; ".join(r.errors)} for r in recs], columns=cols)


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
