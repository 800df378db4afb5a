"""lab.runs_views: the metric-direction table (METRICS), measured on a memorising target vs its retain
model, and the trade-off "change from initial" sign that reads it. (The other runs_views tables are
tested with the dashboard: tests/test_dashboard.py.)"""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from lab import metrics, runs_views


# Metrics the tiny TOFU evaluation does not report (MUSE, ALKN), and utility metrics (which a memorising
# target and its retain model share): measured by the SAME statistic on the forget rows, which the target
# knows and the retain model does not. A utility metric is better when the model knows its rows.
def _forget_rows(ev) -> pd.DataFrame:
    return ev["rows"][ev["rows"]["set"] == "forget"]


def _prob(ev):
    return float(_forget_rows(ev)["prob"].mean())


def _rouge(ev):
    return float(_forget_rows(ev)["rouge"].mean())


def _truth_ratio_utility(ev):
    return metrics.truth_ratio_stat(_forget_rows(ev)["truth_ratio"].to_numpy(), "utility")


def _utility(ev):
    return metrics.model_utility([_prob(ev), _rouge(ev), _truth_ratio_utility(ev)])


STAND_INS = {
    "forget_min_k": lambda ev: float(_forget_rows(ev)["min_k"].mean()),   # MUSE per-task: mean Min-K% log-prob
    "verbmem_rouge_f1": _rouge, "knowmem_forget_rouge_f1": _rouge,        # MUSE: ROUGE on forget text / QA
    "model_utility": _utility, "model_utility_trouge": _utility,
    "trouge": _rouge, "knowmem_retain_rouge_f1": _rouge,
    **{f"{s}_prob": _prob for s in ("retain", "real_authors", "world_facts")},
    **{f"{s}_rouge": _rouge for s in ("retain", "real_authors", "world_facts")},
    **{f"{s}_truth_ratio": _truth_ratio_utility for s in ("retain", "real_authors", "world_facts")},
}


# undefined on the retain model itself (it is the attack's reference): a model that cannot tell members
# from non-members scores chance
CHANCE_ON_REFERENCE = {"mia_reference_auc": 0.5}
# need a robustness probe (lab.probes) on an unlearned run: not measurable on the prepared pair
NEEDS_A_PROBE = {"recovery_rouge", "recovery_prob"}


def _measured(metric, ev):
    """(value, how): the metric itself where the forget-role evaluation reports it, else its stand-in."""
    spec = runs_views.METRICS[metric]
    value = ev["metrics"].get(metric, math.nan)
    if metric in CHANCE_ON_REFERENCE and math.isnan(value):
        return CHANCE_ON_REFERENCE[metric], "chance"
    if spec.role == "forget" and metric in ev["metrics"]:
        return value, "reported"
    if metric not in STAND_INS:
        raise AssertionError(f"{metric}: neither reported by the TOFU evaluation nor given a stand-in here")
    return STAND_INS[metric](ev), "stand-in"


def test_every_direction_matches_a_memorising_target_vs_its_retain_model(prepared_tiny):
    """Forget metrics: better = the retain model's side (it never saw the forget rows). Utility metrics:
    better = the side of the model that knows the rows (the target on the forget rows)."""
    target, retain = prepared_tiny.target_eval, prepared_tiny.retain_eval
    # every metric an evaluation reports has a direction in the table
    assert set(target["metrics"]) | set(retain["metrics"]) <= set(runs_views.METRICS)
    wrong = []
    for metric, spec in runs_views.METRICS.items():
        if spec.role == "info" or metric in NEEDS_A_PROBE:
            continue
        t, how = _measured(metric, target)
        r, _ = _measured(metric, retain)
        assert not (math.isnan(t) or math.isnan(r)) and t != r, (metric, t, r)
        lo, hi = spec.range
        if how == "reported":
            assert lo <= t <= hi and lo <= r <= hi, (metric, spec.range, t, r)
        better_is_higher = (r > t) if spec.role == "forget" else (t > r)
        if better_is_higher != spec.higher:
            wrong.append(f"{metric} ({how}): target {t:.4g}, retain {r:.4g}, table says higher={spec.higher}")
    assert not wrong, "\n".join(wrong)
    # the two the issue names (issue 13 item 9)
    assert runs_views.higher_is_better("forget_truth_ratio") and not runs_views.higher_is_better("forget_min_k")


def test_axis_lists_and_unknown_metrics_come_from_the_table():
    assert runs_views.UTILITY_METRICS[0] == "model_utility" and runs_views.FORGET_METRICS[0] == "forget_rouge"
    assert {"forget_truth_ratio", "forget_min_k", "forget_quality"} <= set(runs_views.FORGET_METRICS)
    assert all(runs_views.METRICS[m].role == "utility" for m in runs_views.UTILITY_METRICS)
    assert "privleak" not in runs_views.FORGET_METRICS and "mia_min_k" not in runs_views.FORGET_METRICS
    assert runs_views.HIGHER_IS_BETTER["forget_truth_ratio"] is True        # the old name, from the table
    assert not runs_views.higher_is_better("forget_new_thing") and runs_views.higher_is_better("new_utility")
    assert "privleak" not in runs_views.UNIT_METRICS and "model_utility" in runs_views.UNIT_METRICS


class _Rec:
    def __init__(self, run_id, config, evals):
        self.run_id, self.config, self.evals = run_id, config, pd.DataFrame(evals)
        self.summary, self.trace, self.errors, self.status, self.masks = {}, None, [], "done", None


@pytest.mark.parametrize("metric, initial, final, forgot", [
    ("forget_truth_ratio", 0.3, 0.7, 0.4),   # towards 1 (indistinguishable): forgetting
    ("forget_min_k", -1.0, -3.0, 2.0),       # log-probs fall: less member-like
    ("forget_rouge", 0.9, 0.4, 0.5),
    ("forget_quality", 0.01, 0.5, 0.49),
])
def test_change_from_initial_is_positive_when_the_model_forgets(metric, initial, final, forgot):
    rec = _Rec("20260101-000000-unlearn-npo-tiny-def456",
               {"kind": "unlearn", "method": "npo", "model": "tiny", "benchmark": "tofu_subset"},
               [dict(step=0, checkpoint="initial", model_utility=0.6, **{metric: initial}),
                dict(step=5, checkpoint="unlearned", model_utility=0.5, **{metric: final})])
    pts = runs_views.tradeoff_table([rec], "model_utility", metric, change=True)
    assert pts.loc[pts["point"] == "final", "forgetting"].iloc[0] == pytest.approx(forgot)


def test_pareto_front_reads_the_direction_of_the_forgetting_axis():
    """forget_truth_ratio: the run that moved it up (towards 1) with the same utility is on the front."""
    from dashboard import figures
    pts = pd.DataFrame({"label": ["a", "b"], "kind": ["unlearn"] * 2, "forgetting": [0.2, 0.8],
                        "utility": [0.5, 0.5], "hover": ["", ""], "task": [None, None]})
    fig = figures.tradeoff_figure(pts, "model_utility", "forget_truth_ratio")
    front = next(t for t in fig.data if t.meta == "pareto")
    assert list(np.asarray(front.x, dtype=float)) == [0.8]


# ---------------------------------------------------------------- experiments (config.yaml `experiment`)
def _tagged_run(root, stamp, method, tag=None, env=None, monkeypatch=None):
    from lab import runs
    if env is not None:
        monkeypatch.setenv(runs.EXPERIMENT_ENV, env)
    with runs.experiment(tag):
        with runs.create_run({"kind": "unlearn", "method": method, "model": "tiny"}, root=root,
                             run_id=f"2026010{stamp}-000000-unlearn-{method}-tiny-{stamp}{method}") as run:
            run.log_eval({"step": 1, "checkpoint": "unlearned", "model_utility": 0.5, "forget_rouge": 0.3})
    if env is not None:
        monkeypatch.delenv(runs.EXPERIMENT_ENV)
    return run.path


def make_experiment_runs(root, monkeypatch) -> dict:
    """Four runs: one untagged, two of 'nbA (demo)' (sections S1, S2), then one of 'nbB (demo)'."""
    return {"untagged": _tagged_run(root, 1, "ga"),
            "a1": _tagged_run(root, 2, "ga", env="nbA (demo)", tag="nbA (demo)/S1", monkeypatch=monkeypatch),
            "a2": _tagged_run(root, 3, "npo", env="nbA (demo)", monkeypatch=monkeypatch),
            "b": _tagged_run(root, 4, "npo", tag="my tag", monkeypatch=monkeypatch)}


def test_runs_record_their_experiment_and_the_options_put_the_latest_first(tmp_path, monkeypatch):
    from lab import runs
    paths = make_experiment_runs(tmp_path, monkeypatch)
    recs = [runs.load_run(p) for p in paths.values()]
    assert [r.config.get("experiment") for r in recs] == [None, "nbA (demo)/S1", "nbA (demo)", "my tag"]
    listed = runs.list_runs(tmp_path)
    assert listed["experiment"].tolist()[1:] == ["nbA (demo)/S1", "nbA (demo)", "my tag"]
    table = runs_views.runs_table(recs)
    assert runs_views.experiment_options(table) == ["my tag", "nbA (demo)", "nbA (demo)/S1", runs_views.UNTAGGED]
    assert table.loc[runs_views.in_experiment(table, "nbA (demo)"), "method"].tolist() == ["ga", "npo"]
    assert table.loc[runs_views.in_experiment(table, "nbA (demo)/S1"), "method"].tolist() == ["ga"]
    assert runs_views.in_experiment(table, runs_views.UNTAGGED).tolist() == [True, False, False, False]
    assert runs.current_experiment() is None                       # the context is gone after the block
