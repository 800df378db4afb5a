"""Derived tables from run records (lab.runs.RunRecord): what the dashboard and notebooks plot.

Pure pandas - no torch, no streamlit - so every table is unit-testable and importable in a second.
Each function takes a list of records (anything with run_id, config, summary, trace, evals, masks,
status, errors, like lab.runs.RunRecord) and returns a long or wide DataFrame:

    runs_table(recs)                        one row per run: keys, status, steps, final metrics, errors
    trace_table(recs)                       every trace row with run_id / label / method columns
    tradeoff_table(recs, "model_utility", "forget_rouge")
                                            one point per run (per task for continual runs) + targets
    continual_table(recs)                   long: run, protocol, task checkpoint, eval_task, metric, value
    cascading_table(recs)                   ALKN fig. 2a: forget_prob of task k at initial vs after k-1
    mask_overlap_table(recs)                masks.parquet of every continual run, with run labels
    task_diagnostics_table(recs)            per task: active_fraction, tv_moved_fraction, sparsity, ...
    generations_table(recs_rows, set, row)  one row per (run, checkpoint) for a question
"""
from __future__ import annotations

import math
from typing import NamedTuple

import pandas as pd

from lab import runs

MASK_COUNTS = runs.MASK_COUNTS   # lab.continual: per task and tensor active counts (ALKN)

# ---------------------------------------------------------------- metric directions
# THE table of metric directions: every trade-off axis, Pareto front and "change from initial" sign reads
# it. role "forget": better = more forgotten (the retain model scores better than the memorising target);
# role "utility": better = more knowledge kept; role "info": no direction (not an axis). `higher`: whether
# a larger value is better for that role; `range`: the values the metric can take. tests/test_runs_views.py
# derives each direction from a memorising target vs its retain model. A new metric: one line here.
class MetricSpec(NamedTuple):
    role: str                     # "forget" | "utility" | "info" (no direction)
    higher: bool                  # larger is better for the role
    range: tuple = (0.0, 1.0)     # the values the metric can take
    axis: bool = True             # offered as a trade-off axis


INF = math.inf


def _forget(higher: bool, range=(0.0, 1.0), axis=True) -> MetricSpec:
    return MetricSpec("forget", higher, range, axis)


def _utility(axis=True) -> MetricSpec:
    return MetricSpec("utility", True, (0.0, 1.0), axis)


METRICS = {
    # utility (TOFU: retain / real authors / world facts; MUSE: KnowMem on retain; ALKN: T-Rouge)
    "model_utility": _utility(), "model_utility_trouge": _utility(), "trouge": _utility(),
    "knowmem_retain_rouge_f1": _utility(), "retain_rouge": _utility(), "retain_prob": _utility(),
    "retain_truth_ratio": _utility(axis=False),       # mean max(0, 1 - R)
    "real_authors_rouge": _utility(axis=False), "real_authors_prob": _utility(axis=False),
    "real_authors_truth_ratio": _utility(axis=False), "world_facts_rouge": _utility(axis=False),
    "world_facts_prob": _utility(axis=False), "world_facts_truth_ratio": _utility(axis=False),
    # forgetting
    "forget_rouge": _forget(False),
    "forget_quality": _forget(True),                  # KS p-value vs the retain model: 1 = indistinguishable
    "forget_prob": _forget(False),
    "forget_truth_ratio": _forget(True),              # mean min(R, 1/R): 1 = paraphrase and perturbed alike
    "privleak": _forget(True, (-100.0, INF), axis=False),  # %: memorising ~ -100, retain 0, > 0 over-unlearned
    "forget_min_k": _forget(False, (-INF, 0.0)),      # mean Min-K% log-prob: high = member-like
    "verbmem_rouge_f1": _forget(False), "knowmem_forget_rouge_f1": _forget(False),
    "forget_exact_memorization": _forget(False),      # EM: share of answer tokens the model predicts (argmax)
    "forget_extraction_strength": _forget(False),     # ES: 1 - shortest prefix share that extracts the rest
    # membership-inference AUCs (forget = members, holdout = non-members): ~1 memorised, ~0.5 retain
    "mia_loss_auc": _forget(False), "mia_min_k_auc": _forget(False), "mia_zlib_auc": _forget(False),
    "mia_min_k_plus_plus_auc": _forget(False), "mia_gradnorm_auc": _forget(False),
    "mia_reference_auc": _forget(False),              # vs the retain model as reference (undefined on itself)
    # robustness probes (lab.probes): (probe - unlearned) / (target - unlearned), 0 = nothing came back
    "recovery_rouge": _forget(False, (-INF, INF), axis=False), "recovery_prob": _forget(False, (-INF, INF), axis=False),
    # no direction
    "mia_min_k": MetricSpec("info", True, (0.0, 1.0), axis=False),   # the K of Min-K%: a setting
}
# Metric -> True if larger is better (kept for callers of the old name; derived from METRICS)
HIGHER_IS_BETTER = {m: s.higher for m, s in METRICS.items() if s.role != "info"}


def metric_spec(metric: str) -> MetricSpec:
    """The METRICS entry; a metric not listed counts as forget-like (lower is better) when its name says
    forget_/mia_/verbmem, else utility-like (higher is better), range unknown, and is no axis."""
    if metric in METRICS:
        return METRICS[metric]
    forget = metric.startswith(("forget_", "mia_", "verbmem"))
    return MetricSpec("forget" if forget else "utility", not forget, (-INF, INF), axis=False)


def higher_is_better(metric: str) -> bool:
    """Direction of a metric for its role (METRICS); unknown metrics: see metric_spec."""
    return metric_spec(metric).higher


def axis_metrics(role: str) -> list[str]:
    """The metrics of one role ('forget' / 'utility') offered as trade-off axes, in table order."""
    return [m for m, s in METRICS.items() if s.role == role and s.axis]


UTILITY_METRICS = axis_metrics("utility")
FORGET_METRICS = axis_metrics("forget")
SUMMARY_METRICS = ["model_utility", "forget_rouge", "forget_quality", "forget_prob", "privleak",
                   "verbmem_rouge_f1", "knowmem_forget_rouge_f1", "knowmem_retain_rouge_f1"]
UNIT_METRICS = [m for m in SUMMARY_METRICS if metric_spec(m).range == (0.0, 1.0)]   # one bar chart axis
HOVER_KEYS = ["method", "kind", "protocol", "lr", "epochs", "max_steps", "batch_size", "seed", "model",
              "benchmark", "method_args"]


def run_label(rec) -> str:
    """Short, unique, human label: method [protocol] #digest (the run id ends with a config digest)."""
    cfg = rec.config or {}
    method = cfg.get("method") or "?"
    proto = f" [{cfg['protocol']}]" if cfg.get("protocol") else ""
    return f"{method}{proto} #{rec.run_id.rsplit('-', 1)[-1]}"


def _meta(rec) -> dict:
    return {"run_id": rec.run_id, "label": run_label(rec),
            **{k: (rec.config or {}).get(k) for k in runs.RUN_KEYS}}


# ---------------------------------------------------------------- per-run summary
def _utility_records(rec, checkpoint: str) -> pd.DataFrame:
    """A run's utility-level eval records (eval_task empty) at one checkpoint."""
    ev = rec.evals
    if ev is None or ev.empty or "checkpoint" not in ev:
        return pd.DataFrame()
    ev = ev[ev["checkpoint"] == checkpoint]
    return ev[ev["eval_task"].isna()] if "eval_task" in ev else ev


def final_record(rec) -> dict:
    """The last utility-level 'unlearned' eval record of a run (continual: after the last task), or {}."""
    ev = _utility_records(rec, "unlearned")
    if ev.empty:
        return {}
    order = [c for c in ("task", "step") if c in ev]
    return ev.sort_values(order, kind="stable").iloc[-1].dropna().to_dict() if order else ev.iloc[-1].to_dict()


def initial_record(rec) -> dict:
    ev = _utility_records(rec, "initial")
    return ev.iloc[-1].dropna().to_dict() if len(ev) else {}


def runs_table(records) -> pd.DataFrame:
    """One row per run: label, status, RUN_KEYS, steps, seconds, final metrics (summary or last eval), errors."""
    out = []
    for rec in records:
        summary = rec.summary or {}
        metrics = summary.get("metrics") if isinstance(summary.get("metrics"), dict) else {}
        final = {**final_record(rec), **metrics}
        row = {**_meta(rec), "status": rec.status, "steps": summary.get("steps"),
               "trace_rows": len(rec.trace) if rec.trace is not None else 0,
               "seconds": summary.get("seconds"), "started": summary.get("started")}
        row.update({m: final.get(m) for m in SUMMARY_METRICS})
        row["errors"] = "; ".join(rec.errors)
        out.append(row)
    cols = ["label", "status", *runs.RUN_KEYS, "steps", "trace_rows", "seconds", "started",
            *SUMMARY_METRICS, "errors", "run_id"]
    df = pd.DataFrame(out, columns=cols)
    # drop metric columns no run has, so the table stays narrow
    return df.drop(columns=[m for m in SUMMARY_METRICS if df[m].isna().all()])


def trace_table(records) -> pd.DataFrame:
    """All trace rows of the runs, with run_id, label, method, kind, protocol columns in front."""
    frames = []
    for rec in records:
        if rec.trace is None or rec.trace.empty:
            continue
        m = _meta(rec)
        frames.append(rec.trace.assign(**{k: m[k] for k in ("run_id", "label", "method", "kind", "protocol")}))
    if not frames:
        return pd.DataFrame(columns=["run_id", "label", "method", "kind", "protocol", *runs.TRACE_COLUMNS])
    df = pd.concat(frames, ignore_index=True)
    front = ["run_id", "label", "method", "kind", "protocol"]
    return df[front + [c for c in df.columns if c not in front]]


# ---------------------------------------------------------------- experiments (config.yaml `experiment`)
UNTAGGED = "(untagged)"


def experiment_options(table: pd.DataFrame) -> list[str]:
    """The experiments of a runs_table (its `experiment` and `run_id` columns; run ids start with the
    start time), the one of the latest run first: each top level ('<notebook> (<profile>)' or a user's
    --tag) followed by its sections ('<top>/<section>') in the order they ran; UNTAGGED for runs without."""
    if table.empty:
        return []
    exp = table["experiment"].fillna(UNTAGGED).astype(str)
    top = exp.str.split("/", n=1).str[0]
    latest = table["run_id"].groupby(top).max().sort_values(ascending=False)
    first = table["run_id"].groupby(exp).min()
    out = []
    for t in latest.index:
        out += [t, *sorted((e for e in first.index if e.startswith(t + "/")), key=first.get)]
    return out


def in_experiment(table: pd.DataFrame, choice: str) -> pd.Series:
    """Rows of a runs_table in experiment `choice` (a top level includes all its sections)."""
    exp = table["experiment"].fillna(UNTAGGED).astype(str)
    return (exp == choice) | exp.str.startswith(choice + "/")


# ---------------------------------------------------------------- trade-offs
def _hover(rec) -> str:
    cfg = rec.config or {}
    parts = [f"{k}={cfg[k]}" for k in HOVER_KEYS if cfg.get(k) not in (None, {}, [])]
    return "<br>".join([rec.run_id, *parts])


def _value(rec_metrics: dict, metric: str):
    v = rec_metrics.get(metric)
    return float(v) if isinstance(v, (int, float)) and not (isinstance(v, float) and math.isnan(v)) else None


def tradeoff_table(records, utility: str = "model_utility", forgetting: str = "forget_rouge",
                   change: bool = False) -> pd.DataFrame:
    """Points for a utility-vs-forgetting scatter (NGDiff fig. 1 / ALKN fig. 4).

    Single runs: one point (final 'unlearned' record). Continual runs: one point per task t, with the
    utility after task t and `forgetting` of task t's own forget set after task t. One 'target' point per
    (benchmark, model) from the initial records. change=True replaces forgetting by its change from the
    initial value (initial - now for lower-is-better metrics, e.g. the drop in F-Rouge), as in ALKN fig. 4.
    Columns: run_id, label, method, kind, protocol, benchmark, model, point, task, utility, forgetting, hover.
    """
    rows, targets = [], {}
    for rec in records:
        ev = rec.evals
        if ev is None or ev.empty or "checkpoint" not in ev:
            continue
        meta, hover = _meta(rec), _hover(rec)
        init = initial_record(rec)
        per_task = ev[ev["eval_task"].notna()] if "eval_task" in ev else ev.iloc[0:0]
        if (rec.config or {}).get("kind") == "continual" and not per_task.empty:
            init_task = per_task[per_task["checkpoint"] == "initial"].set_index("eval_task")
            util = ev[(ev["checkpoint"] == "unlearned") & ev["eval_task"].isna()]
            for _, u in util.iterrows():
                t = int(u["task"])
                own = per_task[(per_task["checkpoint"] == "unlearned") & (per_task["task"] == t)
                               & (per_task["eval_task"] == t)]
                if own.empty:
                    continue
                f = _value(own.iloc[-1].to_dict(), forgetting)
                f0 = _value(init_task.loc[t].to_dict(), forgetting) if t in init_task.index else None
                rows.append({**meta, "point": f"after task {t}", "task": t, "utility": _value(u.to_dict(), utility),
                             "forgetting": f, "initial_forgetting": f0, "hover": hover})
            init_util = initial_record(rec)
            if init_util:
                f0s = [_value(r.to_dict(), forgetting) for _, r in init_task.iterrows()]
                f0s = [v for v in f0s if v is not None]
                key = (meta["benchmark"], meta["model"])
                targets.setdefault(key, {"utility": _value(init_util, utility),
                                         "forgetting": sum(f0s) / len(f0s) if f0s else None})
            continue
        final = final_record(rec)
        if not final:
            continue
        f0 = _value(init, forgetting) if init else None
        rows.append({**meta, "point": "final", "task": None, "utility": _value(final, utility),
                     "forgetting": _value(final, forgetting), "initial_forgetting": f0, "hover": hover})
        if init:
            targets.setdefault((meta["benchmark"], meta["model"]),
                               {"utility": _value(init, utility), "forgetting": f0})
    for (bench, model), v in targets.items():
        rows.append({"run_id": None, "label": f"target ({model}, {bench})", "method": "target", "kind": "target",
                     "model": model, "benchmark": bench, "point": "initial", "task": None, **v,
                     "initial_forgetting": v["forgetting"], "hover": f"initial model: {model} on {bench}"})
    cols = ["run_id", "label", "method", "kind", "protocol", "benchmark", "model", "point", "task",
            "utility", "forgetting", "initial_forgetting", "hover"]
    df = pd.DataFrame(rows).reindex(columns=cols)
    if change and len(df):
        # positive = more forgetting than the initial model, whichever way the metric points
        sign = -1.0 if higher_is_better(forgetting) else 1.0
        df["forgetting"] = (df["initial_forgetting"] - df["forgetting"]) * sign
    return df.dropna(subset=["utility", "forgetting"]).reset_index(drop=True)


# ---------------------------------------------------------------- continual
def _checkpoint_label(task) -> str:
    return "initial" if task < 0 else f"after {int(task)}"


def continual_table(records) -> pd.DataFrame:
    """Continual runs' eval records in long form: run_id, label, method, protocol, task (-1 = initial),
    checkpoint_label, eval_task (None = utility record), metric, value."""
    frames = []
    for rec in records:
        ev = rec.evals
        if (rec.config or {}).get("kind") != "continual" or ev is None or ev.empty or "eval_task" not in ev:
            continue
        meta = _meta(rec)
        ev = without_probes(ev)   # probe records (lab.probes) are the robustness table's
        ids = [c for c in runs.EVAL_INDEX if c in ev]
        values = ev.drop(columns=ids).select_dtypes("number")
        long = pd.concat([ev[ids], values], axis=1).melt(id_vars=ids, var_name="metric", value_name="value")
        long = long.dropna(subset=["value"])
        frames.append(long.assign(**{k: meta[k] for k in ("run_id", "label", "method", "protocol")}))
    cols = ["run_id", "label", "method", "protocol", "task", "checkpoint_label", "eval_task", "metric", "value"]
    if not frames:
        return pd.DataFrame(columns=cols)
    df = pd.concat(frames, ignore_index=True)
    df["task"] = df["task"].astype(int)
    df["checkpoint_label"] = df["task"].map(_checkpoint_label)
    return df[cols].sort_values(["run_id", "task", "eval_task"], kind="stable", na_position="first") \
        .reset_index(drop=True)


def cascading_table(records, metric: str = "forget_prob") -> pd.DataFrame:
    """ALKN fig. 2a: for each continual run and task k >= 1, `metric` of task k's forget set at the
    initial model ('before any unlearning') and after task k-1 ('after previous unlearning').
    Columns: run_id, label, protocol, eval_task, before_any, after_previous."""
    long = continual_table(records)
    long = long[(long["metric"] == metric) & long["eval_task"].notna()]
    rows = []
    for (run_id, k), g in long.groupby(["run_id", "eval_task"]):
        k = int(k)
        if k < 1:
            continue
        before = g.loc[g["task"] == -1, "value"]
        after = g.loc[g["task"] == k - 1, "value"]
        if before.empty or after.empty:
            continue
        rows.append({"run_id": run_id, "label": g["label"].iloc[0], "protocol": g["protocol"].iloc[0],
                     "eval_task": k, "before_any": float(before.iloc[-1]), "after_previous": float(after.iloc[-1])})
    return pd.DataFrame(rows, columns=["run_id", "label", "protocol", "eval_task", "before_any", "after_previous"])


# ---------------------------------------------------------------- masks
def mask_overlap_table(records) -> pd.DataFrame:
    """masks.parquet of every run that has one (MASK_COLUMNS) with run_id and label."""
    frames = [rec.masks.assign(run_id=rec.run_id, label=run_label(rec))
              for rec in records if rec.masks is not None and not rec.masks.empty]
    cols = ["run_id", "label", *runs.MASK_COLUMNS]
    return pd.concat(frames, ignore_index=True)[cols] if frames else pd.DataFrame(columns=cols)


def read_mask_counts(rec) -> pd.DataFrame:
    """mask_counts.parquet of a continual ALKN run (task, name, layer, module, active, numel), or empty.
    A corrupt file becomes an entry in rec.errors, like the files RunRecord reads."""
    return rec.mask_counts


def layer_active_table(counts: pd.DataFrame, by: str = "layer") -> pd.DataFrame:
    """Active fraction of each task mask per group of tensors (from mask_counts.parquet).

    by="layer": groups 'layer.<i>' (tensors outside the blocks: 'module.<type>'); by="module":
    'module.<type>' (attn, mlp, norm, embed, lm_head). Columns: task, group, active_fraction."""
    if by not in ("layer", "module"):
        raise ValueError(f"layer_active_table: by={by!r}; valid: 'layer', 'module'")
    if counts.empty:
        return pd.DataFrame(columns=["task", "group", "active_fraction"])
    c = counts.copy()
    c["group"] = [f"layer.{int(l)}" if by == "layer" and pd.notna(l) else f"module.{m}"
                  for l, m in zip(c["layer"], c["module"])]
    g = c.groupby(["task", "group"], as_index=False)[["active", "numel"]].sum()
    g["active_fraction"] = g["active"] / g["numel"]
    return g[["task", "group", "active_fraction"]]


TASK_DIAGNOSTICS = ["active_fraction", "tv_moved_fraction", "mask_jaccard_prev", "update_norm",
                    "predicted_retain_change", "lr"]


def task_diagnostics_table(records) -> pd.DataFrame:
    """Per continual run and task: the task diagnostics of its utility record, plus realised task-vector
    sparsity = 1 - tv_moved_fraction. Columns: run_id, label, protocol, task, <diagnostics>, tv_sparsity."""
    long = continual_table(records)
    long = long[long["eval_task"].isna() & (long["task"] >= 0) & long["metric"].isin(TASK_DIAGNOSTICS)]
    if long.empty:
        return pd.DataFrame(columns=["run_id", "label", "protocol", "task", *TASK_DIAGNOSTICS, "tv_sparsity"])
    wide = long.pivot_table(index=["run_id", "label", "protocol", "task"], columns="metric", values="value",
                            aggfunc="last").reset_index()
    wide.columns.name = None
    if "tv_moved_fraction" in wide:
        wide["tv_sparsity"] = 1 - wide["tv_moved_fraction"]
    return wide


# ---------------------------------------------------------------- per-row inspection
ROW_COLUMNS = ["question", "answer", "generation", "rouge", "prob", "truth_ratio", "exact_memorization",
               "extraction_strength"]


def generations_table(runs_rows, set_name: str, row: int) -> pd.DataFrame:
    """One row per (run, checkpoint, step) holding that question's generation.

    runs_rows: list of (record, rows DataFrame). Columns: label, checkpoint, task, step, question,
    answer, generation, rouge, prob, truth_ratio, exact_memorization, extraction_strength (those present),
    run_id."""
    frames = []
    for rec, rows in runs_rows:
        if rows is None or rows.empty or "set" not in rows or "row" not in rows:
            continue
        g = rows[(rows["set"] == set_name) & (rows["row"] == row)]
        if g.empty:
            continue
        keep = [c for c in ["checkpoint", "task", "step", *ROW_COLUMNS] if c in g]
        frames.append(g[keep].assign(label=run_label(rec), run_id=rec.run_id))
    if not frames:
        return pd.DataFrame(columns=["label", "checkpoint", "step", *ROW_COLUMNS, "run_id"])
    df = pd.concat(frames, ignore_index=True)
    # runs on the same prepared target share its 'initial' outputs: show them once, labelled as the target
    same = [c for c in ("generation", "prob", "rouge") if c in df]
    if "checkpoint" in df and same:
        key = df[same].astype(str).agg("|".join, axis=1)
        init = df["checkpoint"] == "initial"
        sharing = key[init].map(key[init].value_counts())
        df.loc[sharing[sharing > 1].index, "label"] = "target (initial)"
        df = df[~(init & key.where(init).duplicated())]
    front = ["label", "checkpoint", *[c for c in ("task", "step") if c in df]]
    return df[front + [c for c in df.columns if c not in front]].reset_index(drop=True)


TABLE_UTILITY = ["model_utility", "model_utility_trouge", "trouge", "verbmem_rouge_f1", "knowmem_forget_rouge_f1",
                 "knowmem_retain_rouge_f1",
                 "active_fraction", "tv_moved_fraction", "predicted_retain_change", "lr"]
TABLE_PER_TASK = ["forget_rouge", "forget_prob", "forget_quality"]


def evals_task_table(evals: pd.DataFrame, per_task=TABLE_PER_TASK, utility=TABLE_UTILITY) -> pd.DataFrame:
    """Per-task table of a continual run's eval records: one row per checkpoint ('initial', 'after 0',
    ...), utility columns and, per metric, one column per evaluated task (e.g. forget_rouge[2])."""
    if evals.empty or "eval_task" not in evals:
        return pd.DataFrame()
    evals = without_probes(evals)
    label = lambda t: "initial" if t < 0 else f"after {int(t)}"  # noqa: E731
    util = evals[evals["eval_task"].isna()].drop_duplicates("task", keep="last").set_index("task")
    out = util[[c for c in utility if c in util.columns and util[c].notna().any()]].copy()
    per = evals[evals["eval_task"].notna()]
    for metric in per_task:
        if metric not in per or per[metric].isna().all():
            continue
        wide = per.pivot_table(index="task", columns="eval_task", values=metric, aggfunc="last")
        wide.columns = [f"{metric}[{int(k)}]" for k in wide.columns]
        out = out.join(wide, how="outer")
    out.index = [label(t) for t in out.index]
    out.index.name = "checkpoint"
    return out


def task_table(rec, per_task=TABLE_PER_TASK, utility=TABLE_UTILITY) -> pd.DataFrame:
    """evals_task_table of one continual run (empty for other kinds of run)."""
    if (rec.config or {}).get("kind") != "continual" or rec.evals is None:
        return pd.DataFrame()
    return evals_task_table(rec.evals, per_task, utility)


# ---------------------------------------------------------------- robustness probes (lab.probes, METHODS §8)
ROBUSTNESS_COLUMNS = [
    "run_id", "label", "method", "kind", "protocol", "probe", "probe_rows",
    *[f"{w}forget_{k}" for k in ("rouge", "prob") for w in ("unlearned_", "", "target_", "floor_")],
    "recovery_rouge", "recovery_prob", "delta_forget_rouge", "delta_forget_prob",
    "floor_recovery_rouge", "floor_recovery_prob", "model_utility", "probe_model_utility"]


def without_probes(evals: pd.DataFrame) -> pd.DataFrame:
    """Eval records other than the robustness probes' (checkpoint "probe:<name>")."""
    if evals is None or evals.empty or "checkpoint" not in evals:
        return evals
    return evals[~evals["checkpoint"].astype(str).str.startswith(runs.PROBE_PREFIX)]


def robustness_table(records) -> pd.DataFrame:
    """One row per (run, probe): forget ROUGE-L / Prob of the final model unprobed (unlearned_*), under the
    probe (forget_*), of the target (target_*) and of the retain model (floor_*; after the same attack
    for relearn) on the probe's rows, the recovery fractions (probe - unlearned) / (target - unlearned),
    the changes, and model_utility of the final model (its 'unlearned' record) beside the probed model's.
    Columns ROBUSTNESS_COLUMNS; probes in lab.runs.PROBES order."""
    out = []
    for rec in records:
        probes = runs.probe_evals(rec.evals)
        if probes.empty:
            continue
        meta = _meta(rec)
        utility = _value(final_record(rec), "model_utility")
        for _, r in probes.drop_duplicates("probe", keep="last").iterrows():
            d = r.to_dict()
            row = {**{k: meta.get(k) for k in ("run_id", "label", "method", "kind", "protocol")},
                   "model_utility": utility, "probe_model_utility": _value(d, "model_utility")}
            row.update({c: _value(d, c) for c in ROBUSTNESS_COLUMNS if c not in row and c in d})
            row["probe"] = d["probe"]
            out.append(row)
    df = pd.DataFrame(out).reindex(columns=ROBUSTNESS_COLUMNS)
    if df.empty:
        return df
    order = {p: i for i, p in enumerate(runs.PROBES)}
    df["_order"] = df["probe"].map(lambda p: order.get(p, len(order)))
    return df.sort_values(["label", "_order"], kind="stable").drop(columns="_order").reset_index(drop=True)
