"""lab.bench_eval: the open-unlearning-style baseline agrees with the lab's suite, and the equality check
refuses any difference before a time is reported."""
import numpy as np
import pytest

from lab import bench_eval
from lab.data import get_benchmark
from lab.models import load_model


@pytest.fixture(scope="module")
def tiny_both():
    model, tok = load_model("tiny")
    bench = get_benchmark("tofu_forget10")
    data = {n: bench.eval_sets[n].select(range(2)) for n in bench_eval.SETS}
    ours, ours_metrics, secs = bench_eval.lab_tofu(model, tok, bench, rows=2)
    base, base_secs = bench_eval.baseline_tofu(model, tok, data, max_new_tokens=200)
    return model, tok, ours, ours_metrics, base, secs, base_secs


def test_baseline_and_lab_agree_on_every_row(tiny_both):
    model, tok, ours, ours_metrics, base, secs, base_secs = tiny_both
    report = bench_eval.compare(model, tok, ours, ours_metrics, base)
    assert report["rows"] == 10 and report["generation_differences"] == []
    assert set(report["metrics"]) == set(bench_eval.METRIC_KEYS)
    assert all(v > 0 for v in secs.values()) and all(v > 0 for v in base_secs.values())


def test_compare_refuses_a_changed_score_or_generation(tiny_both):
    model, tok, ours, ours_metrics, base, _, _ = tiny_both
    bad = base.copy()
    bad.loc[bad["set"] == "retain", "loss"] += 1e-2
    with pytest.raises(AssertionError, match="loss differs at retain row"):
        bench_eval.compare(model, tok, ours, ours_metrics, bad)
    bad = base.copy()
    i = bad.index[bad["set"] == "forget"][0]
    bad.loc[i, "generation"] = "something else entirely"
    with pytest.raises(AssertionError, match="generation differs at forget row .*not a near-tie"):
        bench_eval.compare(model, tok, ours, ours_metrics, bad)


def test_summary_and_markdown():
    rounds = [{"lab": dict.fromkeys(bench_eval.COMPONENTS, 1.0), "baseline": dict.fromkeys(bench_eval.COMPONENTS, 3.0),
               "loadavg_before": (1.0, 1.0, 1.0), "loadavg_after": (2.0, 1.0, 1.0)} for _ in range(3)]
    s = bench_eval.summarize(rounds)
    assert np.isclose(s["total"]["speedup"], 3.0)
    result = {"summary": s, "rounds": rounds, "baseline_batch_size": 32, "model": "tiny", "rows_per_set": 2,
              "dtype": "torch.float32", "threads": 2, "attn_implementation": "sdpa", "cpu_count": 2,
              "equality": {"rows": 10, "max_abs_diff": {"loss": 1e-6}, "generation_differences": []}}
    md = bench_eval.format_markdown(result)
    assert "| total | 1.0 s [1.0, 1.0] | 3.0 s [3.0, 3.0] | 3.00x |" in md and "load average 1.0-2.0" in md
