"""The TOFU protocol's starting point on the embedded default (tiny model, tofu_subset)."""
import dataclasses
import json
import math
import shutil

import pandas as pd
import pytest

from lab import data
from lab import prepare as prep
from lab import eval as lab_eval
from lab import runs
from lab.data import read_records


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


def test_a_cache_entry_whose_prepare_run_was_deleted_points_at_no_run(prepared_tiny, tmp_path):
    meta = json.loads((prepared_tiny.path / "prepared.json").read_text())
    (tmp_path / "prepared.json").write_text(json.dumps({**meta, "run_dir": str(tmp_path / "deleted-run")}))
    (tmp_path / "evals").symlink_to(prepared_tiny.path / "evals")
    entry = prep._load_prepared(tmp_path, prepared_tiny.eval_path.name)
    assert entry.run_dir is None and entry.target_eval["metrics"] == prepared_tiny.target_eval["metrics"]


def test_reference_covering_scores_the_rows_a_reference_lacks_as_the_full_evaluation_did(prepared_tiny, monkeypatch):
    full = prepared_tiny.retain_eval
    rows = full["rows"]
    forget, holdout = (prepared_tiny.benchmark.eval_sets[s] for s in ("forget", "holdout"))
    cut = {**full, "rows": rows[(rows["set"] != "forget") | (rows["row"].isin(forget["row"][:4]))]}
    sets = {"forget": forget.select(range(10)), "holdout": holdout.select(range(3))}
    with pytest.raises(ValueError, match="reference lacks 6 of the 10"):
        lab_eval.same_rows(cut, lab_eval.score_tofu_rows(*prepared_tiny.load("retain"), sets), ("forget",))
    covered = prep.reference_covering(prepared_tiny.path, cut, sets)
    got, want = (lab_eval.same_rows(r, covered["rows"], ("forget",))[0] for r in (covered, full))
    assert got["row"].tolist() == list(forget["row"][:10]) and len(covered["rows"]) == len(cut["rows"]) + 6
    for col in ("truth_ratio", "min_k", "loss", "zlib", "exact_memorization"):   # scored alone == in the full batch
        assert got[col].to_numpy() == pytest.approx(want[col].to_numpy(), rel=1e-4, abs=1e-6), col
    assert got["rouge"].iloc[:4].notna().all() and got["rouge"].iloc[4:].isna().all()   # scored, never generated

    def never(*a, **k):
        raise AssertionError("a cached reference extension must not load the retain model")
    monkeypatch.setattr(prep, "load_model", never)
    again = prep.reference_covering(prepared_tiny.path, cut, sets)
    pd.testing.assert_frame_equal(again["rows"], covered["rows"])
    assert prep.reference_covering(prepared_tiny.path, full, sets) is full   # covers them already


def test_cached_second_call_loads_without_fine_tuning_or_evaluating(prepared_tiny, tmp_path, monkeypatch):
    def never(*a, **k):
        raise AssertionError("a cache hit must not fine-tune or evaluate")

    monkeypatch.setattr(prep, "finetune", never)
    monkeypatch.setattr(prep, "evaluate", never)
    again = prep.prepare(model="tiny", benchmark="tofu_subset", verbose=False, runs_root=tmp_path)
    assert again.path == prepared_tiny.path
    assert again.target_eval["metrics"] == prepared_tiny.target_eval["metrics"]
    assert runs.find_runs(tmp_path) == []    # nothing trained: no new prepare run either
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
    assert list(prepared_dir.iterdir()) == []     # no cache entry, no tmp dir, no .lock file
    assert runs.find_runs(tmp_path / "runs") == []


def test_failure_in_a_worker_process_leaves_nothing_either(tmp_path, monkeypatch):
    monkeypatch.setenv("LAB_CACHE", str(tmp_path / "cache"))
    with pytest.raises(FloatingPointError, match="fine-tune (retain|target): loss is nan"):
        prep.prepare(model="tiny", benchmark="tofu_subset", verbose=False, runs_root=tmp_path / "runs",
                     benchmark_kwargs=SMALL, epochs=2, lr=1e30, parallel=True)
    assert list((tmp_path / "cache" / "prepared").iterdir()) == []
    assert runs.find_runs(tmp_path / "runs") == []


SMALL = {"n_retain_authors": 1, "n_forget_authors": 1, "extras": False}


def test_side_by_side_processes_train_the_same_models_as_one_after_the_other(tmp_path, monkeypatch):
    """parallel=True runs each fine-tune in its own process with half the threads; with one thread in
    both layouts (workers and the evaluating main process) the weights, the loss traces and the
    evaluations are bit-identical (a GEMM's rounding depends on the thread count)."""
    import torch
    from lab.models import load_model
    hp = dict(benchmark_kwargs=SMALL, epochs=2, eval_limit=4, verbose=False)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        monkeypatch.setenv("LAB_CACHE", str(tmp_path / "serial"))
        serial = prep.prepare(runs_root=tmp_path / "runs-s", parallel=False, **hp)
        monkeypatch.setenv("LAB_CACHE", str(tmp_path / "parallel"))
        side = prep.prepare(runs_root=tmp_path / "runs-p", parallel=True, **hp)
    finally:
        torch.set_num_threads(threads)
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


def _tofu_copy(tmp_path, shared_data, edit=None):
    """A data root holding a copy of the TOFU files; edit: (file, row, key, new value) changed in the copy."""
    root = tmp_path / "data"
    shutil.copytree(shared_data / "tofu", root / "tofu")
    if edit:
        name, row, key, value = edit
        path = root / "tofu" / name
        rows = read_records(path)
        rows[row] = {**rows[row], key: value}   # the parsed records are cached: no mutation
        path.write_text(json.dumps(rows))
    return root


def _keys(root=None, **hp):
    cfg = prep.prepare_config(model="tiny", benchmark_kwargs={"root": None if root is None else str(root)}, **hp)
    return prep.cache_keys(cfg)


def test_cache_keys_cover_the_rows_used_not_the_names(tmp_path, shared_data):
    default = _keys()
    assert _keys(_tofu_copy(tmp_path / "same", shared_data)) == default          # same rows, other folder
    # an edited training row (author 0 is retained: in train_full and train_retain): new models
    edited = _keys(_tofu_copy(tmp_path / "train", shared_data, ("full.json", 0, "answer", "Edited.")))
    assert edited[0] != default[0]
    # an edited eval-only row (holdout): same models, new evaluation
    held = _keys(_tofu_copy(tmp_path / "eval", shared_data, ("holdout10.json", 0, "answer", "Edited.")))
    assert held[0] == default[0] and held[1] != default[1]


def test_evaluation_conventions_key_the_evaluations_not_the_models(monkeypatch):
    model_key, eval_key = _keys()
    assert _keys(eval_limit=5) == (model_key, _keys(eval_limit=5)[1]) and _keys(eval_limit=5)[1] != eval_key
    assert _keys(eval_batch_size=3) == (model_key, eval_key)       # batching does not change the numbers
    assert _keys(epochs=3)[0] != model_key
    no_eos = _keys(score_eos=False)
    assert no_eos[0] == model_key and no_eos[1] != eval_key
    monkeypatch.setattr(prep.lab_eval, "EVAL_VERSION", prep.lab_eval.EVAL_VERSION + 1)
    bumped = _keys()
    assert bumped[0] == model_key and bumped[1] != eval_key


def test_new_evaluation_options_reuse_the_models_and_evaluate_lazily(tmp_path, monkeypatch):
    monkeypatch.setattr(prep, "cache_root", lambda: tmp_path / "cache")
    hp = dict(benchmark_kwargs=SMALL, epochs=1, verbose=False, parallel=False, runs_root=tmp_path / "runs")
    first = prep.prepare(eval_limit=2, **hp)

    def never(*a, **k):
        raise AssertionError("new evaluation options must not fine-tune")

    monkeypatch.setattr(prep, "finetune", never)
    other = prep.prepare(eval_limit=3, **hp)
    assert other.path == first.path and other.eval_path != first.eval_path
    assert (other.target_eval["rows"].groupby("set").size() == 3).all()
    assert (first.target_eval["rows"].groupby("set").size() == 2).all()
    assert len(runs.find_runs(tmp_path / "runs")) == 1                 # only the first call trained
    again = prep.prepare(eval_limit=2, **hp)                             # both evaluations stay cached
    assert again.eval_path == first.eval_path
    assert pd.Series(again.target_eval["metrics"]).equals(pd.Series(first.target_eval["metrics"]))
    assert sorted(p.name for p in (tmp_path / "cache" / "prepared").iterdir()) == [first.path.name]


def test_a_failed_lazy_evaluation_leaves_the_models_and_nothing_else(tmp_path, monkeypatch):
    monkeypatch.setattr(prep, "cache_root", lambda: tmp_path / "cache")
    hp = dict(benchmark_kwargs=SMALL, epochs=1, verbose=False, parallel=False, runs_root=tmp_path / "runs")
    first = prep.prepare(eval_limit=2, **hp)

    def broken(*a, **k):
        raise RuntimeError("evaluation failed")

    monkeypatch.setattr(prep, "evaluate", broken)
    with pytest.raises(RuntimeError, match="evaluation failed"):
        prep.prepare(eval_limit=3, **hp)
    assert [p.name for p in (first.path / "evals").iterdir()] == [first.eval_path.name]
    assert sorted(p.name for p in (tmp_path / "cache" / "prepared").iterdir()) == [first.path.name]


def test_entry_lock_is_removed_on_release_and_on_failure(tmp_path):
    entry = tmp_path / "entry"
    with prep.entry_lock(entry):
        assert (tmp_path / "entry.lock").exists()
    assert not (tmp_path / "entry.lock").exists()
    with pytest.raises(KeyError):
        with prep.entry_lock(entry):
            raise KeyError("boom")
    assert list(tmp_path.iterdir()) == []


def test_entry_lock_excludes_a_second_holder_even_when_files_are_removed(tmp_path):
    """Threads stand in for processes (each lock is its own open file). Holders must never overlap,
    although every release removes the lock file that waiters may already have opened."""
    import threading
    entry, inside, overlaps = tmp_path / "entry", [], []

    def work():
        for _ in range(20):
            with prep.entry_lock(entry):
                inside.append(1)
                if len(inside) > 1:
                    overlaps.append(len(inside))
                inside.pop()

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert overlaps == [] and list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------- MUSE-News (issue 19): a prepared news target
# 3 forget articles: the sources of verbmem, knowmem and privleak item 0 (eval_limit 2 scores items 0 and 1).
# max_length 512 (the default) = the evaluation's prompt context (lab.eval.evaluate_muse): windows of 128
# tokens gave VerbMem 0.16 at a 512-token prompt but 0.34 at a 128-token one. A from-scratch model needs many
# small steps to memorise text: batch 16 (320 steps) left the target at loss 0.36, batch 4 (1120) at 0.11.
# Cold: about 4 min on 2 shared cores (slow); later runs hit the cache.
MUSE_DOCS = {"max_docs": 3, "other_docs": 0}
MUSE_PREP = dict(epochs=40, eval_limit=2, batch_size=4)


@pytest.fixture(scope="module")
def prepared_muse():
    return prep.prepare(model="tiny", benchmark="muse_news", benchmark_kwargs=MUSE_DOCS, verbose=False,
                        runs_root=prep.cache_root() / "test-runs", **MUSE_PREP)


def test_muse_forget_selection_takes_the_eval_items_articles_first(shared_data):
    sources, holdout = data.muse_sources(shared_data)
    rows, summary = data.muse_forget_selection(6, 0, shared_data)
    assert rows[:2] == [sources["verbmem"][0], sources["knowmem"][0]] and len(set(rows)) == 6
    assert summary == {"source_docs": 6, "other_docs": 0, "items_with_source": {
        "verbmem": sum(i in rows for i in sources["verbmem"]), "knowmem": sum(i in rows for i in sources["knowmem"]),
        "privleak": sum(i in rows for i in sources["privleak"])}}
    raw = data.load_muse_news("raw/forget", shared_data)["text"]
    assert " ".join(data.load_muse_news("verbmem/forget", shared_data)[0]["gt"].split())[:200] in " ".join(
        raw[rows[0]].split())
    mixed, s = data.muse_forget_selection(8, root=shared_data)   # other_docs default: max_docs // 4 sampled
    assert s["other_docs"] == 2 and mixed[:6] == rows and not set(mixed[6:]) & set(sum(sources.values(), []))
    assert not set(data.muse_forget_selection(200, 100, shared_data)[0]) & set(holdout)
    b = data.get_benchmark("muse_news", root=shared_data, **MUSE_DOCS)
    assert list(b.forget["row"]) == rows[:3] and len(b.train_full) == 3 + len(b.train_retain) == 103
    assert b.train_retain[0]["text"].startswith("Question: ") and "\nAnswer: " in b.train_retain[0]["text"]
    assert data.benchmark_from_config(json.loads(json.dumps(b.config))).config == b.config
    with pytest.raises(ValueError, match="other_docs=7 > max_docs=6"):
        data.muse_forget_selection(6, 7, shared_data)
    with pytest.raises(ValueError, match="max_docs=0; valid: an int >= 1"):
        data.get_benchmark("muse_news", max_docs=0)
    with pytest.raises(ValueError, match="no fine-tuning data.*max_docs=N"):
        prep.prepare_config(model="tiny", benchmark="muse_news")


def test_text_chunks_cover_every_token_with_half_a_window_of_context():
    from lab.data import chunk_batches, text_chunks
    from lab.models import load_model
    _, tok = load_model("tiny")
    ids = tok("word " * 300, add_special_tokens=False)["input_ids"]
    chunks = text_chunks(tok, ["word " * 300, "short"], max_length=64)
    bos = chunks[0][:1] if chunks[0][0] == tok.bos_token_id else []
    body = [c[len(bos):] for c in chunks[:-1]]
    assert all(len(c) <= 64 for c in chunks) and body[0] == ids[:64 - len(bos)] and body[-1][-1] == ids[-1]
    assert len(chunks[-1]) == len(bos) + len(tok("short", add_special_tokens=False)["input_ids"])
    batch = next(chunk_batches(tok, chunks, 2))
    assert batch["labels"][0, 0] == -100 and (batch["labels"][0, 1:] == batch["input_ids"][0, 1:]).all()


@pytest.mark.slow
def test_muse_target_memorises_its_news_and_the_reference_does_not(prepared_muse):
    target, ref = prepared_muse.target_eval["metrics"], prepared_muse.retain_eval["metrics"]
    print("MUSE prepared (tiny, 3 articles): target", {k: round(target[k], 3) for k in prep.MUSE_MEMORISATION_KEYS},
          "reference", {k: round(ref[k], 3) for k in prep.MUSE_MEMORISATION_KEYS})
    # exact memorisation (teacher-forced, ~0.5 vs ~0.02 on 2 cores and in CI) carries the claim with a wide
    # margin; the generated ROUGE (0.20-0.25 vs 0.055-0.07) moves with thread count and is checked looser
    assert target["verbmem_exact_memorization"] > ref["verbmem_exact_memorization"] + 0.3, (target, ref)
    assert target["verbmem_rouge_f1"] > ref["verbmem_rouge_f1"] + 0.1, (target, ref)
    assert "privleak" in target and ref["privleak"] == 0.0       # PrivLeak against the real retrain reference
    assert prepared_muse.config["benchmark"]["max_docs"] == 3 and "3 forget articles" in prepared_muse.config["note"]
    table = prep.memorisation_table(prepared_muse)
    assert "verbmem_rouge_f1" in table and "forget_truth_ratio" not in table
    rec = runs.load_run(prepared_muse.run_dir)
    assert rec.status == "done" and set(rec.evals["checkpoint"]) == {"target", "retain"}


@pytest.mark.slow
def test_muse_prepare_second_call_is_a_cache_hit(prepared_muse, tmp_path, monkeypatch):
    def never(*a, **k):
        raise AssertionError("a cache hit must not fine-tune or evaluate")

    monkeypatch.setattr(prep, "finetune", never)
    monkeypatch.setattr(prep, "evaluate", never)
    assert prep.prepared_exists(model="tiny", benchmark="muse_news", benchmark_kwargs=MUSE_DOCS, **MUSE_PREP)
    again = prep.prepare(model="tiny", benchmark="muse_news", benchmark_kwargs=MUSE_DOCS, verbose=False,
                         runs_root=tmp_path, **MUSE_PREP)
    assert again.path == prepared_muse.path and runs.find_runs(tmp_path) == []
    assert again.target_eval["metrics"] == prepared_muse.target_eval["metrics"]
    assert not prep.prepared_exists(model="tiny", benchmark="muse_news", benchmark_kwargs={"max_docs": 5},
                                    **MUSE_PREP)


@pytest.mark.slow
def test_unlearn_on_muse_news_starts_from_the_prepared_target_with_a_reference(prepared_muse, tmp_path):
    from lab.engine import unlearn
    base = dict(method="ga", model="tiny", benchmark="muse_news", benchmark_kwargs=MUSE_DOCS, max_steps=1,
                batch_size=2, max_length=256, eval_limit=2, runs_root=str(tmp_path), progress=False,
                prepare={k: v for k, v in MUSE_PREP.items() if k != "eval_limit"})
    res = unlearn(**base)
    assert res.config["muse_starting_point"] == "prepared" and res.config["prepared"] == str(prepared_muse.path)
    assert res.config["benchmark_config"]["max_docs"] == 3
    assert "privleak" in res.metrics and res.metrics["verbmem_rouge_f1"] >= 0
    # one epoch over the forget rows: open-unlearning's max_length-token chunks of the 3 articles by default,
    # the 3 articles cut to max_length each by name (the lab's earlier rows)
    epoch = {**base, "max_steps": None, "epochs": 1}
    chunked, cut = unlearn(**epoch), unlearn(**epoch, forget_text_rows="truncated")
    chunks = data.forget_text_rows(res.tokenizer, data.get_benchmark("muse_news", **MUSE_DOCS).forget, 256)
    assert len(chunks) > 3 and len(chunked.trace) == math.ceil(len(chunks) / 2) and len(cut.trace) == 2
    assert chunked.config["conventions"]["forget_text_rows"] == "chunks"
    assert cut.config["conventions"]["forget_text_rows"] == "truncated"
    plain = unlearn(**{**base, "prepare": {"starting_point": "model"}})   # today's path, explicit
    assert plain.config["muse_starting_point"] == "model" and "privleak" not in plain.metrics
    with pytest.raises(ValueError, match="starting_point='hub'; valid: auto, prepared, model"):
        unlearn(**{**base, "prepare": {"starting_point": "hub"}})


def test_muse_starting_point_auto_uses_a_cached_entry_and_never_trains(monkeypatch):
    """auto: the prepared target where its entry exists (a CPU preset: the MUSE_CPU_MAX_DOCS one), else the
    model itself - a notebook's MUSE section never starts a minutes-long fine-tune; "prepared" does."""
    from lab import engine, models
    calls = []

    class Stop(Exception):
        pass

    def fake_prepare(**kw):
        calls.append(kw)
        raise Stop

    monkeypatch.setattr(prep, "prepare", fake_prepare)
    monkeypatch.setattr(models, "load_model", lambda name, **kw: (name, None))
    cfg = engine.UnlearnConfig(method="ga", benchmark="muse_news", eval_limit=3)
    monkeypatch.setattr(prep, "prepared_exists", lambda **kw: False)
    plain = engine.load_starting_point(cfg)                       # nothing cached: today's path
    assert plain[0] == "tiny" and plain[5]["muse_starting_point"] == "model" and calls == []
    monkeypatch.setattr(prep, "prepared_exists", lambda **kw: kw["benchmark_kwargs"].get("max_docs") is not None)
    with pytest.raises(Stop):   # the cached entry of a CPU preset: MUSE_CPU_MAX_DOCS articles
        engine.load_starting_point(cfg)
    assert calls[-1]["benchmark_kwargs"] == {"max_docs": engine.MUSE_CPU_MAX_DOCS} and calls[-1]["eval_limit"] == 3
    with pytest.raises(Stop):   # explicit: prepares even without a cached entry
        engine.load_starting_point(dataclasses.replace(cfg, prepare={"starting_point": "prepared"}))
    hub = engine.load_starting_point(engine.UnlearnConfig(method="ga", model="org/muse-target", benchmark="muse_news"))
    assert hub[0] == "org/muse-target" and hub[3] is None and hub[5]["muse_starting_point"] == "model"
    assert len(hub[2].forget) == 889 and len(calls) == 2   # the whole corpus, nothing prepared
