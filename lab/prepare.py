"""The TOFU protocol's starting point: a target model and a retain reference model.

    prepared = prepare(model="tiny", benchmark="tofu_subset")
    target, tok = prepared.load("target")     # fine-tuned on forget + retain (what we unlearn from)
    retain, tok = prepared.load("retain")     # fine-tuned on retain only (the gold standard)
    prepared.target_eval["metrics"]["forget_rouge"]   # the target really knows the forget set

Both are cached under $LAB_CACHE/prepared/<hash> where the hash covers (base model, benchmark config,
hyper-parameters, seed, lab version): a second call with the same inputs loads in about a second.
Fresh preparation also writes a run directory (kind 'prepare') with the fine-tuning loss trace and
both evaluations, so the dashboard shows it like any other run.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import shutil
import tempfile
import time
from pathlib import Path

import pandas as pd
import torch
from filelock import FileLock
from tqdm.auto import tqdm

import lab
from lab import runs
from lab.data import benchmark_from_config, get_benchmark, qa_batches
from lab.eval import evaluate
from lab.models import load_model, model_info

# Fine-tuning defaults per model. TOFU fine-tunes real LMs 5 epochs at lr 1e-5..2e-5 (TOFU paper);
# a from-scratch `tiny` model must memorise its data from nothing, so it needs many more epochs at a
# much larger lr.
PREPARE_DEFAULTS = {
    "tiny": dict(epochs=40, lr=3e-3, batch_size=16, weight_decay=0.0, warmup=0.05),
    "smollm2-135m": dict(epochs=5, lr=5e-5, batch_size=16, weight_decay=0.01, warmup=0.2),
    None: dict(epochs=5, lr=1e-5, batch_size=32, weight_decay=0.01, warmup=0.2),
}


def cache_root() -> Path:
    return Path(os.environ.get("LAB_CACHE", Path.home() / ".cache" / "lab"))


# ---------------------------------------------------------------- fine-tuning
def finetune(model, tokenizer, dataset, *, epochs, lr, batch_size, weight_decay=0.0, warmup=0.0,
             seed=0, max_length=512, autocast_dtype=None, desc="finetune", on_step=None) -> list[float]:
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
    bar = tqdm(total=total, desc=desc, leave=False)
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

    def load(self, which: str = "target", dtype=None, device="cpu"):
        if which not in ("target", "retain"):
            raise ValueError(f"Prepared.load: which={which!r}; valid: 'target', 'retain'")
        return load_model(str(self.path / which), dtype=dtype, device=device)

    @property
    def benchmark(self):
        return benchmark_from_config(self.config["benchmark"])


def prepare_config(model="tiny", benchmark="tofu_subset", benchmark_kwargs=None, seed=0, **hparams) -> dict:
    defaults = PREPARE_DEFAULTS.get(model, PREPARE_DEFAULTS[None])
    unknown = set(hparams) - set(defaults) - {"max_length", "autocast", "eval_batch_size", "eval_limit"}
    if unknown:
        raise ValueError(f"prepare: unknown options {sorted(unknown)}; valid: "
                         f"{sorted(set(defaults) | {'max_length', 'autocast', 'eval_batch_size', 'eval_limit'})}")
    bench = get_benchmark(benchmark, **(benchmark_kwargs or {}))
    if bench.train_full is None or bench.train_retain is None:
        raise ValueError(f"benchmark {benchmark!r} has no fine-tuning data (train_full/train_retain); "
                         "prepare works on TOFU benchmarks ('tofu_subset', 'tofu_forget01|05|10')")
    cfg = {"kind": "prepare", "model": model, "benchmark": bench.config, "seed": seed,
           "max_length": 512, "autocast": None, "eval_batch_size": 16, "eval_limit": None,
           **defaults, **hparams}
    cfg["note"] = ("from-scratch model: target and retain models are also trained on the real-authors and "
                   "world-facts QA so that model utility means something"
                   if bench.config.get("extras") else "")
    return cfg


def _hash(cfg: dict) -> str:
    keyed = {k: v for k, v in cfg.items() if k not in ("eval_batch_size",)}
    keyed["lab_version"] = lab.__version__
    return hashlib.sha256(json.dumps(keyed, sort_keys=True, default=str).encode()).hexdigest()[:16]


def prepare(model="tiny", benchmark="tofu_subset", *, benchmark_kwargs=None, seed=0, runs_root="runs",
            force=False, verbose=True, **hparams) -> Prepared:
    """Fine-tune target (forget + retain) and retain-only models, evaluate both, cache the result."""
    cfg = prepare_config(model, benchmark, benchmark_kwargs, seed, **hparams)
    path = cache_root() / "prepared" / _hash(cfg)
    path.parent.mkdir(parents=True, exist_ok=True)
    # one preparer per cache entry: parallel test workers / notebooks wait instead of training twice
    with FileLock(str(path) + ".lock"):
        if (path / "prepared.json").exists() and not force:
            prepared = _load_prepared(path)
            if verbose:
                print(f"prepared models (cached): {path}")
                print(memorisation_table(prepared))
            return prepared
        return _prepare_fresh(cfg, path, runs_root, verbose)


def _prepare_fresh(cfg, path, runs_root, verbose) -> Prepared:
    model, seed = cfg["model"], cfg["seed"]

    bench = benchmark_from_config(cfg["benchmark"])
    autocast_dtype = getattr(torch, cfg["autocast"]) if cfg["autocast"] else None
    train = {k: cfg[k] for k in ("epochs", "lr", "batch_size", "weight_decay", "warmup", "max_length")}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}."))
    try:
        with runs.create_run(cfg, root=runs_root) as run:
            results = {}
            for which, data in (("retain", bench.train_retain), ("target", bench.train_full)):
                t0 = time.time()
                net, tok = load_model(model, seed=seed)
                finetune(net, tok, data, seed=seed, autocast_dtype=autocast_dtype, desc=f"fine-tune {which}",
                         on_step=lambda s, e, l, lr, w=which: run.log_step(
                             {"step": s, "epoch": e, "checkpoint": w, "loss": l, "lr": lr}), **train)
                net.save_pretrained(tmp / which)
                tok.save_pretrained(tmp / which)
                ref = results.get("retain")
                res = evaluate(net, tok, bench, reference=ref, batch_size=cfg["eval_batch_size"],
                               limit=cfg["eval_limit"], autocast_dtype=autocast_dtype)
                if which == "retain":  # the reference against itself: FQ = 1, PrivLeak = 0 by construction
                    res = evaluate_reference_self(res)
                results[which] = res
                run.log_eval({"step": 0, "checkpoint": which, "seconds": time.time() - t0, **res["metrics"]},
                             rows=res["rows"])
                res["rows"].to_parquet(tmp / f"{which}_eval_rows.parquet", index=False)
            info = model_info(net)
            meta = {"config": cfg, "model_info": info, "run_dir": str(run.path),
                    "metrics": {w: r["metrics"] for w, r in results.items()}}
            runs.atomic_write_json(tmp / "prepared.json", meta)
            run.write_summary(metrics={w: r["metrics"] for w, r in results.items()}, cache=str(path))
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    prepared = _load_prepared(path)
    if verbose:
        print(f"prepared models: {path}\nrun: {prepared.run_dir}")
        print(memorisation_table(prepared))
    return prepared


def evaluate_reference_self(res: dict) -> dict:
    """Forget quality and PrivLeak of the reference model against itself (exactly 1 and 0)."""
    from lab import metrics
    m = dict(res["metrics"])
    forget = res["rows"].query("set == 'forget'")["truth_ratio"].to_numpy()
    m["forget_quality"] = float(metrics.forget_quality(forget, forget))
    m["privleak"] = float(metrics.privleak(m["mia_min_k_auc"], m["mia_min_k_auc"]))
    return {**res, "metrics": m}


def _load_prepared(path: Path) -> Prepared:
    meta = json.loads((path / "prepared.json").read_text())
    evals = {w: {"benchmark": meta["config"]["benchmark"]["name"], "metrics": meta["metrics"][w],
                 "rows": pd.read_parquet(path / f"{w}_eval_rows.parquet")} for w in ("target", "retain")}
    return Prepared(path=path, config=meta["config"], target_eval=evals["target"],
                    retain_eval=evals["retain"], run_dir=Path(meta["run_dir"]) if meta.get("run_dir") else None)


MEMORISATION_KEYS = ["forget_rouge", "forget_prob", "forget_truth_ratio", "forget_quality", "retain_rouge",
                     "retain_prob", "model_utility", "mia_min_k_auc", "privleak"]


def memorisation_table(prepared: Prepared) -> str:
    """Target vs retain model side by side: the target must know the forget set, the retain model not."""
    df = pd.DataFrame({w: {k: getattr(prepared, f"{w}_eval")["metrics"].get(k) for k in MEMORISATION_KEYS}
                       for w in ("target", "retain")})
    return df.to_string(float_format=lambda x: f"{x:.4g}")
