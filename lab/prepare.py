"""The TOFU protocol's starting point: a target model and a retain reference model.

    prepared = prepare(model="tiny", benchmark="tofu_subset")
    target, tok = prepared.load("target")     # fine-tuned on forget + retain (what we unlearn from)
    retain, tok = prepared.load("retain")     # fine-tuned on retain only (the gold standard)
    prepared.target_eval["metrics"]["forget_rouge"]   # the target really knows the forget set

Two cache levels, so that a change of evaluation conventions never retrains:
- the fine-tuned models under $LAB_CACHE/prepared/<model key>, the key covering the base model, the
  training hyper-parameters, the seed, the lab version and the CONTENT of the rows trained on
  (train_full, train_retain): edited data files never reuse old models;
- their evaluations under <that dir>/evals/<eval key>, the key covering the scoring options
  (EVAL_OPTIONS: eval_limit, score_eos, ...), lab.eval.EVAL_VERSION and the content of the eval sets.
  A missing evaluation is recomputed from the cached models (no fine-tune).
A second call with the same inputs loads in about a second. Fresh preparation also writes a run
directory (kind 'prepare') with the fine-tuning loss trace and both evaluations, so the dashboard shows
it like any other run. One process prepares an entry at a time (a lock file, removed on release).
"""
from __future__ import annotations

import builtins
import contextlib
import dataclasses
import fcntl
import hashlib
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import torch
from lab.progress import tqdm   # one line per bar when stderr is not a terminal

import lab
from lab import runs
from lab.data import benchmark_from_config, get_benchmark, qa_batches
from lab import eval as lab_eval
from lab.eval import evaluate
from lab.models import load_model, model_info

# Fine-tuning defaults per model. TOFU fine-tunes real LMs 5 epochs at lr 1e-5..2e-5 (TOFU paper);
# a from-scratch `tiny` model must memorise its data from nothing, so it needs many more epochs at a
# much larger lr. 25 epochs: the target still recalls every forget answer (forget ROUGE 1.0, Prob 0.98)
# and the retain model none (0.07); 40 epochs (Prob 0.997) cost 60 % more of `make demo`'s cold start.
PREPARE_DEFAULTS = {
    "tiny": dict(epochs=25, lr=3e-3, batch_size=16, weight_decay=0.0, warmup=0.05),
    "smollm2-135m": dict(epochs=5, lr=5e-5, batch_size=16, weight_decay=0.01, warmup=0.2),
    None: dict(epochs=5, lr=1e-5, batch_size=32, weight_decay=0.01, warmup=0.2),
}


def cache_root() -> Path:
    return Path(os.environ.get("LAB_CACHE", Path.home() / ".cache" / "lab"))


# ---------------------------------------------------------------- fine-tuning
def finetune(model, tokenizer, dataset, *, epochs, lr, batch_size, weight_decay=0.0, warmup=0.0,
             seed=0, max_length=512, autocast_dtype=None, desc="finetune", on_step=None,
             position=None) -> list[float]:
    """Plain supervised fine-tuning on QA rows (answer tokens only) with AdamW and linear warmup/decay.

    Returns the per-step losses; `on_step(step, epoch, loss, lr)` is called after every step.
    """
    if len(dataset) == 0:
        raise ValueError(f"{desc}: empty training set")
    torch.manual_seed(seed)
    model.train()
    steps_per_epoch = math.ceil(len(dataset) / batch_size)
    total = epochs * steps_per_epoch
    warm = max(1, int(warmup * total))
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min((s + 1) / warm, max(0.0, (total - s) / max(1, total - warm))))
    device = next(model.parameters()).device
    ctx = (torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype
           else torch.autocast(device.type, enabled=False))
    losses, step = [], 0
    bar = tqdm(total=total, desc=desc, leave=False, position=position)
    for epoch in range(epochs):
        for batch in qa_batches(tokenizer, dataset, batch_size, shuffle=True, seed=seed + epoch,
                                max_length=max_length):
            batch = {k: v.to(device) for k, v in batch.items()}
            with ctx:
                loss = model(**batch).loss
            if not torch.isfinite(loss):
                raise FloatingPointError(f"{desc}: loss is {loss.item()} at step {step} (epoch {epoch})")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            losses.append(loss.item())
            if on_step:
                on_step(step, epoch, losses[-1], sched.get_last_lr()[0])
            step += 1
            bar.update()
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
    bar.close()
    model.eval()
    return losses


# ---------------------------------------------------------------- prepared models
@dataclasses.dataclass
class Prepared:
    path: Path
    config: dict
    target_eval: dict
    retain_eval: dict
    run_dir: Path | None = None
    eval_path: Path | None = None   # where target_eval / retain_eval are cached (one per eval key)

    def load(self, which: str = "target", dtype=None, device="cpu"):
        if which not in ("target", "retain"):
            raise ValueError(f"Prepared.load: which={which!r}; valid: 'target', 'retain'")
        return load_model(str(self.path / which), dtype=dtype, device=device)

    @property
    def benchmark(self):
        return benchmark_from_config(self.config["benchmark"])


def prepare_config(model="tiny", benchmark="tofu_subset", benchmark_kwargs=None, seed=0, **hparams) -> dict:
    defaults = PREPARE_DEFAULTS.get(model, PREPARE_DEFAULTS[None])
    extra = {"max_length", "autocast", "eval_batch_size", "eval_limit", "score_eos"}
    unknown = set(hparams) - set(defaults) - extra
    if unknown:
        raise ValueError(f"prepare: unknown options {sorted(unknown)}; valid: {sorted(set(defaults) | extra)}")
    bench = get_benchmark(benchmark, **(benchmark_kwargs or {}))
    if bench.train_full is None or bench.train_retain is None:
        raise ValueError(f"benchmark {benchmark!r} has no fine-tuning data (train_full/train_retain); "
                         "prepare works on TOFU benchmarks ('tofu_subset', 'tofu_forget01|05|10')")
    cfg = {"kind": "prepare", "model": model, "benchmark": bench.config, "seed": seed,
           "max_length": 512, "autocast": None, "eval_batch_size": 16, "eval_limit": None, "score_eos": True,
           **defaults, **hparams}
    cfg["note"] = ("from-scratch model: target and retain models are also trained on the real-authors and "
                   "world-facts QA so that model utility means something"
                   if bench.config.get("extras") else "")
    return cfg


# which config fields key what: the models are keyed on TRAIN_OPTIONS (+ the rows trained on), their
# evaluations on EVAL_OPTIONS (+ the eval rows, lab.eval.EVAL_VERSION). eval_batch_size keys neither:
# batching does not change the numbers.
TRAIN_OPTIONS = ("model", "seed", "epochs", "lr", "batch_size", "weight_decay", "warmup", "max_length", "autocast")
EVAL_OPTIONS = ("eval_limit", "score_eos", "autocast")


def data_hash(*datasets) -> str:
    """sha256 of the rows of datasets (every column, in order): the same rows give the same hash
    whatever file or folder they were read from."""
    h = hashlib.sha256()
    for ds in datasets:
        h.update(json.dumps(ds.to_dict(), sort_keys=True, default=str).encode())
        h.update(b"\0")
    return h.hexdigest()


def cache_keys(cfg: dict, bench=None) -> tuple[str, str]:
    """(model key, eval key) of a prepare config; bench: its benchmark, when already built."""
    bench = bench or benchmark_from_config(cfg["benchmark"])
    model = {k: cfg[k] for k in TRAIN_OPTIONS}
    model.update(lab_version=lab.__version__, data=data_hash(bench.train_full, bench.train_retain))
    sets = sorted(bench.eval_sets)
    evals = {k: cfg.get(k) for k in EVAL_OPTIONS}
    evals.update(eval_version=lab_eval.EVAL_VERSION, sets=sets, data=data_hash(*(bench.eval_sets[s] for s in sets)))
    key = lambda d: hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:16]  # noqa: E731
    return key(model), key(evals)


@contextlib.contextmanager
def entry_lock(path: Path):
    """Exclusive lock on one cache entry (<path>.lock), removed again on release, also when the holder
    fails. A waiter that locked a file its holder has just removed sees that the path no longer names
    its file and locks afresh, so removing the file never lets two holders in. (After a kill -9 the file
    stays, unlocked: the next holder takes it and removes it.)"""
    lock = Path(str(path) + ".lock")
    lock.parent.mkdir(parents=True, exist_ok=True)
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                held = os.fstat(fd).st_ino == os.stat(lock).st_ino
            except FileNotFoundError:
                held = False
        except BaseException:
            os.close(fd)
            raise
        if held:
            break
        os.close(fd)
    try:
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            lock.unlink()
        os.close(fd)


def _tmp_dir(parent: Path, name: str) -> Path:
    """A fresh .<name>.<random> dir (mkdir: the umask sets its permissions, unlike mkdtemp's 0700)."""
    while True:
        tmp = parent / f".{name}.{os.urandom(4).hex()}"
        with contextlib.suppress(FileExistsError):
            tmp.mkdir(parents=True)
            return tmp


def _remove_stale_tmp(path: Path) -> None:
    """Temporary dirs of this entry left by a killed preparer (only the lock holder creates them)."""
    for tmp in [*path.parent.glob(f".{path.name}.*"), *(path / "evals").glob(".*")]:
        shutil.rmtree(tmp, ignore_errors=True)


def prepare(model="tiny", benchmark="tofu_subset", *, benchmark_kwargs=None, seed=0, runs_root="runs",
            force=False, verbose=True, device="cpu", parallel=None, **hparams) -> Prepared:
    """Fine-tune target (forget + retain) and retain-only models, evaluate both, cache the result.

    device: where to fine-tune and evaluate ("cuda" on a GPU machine). parallel: fine-tune the two
    models side by side in two processes, each with half the CPU threads (None: on CPU with >= 2
    threads). Small models use threads poorly, so two half-width processes finish sooner than two
    full-width runs in turn. Neither changes the cache key: the cached models are the same recipe
    (up to floating-point summation order). Cached models whose evaluation under the current
    EVAL_OPTIONS / EVAL_VERSION is missing are only evaluated, not fine-tuned again."""
    cfg = prepare_config(model, benchmark, benchmark_kwargs, seed, **hparams)
    bench = benchmark_from_config(cfg["benchmark"])
    model_key, eval_key = cache_keys(cfg, bench)
    path = cache_root() / "prepared" / model_key
    # one preparer per cache entry: parallel test workers / notebooks wait instead of training twice
    with entry_lock(path):
        _remove_stale_tmp(path)
        if force or not (path / "prepared.json").exists():
            if parallel is None:
                parallel = torch.device(device).type == "cpu" and torch.get_num_threads() >= 2
            prepared = _prepare_fresh(cfg, path, runs_root, verbose, device, parallel, eval_key)
            fresh = "prepared models"
        else:
            fresh = "prepared models (cached)"
            if not (path / "evals" / eval_key / "eval.json").exists():
                _evaluate_cached(cfg, bench, path, eval_key, device)
                fresh = "prepared models (cached; evaluation recomputed)"
            prepared = _load_prepared(path, eval_key, cfg)
    if verbose:
        print(f"{fresh}: {path}" + (f"\nrun: {prepared.run_dir}" if prepared.run_dir else ""))
        print(memorisation_table(prepared))
    return prepared


CHECKPOINTS = ("retain", "target")   # retain first: the target's evaluation needs it as the reference


def finetune_checkpoint(cfg: dict, which: str, out: Path, device="cpu", threads=None, position=None) -> list[dict]:
    """Fine-tune one checkpoint of a prepare config (`which`: retain on train_retain, target on
    train_full) and save it to out/<which>. Returns its trace rows. Top-level, so that a worker process
    can run it."""
    if threads:
        torch.set_num_threads(threads)
    bench = benchmark_from_config(cfg["benchmark"])
    data = bench.train_retain if which == "retain" else bench.train_full
    train = {k: cfg[k] for k in ("epochs", "lr", "batch_size", "weight_decay", "warmup", "max_length")}
    rows = []
    net, tok = load_model(cfg["model"], seed=cfg["seed"], device=device)
    t0 = time.time()
    finetune(net, tok, data, seed=cfg["seed"], autocast_dtype=getattr(torch, cfg["autocast"]) if cfg["autocast"]
             else None, desc=f"fine-tune {which}", position=position,
             on_step=lambda s, e, l, lr: rows.append({"step": s, "epoch": e, "checkpoint": which, "loss": l, "lr": lr}),
             **train)
    net.save_pretrained(out / which)
    tok.save_pretrained(out / which)
    rows[-1]["finetune_seconds"] = time.time() - t0
    return rows


def _finetune_both(cfg, tmp, device, parallel) -> dict:
    if not parallel:
        return {w: finetune_checkpoint(cfg, w, tmp, device) for w in CHECKPOINTS}
    # one `python -m lab.prepare` worker per checkpoint (a subprocess, not multiprocessing: spawn would
    # re-run the caller's unguarded script, fork is unsafe after OpenMP started)
    threads = max(1, torch.get_num_threads() // len(CHECKPOINTS))
    spec = tmp / "worker-config.json"
    runs.atomic_write_json(spec, cfg)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    procs = {w: subprocess.Popen([sys.executable, "-m", "lab.prepare", "--worker", str(spec), w, str(tmp), device,
                                  str(threads), str(i)], env=env) for i, w in enumerate(CHECKPOINTS)}
    try:
        codes = {w: p.wait() for w, p in procs.items()}
    finally:  # Ctrl-C / an error here: no orphaned worker keeps training
        for p in procs.values():
            if p.poll() is None:
                p.kill()
    out = {}
    for w in CHECKPOINTS:
        error = tmp / f"{w}.error.json"
        if error.exists():   # the worker's own exception, re-raised here with its type when it is a builtin
            err = json.loads(error.read_text())
            kind = getattr(builtins, err["type"], None)
            raise (kind if isinstance(kind, type) and issubclass(kind, Exception) else RuntimeError)(err["message"])
        if codes[w] != 0:
            raise RuntimeError(f"prepare: the {w} fine-tuning worker exited with code {codes[w]} (see its output above)")
        out[w] = json.loads((tmp / f"{w}.trace.json").read_text())
        (tmp / f"{w}.trace.json").unlink()
    spec.unlink()
    return out


def _worker(argv) -> int:
    """python -m lab.prepare --worker CONFIG.json WHICH OUT DEVICE THREADS POSITION (see _finetune_both)."""
    spec, which, out, device, threads, position = argv
    out = Path(out)
    try:
        rows = finetune_checkpoint(json.loads(Path(spec).read_text()), which, out, device, int(threads), int(position))
    except Exception as e:
        runs.atomic_write_json(out / f"{which}.error.json", {"type": type(e).__name__, "message": str(e)})
        raise
    runs.atomic_write_json(out / f"{which}.trace.json", rows)
    return 0


def _evaluate_both(cfg, bench, model_dir: Path, device="cpu", on_eval=None) -> dict:
    """Evaluate the retain model, then the target against it (the reference), with the config's
    evaluation options. on_eval(which, result, seconds) is called after each."""
    autocast_dtype = getattr(torch, cfg["autocast"]) if cfg["autocast"] else None
    results = {}
    for which in CHECKPOINTS:
        t0 = time.time()
        net, tok = load_model(str(model_dir / which), device=device)
        res = evaluate(net, tok, bench, reference=results.get("retain"), batch_size=cfg["eval_batch_size"],
                       limit=cfg["eval_limit"], autocast_dtype=autocast_dtype, score_eos=cfg.get("score_eos", True))
        if which == "retain":  # the reference against itself: FQ = 1, PrivLeak = 0 by construction
            res = evaluate_reference_self(res)
        results[which] = res
        if on_eval:
            on_eval(which, res, time.time() - t0)
    return results


def _write_eval(out: Path, cfg: dict, results: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for which, res in results.items():
        res["rows"].to_parquet(out / f"{which}_eval_rows.parquet", index=False)
    runs.atomic_write_json(out / "eval.json", {   # written last: marks the entry complete
        "eval_options": {k: cfg.get(k) for k in EVAL_OPTIONS}, "eval_version": lab_eval.EVAL_VERSION,
        "metrics": {w: r["metrics"] for w, r in results.items()},
        "options": {w: r.get("options") for w, r in results.items()}})


def _evaluate_cached(cfg, bench, path: Path, eval_key: str, device="cpu") -> None:
    """Evaluate cached models under new evaluation options (no fine-tune); written atomically."""
    evals = path / "evals"
    evals.mkdir(exist_ok=True)
    tmp = _tmp_dir(evals, eval_key)
    try:
        _write_eval(tmp, cfg, _evaluate_both(cfg, bench, path, device))
        os.replace(tmp, evals / eval_key)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _prepare_fresh(cfg, path, runs_root, verbose, device="cpu", parallel=False, eval_key=None) -> Prepared:
    bench = benchmark_from_config(cfg["benchmark"])
    eval_key = eval_key or cache_keys(cfg, bench)[1]
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_dir(path.parent, path.name)
    try:
        with runs.create_run({**cfg, "device": device, "parallel": bool(parallel)}, root=runs_root) as run:
            trained = _finetune_both(cfg, tmp, device, parallel)
            for which in CHECKPOINTS:
                for row in trained[which]:
                    run.log_step({k: v for k, v in row.items() if k != "finetune_seconds"})

            def log(which, res, seconds):
                run.log_eval({"step": 0, "checkpoint": which, "finetune_seconds": trained[which][-1]["finetune_seconds"],
                              "eval_seconds": seconds, **res["metrics"]}, rows=res["rows"])

            results = _evaluate_both(cfg, bench, tmp, device, on_eval=log)
            _write_eval(tmp / "evals" / eval_key, cfg, results)
            info = model_info(load_model(str(tmp / "target"))[0])
            meta = {"config": cfg, "model_info": info, "run_dir": str(run.path)}
            runs.atomic_write_json(tmp / "prepared.json", meta)   # written last: marks the models complete
            run.write_summary(metrics={w: r["metrics"] for w, r in results.items()}, cache=str(path))
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return _load_prepared(path, eval_key, cfg)


def evaluate_reference_self(res: dict) -> dict:
    """Forget quality and PrivLeak of the reference model against itself (exactly 1 and 0; PrivLeak NaN
    when undefined, see lab.eval.privleak_or_nan), by the same code as any comparison with a reference."""
    m = lab_eval.restrict_eval(res, None, reference=res)["metrics"]
    return {**res, "metrics": {**res["metrics"], "forget_quality": m["forget_quality"], "privleak": m["privleak"]}}


def _load_prepared(path: Path, eval_key: str, cfg: dict | None = None) -> Prepared:
    meta = json.loads((path / "prepared.json").read_text())
    ev = path / "evals" / eval_key
    stored = json.loads((ev / "eval.json").read_text())
    cfg = cfg or meta["config"]
    evals = {w: {"benchmark": cfg["benchmark"]["name"], "metrics": stored["metrics"][w],
                 "rows": pd.read_parquet(ev / f"{w}_eval_rows.parquet"),
                 "options": (stored.get("options") or {}).get(w)} for w in ("target", "retain")}
    return Prepared(path=path, config=cfg, target_eval=evals["target"], retain_eval=evals["retain"],
                    run_dir=Path(meta["run_dir"]) if meta.get("run_dir") else None, eval_path=ev)


MEMORISATION_KEYS = ["forget_rouge", "forget_prob", "forget_truth_ratio", "forget_quality", "retain_rouge",
                     "retain_prob", "model_utility", "mia_min_k_auc", "privleak"]


def memorisation_table(prepared: Prepared) -> str:
    """Target vs retain model side by side: the target must know the forget set, the retain model not."""
    df = pd.DataFrame({w: {k: getattr(prepared, f"{w}_eval")["metrics"].get(k) for k in MEMORISATION_KEYS}
                       for w in ("target", "retain")})
    return df.to_string(float_format=lambda x: f"{x:.4g}")


if __name__ == "__main__":
    if sys.argv[1:2] != ["--worker"]:
        raise SystemExit("internal entry point of lab.prepare; use `lab prepare` (python -m lab prepare)")
    raise SystemExit(_worker(sys.argv[2:]))
