"""Continual unlearning (ALKN; METHODS §5): a sequence of forget tasks, evaluated after every task.

    from lab.continual import continual
    res = continual(method="alkn", protocol="sequential", benchmark="tofu_subset",
                    benchmark_kwargs={"n_forget_authors": 5}, epochs=2, eval_limit=8)
    res.table                      # per-task table: MU and every task's F-Rouge / F-Prob / FQ after each task
    continual(resume=res.run_dir)  # an interrupted run goes on from its last finished task

Protocols: `sequential` (task t starts from theta^{t-1} and sees only D_u^t + the retain set),
`independent` (every task from theta_0), `joint` (task t unlearns D_u^1 u ... u D_u^t from theta_0).
Methods: any engine method (lab.methods: ga_rt, npo_gd, npo_kl, gru_*, blur_*, ngdiff, ...), the
model-arithmetic methods `tv` and ALKN (`alkn`, `alkn_wo_esl`, `alkn_wo_dgs`, `alkn_wo_apm`; lab.alkn)
and `tru` (lab.taskvec). Baselines (everything but ALKN) halve the lr after each task (ALKN App. E.1;
`lr_decay`). `lr_schedule`: `per_task` (default) = task t uses lr * lr_decay**t in every protocol, so
sequential / independent / joint compare at the same per-task lr (ALKN fig. 2b); `sequential_only` = the
decay applies to the sequential protocol only (independent / joint keep lr; the lab's runs before this
option). ALKN's union mask M carries over tasks in the sequential protocol only.

Benchmarks and tasks: tofu_forget10 -> 5 tasks of 4 whole authors (lab.data.tofu_continual_tasks);
tofu_subset -> its forget authors in whole-author tasks (n_tasks; `task_unit: rows` cuts equal row
blocks instead); muse_news -> sust/forget_1..4. The prepared target (lab.prepare) was trained on every
task's forget data and the retain model on the retain set only, so FQ per task is against that model.

Run directory (lab.runs), besides config.yaml / trace.parquet / summary.json:
  eval.jsonl  checkpoint "initial" (task -1) and "unlearned" after each task t (task = t):
              - one utility record (eval_task None): model utility and its parts / MUSE metrics, T-Rouge
                (`trouge`, `model_utility_trouge` when configured), lr, seconds, and the task's diagnostics:
                active_fraction (ALKN final mask), mask_jaccard_prev (vs the union of earlier masks),
                tv_moved_fraction (fraction of parameters the task changed = realised task-vector density),
                update_norm ||theta^t - theta^{t-1}||, predicted_retain_change G_r . (theta^t - theta^{t-1})
                (G_r = retain NLL gradient at theta^{t-1}; first-order change of the retain loss);
              - one record per task k (eval_task k): forget_prob, forget_rouge, forget_truth_ratio,
                forget_quality (KS vs the retain model on the same rows), mia_{loss,min_k,zlib}_auc,
                privleak (TOFU); forget_prob, forget_min_k, mia_min_k_auc (MUSE).
              Cascading degradation (ALKN fig. 2a): forget_prob of eval_task k at "initial" vs at task k-1.
  trace.parquet   engine trace rows of every task's loop (column task; ALKN adds active_fraction, dgs_*)
  masks.parquet   Jaccard overlap of task masks (lab.masks.overlap_table; ALKN only)
  masks/task_<t>.npz, mask_counts.parquet   per-task masks as packed bits, per-tensor counts
  checkpoint/     state.json (+ params.pt, union_mask.npz in the sequential protocol): resume point

LoRA (`lora`, lab.lora; engine methods only): one peft adapter is put on theta_0 and trained across the tasks
(sequential: task t goes on from task t-1's adapter; independent / joint: every task from the adapter's init),
the base weights stay frozen. Each task's reference (KL / NPO theta_ref) is the merged model at the task's start,
as without LoRA; evaluation, --save-model (<run>/model, plus <run>/adapter) and probes use the merged model.
The per-task diagnostics (tv_moved_fraction, update_norm, predicted_retain_change) and checkpoint/params.pt are
over the adapter parameters, so resume restores the adapter. ALKN, tv and tru (task vectors and masks over the
full weights) refuse lora; so does --parallel fsdp (as in lab unlearn), ddp runs it.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import time
from pathlib import Path

import pandas as pd
import torch

from lab import alkn, distributed, geometry, lora, masks, prepare, runs, taskvec
from lab.data import forget_text_rows
from lab.engine import (Diverged, LoopState, UnlearnConfig, load_starting_point, make_context, resolved_lr,
                        unlearning_loop)
from lab.methods import METHODS, fit_to_model, get_method
# the per-task table is pure pandas, shared with the dashboard (which must not import torch)
from lab.runs_views import TABLE_PER_TASK, TABLE_UTILITY, evals_task_table as task_table  # noqa: F401

PROTOCOLS = ("sequential", "independent", "joint")
TASK_UNITS = ("author", "rows")
LR_SCHEDULES = ("per_task", "sequential_only")
TRU_DEFAULTS = {"n_batches": 4, "stg": 0.75}
TIME_KEYS = ("seconds", "task_seconds", "eval_seconds")   # wall-clock values (differ between reruns)


@dataclasses.dataclass
class ContinualConfig(UnlearnConfig):
    """UnlearnConfig (per-task loop settings) plus the continual protocol. Saved to config.yaml."""
    method: str = "alkn"
    protocol: str = "sequential"        # sequential | independent | joint
    n_tasks: int | None = None          # None: 5 (tofu_forgetXX), all forget authors up to 5 per task count
    task_unit: str = "author"           # TOFU: whole authors per task, or "rows" (equal row blocks)
    lr_decay: float | None = None       # lr *= lr_decay after each task; None: 0.5 baselines, 1 ALKN
    lr_schedule: str = "per_task"       # per_task: decay in every protocol | sequential_only: sequential only
    task_diagnostics: bool = True       # G_r per task for predicted_retain_change (ALKN computes it anyway)
    trouge: dict | None = None          # lab.alkn.build_trouge_corpus options: adds T-Rouge and MU with it
    checkpoint: bool = True             # keep <run>/checkpoint after each task (resume)
    eval_max_new_tokens: int | None = None   # TOFU generation length (None: 200, METHODS §6); smoke tests

    def __post_init__(self):
        if self.protocol not in PROTOCOLS:
            raise ValueError(f"protocol={self.protocol!r}; valid: {list(PROTOCOLS)}")
        if self.task_unit not in TASK_UNITS:
            raise ValueError(f"task_unit={self.task_unit!r}; valid: {list(TASK_UNITS)}")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"lr_schedule={self.lr_schedule!r}; valid: {list(LR_SCHEDULES)}")
        if self.lr_decay is not None and not 0 < self.lr_decay <= 1:
            raise ValueError(f"lr_decay={self.lr_decay}; valid: (0, 1] or None")
        if self.n_tasks is not None and (isinstance(self.n_tasks, bool) or not isinstance(self.n_tasks, int)
                                         or self.n_tasks < 1):
            raise ValueError(f"n_tasks={self.n_tasks!r}; valid: a positive int or None")
        self.kind, self.inner_method, self.inner_args, self.opts = resolve_method(self.method, self.method_args)
        self.lora = lora.parse_spec(self.lora)   # recorded as the full dict (r, alpha, dropout, targets)
        if self.lora and self.kind != "engine":
            raise ValueError(f"lora: continual method {self.method!r} works on the full weights (ALKN's DGS masks "
                             "and APM, the task vectors of tv / tru), not on adapters; --lora / lora= runs with "
                             f"the engine methods (and their aliases, `lab methods`): {', '.join(lora_methods())}")
        self.task_config(lr=self.base_lr)   # validates the engine fields (lora: not with fsdp or rmu)

    @property
    def base_lr(self) -> float:
        return resolved_lr(self)

    @property
    def decay(self) -> float:
        if self.lr_decay is not None:
            return self.lr_decay
        return 1.0 if self.kind == "alkn" and self.opts["variant"] != "tv" else 0.5

    def task_lr(self, t: int) -> float:
        """Task t's lr: base_lr * decay**t (sequential_only: decayed in the sequential protocol only)."""
        decays = self.lr_schedule == "per_task" or self.protocol == "sequential"
        return self.base_lr * (self.decay ** t if decays else 1.0)

    def task_config(self, lr: float, seed: int | None = None) -> UnlearnConfig:
        base = {f.name: getattr(self, f.name) for f in dataclasses.fields(UnlearnConfig)}
        return UnlearnConfig(**{**base, "method": self.inner_method, "method_args": self.inner_args, "lr": lr,
                                "seed": self.seed if seed is None else seed})

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def lora_methods() -> list[str]:
    """The continual methods that take `lora`: the engine methods that train every weight (not rmu)."""
    return sorted({m.name for m in METHODS.values() if not m.trainable})


def resolve_method(name: str, method_args: dict) -> tuple[str, str, dict, dict]:
    """(kind, engine method used per task, its args, arithmetic options) for a continual method name."""
    key = alkn.normalise_variant(name)
    if key in alkn.VARIANTS:
        opts = alkn.alkn_options(key, **(method_args or {}))
        if opts["esl"]:
            return "alkn", "finetune_esl", {k: opts[k] for k in ("esl_s", "esl_form", "esl_k")}, opts
        return "alkn", "finetune_forget", {}, opts
    if key == "tru":
        unknown = set(method_args or {}) - set(TRU_DEFAULTS)
        if unknown:
            raise ValueError(f"tru: unknown options {sorted(unknown)}; valid: {sorted(TRU_DEFAULTS)}")
        return "tru", "finetune_forget", {}, {**TRU_DEFAULTS, **(method_args or {})}
    try:
        method, args = get_method(name, **(method_args or {}))
    except ValueError as e:
        raise ValueError(f"{e}; continual also runs: {sorted(alkn.VARIANTS)} and 'tru'") from None
    return "engine", method.name, args, {}


# ---------------------------------------------------------------- tasks
def _default_n_tasks(n_units: int) -> int:
    return 5 if n_units % 5 == 0 else n_units


def continual_tasks(bench, n_tasks: int | None = None, unit: str = "author") -> list:
    """The task datasets of a benchmark (each with a `task` column), in order."""
    from lab.data import TOFU_FORGET_ROWS, load_muse_news, tofu_continual_tasks
    if bench.name == "muse_news":
        n = n_tasks or 4
        if not 1 <= n <= 4:
            raise ValueError(f"muse_news: n_tasks={n}; valid: 1..4 (sust/forget_1..4)")
        root = bench.config.get("root")
        return [_with_task(load_muse_news(f"sust/forget_{i + 1}", root), i) for i in range(n)]
    if not bench.name.startswith("tofu"):
        raise ValueError(f"continual: benchmark {bench.name!r}; valid: tofu_subset, tofu_forget01|05|10, muse_news")
    forget = bench.forget
    if unit == "rows":
        n = n_tasks or _default_n_tasks(len(forget))
        if not 1 <= n <= len(forget):
            raise ValueError(f"n_tasks={n}; valid with task_unit=rows: 1..{len(forget)}")
        cuts = [round(i * len(forget) / n) for i in range(n + 1)]
        return [_with_task(forget.select(range(cuts[i], cuts[i + 1])), i) for i in range(n)]
    authors = list(dict.fromkeys(forget["author"]))
    n = n_tasks or _default_n_tasks(len(authors))
    valid = [k for k in range(1, len(authors) + 1) if len(authors) % k == 0]
    if n not in valid:
        raise ValueError(f"{bench.name}: {len(authors)} forget authors cannot be cut into n_tasks={n} equal "
                         f"whole-author tasks; valid n_tasks: {valid} (or task_unit='rows')")
    split = bench.config.get("forget_split")
    if split in TOFU_FORGET_ROWS:
        return tofu_continual_tasks(n, split, bench.config.get("root"))
    per = len(authors) // n
    task_of = {a: i // per for i, a in enumerate(authors)}
    column = forget["author"]
    return [_with_task(forget.select([i for i, a in enumerate(column) if task_of[a] == t]), t) for t in range(n)]


def _with_task(ds, t):
    if "task" in ds.column_names:
        ds = ds.remove_columns("task")
    return ds.add_column("task", [t] * len(ds))


def task_data(tasks, t: int, protocol: str):
    from datasets import concatenate_datasets
    return concatenate_datasets(tasks[:t + 1]) if protocol == "joint" else tasks[t]


# ---------------------------------------------------------------- evaluation after each task
def _head(ds, limit):
    return ds if limit is None else ds.select(range(min(limit, len(ds))))


def evaluate_tasks(model, tok, bench, tasks, cfg: ContinualConfig, reference=None, trouge_corpus=None,
                   progress=False, par=None) -> tuple[dict, list[dict], pd.DataFrame] | None:
    """(utility metrics, one forget-metrics dict per task, per-row outputs) of the model now.
    Under a launcher (`par`, lab.distributed.Parallel with a group) every rank must call it: the TOFU
    rows are split across ranks and gathered on rank 0, the rest runs on rank 0; other ranks get None."""
    if par is not None and par.group is not None:
        return _evaluate_tasks_distributed(model, tok, bench, tasks, cfg, reference, trouge_corpus, progress, par)
    kw = _eval_kwargs(cfg, progress)
    if bench.name.startswith("tofu"):
        util, per_task, rows = _evaluate_tofu_tasks(model, tok, bench, tasks, cfg, reference, kw)
    else:
        util, per_task, rows = _evaluate_muse_tasks(model, tok, bench, tasks, cfg, kw)
    _add_trouge(util, model, tok, bench, trouge_corpus, cfg)
    return util, per_task, rows


def _eval_kwargs(cfg, progress) -> dict:
    autocast = getattr(torch, cfg.autocast) if cfg.autocast else None
    return dict(batch_size=cfg.eval_batch_size, autocast_dtype=autocast, progress=progress, score_eos=cfg.score_eos)


def _add_trouge(util, model, tok, bench, trouge_corpus, cfg):
    if trouge_corpus:
        util["trouge"] = alkn.trouge(model, tok, trouge_corpus, batch_size=cfg.eval_batch_size)["trouge"]
        if bench.name.startswith("tofu"):
            util["model_utility_trouge"] = alkn.utility_with_trouge(util, util["trouge"])


def _evaluate_tasks_distributed(model, tok, bench, tasks, cfg, reference, trouge_corpus, progress, par):
    whole = distributed.plain_copy(model, par)   # fsdp: an unsharded copy on every rank (a collective)
    # the copy is whole on every rank, as under ddp: distributed.evaluate then makes no second one
    replicated = dataclasses.replace(par, mode="ddp")
    kw = _eval_kwargs(cfg, progress and par.is_writer)
    res = None
    if bench.name.startswith("tofu"):
        heads, sub = _tofu_eval_benchmark(bench, tasks, cfg.eval_limit)
        res = distributed.evaluate(whole, tok, sub, replicated, reference=None, limit=None,
                                   max_new_tokens=cfg.eval_max_new_tokens, **kw)

    def on_writer():   # the per-task metrics from all rows, MUSE, T-Rouge: rank 0 alone (no collective)
        if res is not None:
            util, per_task, rows = _tofu_per_task(res, heads, reference)
        else:
            util, per_task, rows = _evaluate_muse_tasks(whole, tok, bench, tasks, cfg, kw)
        _add_trouge(util, whole, tok, bench, trouge_corpus, cfg)
        return util, per_task, rows
    return distributed.run_all_or_none(lambda: on_writer() if par.is_writer else None, par)


def _tofu_eval_benchmark(bench, tasks, limit):
    """(the tasks' first `limit` rows, the benchmark evaluating them as its forget set)."""
    from datasets import concatenate_datasets
    heads = [_head(t, limit) for t in tasks]
    sets = {name: _head(ds, limit) for name, ds in bench.eval_sets.items() if name != "forget"}
    sets["forget"] = concatenate_datasets([h.remove_columns("task") for h in heads])
    return heads, dataclasses.replace(bench, eval_sets=sets)


def _evaluate_tofu_tasks(model, tok, bench, tasks, cfg, reference, kw):
    from lab.eval import evaluate
    heads, sub = _tofu_eval_benchmark(bench, tasks, cfg.eval_limit)
    res = evaluate(model, tok, sub, reference=None, limit=None, max_new_tokens=cfg.eval_max_new_tokens, **kw)
    return _tofu_per_task(res, heads, reference)


def _tofu_per_task(res, heads, reference):
    """(utility metrics, per-task forget metrics, per-row outputs) of one evaluation of the task heads."""
    from lab import metrics
    from lab.eval import privleak_or_nan, same_rows
    m, rows = res["metrics"], res["rows"]
    util = {k: v for k, v in m.items() if not k.startswith(("forget_", "mia_", "privleak"))}
    row_task = {int(r): t for t, h in enumerate(heads) for r in h["row"]}
    rows["row_task"] = [row_task.get(int(r), -1) if s == "forget" else -1 for s, r in zip(rows["set"], rows["row"])]
    holdout = rows[rows["set"] == "holdout"]
    mia_k = m.get("mia_min_k", 0.4)
    per_task = []
    for t in range(len(heads)):
        g = rows[(rows["set"] == "forget") & (rows["row_task"] == t)]
        out = {"forget_prob": float(g["prob"].mean()), "forget_rouge": float(g["rouge"].mean()),
               "forget_truth_ratio": float(metrics.truth_ratio_stat(g["truth_ratio"].to_numpy(), "forget"))}
        for score in ("loss", "min_k", "zlib"):
            out[f"mia_{score}_auc"] = float(metrics.mia_auc(metrics.membership_score(score, g[score]),
                                                           metrics.membership_score(score, holdout[score])))
        out["mia_min_k"] = mia_k
        if reference is not None:  # the reference's values on the same rows (METHODS §6)
            ref_f, ref_h = same_rows(reference, pd.concat([g, holdout]), ("forget", "holdout"))
            if len(ref_f) and len(ref_h):
                out["forget_quality"] = float(metrics.forget_quality(g["truth_ratio"].to_numpy(),
                                                                     ref_f["truth_ratio"].to_numpy()))
                ref_auc = metrics.mia_auc(metrics.membership_score("min_k", ref_f["min_k"]),
                                          metrics.membership_score("min_k", ref_h["min_k"]))
                # NaN where the reference separates the task's rows perfectly (AUC 1), as lab.eval reports it
                out["privleak"] = privleak_or_nan(out["mia_min_k_auc"], ref_auc)
        per_task.append(out)
    return util, per_task, rows


def _evaluate_muse_tasks(model, tok, bench, tasks, cfg, kw):
    import numpy as np
    from lab import metrics
    from lab.eval import evaluate, token_logprobs
    res = evaluate(model, tok, bench, limit=cfg.eval_limit, **kw)
    util = dict(res["metrics"])
    bos = tok.bos_token or ""

    def text_lp(texts):
        return token_logprobs(model, tok, [bos] * len(texts), texts, batch_size=cfg.eval_batch_size,
                              max_length=cfg.max_length, autocast_dtype=kw["autocast_dtype"])
    holdout = [t for t in _head(bench.eval_sets["privleak_holdout"], cfg.eval_limit)["text"] if t.strip()]
    hold_mink = np.array([metrics.min_k_percent(lp.numpy()) for lp in text_lp(holdout) if lp.numel()])
    per_task = []
    for task in tasks:
        texts = [t for t in _head(task, cfg.eval_limit)["text"] if t.strip()]
        lps = [lp for lp in text_lp(texts) if lp.numel()]
        mink = np.array([metrics.min_k_percent(lp.numpy()) for lp in lps])
        per_task.append({"forget_prob": float(np.mean([math.exp(float(lp.mean())) for lp in lps])),
                         "forget_min_k": float(mink.mean()),
                         "mia_min_k_auc": float(metrics.mia_auc(mink, hold_mink))})
    return util, per_task, res["rows"]


# ---------------------------------------------------------------- run directory: checkpoints and resume
def _save_checkpoint(run_path: Path, state: dict, params=None, union_mask=None, names=None) -> None:
    tmp, final, old = run_path / "checkpoint.tmp", run_path / "checkpoint", run_path / "checkpoint.old"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    if params is not None:
        torch.save([p.detach().cpu().clone() for p in params], tmp / "params.pt")
    if union_mask is not None:
        masks.save_mask(tmp / "union_mask.npz", union_mask, names)
    runs.atomic_write_json(tmp / "state.json", state)      # written last: marks a complete checkpoint
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def _load_checkpoint(run_path: Path) -> tuple[Path | None, dict | None]:
    best = (None, None)
    for name in ("checkpoint", "checkpoint.old", "checkpoint.tmp"):
        p = run_path / name / "state.json"
        if p.is_file():
            state = json.loads(p.read_text())
            if best[1] is None or state["task_done"] > best[1]["task_done"]:
                best = (p.parent, state)
    return best


def _read_eval_records(path: Path) -> list[dict]:
    f = path / runs.EVAL
    return [json.loads(line) for line in f.read_text().splitlines() if line.strip()] if f.exists() else []


def _load_params(path: Path) -> list:
    """A checkpoint's parameter list: plain tensors only (weights_only: a pickle cannot run code on resume)."""
    import pickle
    try:
        params = torch.load(path, weights_only=True)
    except pickle.UnpicklingError as e:
        raise ValueError(f"resume: {path} holds more than tensors; refusing to unpickle it "
                         f"(torch.load weights_only=True): {str(e).splitlines()[0]}") from None
    if not isinstance(params, list) or not all(isinstance(p, torch.Tensor) for p in params):
        raise ValueError(f"resume: {path} is not a list of tensors (a lab.continual checkpoint)")
    return params


def resume_hint(path: Path) -> str:
    """How to go on with an interrupted or failed continual run, as a command."""
    path = Path(path)
    root = "" if path.parent == Path("runs") else f" --runs {path.parent}"
    return f"resume with: lab continual --resume {path.name}{root}  (Python: continual(resume={str(path)!r}))"


def _reopen(path: Path, config: dict, task_done: int, writer: runs.WriterLock | None = None) -> runs.Run:
    """A Run on an existing directory holding only what tasks <= task_done wrote (public Run API)."""
    old_trace = pd.read_parquet(path / runs.TRACE) if (path / runs.TRACE).exists() else pd.DataFrame()
    old_rows = pd.read_parquet(path / runs.EVAL_ROWS) if (path / runs.EVAL_ROWS).exists() else pd.DataFrame()
    records = [r for r in _read_eval_records(path) if r.get("task", -1) <= task_done]
    for name in (runs.TRACE, runs.EVAL, runs.EVAL_ROWS):
        (path / name).unlink(missing_ok=True)
    for f in (path / "masks").glob("task_*.npz") if (path / "masks").exists() else []:
        if int(f.stem.split("_")[1]) > task_done:
            f.unlink()
    run = runs.Run(path, config, writer=writer)
    if not old_trace.empty:
        keep = old_trace[old_trace["task"] <= task_done]
        for row in keep.to_dict("records"):
            run.log_step({k: v for k, v in row.items() if not (isinstance(v, float) and math.isnan(v))})
    for rec in records:
        rows = None
        if not old_rows.empty and rec.get("eval_task") is None:
            match = (old_rows["task"] == rec["task"]) & (old_rows["checkpoint"] == rec["checkpoint"])
            rows = old_rows[match].drop(columns=[c for c in runs.EVAL_INDEX if c in old_rows.columns])
        run.log_eval(rec, rows=rows)
    run.flush()
    return run


def _now() -> str:
    import datetime as dt
    return dt.datetime.now().isoformat(timespec="seconds")


def _run_context(config: dict, root, resume_path: Path | None, task_done: int, writer=None):
    """create_run for a new run; a reopened Run for a resumed one (holding `writer`, its lock). Either way a
    failure KEEPS the directory (status 'failed' / 'interrupted'): a continual run is resumable, and the
    error says how (resume_hint)."""
    import contextlib

    @contextlib.contextmanager
    def ctx():
        if resume_path is None:
            try:
                with runs.create_run(config, root=root) as run:
                    try:
                        yield run
                    except (runs.RunStopped, KeyboardInterrupt):
                        raise
                    except Exception as e:
                        raise runs.RunStopped(f"{type(e).__name__}: {e}; {resume_hint(run.path)}",
                                              status="failed") from e
            except runs.RunInterrupted as e:
                raise runs.RunInterrupted(f"{e}; {resume_hint(e.run_dir)}", e.run_dir) from None
            return
        run = _reopen(resume_path, config, task_done, writer)
        run.write_summary(status="running", resumed=_now(), error=None)
        try:
            yield run
        except runs.RunStopped as stop:
            run.flush()
            run.write_summary(status=stop.status, error=str(stop), finished=_now())
            raise
        except KeyboardInterrupt:
            run.interrupted()
            raise runs.RunInterrupted(f"interrupted; the run so far is kept in {run.path}; {resume_hint(run.path)}",
                                      run.path) from None
        except BaseException as e:
            run.flush()
            run.write_summary(status="failed", error=f"{type(e).__name__}: {e}", finished=_now())
            raise runs.RunStopped(f"{type(e).__name__}: {e}; {resume_hint(run.path)}", status="failed") from e
        else:
            run.flush()
            run.write_summary(status="done", finished=_now())
        finally:
            run.close()
    return ctx()


def _mask_outputs(t, task_masks, names, params, par) -> tuple:
    """(task t's whole mask, the overlap table, the per-tensor counts of every mask so far). Under fsdp the
    masks are this rank's shards: the counts are summed over the group and task t's mask is gathered onto
    rank 0 (collectives: every rank calls it; None for the mask on the other ranks)."""
    reduce = _count_sums(par)
    shapes = [tuple(p.shape) for p in params]   # a DTensor's shape is the whole parameter's
    overlap = masks.overlap_table(task_masks, names, reduce=reduce)
    counts = pd.concat([masks.mask_counts(task_masks[k], names, task=k, reduce=reduce, shapes=shapes)
                        for k in sorted(task_masks)])
    return distributed.full_masks(task_masks[t], params, par), overlap, counts


def _count_sums(par):
    """lab.masks' `reduce` under fsdp (per-rank counts summed over the group); None: the masks are whole."""
    return (lambda values: distributed.shard_sums(values, par)) if par is not None and par.sharded else None


def _write_masks(run, t, mask, overlap, counts, names) -> None:
    """Task t's mask file (the whole mask), the overlap table and the per-tensor counts (_mask_outputs)."""
    (run.path / "masks").mkdir(exist_ok=True)
    masks.save_mask(run.path / "masks" / f"task_{t}.npz", mask, names)
    run.log_masks(overlap)
    runs.atomic_write_parquet(run.path / runs.MASK_COUNTS, counts)


# ---------------------------------------------------------------- under a launcher
def _moved_fraction(before, after, par) -> float:
    """masks.moved_fraction over all shards: local counts summed over the group under fsdp."""
    moved, total = distributed.shard_sums([sum(int((a != b).sum()) for a, b in zip(before, after)),
                                           sum(b.numel() for b in before)], par)
    return moved / total if total else 0.0


def _sharded_context(model, tok, forget, method, args, cfg, idk, par):
    """Under fsdp, for a method with a frozen theta_0 copy (KL terms): the objective context built from an
    unsharded copy of the model (FSDP2 modules cannot be deep-copied; the loop shards the copy). None
    otherwise: the loop builds the context itself."""
    from lab.methods import fit_to_model
    from lab.objectives import get_objective
    needs = {n for t in (*method.forget, *method.retain) for n in get_objective(t.objective).needs}
    if not par.sharded or "ref_model" not in needs:
        return None
    args = fit_to_model(method, args, model)
    return make_context(distributed.plain_copy(model, par), method, args, forget, tok, cfg, idk)


def _lora_context(model, tok, forget, method, args, cfg, idk):
    """LoRA: the objective context of a task from the merged model at the task's start (theta^{t-1} in the
    sequential protocol, as without adapters; the loop's own would take the base weights theta_0)."""
    merged = lora.merged_copy(model)
    return make_context(merged, method, fit_to_model(method, args, merged), forget, tok, cfg, idk)


# ---------------------------------------------------------------- the protocol
@dataclasses.dataclass
class ContinualResult:
    run_dir: Path
    model: torch.nn.Module
    tokenizer: object
    evals: pd.DataFrame
    table: pd.DataFrame
    config: dict


def _config_from_run(path: Path) -> ContinualConfig:
    rec = runs.load_run(path)
    bad = [e for e in rec.errors if runs.CONFIG in e]
    if bad:
        raise ValueError(f"resume: {bad[0]}")
    raw = rec.config
    if raw.get("kind") != "continual":
        raise ValueError(f"{path}: not a continual run (kind={raw.get('kind')!r})")
    fields = {f.name for f in dataclasses.fields(ContinualConfig)}
    # a run started before lr_schedule existed resumes with the schedule it was started with
    return ContinualConfig(**{"lr_schedule": "sequential_only", **{k: v for k, v in raw.items() if k in fields}})


def continual(config: ContinualConfig | dict | None = None, *, resume=None, progress=True,
              **overrides) -> ContinualResult:
    """Run (or resume) a continual-unlearning experiment; see the module docstring.

    resume: an interrupted / failed run's directory. Its writer lock is taken first, so a second process
    on a run that is still being written stops at once with runs.RunLocked (naming the writer's pid).
    Under torchrun / accelerate launch (parallel ddp|fsdp, README 'Scaling out') every rank calls it;
    rank 0 writes the run and returns its results, the other ranks get run_dir None and an empty table.
    A resumed run may change `parallel` only (how it runs, not what: the same result at any world size)."""
    if resume is None:
        cfg = (dataclasses.replace(config, **overrides) if isinstance(config, ContinualConfig)
               else ContinualConfig(**{**(config or {}), **overrides}))
        if cfg.nproc > 1 and not distributed.launched():   # e.g. a notebook's call: start the ranks, read the run
            run_dir = distributed.launch_run("continual", dataclasses.asdict(cfg), cfg.nproc, cfg.runs_root)
            evals = pd.DataFrame(_read_eval_records(run_dir))
            return ContinualResult(run_dir, None, None, evals, task_table(evals), runs.load_run(run_dir).config)
        return _launch(cfg, None, progress)
    resume = Path(resume)
    if not (resume / runs.CONFIG).is_file():
        raise FileNotFoundError(f"resume: {resume} is not a run directory (no {runs.CONFIG})")
    how = {k: overrides.pop(k) for k in RESUME_OVERRIDES if k in overrides}
    if config is not None or overrides:
        raise ValueError("resume: the run's own config.yaml is used; pass no config or overrides "
                         f"(valid: {', '.join(RESUME_OVERRIDES)})")
    return _launch(dataclasses.replace(_config_from_run(resume), **how), resume, progress)


RESUME_OVERRIDES = ("parallel",)


def _launch(cfg: ContinualConfig, resume: Path | None, progress) -> ContinualResult:
    """Join the launcher's process group once, take the run's writer lock (rank 0) and run the protocol."""
    par = distributed.setup(cfg.parallel, cfg.device)   # under a launcher: this rank's group and device
    if par.mode != "none":
        cfg = dataclasses.replace(cfg, device=par.device)
    writer = (distributed.run_all_or_none(lambda: runs.WriterLock(resume).acquire() if par.is_writer else None, par)
              if resume is not None else None)
    try:
        return _continual(cfg, resume, writer, progress, par)
    finally:
        if writer is not None:
            writer.release()


def _continual(cfg: ContinualConfig, resume: Path | None, writer, progress, par) -> ContinualResult:
    """The protocol on every rank of `par`. Rank 0 writes the run (checkpoints from the full weights);
    under fsdp the model is sharded once, after loading, so every parameter list below (theta_0,
    theta^{t-1}, deltas) holds this rank's shards and every norm / count sums over the group."""
    from lab.data import idk_answers as load_idk

    model, tok, bench, reference, _, extra = load_starting_point(cfg.task_config(cfg.base_lr))
    tasks = continual_tasks(bench, cfg.n_tasks, cfg.task_unit)
    if reference is not None and bench.name.startswith("tofu") and extra.get("prepared"):
        # the task heads span every forget author; the prepare may have evaluated fewer rows (its eval_limit)
        sub = _tofu_eval_benchmark(bench, tasks, cfg.eval_limit)[1]
        sets = {name: sub.eval_sets[name] for name in ("forget", "holdout")}
        reference = distributed.from_writer(lambda: prepare.reference_covering(
            extra["prepared"], reference, sets, device=cfg.device, progress=progress), par)
    trouge_corpus = None
    if cfg.trouge is not None:   # built from theta_0 (the model before any unlearning), cached; on rank 0
        exclude = [a for t in tasks for a in (t["answer"] if "answer" in t.column_names else t["text"])]
        trouge_corpus = distributed.from_writer(
            lambda: alkn.build_trouge_corpus(model, tok, exclude_texts=exclude, **cfg.trouge), par)
    if cfg.lora:   # one adapter on theta_0 for every task: the parameter lists below are the adapter's
        model = lora.wrap(model, cfg.lora, seed=cfg.seed)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    method = args = idk = None
    if cfg.kind == "engine":
        method, args = get_method(cfg.inner_method, **cfg.inner_args)
        if any(t.objective in ("idk", "dpo") for t in method.forget):
            idk = load_idk()

    config = {**cfg.to_dict(), "kind": "continual", "method": alkn.normalise_variant(cfg.method)
              if cfg.kind != "engine" else method.name, "method_kind": cfg.kind, "engine_method": cfg.inner_method,
              "engine_method_args": cfg.inner_args, "arithmetic_options": cfg.opts,
              "benchmark_config": bench.config, "n_tasks": len(tasks), "lr_decay": cfg.decay,
              "task_rows": [len(t) for t in tasks], "trace_columns": runs.TRACE_COLUMNS,
              "world_size": par.world, **extra}
    ckpt_dir, ckpt = _load_checkpoint(resume) if resume is not None else (None, None)
    task_done = ckpt["task_done"] if ckpt else -2           # -2: nothing, -1: initial evaluation logged
    if resume is not None and task_done == len(tasks) - 1:
        raise ValueError(f"resume: {resume} already finished all {len(tasks)} tasks")

    union_mask, task_masks, global_step = None, {}, 0
    if ckpt:   # on every rank, into the whole model (before fsdp shards it)
        global_step = ckpt["global_step"]
        if cfg.protocol == "sequential" and (ckpt_dir / "params.pt").is_file():
            saved, current = _load_params(ckpt_dir / "params.pt"), taskvec.trainable(model)
            if [tuple(v.shape) for v in saved] != [tuple(p.shape) for p in current]:
                raise ValueError(f"resume: {ckpt_dir / 'params.pt'} holds {len(saved)} tensors that do not match "
                                 f"the model's {len(current)} trainable parameters (lora={cfg.lora})")
            taskvec.load_values_(current, saved)
        if (ckpt_dir / "union_mask.npz").is_file():
            union_mask = masks.load_mask(ckpt_dir / "union_mask.npz")[0]
        for t in range(task_done + 1):
            f = resume / "masks" / f"task_{t}.npz"
            if f.is_file():
                task_masks[t] = masks.load_mask(f)[0]
    distributed.wrap(model, par, autocast=cfg.autocast)   # fsdp: FSDP2 shards, once for every task
    params = taskvec.trainable(model)
    # fsdp: the masks loaded whole on resume -> this rank's shards, as ALKN keeps them
    union_mask = distributed.local_masks(union_mask, params, par)
    task_masks = {k: distributed.local_masks(m, params, par) for k, m in task_masks.items()}
    theta_0 = taskvec.snapshot(params) if cfg.protocol != "sequential" else None

    def on_writer(fn):   # a write of rank 0's; a failure there stops every rank
        return distributed.run_all_or_none(lambda: fn() if par.is_writer else None, par)

    t_start = time.time()
    # rank 0 writes the run; the other ranks' run records nothing
    run_context = (_run_context(config, cfg.runs_root, resume, task_done, writer) if par.is_writer
                   else distributed.NullRun())
    with run_context as run:
        def log_checkpoint(task, checkpoint, step, epoch, util, per_task, rows, extra_util=None):
            base = {"step": step, "epoch": epoch, "task": task, "checkpoint": checkpoint}
            run.log_eval({**base, "eval_task": None, **util, **(extra_util or {})}, rows=rows)
            for k, m in enumerate(per_task):
                run.log_eval({**base, "eval_task": k, **m})

        if task_done < -1:
            t0 = time.time()
            evaluated = evaluate_tasks(lora.merged_copy(model), tok, bench, tasks, cfg, reference, trouge_corpus,
                                       progress=progress, par=par)
            if evaluated is not None:   # rank 0 (or one process)
                log_checkpoint(-1, "initial", 0, 0, *evaluated,
                               {"eval_seconds": round(time.time() - t0, 2), "lr": None})
            if cfg.checkpoint:
                on_writer(lambda: _save_checkpoint(run.path, {"task_done": -1, "global_step": 0}))
        for t in range(max(task_done + 1, 0), len(tasks)):
            t0 = time.time()
            if cfg.protocol != "sequential":
                taskvec.load_values_(params, theta_0)
            lr_t = cfg.task_lr(t)
            task_cfg = cfg.task_config(lr=lr_t, seed=cfg.seed + t)
            forget_t = forget_text_rows(tok, task_data(tasks, t, cfg.protocol), cfg.max_length, cfg.forget_text_rows)
            theta_prev = taskvec.snapshot(params)
            need_gr = cfg.task_diagnostics or (cfg.kind == "alkn" and cfg.opts["dgs"])
            retain_grad = (alkn.retain_gradient(model, tok, bench.retain, task_cfg, cfg.opts or None, parallel=par)
                           if need_gr else None)
            state = LoopState(step=global_step)
            prev_mask = union_mask if cfg.protocol == "sequential" else None
            mask = None
            try:
                if cfg.kind == "engine":
                    context = (_lora_context(model, tok, forget_t, method, args, task_cfg, idk) if cfg.lora
                               else _sharded_context(model, tok, forget_t, method, args, task_cfg, idk, par))
                    unlearning_loop(model, tok, forget_t, bench.retain, method, args, task_cfg, run=run, task=t,
                                    idk_answers=idk, progress=progress, state=state, context=context, parallel=par)
                    del context
                elif cfg.kind == "alkn":
                    out = alkn.alkn_task(model, tok, forget_t, bench.retain, task_cfg, cfg.opts,
                                         prev_mask=prev_mask, retain_grad=retain_grad, theta_prev=theta_prev,
                                         run=run, task=t, state=state, progress=progress, parallel=par)
                    mask = out["mask"]
                else:
                    taskvec.tru_unlearn(model, tok, forget_t, task_cfg, n_batches=cfg.opts["n_batches"],
                                        stg=cfg.opts["stg"], run=run, task=t, state=state, progress=progress,
                                        parallel=par)
            except Diverged as e:   # every rank sees the same global losses and norm: all stop here
                kept = (f"the weights after task {t - 1} are in {(run.path or Path('<run>')) / 'checkpoint'}"
                        if cfg.checkpoint and t > 0 and cfg.protocol == "sequential"
                        else "the last good weights are the starting model's (every task starts from it)"
                        if cfg.protocol != "sequential" else "no finished task's weights are kept")
                raise runs.RunStopped(f"task {t}: {cfg.method} diverged: {e}; the trace so far is kept; {kept}",
                                      status="diverged") from None
            global_step = state.step
            task_seconds = time.time() - t0
            local = distributed.local_list(params)
            delta = [p.detach() - b for p, b in zip(local, theta_prev)]
            geo = par.group if par.sharded else None   # shards: norms and dots sum over the group
            diag = {"lr": lr_t, "tv_moved_fraction": _moved_fraction(theta_prev, local, par),
                    "update_norm": float(geometry.norm(delta, geo)),
                    "predicted_retain_change": retain_grad.dot(delta, geo) if retain_grad is not None else None,
                    "task_seconds": round(task_seconds, 2), "steps": global_step}
            del delta, theta_prev, retain_grad
            if mask is not None:   # fsdp: shards, so every count below sums over the group
                diag["active_fraction"] = masks.active_fraction(mask, reduce=_count_sums(par))
                diag["mask_jaccard_prev"] = (masks.jaccard(mask, prev_mask, reduce=_count_sums(par))
                                             if prev_mask is not None else None)
                task_masks[t] = mask
                outputs = _mask_outputs(t, task_masks, names, params, par)   # every rank
                on_writer(lambda: _write_masks(run, t, *outputs, names))
                if cfg.protocol == "sequential":
                    union_mask = mask if union_mask is None else masks.union(union_mask, mask)
            e0 = time.time()
            evaluated = evaluate_tasks(lora.merged_copy(model), tok, bench, tasks, cfg, reference, trouge_corpus,
                                       progress=progress, par=par)
            diag["eval_seconds"] = round(time.time() - e0, 2)
            epoch = state.trace[-1]["epoch"] if state.trace else 0
            if evaluated is not None:
                log_checkpoint(t, "unlearned", global_step, epoch, *evaluated, diag)
            if cfg.checkpoint:
                seq = cfg.protocol == "sequential"
                values = distributed.full_parameters(model, names, par) if seq else None   # every rank
                whole_union = distributed.full_masks(union_mask, params, par) if seq else None   # every rank
                on_writer(lambda: _save_checkpoint(run.path, {"task_done": t, "global_step": global_step},
                                                   params=values, union_mask=whole_union, names=names))
                del values, whole_union
        final_model = lora.merged_copy(model)   # LoRA: W + BA as a plain model; otherwise the model
        if cfg.save_model:
            distributed.save_pretrained(final_model, tok, run.path and run.path / "model", par)
            if cfg.lora and par.is_writer:
                lora.save_adapter(model, run.path / "adapter")
        if cfg.probes:  # robustness probes on the model after the last task (lab.probes, METHODS §8)
            from lab.probes import continual_forget, run_probes
            distributed.on_writer_whole(final_model, par, lambda whole: run_probes(   # launcher: rank 0
                whole, tok, cfg, run, bench=bench, forget=continual_forget(tasks, cfg.protocol),
                step=global_step, task=len(tasks) - 1, progress=progress))
        evals = pd.DataFrame(_read_eval_records(run.path) if run.path is not None else [])
        table = task_table(evals)
        final = {k: v for k, v in table.iloc[-1].items() if pd.notna(v)} if len(table) else {}
        run.write_summary(metrics={str(k): v for k, v in final.items()}, steps=global_step,
                          seconds=round(time.time() - t_start, 2), n_tasks=len(tasks))
    return ContinualResult(run.path, model, tok, evals, table, config)
