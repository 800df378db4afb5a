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
import torch.distributed as dist
from lab.progress import tqdm   # one line per bar when stderr is not a terminal

import lab
from lab import distributed, runs
from lab.data import benchmark_from_config, chunk_batches, get_benchmark, qa_batches, text_chunks
from lab import eval as lab_eval
from lab.eval import evaluate
from lab.models import load_model, model_info

# Fine-tuning defaults per model. TOFU fine-tunes real LMs 5 epochs at lr 1e-5..2e-5 (TOFU paper);
# a from-scratch `tiny` model must memorise its data from nothing, so it needs many more epochs at a
# much larger lr. 25 epochs: the target still recalls every forget answer (forget ROUGE 1.0, Prob 0.98)
# and the retain model none (0.07); 40 epochs (Prob 0.997) cost 60 % more of `make demo`'s cold start.
# SmolLM2-135M: TOFU's 5 epochs at lr 3e-4: the target recalls its forget set (ROUGE-L 0.96 on 30 rows) and
# the retain model does not (0.27); at lr 1e-4 the target reached only 0.51. The pretrained model's
# real-authors / world-facts Prob and truth ratio survive either (README "Real model").
PREPARE_DEFAULTS = {
    "tiny": dict(epochs=25, lr=3e-3, batch_size=16, weight_decay=0.0, warmup=0.05),
    "smollm2-135m": dict(epochs=5, lr=3e-4, batch_size=16, weight_decay=0.01, warmup=0.1),
    None: dict(epochs=5, lr=1e-5, batch_size=32, weight_decay=0.01, warmup=0.2),
}


def cache_root() -> Path:
    return Path(os.environ.get("LAB_CACHE", Path.home() / ".cache" / "lab"))


# ---------------------------------------------------------------- fine-tuning
def finetune(model, tokenizer, dataset, *, epochs, lr, batch_size, weight_decay=0.0, warmup=0.0,
             seed=0, max_length=512, autocast_dtype=None, desc="finetune", on_step=None,
             position=None, par=None) -> list[float]:
    """Plain supervised fine-tuning on QA rows (answer tokens only) with AdamW and linear warmup/decay.

    Returns the per-step losses; `on_step(step, epoch, loss, lr)` is called after every step.
    par: a lab.distributed.Parallel under a launcher (every rank calls this; the model already wrapped
    by lab.distributed.wrap under fsdp). The global batch is drawn once from the seed and split
    rank::world (lab.distributed.shard_rows); each rank's loss is its tokens' NLL SUM over the global
    batch's answer tokens, so the summed gradients (all-reduced under ddp, reduce-scattered under
    fsdp) are the one-process mean gradient: the same steps at any world size.
    """
    if len(dataset) == 0:
        raise ValueError(f"{desc}: empty training set")
    torch.manual_seed(seed)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    local = distributed.local_list(params)   # the shards under fsdp, the parameters otherwise
    steps_per_epoch, epoch_batches = _sft_batches(tokenizer, dataset, batch_size, seed, max_length)
    total = epochs * steps_per_epoch
    warm = max(1, int(warmup * total))
    opt = torch.optim.AdamW(local, lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min((s + 1) / warm, max(0.0, (total - s) / max(1, total - warm))))
    device = local[0].device
    ctx = (torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype
           else torch.autocast(device.type, enabled=False))
    losses, step = [], 0
    bar = tqdm(total=total, desc=desc, leave=False, position=position,
               disable=par is not None and not par.is_writer)
    for epoch in range(epochs):
        for batch in epoch_batches(epoch):
            loss = _sft_step(model, params, local, batch, ctx, device, par, f"at step {step} (epoch {epoch})", desc)
            opt.step()
            sched.step()
            for p in local:
                p.grad = None
            losses.append(loss)
            if on_step:
                on_step(step, epoch, losses[-1], sched.get_last_lr()[0])
            step += 1
            bar.update()
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
    bar.close()
    model.eval()
    return losses


def _sft_batches(tokenizer, dataset, batch_size, seed, max_length):
    """(steps per epoch, epoch -> batches): QA rows (question/answer: answer tokens only) or texts
    (`text`, MUSE-News: plain LM loss on every token, in lab.data.text_chunks windows of max_length,
    tokenized once)."""
    if "text" not in dataset.column_names:
        return math.ceil(len(dataset) / batch_size), lambda epoch: qa_batches(
            tokenizer, dataset, batch_size, shuffle=True, seed=seed + epoch, max_length=max_length)
    chunks = text_chunks(tokenizer, dataset["text"], max_length)
    if not chunks:
        raise ValueError("finetune: the texts hold no tokens")
    return math.ceil(len(chunks) / batch_size), lambda epoch: chunk_batches(
        tokenizer, chunks, batch_size, shuffle=True, seed=seed + epoch)


def _rank_rows(batch: dict, par) -> tuple[dict, float]:
    """(this rank's rows of a global batch, their loss weight). A rank left without rows (a last batch
    smaller than the world) runs the first row with weight 0: under fsdp every rank must run forward and
    backward (their all-gathers and reduce-scatters), and 0 * a finite loss adds exactly nothing."""
    if par is None or par.group is None:
        return batch, 1.0
    part = distributed.shard_rows(batch, par.rank, par.world)
    if len(part["input_ids"]):
        return part, 1.0
    return {k: v[:1] for k, v in batch.items()}, 0.0


def _sft_step(model, params, local, batch, ctx, device, par, where, desc) -> float:
    """Forward and backward of one global batch on this rank; leaves the global, clipped gradient in
    local[i].grad and returns the global mean loss. Under a launcher the loss sum and this rank's
    failure flag travel in ONE all_reduce before backward: a rank whose forward failed stops every rank
    there (its own exception; the others RankFailed with its message), and a non-finite loss stops all."""
    units = (batch["labels"][:, 1:] != -100).sum().clamp(min=1)   # the global batch's answer tokens
    part, weight = _rank_rows(batch, par)
    part = {k: v.to(device) for k, v in part.items()}
    error, loss = None, None
    try:
        with ctx:
            logits = model(input_ids=part["input_ids"], attention_mask=part["attention_mask"]).logits
        loss = weight * _token_nll_sum(logits, part["labels"]) / units
    except Exception as e:   # noqa: BLE001 - re-raised below, on every rank
        error = e
    if par is not None and par.group is not None:
        flags = torch.stack([loss.detach() if loss is not None else torch.zeros((), device=device),
                             torch.tensor(float(error is not None), device=device)])
        dist.all_reduce(flags, group=par.group)
        if flags[1] > 0:
            _raise_everywhere(error, par)
        total = flags[0]
    else:
        if error is not None:
            raise error
        total = loss.detach()
    if not torch.isfinite(total):
        raise FloatingPointError(f"{desc}: loss is {total.item()} {where}")
    for p in params:
        p.grad = None
    loss.backward()
    grads = [distributed.local(p.grad) if p.grad is not None else torch.zeros_like(q) for p, q in zip(params, local)]
    for p in params:
        p.grad = None
    if par is not None and par.group is not None and not par.sharded:   # ddp: sum the replicas' gradients
        work = [dist.all_reduce(g, group=par.group, async_op=True) for g in grads]
        for w in work:
            w.wait()
    _clip_(grads, 1.0, par)
    for q, g in zip(local, grads):
        q.grad = g
    return total.item()


def _token_nll_sum(logits, labels):
    """Sum of the next-token NLL over the answer tokens (labels != -100), in float32 (as HF's loss)."""
    return torch.nn.functional.cross_entropy(logits[:, :-1].float().flatten(0, 1), labels[:, 1:].flatten(),
                                             ignore_index=-100, reduction="sum")


@torch.no_grad()
def _clip_(grads, max_norm, par):
    """torch.nn.utils.clip_grad_norm_'s rule on the global gradient: under fsdp its norm is the sum of
    the shards' squared norms, all-reduced."""
    sq = torch.stack([g.float().pow(2).sum() for g in grads]).sum()
    if par is not None and par.sharded:
        dist.all_reduce(sq, group=par.group)
    coef = (max_norm / (sq.sqrt() + 1e-6)).clamp(max=1.0)
    torch._foreach_mul_(grads, coef.to(grads[0].dtype))


def _raise_everywhere(error, par):
    """Every rank raises: the failing rank its own exception, the others RankFailed with its message."""
    msg = None if error is None else f"rank {par.rank}: {type(error).__name__}: {error}"
    failed = [m for m in distributed.all_gather_objects(msg, par) if m]
    if error is not None:
        raise error
    raise distributed.RankFailed(failed[0])


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
        hint = (" without max_docs (the whole corpus; the target is a given model): pass --bench-opt max_docs=N"
                if bench.name == "muse_news" else "")
        raise ValueError(f"benchmark {benchmark!r} has no fine-tuning data (train_full/train_retain){hint}; "
                         "prepare works on TOFU benchmarks ('tofu_subset', 'tofu_forget01|05|10') and on "
                         "muse_news with max_docs")
    cfg = {"kind": "prepare", "model": model, "benchmark": bench.config, "seed": seed,
           "max_length": 512, "autocast": None, "eval_batch_size": 16, "eval_limit": None, "score_eos": True,
           **defaults, **hparams}
    cfg["note"] = ("from-scratch model: target and retain models are also trained on the real-authors and "
                   "world-facts QA so that model utility means something"
                   if bench.config.get("extras") else "")
    if bench.name == "muse_news":   # lab.data.muse_news_benchmark: what the two models were trained on
        cfg["note"] = (f"MUSE-News target = {model} fine-tuned (plain LM loss, max_length-token windows) on "
                       f"{len(bench.forget)} forget articles + the retain stand-in {bench.config['retain_standin']}; "
                       "retrain reference = fine-tuned on the stand-in only")
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

    device: where to fine-tune and evaluate ("cuda" on a GPU machine). parallel: True / False: fine-tune
    the two models side by side in two processes, each with half the CPU threads, or one after the
    other; None or "none": side by side on CPU with >= 2 threads. Small models use threads poorly, so
    two half-width processes finish sooner than two full-width runs in turn. "ddp" / "fsdp": under
    torchrun / accelerate launch, every rank calls prepare() and the ranks fine-tune target and retain
    one after the other together (lab.distributed; README 'Scaling out'). None of these changes the
    cache key: the cached models are the same recipe (up to floating-point summation order). Cached
    models whose evaluation under the current EVAL_OPTIONS / EVAL_VERSION is missing are only
    evaluated, not fine-tuned again."""
    mode = launch_mode(parallel)
    cfg = prepare_config(model, benchmark, benchmark_kwargs, seed, **hparams)
    bench = benchmark_from_config(cfg["benchmark"])
    model_key, eval_key = cache_keys(cfg, bench)
    path = cache_root() / "prepared" / model_key
    if mode != "none":
        return _prepare_launched(cfg, bench, path, eval_key, mode, runs_root=runs_root, force=force,
                                 verbose=verbose, device=device)
    parallel = None if parallel == "none" else parallel
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


def prepared_exists(model="tiny", benchmark="tofu_subset", *, benchmark_kwargs=None, seed=0, **hparams) -> bool:
    """Whether prepare() with these arguments would find its fine-tuned models cached (its evaluation
    may still be computed); trains nothing."""
    cfg = prepare_config(model, benchmark, benchmark_kwargs, seed, **hparams)
    return (cache_root() / "prepared" / cache_keys(cfg)[0] / "prepared.json").exists()


CHECKPOINTS = ("retain", "target")   # retain first: the target's evaluation needs it as the reference


def launch_mode(parallel) -> str:
    """'none' (one process: side by side or serial), or the lab.distributed mode of a launcher."""
    if parallel is None or isinstance(parallel, bool):
        return "none"
    if parallel not in distributed.MODES:
        raise ValueError(f"prepare: parallel={parallel!r}; valid: {', '.join(distributed.MODES)}, "
                         "True / False (side by side / one after the other in one process) or None")
    return parallel


# ---------------------------------------------------------------- under a launcher (ddp / fsdp)
def _prepare_launched(cfg, bench, path, eval_key, mode, *, runs_root, force, verbose, device) -> Prepared:
    """prepare() on every rank of a launcher. Rank 0 alone holds the entry lock and decides (fresh /
    evaluate only / cached); the other ranks wait for its decision, take part in the work, then load
    the finished entry. Rank 0 writes the cache entry (atomically, as in one process) and the run;
    any rank's failure stops every rank (lab.distributed.run_all_or_none) and leaves no entry."""
    par = distributed.setup(mode, device)
    lock = entry_lock(path) if par.is_writer else contextlib.nullcontext()
    with lock:
        todo = distributed.from_writer(lambda: _todo(path, eval_key, force), par)
        if todo == "fresh":
            _prepare_fresh_launched(cfg, bench, path, eval_key, runs_root, par)
        elif todo == "evaluate":
            _evaluate_cached_launched(cfg, bench, path, eval_key, par)
        distributed.barrier(par)   # the entry is complete before any rank reads it
    prepared = _load_prepared(path, eval_key, cfg)
    if verbose and par.is_writer:
        what = {"fresh": "prepared models", "evaluate": "prepared models (cached; evaluation recomputed)",
                "cached": "prepared models (cached)"}[todo]
        print(f"{what} ({mode}, {par.world} ranks): {path}" + (f"\nrun: {prepared.run_dir}" if prepared.run_dir else ""))
        print(memorisation_table(prepared))
    return prepared


def _todo(path: Path, eval_key: str, force: bool) -> str:
    """What the entry needs (rank 0, lock held): 'fresh', 'evaluate' (models cached) or 'cached'."""
    _remove_stale_tmp(path)
    if force or not (path / "prepared.json").exists():
        return "fresh"
    return "cached" if (path / "evals" / eval_key / "eval.json").exists() else "evaluate"


def _prepare_fresh_launched(cfg, bench, path, eval_key, runs_root, par) -> None:
    """Fine-tune retain, evaluate it, then the target against it, all ranks together; rank 0 writes
    a temporary entry and moves it into place when complete."""
    on_writer = lambda fn: distributed.run_all_or_none(lambda: fn() if par.is_writer else None, par)  # noqa: E731
    tmp = Path(distributed.from_writer(lambda: str(_new_tmp(path)), par))
    try:
        with contextlib.ExitStack() as stack:
            run_cfg = {**cfg, "device": par.device, "parallel": par.mode, "world_size": par.world}
            run = on_writer(lambda: stack.enter_context(runs.create_run(run_cfg, root=runs_root)))
            run = run if par.is_writer else distributed.NullRun()
            results, info = {}, None
            for which in CHECKPOINTS:
                net, tok, rows, net_info = finetune_checkpoint_launched(cfg, which, tmp, par)
                info = net_info if which == "target" else info
                on_writer(lambda: [run.log_step({k: v for k, v in r.items() if k != "finetune_seconds"}) for r in rows])
                t0 = time.time()
                res = _evaluate_one(cfg, bench, which, net, tok, results.get("retain"), par)
                del net
                seconds = time.time() - t0
                on_writer(lambda: run.log_eval({"step": 0, "checkpoint": which, "finetune_seconds": rows[-1]["finetune_seconds"],
                                                "eval_seconds": seconds, **res["metrics"]}, rows=res["rows"]))
                results[which] = res

            def finish():
                _write_eval(tmp / "evals" / eval_key, cfg, results)
                meta = {"config": cfg, "model_info": info, "run_dir": str(run.path)}
                runs.atomic_write_json(tmp / "prepared.json", meta)   # written last: marks the models complete
                run.write_summary(metrics={w: r["metrics"] for w, r in results.items()}, cache=str(path))
            on_writer(finish)
        on_writer(lambda: _move_into_place(tmp, path))
    except BaseException:
        if par.is_writer:
            shutil.rmtree(tmp, ignore_errors=True)
        raise


def _new_tmp(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    return _tmp_dir(path.parent, path.name)


def _move_into_place(tmp: Path, path: Path) -> None:
    if path.exists():
        shutil.rmtree(path)
    os.replace(tmp, path)


def finetune_checkpoint_launched(cfg: dict, which: str, out: Path, par):
    """finetune_checkpoint on every rank of `par`: (model, tokenizer, trace rows, model_info); rank 0
    saves out/<which> from the full weights. A rank that fails to load stops every rank."""
    bench = benchmark_from_config(cfg["benchmark"])
    data = bench.train_retain if which == "retain" else bench.train_full
    train = {k: cfg[k] for k in ("epochs", "lr", "batch_size", "weight_decay", "warmup", "max_length")}
    net, tok = distributed.run_all_or_none(lambda: load_model(cfg["model"], seed=cfg["seed"], device=par.device), par)
    info = model_info(net)   # before sharding: the whole model's counts and class
    distributed.wrap(net, par, autocast=cfg["autocast"])
    rows = []
    t0 = time.time()
    finetune(net, tok, data, seed=cfg["seed"], autocast_dtype=getattr(torch, cfg["autocast"]) if cfg["autocast"]
             else None, desc=f"fine-tune {which}", par=par,
             on_step=lambda s, e, l, lr: rows.append({"step": s, "epoch": e, "checkpoint": which, "loss": l, "lr": lr}),
             **train)
    rows[-1]["finetune_seconds"] = time.time() - t0
    state = distributed.full_state_dict(net, par)   # a collective under fsdp (None otherwise)
    distributed.run_all_or_none(lambda: _save_checkpoint(net, tok, out / which, state, info) if par.is_writer
                                else None, par)
    return net, tok, rows, info


def _save_checkpoint(net, tok, where: Path, state, info) -> None:
    """save_pretrained of the full weights; the config names the model's own class, not FSDP2's subclass."""
    net.save_pretrained(where, **({"state_dict": state} if state is not None else {}))
    tok.save_pretrained(where)
    config = json.loads((where / "config.json").read_text())
    config["architectures"] = [info["architecture"]]
    runs.atomic_write_json(where / "config.json", config)


def _evaluate_one(cfg, bench, which, net, tok, reference, par) -> dict | None:
    """lab.distributed.evaluate of one checkpoint with the config's options (rows split across ranks,
    the result on rank 0, None elsewhere); the retain model against itself as in one process. The
    reference (the retain result, rank 0's) is sent to every rank: each scores its rows against it."""
    reference = distributed.from_writer(lambda: reference, par) if which == "target" else None
    res = distributed.evaluate(net, tok, bench, par, reference=reference, batch_size=cfg["eval_batch_size"],
                               limit=cfg["eval_limit"], score_eos=cfg.get("score_eos", True),
                               autocast_dtype=getattr(torch, cfg["autocast"]) if cfg["autocast"] else None,
                               progress=par.is_writer)
    if res is not None and which == "retain":
        res = evaluate_reference_self(res)
    return res


def _evaluate_cached_launched(cfg, bench, path: Path, eval_key: str, par) -> None:
    """_evaluate_cached under a launcher: every rank loads the cached models and scores its rows; rank 0
    writes the evaluation atomically."""
    results = {}
    for which in CHECKPOINTS:
        net, tok = distributed.run_all_or_none(lambda: load_model(str(path / which), device=par.device), par)
        results[which] = _evaluate_one(cfg, bench, which, net, tok, results.get("retain"), par)

    def write():
        evals = path / "evals"
        evals.mkdir(exist_ok=True)
        tmp = _tmp_dir(evals, eval_key)
        try:
            _write_eval(tmp, cfg, results)
            os.replace(tmp, evals / eval_key)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    distributed.run_all_or_none(lambda: write() if par.is_writer else None, par)


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
    if str(res.get("benchmark", "")).startswith("muse"):   # no forget quality on MUSE; PrivLeak(AUC, AUC)
        score = (res.get("options") or {}).get("privleak_score", "min_k")
        auc = res["metrics"].get(f"mia_{score}_auc", 0.5 if score == "reference" else math.nan)
        return {**res, "metrics": {**res["metrics"], "privleak": lab_eval.privleak_or_nan(auc, auc)}}
    m = lab_eval.restrict_eval(res, None, reference=res)["metrics"]
    return {**res, "metrics": {**res["metrics"], "forget_quality": m["forget_quality"], "privleak": m["privleak"]}}


def reference_covering(prepared_path, reference: dict, sets: dict, *, device="cpu", progress=False) -> dict:
    """`reference` (the prepared retain model's evaluation, Prepared.retain_eval) extended to every row of
    `sets` ({set name: QA dataset}) it lacks, so that a run scoring other rows than the prepare evaluated
    (a continual run's task heads span all forget authors; the prepare evaluated the first eval_limit rows)
    still compares with the reference on the same rows (METHODS §6). The missing rows are scored (not
    generated: forget quality and PrivLeak read truth ratios and MIA scores) by the retain model under the
    prepare's own evaluation options, and cached in <prepared>/reference_rows/<key>.parquet (atomic).
    The reference is returned unchanged where it covers every row already."""
    rows = reference["rows"]
    have = set(zip(rows["set"], rows["row"].astype(int)))
    missing = {name: ds.select([i for i, r in enumerate(ds["row"]) if (name, int(r)) not in have])
               for name, ds in sets.items()}
    missing = {name: ds for name, ds in missing.items() if len(ds)}
    if not missing:
        return reference
    path = Path(prepared_path)
    cfg = json.loads((path / "prepared.json").read_text())["config"]
    options = dict(reference.get("options") or {})
    key_src = {"rows": {n: sorted(int(r) for r in ds["row"]) for n, ds in missing.items()}, "options": options,
               "autocast": cfg.get("autocast"), "eval_version": lab_eval.EVAL_VERSION,
               "data": data_hash(*missing.values())}
    key = hashlib.sha256(json.dumps(key_src, sort_keys=True, default=str).encode()).hexdigest()[:16]
    out = path / "reference_rows" / f"{key}.parquet"
    if out.is_file():
        extra = pd.read_parquet(out)
    else:
        net, tok = load_model(str(path / "retain"), device=device)
        autocast_dtype = getattr(torch, cfg["autocast"]) if cfg.get("autocast") else None
        extra = lab_eval.score_tofu_rows(net, tok, missing, batch_size=cfg["eval_batch_size"],
                                         autocast_dtype=autocast_dtype, progress=progress, **options)
        out.parent.mkdir(parents=True, exist_ok=True)
        runs.atomic_write_parquet(out, extra)
    return {**reference, "rows": pd.concat([rows, extra], ignore_index=True)}


def _load_prepared(path: Path, eval_key: str, cfg: dict | None = None) -> Prepared:
    meta = json.loads((path / "prepared.json").read_text())
    ev = path / "evals" / eval_key
    stored = json.loads((ev / "eval.json").read_text())
    cfg = cfg or meta["config"]
    evals = {w: {"benchmark": cfg["benchmark"]["name"], "metrics": stored["metrics"][w],
                 "rows": pd.read_parquet(ev / f"{w}_eval_rows.parquet"),
                 "options": (stored.get("options") or {}).get(w)} for w in ("target", "retain")}
    # the prepare run lives under the runs root it was started with; a deleted one is not pointed at
    run_dir = Path(meta["run_dir"]) if meta.get("run_dir") else None
    return Prepared(path=path, config=cfg, target_eval=evals["target"], retain_eval=evals["retain"],
                    run_dir=run_dir if run_dir and run_dir.is_dir() else None, eval_path=ev)


MEMORISATION_KEYS = ["forget_rouge", "forget_prob", "forget_truth_ratio", "forget_quality", "retain_rouge",
                     "retain_prob", "model_utility", "mia_min_k_auc", "privleak"]
MUSE_MEMORISATION_KEYS = ["verbmem_rouge_f1", "verbmem_exact_memorization", "knowmem_forget_rouge_f1",
                          "knowmem_retain_rouge_f1", "mia_min_k_auc", "privleak"]


def memorisation_table(prepared: Prepared) -> str:
    """Target vs retain model side by side: the target must know the forget set, the retain model not."""
    keys = MUSE_MEMORISATION_KEYS if prepared.config["benchmark"]["name"].startswith("muse") else MEMORISATION_KEYS
    df = pd.DataFrame({w: {k: getattr(prepared, f"{w}_eval")["metrics"].get(k) for k in keys}
                       for w in ("target", "retain")})
    return df.to_string(float_format=lambda x: f"{x:.4g}")


if __name__ == "__main__":
    if sys.argv[1:2] != ["--worker"]:
        raise SystemExit("internal entry point of lab.prepare; use `lab prepare` (python -m lab prepare)")
    raise SystemExit(_worker(sys.argv[2:]))
