"""The TOFU protocol's starting point on the embedded default (tiny model, tofu_subset)."""
import json
import time

import pandas as pd
import pytest

from lab import prepare as prep
from lab import runs


def test_target_memorises_the_forget_set_and_the_retain_model_does_not(prepared_tiny):
    target, retain = prepared_tiny.target_eval["metrics"], prepared_tiny.retain_eval["metrics"]
    # the target was fine-tuned on the forget authors, the retain model never saw them
    assert target["forget_rouge"] > 0.8, target
    assert retain["forget_rouge"] < 0.5 * target["forget_rouge"], (target, retain)
    assert target["forget_prob"] > 3 * retain["forget_prob"]
    # both learned the retain authors (and, for a from-scratch model, the real-author / world-fact QA)
    assert target["retain_rouge"] > 0.8 and retain["retain_rouge"] > 0.8
    assert target["model_utility"] > 0.2 and retain["model_utility"] > 0.2
    # forget quality: the target is far from the reference, the reference against itself is exactly 1
    assert target["forget_quality"] < 0.05
    assert retain["forget_quality"] == 1.0 and retain["privleak"] == 0.0
    assert target["mia_min_k_auc"] > retain["mia_min_k_auc"]


def test_prepared_run_directory_and_config(prepared_tiny):
    cfg = prepared_tiny.config
    assert cfg["model"] == "tiny" and cfg["benchmark"]["name"] == "tofu_subset"
    assert "real-authors" in cfg["note"]   # the config says why a from-scratch model sees the extras
    rec = runs.load_run(prepared_tiny.run_dir)
    assert rec.status == "done" and not rec.errors
    assert set(rec.evals["checkpoint"]) == {"target", "retain"}
    assert {"loss", "lr", "checkpoint"} <= set(rec.trace.columns)
    assert set(rec.rows["set"]) >= {"forget", "retain", "real_authors", "world_facts", "holdout"}


def test_cached_second_call_is_fast_and_identical(prepared_tiny, tmp_path):
    t0 = time.time()
    again = prep.prepare(model="tiny", benchmark="tofu_subset", verbose=False, runs_root=tmp_path)
    assert time.time() - t0 < 30
    assert again.path == prepared_tiny.path
    assert again.target_eval["metrics"] == prepared_tiny.target_eval["metrics"]
    model, tok = again.load("retain")
    assert model.config.num_hidden_layers == 4
    with pytest.raises(ValueError, match="valid: 'target', 'retain'"):
        again.load("both")


def test_memorisation_table_lists_both_models(prepared_tiny):
    table = prep.memorisation_table(prepared_tiny)
    assert "target" in table and "retain" in table and "forget_rouge" in table


def test_bad_options():
    with pytest.raises(ValueError, match=r"unknown options \['epoch'\]; valid: .*epochs"):
        prep.prepare_config(model="tiny", epoch=3)
    with pytest.raises(ValueError, match="no fine-tuning data"):
        prep.prepare_config(model="tiny", benchmark="muse_news")
    with pytest.raises(ValueError, match="n_forget_authors"):
        prep.prepare_config(model="tiny", benchmark_kwargs={"n_forget_authors": 0})


def test_failure_leaves_no_cache_entry_and_no_run(tmp_path, monkeypatch):
    monkeypatch.setenv("LAB_CACHE", str(tmp_path / "cache"))

    def broken(*a, **k):
        raise FloatingPointError("fine-tune retain: loss is nan at step 0 (epoch 0)")

    monkeypatch.setattr(prep, "finetune", broken)
    with pytest.raises(FloatingPointError, match="loss is nan"):
        prep.prepare(model="tiny", benchmark="tofu_subset", verbose=False, runs_root=tmp_path / "runs",
                     benchmark_kwargs={"n_retain_authors": 1, "n_forget_authors": 1}, epochs=1, parallel=False)
    prepared_dir = tmp_path / "cache" / "prepared"
    assert not [p for p in prepared_dir.iterdir() if not p.name.endswith(".lock")]
    assert runs.find_runs(tmp_path / "runs") == []


def test_failure_in_a_worker_process_leaves_nothing_either(tmp_path, monkeypatch):
    monkeypatch.setenv("LAB_CACHE", str(tmp_path / "cache"))
    with pytest.raises(FloatingPointError, match="fine-tune (retain|target): loss is nan"):
        prep.prepare(model="tiny", benchmark="tofu_subset", verbose=False, runs_root=tmp_path / "runs",
                     benchmark_kwargs=SMALL, epochs=2, lr=1e30, parallel=True)
    assert not [p for p in (tmp_path / "cache" / "prepared").iterdir() if not p.name.endswith(".lock")]
    assert runs.find_runs(tmp_path / "runs") == []


SMALL = {"n_retain_authors": 1, "n_forget_authors": 1, "extras": False}


def test_side_by_side_processes_train_the_same_models_as_one_after_the_other(tmp_path, monkeypatch):
    """parallel=True runs each fine-tune in its own process with half the threads; with one thread in
    both layouts the weights and the loss traces are bit-identical."""
    import torch
    from lab.models import load_model
    hp = dict(benchmark_kwargs=SMALL, epochs=2, eval_limit=4, verbose=False)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        monkeypatch.setenv("LAB_CACHE", str(tmp_path / "serial"))
        serial = prep.prepare(runs_root=tmp_path / "runs-s", parallel=False, **hp)
    finally:
        torch.set_num_threads(threads)
    monkeypatch.setenv("LAB_CACHE", str(tmp_path / "parallel"))
    side = prep.prepare(runs_root=tmp_path / "runs-p", parallel=True, **hp)
    assert serial.path.name == side.path.name            # same recipe, same cache key
    for which in prep.CHECKPOINTS:
        a, b = load_model(str(serial.path / which))[0], load_model(str(side.path / which))[0]
        for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
            assert torch.equal(x, y), f"{which}: {name} differs"
    ts, tp = runs.load_run(serial.run_dir).trace, runs.load_run(side.run_dir).trace
    assert list(ts["checkpoint"].unique()) == list(tp["checkpoint"].unique()) == ["retain", "target"]
    assert ts[["step", "loss"]].equals(tp[["step", "loss"]])
    assert pd.Series(serial.target_eval["metrics"]).equals(pd.Series(side.target_eval["metrics"]))
    evals = runs.load_run(side.run_dir).evals
    assert (evals["finetune_seconds"] > 0).all() and (evals["eval_seconds"] > 0).all()
