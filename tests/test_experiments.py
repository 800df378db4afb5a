"""lab.experiments: grids of real runs read back through lab.runs, divergence as a row, reuse of finished
runs, tv/tru through lab.continual, UWC rows, paper tables, side-by-side comparison, computed verdicts."""
import dataclasses
import math
from pathlib import Path

import pandas as pd
import pytest
import yaml

from lab import runs
from lab.engine import UnlearnConfig
from lab.experiments import (cell, claim, compare, finished_runs, paper_table, run_grid, starting_points, traces,
                             unmoved_forget_quality, uwc_table, with_probes)


def _base(tmp_path, **kw):
    return UnlearnConfig(**{"runs_root": str(tmp_path / "runs"), "max_steps": 2, "eval_limit": 3, **kw})


# ---------------------------------------------------------------- grids of real runs (tiny, cached prepare)
def test_grid_rows_are_the_runs_and_reuse(prepared_tiny, tmp_path):
    base = _base(tmp_path)
    grid = run_grid({"GD": {"method": "ga_rt"}, "ngdiff": {}}, base, {"GD": {"lr": 1e-2}}, progress=False)
    assert list(grid["label"]) == ["GD", "ngdiff"] and list(grid["method"]) == ["ga_rt", "ngdiff"]
    assert (grid["status"] == "done").all() and (grid["seconds"] > 0).all()
    for _, row in grid.iterrows():   # every number is the run directory's final "unlearned" record
        rec = runs.load_run(row["run_dir"])
        final = rec.evals[rec.evals["checkpoint"] == "unlearned"].iloc[-1]
        for key in ("forget_rouge", "model_utility", "forget_quality"):
            assert row[key] == pytest.approx(final[key])
        assert row["steps"] == 2 and len(rec.trace) == 2
    assert runs.load_run(grid.loc[0, "run_dir"]).config["lr"] == 1e-2
    # a method named another way (alias, +autolr suffix) with the same arguments is the same run
    assert run_grid(["NGDiff"], base, reuse=grid, progress=False).loc[0, "run_id"] == grid.loc[1, "run_id"]
    tr = traces(grid)
    assert sorted(tr["label"].unique()) == ["GD", "ngdiff"] and len(tr) == 4 and "c_t" in tr

    # the same config under a new label is not run again ...
    again = run_grid({"GD again": {"method": "ga_rt", "lr": 1e-2}}, base, reuse=grid, progress=False)
    assert again.loc[0, "run_id"] == grid.loc[0, "run_id"] and again.loc[0, "label"] == "GD again"
    assert len(runs.find_runs(base.runs_root)) == 2
    # ... unless it wants saved weights the earlier run did not keep; a different lr is a different run
    saved = run_grid({"GD": {"method": "ga_rt", "lr": 1e-2, "save_model": True}, "GD lr": {"method": "ga_rt"}},
                     base, reuse=grid, progress=False)
    assert grid.loc[0, "run_id"] not in set(saved["run_id"]) and len(runs.find_runs(base.runs_root)) == 4
    assert (tmp_path / "runs" / saved.loc[0, "run_id"] / "model").is_dir()


def test_a_run_without_probes_reuses_a_probed_run_but_a_probed_request_needs_its_probes(prepared_tiny, tmp_path):
    # the probes only add records after the final evaluation: a probed run is also the unprobed run
    base = _base(tmp_path)
    probed = run_grid({"GA": {"method": "ga", "probes": ["quant8"]}}, base, progress=False)
    rec = runs.load_run(probed.loc[0, "run_dir"])
    assert "probe:quant8" in set(rec.evals["checkpoint"])
    final = rec.evals[rec.evals["checkpoint"] == "unlearned"].iloc[-1]
    assert probed.loc[0, "forget_rouge"] == pytest.approx(final["forget_rouge"])   # not the probe's record
    plain = run_grid(["ga"], base, reuse=probed, progress=False)
    assert plain.loc[0, "run_id"] == probed.loc[0, "run_id"] and len(runs.find_runs(base.runs_root)) == 1
    same = run_grid({"GA again": {"method": "ga", "probes": ["quant8"]}}, base, reuse=plain, progress=False)
    assert same.loc[0, "run_id"] == probed.loc[0, "run_id"]
    # other probes, or probes over a run that had none: a new run
    other = run_grid({"GA": {"method": "ga", "probes": ["quant4"]}}, base, reuse=probed, progress=False)
    assert other.loc[0, "run_id"] != probed.loc[0, "run_id"]
    bare = run_grid({"GA lr": {"method": "ga", "lr": 2e-3}}, base, progress=False)
    over = run_grid({"GA lr": {"method": "ga", "lr": 2e-3, "probes": ["quant8"]}}, base, reuse=bare, progress=False)
    assert over.loc[0, "run_id"] != bare.loc[0, "run_id"] and len(runs.find_runs(base.runs_root)) == 4


def test_reuse_runs_takes_an_earlier_executions_run_with_the_same_config(prepared_tiny, tmp_path, monkeypatch):
    """lab report --reuse-runs ($LAB_REUSE_RUNS): a grid takes the finished run under runs_root whose recorded
    config equals an entry's (e.g. re-executing a report after a claim's rule changed); any other config runs."""
    base = _base(tmp_path)
    first = run_grid(["ga"], base, progress=False)
    assert list(finished_runs(base.runs_root)["config_key"]) == list(first["config_key"])   # keyed as run_grid keys
    assert finished_runs(tmp_path / "elsewhere").empty
    monkeypatch.setenv(runs.REUSE_ENV, "1")
    again = run_grid({"GA again": {"method": "ga"}, "GA lr": {"method": "ga", "lr": 2e-3}}, base, progress=False)
    assert again.loc[0, "run_id"] == first.loc[0, "run_id"] and again.loc[0, "label"] == "GA again"
    assert again.loc[0, "forget_rouge"] == pytest.approx(first.loc[0, "forget_rouge"])
    assert again.loc[1, "run_id"] != first.loc[0, "run_id"] and len(runs.find_runs(base.runs_root)) == 2
    monkeypatch.delenv(runs.REUSE_ENV)
    assert run_grid(["ga"], base, progress=False).loc[0, "run_id"] not in set(again["run_id"])   # off: runs again
    # a run recorded before an option existed is not taken: what it did there is unknown
    config = Path(first.loc[0, "run_dir"]) / "config.yaml"
    config.write_text(yaml.safe_dump({k: v for k, v in yaml.safe_load(config.read_text()).items()
                                      if k != "forget_text_rows"}))
    assert first.loc[0, "run_id"] not in set(finished_runs(base.runs_root)["run_id"])


def test_with_probes_adds_the_probes_to_the_headline_runs_in_the_grid_only():
    per_run = {"NPO": {"method_args": {"beta": 0.1}}, "GA": {"lr": 1e-4}}
    grid = {"GA": {"method": "ga"}, "NPO": {"method": "npo_gd"}, "BLUR-NPO": {"method": "blur_npo"}}
    out = with_probes(per_run, grid, ["NPO", "BLUR-NPO", "SimNPO"], ["relearn"], {"relearn_lr": 5e-5})
    probed = {"probes": ["relearn"], "probe_options": {"relearn_lr": 5e-5}}
    assert out == {"GA": {"lr": 1e-4}, "NPO": {"method_args": {"beta": 0.1}, **probed}, "BLUR-NPO": probed}
    assert "SimNPO" not in out                                # not in the grid: run_grid would refuse it
    assert per_run == {"NPO": {"method_args": {"beta": 0.1}}, "GA": {"lr": 1e-4}}   # not edited in place
    # a list grid (method names as labels) and no probes: the overrides as they were
    assert with_probes({}, ["ga", "npo"], ["npo"], ["quant4"]) == {"npo": {"probes": ["quant4"], "probe_options": {}}}
    assert with_probes(per_run, grid, ["NPO"], []) == per_run


def test_unmoved_forget_quality_says_when_no_run_left_the_original_value():
    start = pd.DataFrame({"label": ["Original", "Retain"], "forget_quality": [0.0123, 1.0]})
    tied = pd.DataFrame({"label": ["GA", "NPO"], "forget_quality": [0.0123, 0.0123]})
    assert unmoved_forget_quality(start, tied) == pytest.approx(0.0123)
    moved = tied.assign(forget_quality=[0.0123, 0.05])
    assert unmoved_forget_quality(start, moved) is None
    # the log column GRU reports, and no Original row: nothing to compare with
    assert unmoved_forget_quality(start.assign(ln_FQ=[-4.398, 0.0]), tied.assign(ln_FQ=[-4.398, -4.398]),
                                  "ln_FQ") == pytest.approx(-4.398)
    assert unmoved_forget_quality(start[start["label"] == "Retain"], tied) is None


def test_divergence_is_a_row_and_the_grid_goes_on(prepared_tiny, tmp_path):
    base = _base(tmp_path, max_steps=4)
    # plain SGD ascent with an absurd step: the weights overflow and the loss goes non-finite
    grid = run_grid({"boom": {"method": "ga", "optimizer": "sgd", "lr": 1e12}, "ga": {}}, base, progress=False)
    boom = grid.iloc[0]
    assert boom["status"] == "diverged" and "diverged" in boom["error"]
    assert runs.load_run(boom["run_dir"]).status == "diverged"
    assert math.isnan(cell(grid, "boom", "forget_rouge"))     # no final evaluation to report
    assert grid.iloc[1]["status"] == "done" and not math.isnan(cell(grid, "ga", "forget_rouge"))


def test_arithmetic_methods_run_as_one_continual_task(prepared_tiny, tmp_path):
    grid = run_grid({"TV": {"method": "tv", "method_args": {"lam": 1.0}}}, _base(tmp_path), progress=False)
    row = grid.iloc[0]
    assert row["status"] == "done"
    rec = runs.load_run(row["run_dir"])
    assert rec.config["kind"] == "continual" and rec.config["n_tasks"] == 1
    for key in ("model_utility", "forget_quality", "forget_rouge"):   # utility and task records merged
        assert not math.isnan(row[key])


def test_starting_points_and_uwc(prepared_tiny, tmp_path):
    base = _base(tmp_path)
    start = starting_points(base)
    assert list(start["label"]) == ["Original", "Retain"]
    # the target memorised the forget set, the retain model never saw it
    assert cell(start, "Original", "forget_rouge") > cell(start, "Retain", "forget_rouge")

    # 3 ascent steps cost utility below 90 % of the original: the bisection lands strictly inside (0, 1)
    grid = run_grid({"GA": {"method": "ga", "lr": 3e-3, "max_steps": 3, "save_model": True}}, base, progress=False)
    assert grid.loc[0, "model_utility"] < 0.9 * cell(start, "Original", "model_utility")
    uwc = uwc_table(grid, base, targets=(0.9,), tol=0.1)
    row = uwc.iloc[0]
    assert row["label"] == "GA" and 0.0 < row["alpha"] < 1.0 and row["n_evals"] > 2
    # the calibrated model meets the utility target on the rows it was calibrated on
    assert row["model_utility"] >= row["utility_goal"] - 1e-9
    # the calibrated point lives in the run directory too (checkpoint "uwc"), beside the unchanged final record
    rec = runs.load_run(grid.loc[0, "run_dir"])
    point = rec.evals[rec.evals["checkpoint"] == "uwc"]
    assert len(point) == 1 and point["uwc_alpha"].iloc[0] == row["alpha"] and point["uwc_target"].iloc[0] == 0.9
    assert point["model_utility"].iloc[0] == pytest.approx(row["model_utility"])
    from lab.runs_views import final_record
    assert final_record(rec)["model_utility"] == pytest.approx(grid.loc[0, "model_utility"])
    with pytest.raises(FileNotFoundError, match="not a run directory"):
        runs.append_eval(tmp_path, {"checkpoint": "uwc"})
    with pytest.raises(FileNotFoundError, match="save_model=True"):
        uwc_table(run_grid(["ga"], base, progress=False), base, targets=(0.9,))


def test_run_grid_argument_errors(tmp_path):
    base = _base(tmp_path)
    with pytest.raises(TypeError, match="list of method names"):
        run_grid("ga", base)
    with pytest.raises(TypeError, match="UnlearnConfig"):
        run_grid(["ga"], {"method": "ga"})
    with pytest.raises(ValueError, match="not in the grid"):
        run_grid(["ga"], base, {"npo": {"lr": 1.0}})
    with pytest.raises(ValueError, match="duplicate labels"):
        run_grid(["ga", "ga"], base)
    with pytest.raises(ValueError, match="unknown method"):
        run_grid({"x": {"method": "no_such_method"}}, base)
    assert list(run_grid([], base).columns)[:3] == ["label", "method", "status"]


# ---------------------------------------------------------------- paper numbers and verdicts
def test_paper_table_keeps_its_reference():
    t = paper_table({"NGDiff": {"Verbmem": 0.024, "Utility": 0.747}}, table="NGDiff Table 1 (Phi-1.5)")
    assert t.loc["NGDiff", "Verbmem"] == 0.024 and t.loc["NGDiff", "source"] == "NGDiff Table 1 (Phi-1.5)"
    assert t.attrs["table"] == "NGDiff Table 1 (Phi-1.5)"
    with pytest.raises(ValueError, match="name the table"):
        paper_table({"a": {"x": 1}}, table="")
    with pytest.raises(ValueError, match="no rows"):
        paper_table({}, table="T")


def test_compare_side_by_side():
    ours = pd.DataFrame({"label": ["ngdiff", "npo", "Original"], "forget_rouge": [0.3, 0.1, 1.0],
                         "retain_rouge": [0.9, 0.2, 1.0], "status": ["done"] * 3})
    paper = paper_table({"NGDiff": {"Verbmem": 0.024, "Utility": 0.747}, "NPO": {"Verbmem": 0.0, "Utility": "-"},
                         "No-unlearn": {"Verbmem": 1.0, "Utility": 1.0}}, table="T1")
    out = compare(ours, paper, on={"Verbmem": "forget_rouge", "Utility": "retain_rouge"},
                  rows={"ngdiff": "NGDiff", "npo": "NPO"})
    assert list(out.index) == ["ngdiff ~ NGDiff", "npo ~ NPO"]
    assert out.loc["ngdiff ~ NGDiff", ("Verbmem", "ours")] == 0.3
    assert out.loc["ngdiff ~ NGDiff", ("Utility", "paper")] == 0.747
    assert math.isnan(out.loc["npo ~ NPO", ("Utility", "paper")])     # the paper prints "-"
    assert out.loc["npo ~ NPO", ("paper table", "")] == "T1"
    same = compare(ours.assign(label=["NGDiff", "NPO", "x"]), paper, on={"Verbmem": "forget_rouge"})
    assert list(same.index) == ["NGDiff", "NPO"]                      # default: labels that are paper rows
    with pytest.raises(ValueError, match="paper columns"):
        compare(ours, paper, on={"FQ": "forget_quality"})
    with pytest.raises(ValueError, match="paper rows"):
        compare(ours, paper, on=["Verbmem"], rows={"ngdiff": "GA"})


def test_claim_prints_a_computed_verdict(capsys):
    rec = claim("x beats y", 0.5 > 0.3, "0.5 vs 0.3")
    assert rec == {"claim": "x beats y", "verdict": "holds at this scale", "detail": "0.5 vs 0.3"}
    assert capsys.readouterr().out.startswith("[HOLDS AT THIS SCALE] x beats y -- 0.5 vs 0.3")
    import numpy as np
    assert claim("y beats x", np.float64(0.3) > 0.5)["verdict"] == "does not hold at this scale"
    assert claim("needs a run", None, "not run")["verdict"] == "not testable at this scale"


def test_cell_lookup():
    df = pd.DataFrame({"label": ["a", "b"], "status": ["done", "diverged"], "m": [1.5, 2.0]})
    assert cell(df, "a", "m") == 1.5
    assert math.isnan(cell(df, "b", "m"))        # did not finish
    assert math.isnan(cell(df, "c", "m")) and math.isnan(cell(df, "a", "other"))


def test_starting_points_reuse_the_prepared_evaluations_where_they_cover_the_rows(prepared_tiny, tmp_path, monkeypatch):
    import lab.eval
    base = _base(tmp_path)
    fresh = starting_points(dataclasses.replace(base, eval_options={"es_no_match": "open_unlearning"}))  # not cached
    calls = []
    real = lab.eval.evaluate
    monkeypatch.setattr(lab.eval, "evaluate", lambda *a, **k: calls.append(k) or real(*a, **k))
    cut = starting_points(base)
    assert calls == []                        # the prepare's evaluations hold these rows: no model pass
    for label in ("Original", "Retain"):
        for key in ("forget_rouge", "model_utility", "forget_truth_ratio", "forget_quality"):
            assert cell(cut, label, key) == pytest.approx(cell(fresh, label, key), abs=1e-4), (label, key)
    assert cell(cut, "Retain", "forget_quality") == pytest.approx(1.0)
    starting_points(dataclasses.replace(base, eval_options={"es_no_match": "open_unlearning"}))
    assert len(calls) == 2                    # other metric options: Original and Retain are evaluated
