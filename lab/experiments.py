"""Helpers the paper notebooks share: run a grid of methods, hold a paper's reported numbers, put ours
beside them, and print verdicts computed from the numbers.

    grid = run_grid(["gdiff(0.5)", "ngdiff"], UnlearnConfig(max_steps=10, eval_limit=10))
    grid[["label", "status", "forget_rouge", "retain_rouge", "seconds"]]
    paper = paper_table({"NGDiff": {"Verbmem": 0.024, "Utility": 0.747}}, table="NGDiff Table 1, Phi-1.5")
    compare(grid, paper, on={"Verbmem": "forget_rouge", "Utility": "retain_rouge"}, rows={"ngdiff": "NGDiff"})
    claim("NGDiff keeps more utility than GDiff-0.5", holds=u_ngdiff > u_gdiff, detail=f"{u_ngdiff:.3f} vs ...")

Every run goes through lab.engine.unlearn (or lab.continual for the model-arithmetic methods `tv` and
`tru`, as one task), so it is a run directory under base.runs_root that the dashboard reads too; the
numbers in a grid are read back from that directory through lab.runs. A run that diverges is a normal
event: its row says status "diverged" and the grid goes on.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from pathlib import Path

import pandas as pd
import torch

from lab import runs
from lab.engine import UnlearnConfig, load_starting_point, resolved_lr, unlearn
from lab.methods import get_method

# model-arithmetic methods run by lab.continual as a single task (everything else: lab.engine.unlearn)
ARITHMETIC_METHODS = ("tv", "tru")
ROW_KEYS = ["label", "method", "status", "seconds", "steps", "run_id", "run_dir", "error", "config_key",
            "unprobed_key", "saved_model"]


# ---------------------------------------------------------------- running
def _specs(methods, overrides_per_method) -> list[tuple[str, dict]]:
    """(label, UnlearnConfig overrides) per run. `methods` is a list of method names (label = name) or a
    dict label -> overrides (with "method"; default the label itself)."""
    overrides_per_method = overrides_per_method or {}
    if isinstance(methods, str):
        raise TypeError(f"run_grid: methods={methods!r}; pass a list of method names or a dict label -> overrides")
    if isinstance(methods, dict):
        specs = [(label, {"method": label, **(o or {})}) for label, o in methods.items()]
    else:
        specs = [(m, {"method": m}) for m in methods]
    unknown = set(overrides_per_method) - {label for label, _ in specs}
    if unknown:
        raise ValueError(f"run_grid: overrides_per_method names {sorted(unknown)}, which are not in the grid; "
                         f"valid: {[label for label, _ in specs]}")
    labels = [label for label, _ in specs]
    if len(set(labels)) != len(labels):
        raise ValueError(f"run_grid: duplicate labels {labels}; use a dict label -> overrides")
    return [(label, {**o, **overrides_per_method.get(label, {})}) for label, o in specs]


def _final_metrics(rec: runs.RunRecord) -> dict:
    """Metrics of the last 'unlearned' evaluation of a run (its lab.runs record). Continual runs
    (one task) keep utility and forget metrics in separate records: merged."""
    evals = rec.evals
    if evals.empty or "checkpoint" not in evals:
        return {}
    done = evals[evals["checkpoint"] == "unlearned"]
    if done.empty:
        return {}
    if "eval_task" in done and done["eval_task"].notna().any():
        last = done[done["task"] == done["task"].max()]
        merged = {}
        for _, rec in last.iterrows():
            merged.update({k: v for k, v in rec.items() if pd.notna(v)})
        rec = merged
    else:
        rec = done.iloc[-1].dropna().to_dict()
    return {k: v for k, v in rec.items() if k not in runs.EVAL_INDEX and isinstance(v, (int, float))
            and not isinstance(v, bool)}


def _config(base: UnlearnConfig, overrides: dict) -> UnlearnConfig:
    """The run's config: an UnlearnConfig, or for tv / tru a one-task ContinualConfig (lab.continual)."""
    if overrides.get("method") in ARITHMETIC_METHODS:
        from lab.continual import ContinualConfig
        fields = {f.name: getattr(base, f.name) for f in dataclasses.fields(UnlearnConfig)}
        return ContinualConfig(**{**fields, **overrides}, protocol="sequential", n_tasks=1,
                               task_diagnostics=False, checkpoint=False)
    return dataclasses.replace(base, **overrides)


def _run_one(cfg: UnlearnConfig):
    if cfg.method in ARITHMETIC_METHODS:
        from lab.continual import continual
        return continual(cfg, progress=False).run_dir
    return unlearn(cfg, progress=False).run_dir


PROBE_FIELDS = ("probes", "probe_options")


def _config_key(cfg: UnlearnConfig, probes: bool = True) -> str:
    """What makes two runs the same run (save_model only decides whether the weights are kept). The method
    by its resolved name and full arguments: "ngdiff+autolr" is "ngdiff_autolr", "gdiff(0.5)" is gdiff c=0.5.
    probes=False: the key without the robustness probes, which only add records after the final
    evaluation (a probed run is the unprobed run plus those records)."""
    resolved = {}
    if cfg.method not in ARITHMETIC_METHODS:
        method, args = get_method(cfg.method, **cfg.method_args)
        resolved = {"method": method.name, "method_args": args}
    # nproc: how many ranks run it, not what runs (the same result at any world size; keys of older runs hold)
    fields = {k: v for k, v in dataclasses.asdict(cfg).items()
              if k != "nproc" and (probes or k not in PROBE_FIELDS)}
    # the lr as run: None and the model's default lr are one run (config.yaml records the number; finished_runs)
    return json.dumps({**fields, "save_model": None, "lr": resolved_lr(cfg), **resolved}, sort_keys=True, default=str)


def notebook_section() -> str | None:
    """The '## ' heading above the notebook cell now executing, or None outside a notebook that
    lab.report.run_notebook started (it names the source in $LAB_NOTEBOOK; IPython's In[-1] is the cell)."""
    from lab.report import NOTEBOOK_ENV
    path = os.environ.get(NOTEBOOK_ENV)
    try:
        from IPython import get_ipython
        shell = get_ipython() if path else None
        current = shell.user_ns["In"][-1].strip() if shell is not None else None
        cells = json.loads(Path(path).read_text())["cells"] if current else []
    except (ImportError, KeyError, IndexError, OSError, ValueError):
        return None
    heading = None
    for cell in cells:
        src = cell["source"] if isinstance(cell["source"], str) else "".join(cell["source"])
        if cell["cell_type"] == "markdown":
            heading = next((line[3:].strip() for line in src.splitlines() if line.startswith("## ")), heading)
        elif src.strip() == current:
            return heading
    return None


def experiment_tag(section: str | None = None) -> str | None:
    """'<experiment>/<section>' for the runs a grid makes: the experiment from lab.runs (the notebook, or a
    user tag), the section given or the notebook heading above the running cell."""
    base, section = runs.current_experiment(), section or notebook_section()
    return f"{base}/{section}" if base and section else (base or section)


def run_grid(methods, base: UnlearnConfig, overrides_per_method: dict | None = None, progress: bool = True,
             reuse: pd.DataFrame | None = None, section: str | None = None) -> pd.DataFrame:
    """One run per entry of `methods` from the config `base` (UnlearnConfig fields overridden per entry).

    methods: ["ga", "gru_ga", ...] or {"GRU-GA gamma=0.1": {"method": "gru_ga", "method_args": {"gamma": 0.1}}}.
    overrides_per_method: {label: {UnlearnConfig field: value}} applied on top.
    reuse: rows of earlier grids; an entry whose config equals a finished run there is not run again (its
    row comes back under the new label), unless it wants saved weights and that run did not save them.
    section: tags the runs '<experiment>/<section>' (lab.runs.experiment; default: the notebook heading).
    Returns one row per run: label, method, status ("done" | "diverged"), seconds (wall time), steps,
    run_id, run_dir, error, and every metric of the final "unlearned" evaluation. A diverged run keeps its
    directory and its row (no metrics); any other failure raises."""
    if not isinstance(base, UnlearnConfig):
        raise TypeError(f"run_grid: base must be a lab.engine.UnlearnConfig, got {type(base).__name__}")
    with runs.experiment(experiment_tag(section)):
        return _run_grid(methods, base, overrides_per_method, progress, reuse)


def with_probes(per_run: dict, grid, labels, probes, probe_options: dict | None = None) -> dict:
    """run_grid's per-run overrides with the robustness probes added to the headline runs: every label of
    `labels` that is in `grid` (run_grid's methods: a list or a dict label -> overrides) gets `probes` /
    `probe_options` on top of its own overrides, so the table's run carries the probes (after its final
    evaluation) and no second unlearning run is needed. No probes: per_run as it is. A new dict."""
    probed = {"probes": list(probes), "probe_options": dict(probe_options or {})} if probes else {}
    return {**per_run, **{label: {**per_run.get(label, {}), **probed}
                          for label in labels if probed and label in grid}}


def finished_runs(root) -> pd.DataFrame:
    """run_grid's rows for every finished `lab unlearn` run under root, keyed by the UnlearnConfig its config.yaml
    records, so a notebook executed again over the same runs_root can take them instead of running them again
    (run_grid under $LAB_REUSE_RUNS; `lab report --reuse-runs`), e.g. after a claim's rule changed. Left out (so
    run again): a run whose config.yaml lacks a field of today's UnlearnConfig (it predates the option, and what it
    did there is not recorded: e.g. MUSE runs before forget_text_rows), or no longer builds an UnlearnConfig."""
    fields = {f.name for f in dataclasses.fields(UnlearnConfig)}
    rows = []
    for path in runs.find_runs(root):
        rec = runs.load_run(path)
        if rec.status != "done" or rec.config.get("kind") != "unlearn" or not fields <= rec.config.keys():
            continue
        try:
            cfg = UnlearnConfig(**{k: v for k, v in rec.config.items() if k in fields})
        except (TypeError, ValueError):
            continue
        rows.append({"label": cfg.method, "method": cfg.method, "error": None, "seconds": rec.summary.get("seconds"),
                     "config_key": _config_key(cfg), "unprobed_key": _config_key(cfg, probes=False),
                     "saved_model": (path / "model").is_dir(), **_read_back(path, rec)})
    return pd.DataFrame(rows)


def _read_back(run_dir, rec=None) -> dict:
    """A run directory as a grid row's fields: where it is, its status and steps, its final metrics."""
    rec = rec or runs.load_run(run_dir)
    return {"run_dir": str(run_dir), "run_id": Path(run_dir).name, "status": rec.status,
            "steps": rec.summary.get("steps", len(rec.trace)), **_final_metrics(rec)}


def _run_grid(methods, base, overrides_per_method, progress, reuse) -> pd.DataFrame:
    if os.environ.get(runs.REUSE_ENV):   # earlier executions' runs first: a grid's own reuse frame wins a tie
        frames = [f for f in (finished_runs(base.runs_root), reuse) if f is not None and len(f)]
        reuse = pd.concat(frames, ignore_index=True) if frames else reuse
    rows = []
    # a run asking for probes reuses only a run with the same probes; one without probes reuses a probed
    # run too (same model, same final metrics: the probes only add records)
    done = [] if reuse is None or "config_key" not in reuse else [
        r for r in reuse.to_dict("records") if r["status"] == "done"]
    exact = {r["config_key"]: r for r in done}
    unprobed = {r.get("unprobed_key") if isinstance(r.get("unprobed_key"), str) else r["config_key"]: r
                for r in done}
    for label, overrides in _specs(methods, overrides_per_method):
        cfg = _config(base, overrides)
        key, bare_key = _config_key(cfg), _config_key(cfg, probes=False)
        found = exact.get(key) or (unprobed.get(bare_key) if not cfg.probes else None)
        if found is not None and (found["saved_model"] or not cfg.save_model):
            rows.append({**found, "label": label})
            if progress:
                print(f"{label:<28} reused   {found['run_id']}")
            continue
        before = set(runs.find_runs(cfg.runs_root))
        t0 = time.time()
        row = {"label": label, "method": cfg.method, "status": "done", "error": None, "config_key": key,
               "unprobed_key": bare_key, "saved_model": cfg.save_model}
        try:
            run_dir = _run_one(cfg)
        except runs.RunStopped as stop:
            if stop.status != "diverged":   # a failure is a bug to see; divergence is a result
                raise
            new = sorted(set(runs.find_runs(cfg.runs_root)) - before)
            run_dir = new[-1] if new else None
            row.update(status=stop.status, error=str(stop))
        row.update(seconds=round(time.time() - t0, 2), run_dir=None, run_id=None)
        if run_dir is not None:
            row.update(_read_back(run_dir))
        rows.append(row)
        if progress:
            print(f"{label:<28} {row['status']:<9} {row['seconds']:7.1f} s  {row['run_id']}")
    df = pd.DataFrame(rows, columns=None if rows else ROW_KEYS)
    return df[[c for c in ROW_KEYS if c in df] + [c for c in df if c not in ROW_KEYS]]


def starting_points(base: UnlearnConfig) -> pd.DataFrame:
    """Rows "Original" (the model before unlearning) and, on TOFU, "Retain" (the retain-only model, the
    gold standard), evaluated on the same rows as the grid's runs (base.eval_limit). Where lab.prepare's
    cached evaluations hold those rows under the run's scoring options, they are cut to them
    (lab.eval.restrict_eval, as every run's 'initial' record is) instead of evaluated again: on SmolLM2 on
    CPU that is minutes per notebook."""
    from lab.eval import evaluate, restrict_eval
    model, tok, bench, reference, initial, extra = load_starting_point(base)
    kw = dict(limit=base.eval_limit, batch_size=base.eval_batch_size, score_eos=base.score_eos, progress=False,
              autocast_dtype=getattr(torch, base.autocast) if base.autocast else None, **base.eval_options)

    def scored(net, tk, cached):
        if _covers(cached, bench, base):
            return restrict_eval(cached, base.eval_limit, reference)["metrics"]
        return evaluate(net, tk, bench, reference=reference, **kw)["metrics"]

    out = [{"label": "Original", "status": "done", **scored(model, tok, initial)}]
    if extra.get("prepared"):
        from lab.models import load_model
        retain, rtok = load_model(f"{extra['prepared']}/retain", device=base.device)
        out.append({"label": "Retain", "status": "done", **scored(retain, rtok, reference)})
    return pd.DataFrame(out)


def _covers(cached, bench, base: UnlearnConfig) -> bool:
    """Whether a cached TOFU evaluation (lab.prepare's) holds every row base.eval_limit selects, scored
    with the options a run of `base` uses (score_eos, the metric options, no autocast difference)."""
    from lab.eval import metric_options
    if not isinstance(cached, dict) or "rows" not in cached or base.autocast:
        return False
    options = cached.get("options") or {}
    if options.get("score_eos", True) != base.score_eos:
        return False
    if any(options.get(k, v) != v for k, v in metric_options(**base.eval_options).items()):
        return False
    counts = cached["rows"].groupby("set").size()
    for name, ds in bench.eval_sets.items():
        want = len(ds) if base.eval_limit is None else min(base.eval_limit, len(ds))
        if counts.get(name, 0) < want:
            return False
    return True


def uwc_table(grid: pd.DataFrame, base: UnlearnConfig, targets=(0.85, 0.9, 0.95), tol: float = 0.02
              ) -> pd.DataFrame:
    """UWC calibration (GRU App. F, lab.taskvec.uwc_calibrate) of each finished run of a grid: for each
    utility target, the largest alpha with utility(alpha*theta_u + (1-alpha)*theta_org) >= target * the
    original utility, then the full evaluation there. The runs must have saved their weights
    (UnlearnConfig.save_model=True). One row per (run, target): label, target, alpha, n_evals, metrics.
    Each calibrated point is also added to its run's eval.jsonl (checkpoint "uwc", lab.runs.append_eval),
    so the dashboard and lab.runs see it."""
    from lab import taskvec
    from lab.eval import evaluate
    from lab.models import load_model
    model, tok, bench, reference, _, _ = load_starting_point(base)
    params = taskvec.trainable(model)
    theta_org = taskvec.snapshot(params)
    last: dict = {}

    def utility(m) -> float:
        # the full evaluation (FQ included): uwc_calibrate evaluates the chosen alpha last, so `last`
        # holds its metrics afterwards and no extra evaluation is needed
        last.clear()
        last.update(evaluate(m, tok, bench, reference=reference, limit=base.eval_limit, score_eos=base.score_eos,
                             batch_size=base.eval_batch_size, progress=False)["metrics"])
        return last["model_utility"]

    original = utility(model)
    out = []
    for _, row in grid.iterrows():
        if row["status"] != "done":
            out.append({"label": row["label"], "status": row["status"]})
            continue
        weights = Path(row["run_dir"]) / "model"
        if not weights.is_dir():
            raise FileNotFoundError(f"uwc_table: no saved weights for {row['label']!r} at {weights}; "
                                    "run the grid with save_model=True")
        unlearned, _ = load_model(str(weights), device=base.device)
        theta_u = taskvec.snapshot(taskvec.trainable(unlearned))
        del unlearned
        for target in targets:
            res = taskvec.uwc_calibrate(model, theta_org, theta_u, utility, target=target, original=original,
                                        tol=tol)
            if res.history[-1][0] != res.alpha:
                raise RuntimeError("uwc_table: uwc_calibrate did not evaluate the chosen alpha last")
            out.append({"label": row["label"], "status": "done", "target": target, "alpha": res.alpha,
                        "utility_goal": res.goal, "n_evals": len(res.history), **last})
            runs.append_eval(row["run_dir"], {"checkpoint": "uwc", "step": row.get("steps"), "uwc_target": target,
                                              "uwc_alpha": res.alpha, "uwc_utility_goal": res.goal,
                                              "uwc_n_evals": len(res.history), "uwc_tol": tol, **last})
        taskvec.load_values_(params, theta_org)
    return pd.DataFrame(out)


def cell(df: pd.DataFrame, label: str, column: str, key: str = "label") -> float:
    """One number of a grid (row `label`, column `column`); NaN when the run is absent, did not finish or
    lacks the metric - so a claim built on it can say "not testable" instead of crashing."""
    hit = df[df[key] == label] if key in df else df.iloc[0:0]
    if hit.empty or column not in hit or ("status" in hit and hit["status"].iloc[-1] != "done"):
        return math.nan
    return _number(hit[column].iloc[-1])


def unmoved_forget_quality(start: pd.DataFrame, rows: pd.DataFrame, column: str = "forget_quality",
                           tol: float = 1e-9) -> float | None:
    """The Original's forget quality (`column` of starting_points' "Original" row) when no row of `rows`
    moved it (|FQ - FQ_original| <= tol for each); None when one did, or the Original has none. FQ is a
    KS p-value on eval_limit truth ratios: methods that all kept the original's value tie, and a claim
    ranking their FQ is then not testable (it would say nothing about which forgets more)."""
    original = start.loc[start["label"] == "Original", column] if column in start else pd.Series(dtype=float)
    fq0 = float(original.iloc[0]) if len(original) else float("nan")
    if math.isnan(fq0) or (column in rows and (rows[column] - fq0).abs().gt(tol).any()):
        return None
    return fq0


def traces(grid: pd.DataFrame) -> pd.DataFrame:
    """The per-step traces of a grid's runs (lab.runs), stacked, with the grid's label column."""
    frames = []
    for _, row in grid.iterrows():
        if row.get("run_dir"):
            trace = runs.load_run(row["run_dir"]).trace
            if not trace.empty:
                frames.append(trace.assign(label=row["label"], method=row["method"]))
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=["label", "method", "step"])


# ---------------------------------------------------------------- paper numbers and verdicts
def paper_table(rows: dict, table: str) -> pd.DataFrame:
    """Numbers typed in from a paper: {row label: {column: value}}, with the table reference kept in
    the `source` column and in df.attrs["table"]."""
    if not rows:
        raise ValueError("paper_table: no rows")
    if not table:
        raise ValueError("paper_table: name the table, e.g. 'GRU Table 2 (Phi-1.5, 10%)'")
    df = pd.DataFrame.from_dict(rows, orient="index")
    df.index.name = "row"
    df["source"] = table
    df.attrs["table"] = table
    return df


def compare(ours: pd.DataFrame, paper: pd.DataFrame, on, rows: dict | None = None, key: str = "label"
            ) -> pd.DataFrame:
    """Ours next to the paper's numbers for the same cells.

    on: {paper column: our column} (or a list of names both use); rows: {our label: paper row label}
    (default: labels that are paper rows). Columns: (paper column, "ours" | "paper"), plus "paper table"."""
    on = {c: c for c in on} if not isinstance(on, dict) else on
    missing = [c for c in on if c not in paper.columns]
    if missing:
        raise ValueError(f"compare: paper columns {missing} not in {paper.attrs.get('table', 'the paper table')}; "
                         f"valid: {[c for c in paper.columns if c != 'source']}")
    rows = rows or {label: label for label in ours[key] if label in paper.index}
    bad = [r for r in rows.values() if r not in paper.index]
    if bad:
        raise ValueError(f"compare: paper rows {bad} not in the table; valid: {list(paper.index)}")
    ours_by = ours.set_index(key)
    out = {}
    for label, prow in rows.items():
        cells = {}
        for pcol, ocol in on.items():
            have = label in ours_by.index and ocol in ours_by.columns
            cells[(pcol, "ours")] = _number(ours_by.loc[label, ocol]) if have else math.nan
            cells[(pcol, "paper")] = _number(paper.loc[prow, pcol])
        cells[("paper table", "")] = paper.loc[prow, "source"] if "source" in paper else paper.attrs.get("table")
        out[f"{label} ~ {prow}" if label != prow else label] = cells
    df = pd.DataFrame.from_dict(out, orient="index")
    df.columns = pd.MultiIndex.from_tuples(df.columns)
    return df


def _number(x) -> float:
    """A cell as a float; NaN for blanks (e.g. the paper prints "-" or a run diverged)."""
    try:
        return float(x)
    except (TypeError, ValueError):
        return math.nan


VERDICTS = {True: "holds at this scale", False: "does not hold at this scale", None: "not testable at this scale"}


def claim(text: str, holds, detail: str = "", paper: str = "") -> dict:
    """Print one verdict line for a paper claim and return it as a record (collect them into a table).
    holds: a bool computed from the outputs, or None when the outputs cannot decide (e.g. nothing was
    unlearned, a run diverged). paper: the paper's own number for it, for the claims ledger. In a
    notebook kernel the record is also published for `lab claims` (lab.claims.publish)."""
    from lab.claims import publish
    if holds is not None:
        holds = bool(holds)
    record = {"claim": text, "verdict": VERDICTS[holds], "detail": detail}
    if paper:
        record["paper"] = paper
    print(f"[{record['verdict'].upper()}] {text}" + (f" -- {detail}" if detail else ""))
    publish(record)
    return record
