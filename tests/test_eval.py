"""lab.eval on real models: the TOFU suite on the prepared tiny models, MUSE-News, SmolLM2 (slow)."""
import math

import numpy as np
import pytest
import torch

from lab import metrics
from lab.data import get_benchmark
from lab.eval import evaluate, generate, restrict_eval, token_logprobs
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
    # 6 rows: on 3 the pretrained model prefers a perturbed world-fact answer on every row (truth-ratio stat 0,
    # so MU = 0, a harmonic mean); on 6 MU is 0.197 with the EOS scoring convention
    res = evaluate(model, tok, bench, limit=6, max_new_tokens=48, progress=False)
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


# ---------------------------------------------------------------- scoring convention (METHODS §6)
def _by_hand(model, tok, prompt, answer, eos):
    """Log-probs of the answer tokens (and the EOS after them) from one plain forward pass."""
    from lab.data import answer_text
    p = tok(prompt, add_special_tokens=False)["input_ids"]
    a = tok(answer_text(tok, answer), add_special_tokens=False)["input_ids"] + ([tok.eos_token_id] if eos else [])
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=torch.tensor([p + a])).logits[0].float(), -1)
    return np.array([logp[len(p) + i - 1, t].item() for i, t in enumerate(a)])


@pytest.fixture(scope="module")
def untrained_small():
    model, tok = load_model("tiny", seed=0)
    bench = get_benchmark("tofu_subset", n_retain_authors=1, n_forget_authors=1)
    with_eos = evaluate(model, tok, bench, limit=2, max_new_tokens=4, progress=False)
    without = evaluate(model, tok, bench, limit=2, max_new_tokens=4, progress=False, score_eos=False)
    return model, tok, bench, with_eos, without


def test_score_eos_counts_the_eos_in_every_answer_score(untrained_small):
    from lab.data import format_question
    model, tok, bench, with_eos, without = untrained_small
    for res, eos in ((with_eos, True), (without, False)):
        rows = res["rows"]
        for name in ("forget", "real_authors"):
            row = rows[rows["set"] == name].iloc[0]
            ds = bench.eval_sets[name]
            prompt = format_question(tok, ds["question"][0])
            lp = _by_hand(model, tok, prompt, ds["answer"][0], eos)
            assert row["n_tokens"] == len(lp)
            assert row["prob"] == pytest.approx(math.exp(lp.mean()), rel=1e-4)      # Prob = exp(-mean NLL)
            assert row["loss"] == pytest.approx(-lp.mean(), rel=1e-4)              # LOSS MIA score
            assert row["zlib"] == pytest.approx(metrics.zlib_score(-lp.mean(), ds["answer"][0]), rel=1e-4)
            # truth ratio and normalised Prob: paraphrased / perturbed answers carry the EOS as well
            para = ds["paraphrased_answer"][0] if "paraphrased_answer" in ds.column_names else ds["answer"][0]
            pert = [_by_hand(model, tok, prompt, x, eos).mean() for x in ds["perturbed_answer"][0]]
            para_lp = _by_hand(model, tok, prompt, para, eos).mean()
            assert row["truth_ratio"] == pytest.approx(metrics.truth_ratio(para_lp, np.array(pert)), rel=1e-4)
            p_true = math.exp(lp.mean())
            assert row["prob_normalised"] == pytest.approx(p_true / (p_true + sum(math.exp(x) for x in pert)),
                                                           rel=1e-4)
    # the conventions differ, and model utility / the LOSS MIA follow
    assert with_eos["metrics"]["forget_prob"] != pytest.approx(without["metrics"]["forget_prob"], rel=1e-6)


def test_min_k_ignores_the_final_eos(untrained_small):
    from lab.data import format_question
    model, tok, bench, with_eos, without = untrained_small
    assert np.allclose(with_eos["rows"]["min_k"], without["rows"]["min_k"], rtol=1e-4)
    ds = bench.eval_sets["forget"]
    lp = _by_hand(model, tok, format_question(tok, ds["question"][0]), ds["answer"][0], eos=False)
    row = with_eos["rows"].query("set == 'forget'").iloc[0]
    assert row["min_k"] == pytest.approx(metrics.min_k_percent(lp, 0.4), rel=1e-4)


def test_token_logprobs_add_eos_scores_one_more_token():
    from lab.data import format_question
    model, tok = load_model("tiny", seed=0)
    prompts, answers = [format_question(tok, "Who?")] * 2, ["Nobody at all.", "Me."]
    plain = token_logprobs(model, tok, prompts, answers, batch_size=2)
    eos = token_logprobs(model, tok, prompts, answers, batch_size=2, add_eos=True)
    for p, e, a in zip(plain, eos, answers):
        assert e.numel() == p.numel() + 1 and np.allclose(e[:-1].numpy(), p.numpy(), atol=1e-5)
        assert e[-1].item() == pytest.approx(_by_hand(model, tok, prompts[0], a, eos=True)[-1], rel=1e-4)


def test_prompt_left_truncation_keeps_the_whole_target_and_the_end_of_the_prompt():
    """A long MUSE verbmem prompt + its reference: cut from the right only one reference token is scored
    (EM / ES ~0 for any model); prompt_left keeps the target whole and the prompt's last tokens after BOS."""
    from lab.data import _prompt_ids, _tokenize, encode_pairs
    from lab.eval import _pair_ids
    model, tok = load_model("tiny", seed=0)
    prompt = (tok.bos_token or "") + " ".join(f"word{i}" for i in range(200))
    target = " the reference continuation of this news excerpt, twelve words or so"
    p_ids, t_ids = _prompt_ids(tok, [prompt])[0], _tokenize(tok, [target])[0]
    assert len(p_ids) > 64 > len(t_ids)
    right = _pair_ids(encode_pairs(tok, [prompt], [target], max_length=64, add_eos=False))[0]
    left = _pair_ids(encode_pairs(tok, [prompt], [target], max_length=64, add_eos=False, truncate="prompt_left"))[0]
    assert len(right[1]) == 1
    assert list(left[1]) == list(t_ids) and len(left[0]) + len(left[1]) == 64
    assert list(left[0][1:]) == list(p_ids[len(p_ids) - (63 - len(t_ids)):]) and left[0][0] == tok.bos_token_id
    lp = token_logprobs(model, tok, [prompt], [target], max_length=64, truncate="prompt_left")[0]
    assert lp.numel() == len(t_ids)
    short = _pair_ids(encode_pairs(tok, ["Q?"], [target], max_length=64, truncate="prompt_left"))[0]
    assert short == _pair_ids(encode_pairs(tok, ["Q?"], [target], max_length=64))[0]   # fits: unchanged
    with pytest.raises(ValueError, match="truncate='left'; valid: right, prompt_left"):
        encode_pairs(tok, [prompt], [target], truncate="left")


# ---------------------------------------------------------------- same rows (METHODS §6)
@pytest.mark.parametrize("limit", [5, 8, None])
def test_retain_model_against_itself_gives_fq_1_and_privleak_0_at_any_row_limit(prepared_tiny, limit):
    retain, tok = prepared_tiny.load("retain")
    if limit is None:   # the full evaluation is prepare's own: recompute its comparison with itself
        res = restrict_eval(prepared_tiny.retain_eval, None, reference=prepared_tiny.retain_eval)
    else:
        res = evaluate(retain, tok, prepared_tiny.benchmark, reference=prepared_tiny.retain_eval, limit=limit,
                       progress=False, max_new_tokens=8)
        assert (res["rows"].groupby("set").size() == limit).all()
    assert res["metrics"]["forget_quality"] == 1.0
    assert res["metrics"]["privleak"] == 0.0


def test_restricted_full_evaluation_equals_the_limited_evaluation(prepared_tiny):
    """prepare's full target evaluation cut to 8 rows per set = the target evaluated with limit=8."""
    target, tok = prepared_tiny.load("target")
    ref = prepared_tiny.retain_eval
    cut = restrict_eval(prepared_tiny.target_eval, 8, reference=ref)
    direct = evaluate(target, tok, prepared_tiny.benchmark, reference=ref, limit=8, progress=False)
    assert cut["rows"][["set", "row"]].equals(direct["rows"][["set", "row"]])
    assert set(cut["metrics"]) == set(direct["metrics"])
    for k, v in direct["metrics"].items():
        assert cut["metrics"][k] == pytest.approx(v, rel=1e-3, abs=1e-6), k
    # against the whole reference set (the old comparison) forget quality is another number
    assert prepared_tiny.target_eval["metrics"]["forget_quality"] != pytest.approx(cut["metrics"]["forget_quality"])


def test_a_reference_on_fewer_rows_or_another_convention_is_refused(prepared_tiny):
    target, tok = prepared_tiny.load("target")
    small = restrict_eval(prepared_tiny.retain_eval, 3)
    with pytest.raises(ValueError, match="reference lacks 2 of the 5 evaluated 'forget' rows"):
        evaluate(target, tok, prepared_tiny.benchmark, reference=small, limit=5, progress=False, max_new_tokens=2)
    with pytest.raises(ValueError, match="score_eos=True, this evaluation with score_eos=False"):
        evaluate(target, tok, prepared_tiny.benchmark, reference=prepared_tiny.retain_eval, limit=2,
                 progress=False, max_new_tokens=2, score_eos=False)


def test_muse_privleak_compares_the_same_excerpts():
    model, tok = load_model("tiny")
    bench = get_benchmark("muse_news")
    kw = dict(progress=False, max_length=64)
    full = evaluate(model, tok, bench, limit=4, **kw)
    res = evaluate(model, tok, bench, reference=full, limit=2, **kw)
    assert res["metrics"]["privleak"] == 0.0       # the model against itself, on its first 2 excerpts


def test_gradnorm_scores_by_hand_and_leave_the_model_as_it_was():
    """GradNorm = mean over parameter tensors of ||grad of the row's mean answer NLL||_2 (per row), and
    the model's .grad, requires_grad flags and train/eval mode are exactly as before the call."""
    from lab.data import encode_pairs, format_question
    from lab.eval import gradnorm_scores
    model, tok = load_model("tiny")
    prompts = [format_question(tok, q) for q in ("Who wrote it?", "Where was the author born, and when?")]
    answers = ["Jane Doe wrote it.", "In Paris, in 1970."]
    params = list(model.parameters())
    # by hand: one row at a time, backward into .grad, no EOS (as Min-K%)
    want = []
    for p_, a in zip(prompts, answers):
        model.zero_grad(set_to_none=True)
        enc = encode_pairs(tok, [p_], [a], add_eos=False)
        logits = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).logits[0, :-1]
        labels = enc["labels"][0, 1:]
        keep = labels != -100
        torch.nn.functional.cross_entropy(logits[keep], labels[keep]).backward()
        want.append(np.mean([p.grad.norm().item() for p in params]))
    # a model mid-training: train mode, some tensors frozen, some .grad set, others None
    model.zero_grad(set_to_none=True)
    model.train()
    params[0].requires_grad_(False)
    params[1].grad = torch.randn_like(params[1])
    before = [None if p.grad is None else p.grad.clone() for p in params]
    flags = [p.requires_grad for p in params]
    got = gradnorm_scores(model, tok, prompts, answers)
    np.testing.assert_allclose(got, want, rtol=1e-5)
    assert got[0] != got[1] and (got > 0).all()
    assert model.training and all(m.training for m in model.modules())
    assert [p.requires_grad for p in params] == flags and flags[0] is False
    for p, b in zip(params, before):
        assert (p.grad is None) if b is None else torch.equal(p.grad, b)
    # eval mode stays eval mode
    model.eval()
    np.testing.assert_allclose(gradnorm_scores(model, tok, prompts[:1], answers[:1]), want[:1], rtol=1e-5)
    assert not model.training


def test_token_logprobs_stats_from_the_same_logits():
    """stats=True: argmax ids, answer ids and Min-K%++ z-scores per target token, checked against one
    unbatched forward with float64 moments; the default return stays a list of log-prob tensors."""
    from lab.data import encode_pairs, format_question
    model, tok = load_model("tiny")
    prompts = [format_question(tok, q) for q in ("Who wrote it?", "Where was the author born?", "Why?")]
    answers = ["Jane Doe wrote it.", "In a small town near Paris, in 1970.", "No."]
    plain = token_logprobs(model, tok, prompts, answers, batch_size=2, add_eos=True)
    st = token_logprobs(model, tok, prompts, answers, batch_size=2, add_eos=True, stats=True)
    assert all(isinstance(t, torch.Tensor) for t in plain) and all(isinstance(s, dict) for s in st)
    for p_, a, lp, s in zip(prompts, answers, plain, st):
        assert torch.equal(s["logprob"], lp)
        enc = encode_pairs(tok, [p_], [a], add_eos=True)
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=enc["input_ids"]).logits[0, :-1].double(), -1)
        labels = enc["labels"][0, 1:]
        keep = labels != -100
        logp, labels = logp[keep], labels[keep]
        assert torch.equal(s["target"], labels) and s["target"][-1] == tok.eos_token_id
        assert torch.equal(s["argmax"], logp.argmax(-1))
        p = logp.exp()
        mu = (p * logp).sum(-1)
        var = (p * logp ** 2).sum(-1) - mu ** 2
        z = (logp.gather(-1, labels[:, None])[:, 0] - mu) / var.sqrt()
        np.testing.assert_allclose(s["z"].numpy(), z.numpy(), rtol=1e-4, atol=1e-4)
        assert s["z"].shape == lp.shape == s["argmax"].shape


def test_tofu_suite_em_es_and_new_mia_scores_follow_from_the_rows(prepared_tiny):
    model, tok = prepared_tiny.load("target")
    ref = prepared_tiny.retain_eval
    res = evaluate(model, tok, prepared_tiny.benchmark, reference=ref, limit=6, progress=False)
    m, rows = res["metrics"], res["rows"]
    forget, holdout = rows[rows["set"] == "forget"], rows[rows["set"] == "holdout"]
    for key in ("exact_memorization", "extraction_strength"):
        assert m[f"forget_{key}"] == pytest.approx(forget[key].mean())
        assert rows[key].between(0, 1).all()
    # EM / ES count the answer tokens without the EOS (n_tokens includes it under score_eos)
    em_hits = rows["exact_memorization"] * (rows["n_tokens"] - 1)
    np.testing.assert_allclose(em_hits, em_hits.round(), atol=1e-9)
    assert m["forget_exact_memorization"] > 0.5  # the target model memorised its forget set
    for score, col in (("min_k_plus_plus", "min_k_plus_plus"), ("gradnorm", "gradnorm"),
                       ("reference", "reference_score")):
        want = metrics.mia_auc(metrics.membership_score(score, forget[col].to_numpy()),
                               metrics.membership_score(score, holdout[col].to_numpy()))
        assert m[f"mia_{score}_auc"] == pytest.approx(want)
    assert rows["gradnorm"].notna().sum() == len(forget) + len(holdout)  # GradNorm only where the AUC needs it
    # Reference = our mean answer NLL - the retain model's on the same (set, row)
    ref_loss = ref["rows"].set_index(["set", "row"])["loss"]
    want = rows["loss"].to_numpy() - ref_loss.loc[list(zip(rows["set"], rows["row"]))].to_numpy()
    np.testing.assert_allclose(rows["reference_score"].to_numpy(), want)
    assert res["options"]["privleak_score"] == "min_k" and res["options"]["mia_gradnorm"] is True
    assert m["privleak"] == pytest.approx(metrics.privleak(m["mia_min_k_auc"], ref["metrics"]["mia_min_k_auc"]))


def test_tofu_suite_options_by_name(prepared_tiny):
    model, tok = prepared_tiny.load("target")
    ref = prepared_tiny.retain_eval
    res = evaluate(model, tok, prepared_tiny.benchmark, reference=ref, limit=3, progress=False,
                   truth_ratio_aggregators={"forget": "prob_mean", "retain": "closer_to_1_better"},
                   privleak_score="zlib", mia_gradnorm=False)
    m, rows = res["metrics"], res["rows"]
    r = rows[rows["set"] == "forget"]["truth_ratio"].to_numpy()
    assert m["forget_truth_ratio"] == pytest.approx(np.mean(1 / (1 + r)))
    r = rows[rows["set"] == "retain"]["truth_ratio"].to_numpy()
    assert m["retain_truth_ratio"] == pytest.approx(np.minimum(r, 1 / r).mean())
    assert res["options"]["truth_ratio_aggregators"]["world_facts"] == "true_better"
    assert m["privleak"] == pytest.approx(metrics.privleak(m["mia_zlib_auc"], ref["metrics"]["mia_zlib_auc"]))
    assert "gradnorm" not in rows and "mia_gradnorm_auc" not in m
    bench = prepared_tiny.benchmark
    for bad, match in (({"truth_ratio_aggregators": {"forget": "mean"}}, "valid: closer_to_1_better, true_better"),
                       ({"truth_ratio_aggregators": {"holdout": "prob_mean"}}, "unknown set 'holdout'"),
                       ({"privleak_score": "min_k_pp"}, "valid: loss, min_k, zlib, min_k_plus_plus"),
                       ({"privleak_score": "gradnorm", "mia_gradnorm": False}, "needs mia_gradnorm=True"),
                       ({"es_no_match": "one"}, "valid: zero, open_unlearning")):
        with pytest.raises(ValueError, match=match):
            evaluate(model, tok, bench, reference=ref, limit=2, progress=False, **bad)
