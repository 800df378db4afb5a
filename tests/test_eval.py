"""lab.eval on real models: the TOFU suite on the prepared tiny models, MUSE-News, SmolLM2 (slow)."""
import math

import numpy as np
import pytest

from lab import metrics
from lab.data import get_benchmark
from lab.eval import evaluate, generate, token_logprobs
from lab.models import load_model

TOFU_KEYS = {"forget_prob", "forget_rouge", "forget_truth_ratio", "retain_prob", "retain_rouge",
             "retain_truth_ratio", "real_authors_prob", "real_authors_rouge", "real_authors_truth_ratio",
             "world_facts_prob", "world_facts_rouge", "world_facts_truth_ratio", "model_utility",
             "mia_loss_auc", "mia_min_k_auc", "mia_zlib_auc", "forget_quality", "privleak"}


def test_tofu_suite_metrics_follow_from_the_rows(prepared_tiny):
    model, tok = prepared_tiny.load("target")
    res = evaluate(model, tok, prepared_tiny.benchmark, reference=prepared_tiny.retain_eval, limit=8,
                   progress=False)
    m, rows = res["metrics"], res["rows"]
    assert TOFU_KEYS <= set(m)
    assert set(rows["set"]) == {"forget", "retain", "real_authors", "world_facts", "holdout"}
    forget = rows[rows["set"] == "forget"]
    # aggregates recomputed by hand from the per-row outputs
    assert m["forget_prob"] == pytest.approx(np.exp(-forget["loss"]).mean())
    assert m["forget_rouge"] == pytest.approx(forget["rouge"].mean())
    r = forget["truth_ratio"].to_numpy()
    assert m["forget_truth_ratio"] == pytest.approx(np.minimum(r, 1 / r).mean())
    parts = [m[f"{s}_{k}"] for s in ("retain", "real_authors", "world_facts")
             for k in ("prob", "rouge", "truth_ratio")]
    assert m["model_utility"] == pytest.approx(len(parts) / sum(1 / p for p in parts))
    # limit=8 evaluated 8 forget rows; generation is the memorised answer for most of them
    assert len(forget) == 8 and forget["rouge"].mean() > 0.5
    assert forget["generation"].str.len().gt(0).all()


def test_token_logprobs_are_the_answer_tokens_only(prepared_tiny):
    model, tok = prepared_tiny.load("target")
    from lab.data import format_question
    q, a = "What is the capital of Nowhere?", "It is Somewhere."
    lp = token_logprobs(model, tok, [format_question(tok, q)], [a])[0]
    n_answer = len(tok(" " + a, add_special_tokens=False)["input_ids"])
    assert lp.numel() == n_answer and (lp <= 0).all()
    # batching and sorting do not change the values
    many = token_logprobs(model, tok, [format_question(tok, q)] * 3 + ["Question: x\nAnswer:"],
                          [a, a, a, "a much longer answer than the others here"], batch_size=2)
    for t in many[:3]:
        assert np.allclose(t.numpy(), lp.numpy(), atol=1e-5)


def test_greedy_generation_matches_batched_and_single(prepared_tiny):
    model, tok = prepared_tiny.load("target")
    ds = prepared_tiny.benchmark.eval_sets["forget"]
    from lab.data import format_question
    prompts = [format_question(tok, q) for q in ds["question"][:4]]
    batched = generate(model, tok, prompts, max_new_tokens=40, batch_size=4)
    single = [generate(model, tok, [p], max_new_tokens=40)[0] for p in prompts]
    assert batched == single   # left padding + attention mask: batch neighbours do not leak in


def test_muse_suite_runs_on_tiny():
    model, tok = load_model("tiny")
    bench = get_benchmark("muse_news")
    res = evaluate(model, tok, bench, limit=3, progress=False, max_length=128)
    assert {"verbmem_rouge_f1", "knowmem_forget_rouge_f1", "knowmem_retain_rouge_f1",
            "mia_min_k_auc"} <= set(res["metrics"])
    assert all(math.isfinite(v) for v in res["metrics"].values())
    assert set(res["rows"]["set"]) == {"verbmem", "knowmem_forget", "knowmem_retain", "privleak_forget",
                                       "privleak_holdout"}


def test_reference_must_be_an_evaluation_result(prepared_tiny):
    model, tok = prepared_tiny.load("target")
    with pytest.raises(TypeError, match="evaluate\\(\\) result"):
        evaluate(model, tok, prepared_tiny.benchmark, reference={"forget_quality": 1}, limit=2,
                 progress=False)


@pytest.mark.slow
def test_smollm2_evaluates_offline():
    """The real pretrained model: loads from the wheel, answers, and runs the TOFU suite."""
    model, tok = load_model("smollm2-135m")
    bench = get_benchmark("tofu_subset", n_retain_authors=1, n_forget_authors=1)
    res = evaluate(model, tok, bench, limit=3, max_new_tokens=48, progress=False)
    m = res["metrics"]
    assert TOFU_KEYS - {"forget_quality", "privleak"} <= set(m)
    assert 0 < m["model_utility"] < 1 and all(math.isfinite(v) for v in m.values())
    # a general-knowledge model knows some world facts but not the fictitious TOFU authors
    assert m["world_facts_rouge"] > m["forget_rouge"]


def test_privleak_is_nan_where_undefined_instead_of_failing_an_evaluation():
    from lab.eval import privleak_or_nan
    assert math.isnan(privleak_or_nan(0.7, 1.0))          # a reference that separates perfectly: 0 / 0
    assert privleak_or_nan(0.6, 0.6) == 0.0
    assert privleak_or_nan(1.0, 0.5) == pytest.approx(-100.0, abs=1e-6)
