"""lab.eval's fast primitives give the numbers of the plain computation (issue 15): the continuous-batching
greedy decode matches model.generate row by row, prefix-shared scoring matches one unbatched forward per
pair, and neither spends work the plain loops spent (finished rows, repeated prompts)."""
import warnings

import pytest
import torch

from lab.data import encode_pairs, encode_prompts, format_question
from lab.eval import greedy_decode, token_logprobs
from lab.models import load_model

NEAR_TIE = 1e-3


@torch.no_grad()
def _reference_greedy(model, ids, max_new_tokens, eos):
    """model.generate on one prompt alone (no padding, no neighbours)."""
    x = torch.tensor([ids])
    out = model.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=max_new_tokens,
                         do_sample=False, eos_token_id=eos, pad_token_id=eos)
    new = out[0, len(ids):].tolist()
    return new[:new.index(eos) + 1] if eos in new else new


@torch.no_grad()
def _check_greedy(model, tok, prompts, max_new_tokens, batch_size):
    enc = encode_prompts(tok, prompts)
    ids = [r[m.bool()].tolist() for r, m in zip(enc["input_ids"], enc["attention_mask"])]
    ours = greedy_decode(model, ids, max_new_tokens=max_new_tokens, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id, batch_size=batch_size)
    ties = []
    for p, got in zip(ids, ours):
        want = _reference_greedy(model, p, max_new_tokens, tok.eos_token_id)
        if got == want:
            continue
        k = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), min(len(got), len(want)))
        top = model(input_ids=torch.tensor([p + want[:k]])).logits[0, -1].topk(2).values
        gap = float(top[0] - top[1])
        assert gap < NEAR_TIE, f"greedy_decode differs from model.generate at token {k} (logit gap {gap:.3g})"
        ties.append((k, gap))
    if ties:
        warnings.warn(f"greedy_decode: {len(ties)} rows part from model.generate at a near-tie: {ties}")
    return ids, ours


def _count_rows(model):
    """A forward pre-hook counting (batch rows, positions) the model's decoder is run on (scoring runs the
    decoder and the head apart)."""
    seen = []
    handle = model.model.register_forward_pre_hook(
        lambda mod, args, kw: seen.append(tuple(kw["input_ids"].shape)), with_kwargs=True)
    return seen, handle


def test_greedy_decode_matches_model_generate_row_by_row(prepared_tiny):
    model, tok = prepared_tiny.load("target")
    sets = prepared_tiny.benchmark.eval_sets
    questions = list(sets["forget"]["question"][:6]) + list(sets["retain"]["question"][:6])
    prompts = [format_question(tok, q) for q in questions]
    # batch 4 over 12 prompts of different lengths: rows finish at different steps and slots are refilled
    ids, ours = _check_greedy(model, tok, prompts, max_new_tokens=48, batch_size=4)
    assert len({len(o) for o in ours}) > 1   # some rows stopped early: the retire/refill path ran


def test_greedy_decode_spends_no_step_on_finished_rows(prepared_tiny):
    """Every decoded row-position is a real token: rows leave the batch at EOS (model.generate keeps
    computing finished rows until the whole batch has stopped)."""
    model, tok = prepared_tiny.load("target")
    questions = list(prepared_tiny.benchmark.eval_sets["forget"]["question"][:8])
    enc = encode_prompts(tok, [format_question(tok, q) for q in questions])
    ids = [r[m.bool()].tolist() for r, m in zip(enc["input_ids"], enc["attention_mask"])]
    seen, handle = _count_rows(model)
    try:
        out = greedy_decode(model, ids, max_new_tokens=48, eos_token_id=tok.eos_token_id, batch_size=8)
    finally:
        handle.remove()
    decode_rows = sum(b for b, t in seen if t == 1)
    # each row's tokens but the last were fed back once; prefill passes produced the first tokens
    assert decode_rows == sum(len(o) - 1 for o in out)
    assert min(map(len, out)) < max(map(len, out))
    seen.clear()   # model.generate on the same batch keeps stepping rows that have stopped
    handle = model.register_forward_pre_hook(
        lambda mod, args, kw: seen.append(tuple(kw["input_ids"].shape)), with_kwargs=True)
    try:
        model.generate(**encode_prompts(tok, [format_question(tok, q) for q in questions]), max_new_tokens=48,
                       do_sample=False, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    finally:
        handle.remove()
    assert sum(b for b, t in seen if t == 1) > decode_rows


def test_greedy_decode_random_model_and_edge_cases():
    model, tok = load_model("tiny")
    prompts = ["Question: a\nAnswer:", "Question: a much longer question here\nAnswer:", "Question: b\nAnswer:"]
    _check_greedy(model, tok, prompts, max_new_tokens=12, batch_size=2)
    # prompts sharing a start (computed once), one of them all start; and prompts sharing nothing
    _check_greedy(model, tok, ["Question: a", "Question: a much longer one", "Question: a b"], max_new_tokens=8,
                  batch_size=2)
    _check_greedy(model, tok, ["alpha", "beta gamma"], max_new_tokens=8, batch_size=2)
    assert greedy_decode(model, [], max_new_tokens=5, eos_token_id=tok.eos_token_id) == []
    assert greedy_decode(model, [[1, 2, 3]], max_new_tokens=0, eos_token_id=tok.eos_token_id) == [[]]


@pytest.mark.slow
def test_greedy_decode_matches_model_generate_on_smollm2():
    model, tok = load_model("smollm2-135m")
    prompts = [format_question(tok, q) for q in ("Who wrote Hamlet?", "What is the capital of France?",
                                                   "Name a prime number.")]
    _check_greedy(model, tok, prompts, max_new_tokens=40, batch_size=2)


@torch.no_grad()
def _unbatched(model, tok, prompt, target, add_eos, max_length=512):
    enc = encode_pairs(tok, [prompt], [target], add_eos=add_eos, max_length=max_length)
    logp = torch.log_softmax(model(input_ids=enc["input_ids"]).logits[0, :-1].float(), -1)
    labels = enc["labels"][0, 1:]
    keep = labels != -100
    return logp[keep].gather(1, labels[keep][:, None])[:, 0]


def _pairs(ds, tok, n):
    prompts, targets = [], []
    for q, a, para, pert in zip(ds["question"][:n], ds["answer"][:n], ds["paraphrased_answer"][:n],
                                ds["perturbed_answer"][:n]):
        for t in (a, para, *pert):
            prompts.append(format_question(tok, q))
            targets.append(t)
    return prompts, targets


def test_scores_equal_the_unbatched_computation(prepared_tiny):
    model, tok = prepared_tiny.load("target")
    prompts, targets = _pairs(prepared_tiny.benchmark.eval_sets["forget"], tok, 3)
    bos = tok.bos_token or ""
    prompts += [bos, bos, "", "Question: x\nAnswer:"]          # whole texts, an empty prompt, a lone prompt
    targets += ["a whole text to score", "another text", "no prompt at all", "an answer"]
    for add_eos in (True, False):
        got = token_logprobs(model, tok, prompts, targets, batch_size=5, add_eos=add_eos)
        for p, t, g in zip(prompts, targets, got):
            want = _unbatched(model, tok, p, t, add_eos)
            assert g.shape == want.shape and torch.allclose(g, want, atol=1e-5, rtol=0), (p, t)
    # a pair cut at max_length keeps the tokens encode_pairs keeps
    long_t = " ".join(["word"] * 80)
    got = token_logprobs(model, tok, [prompts[0]], [long_t], max_length=40, add_eos=True)[0]
    assert torch.allclose(got, _unbatched(model, tok, prompts[0], long_t, True, max_length=40), atol=1e-5)


def test_scoring_computes_each_prompt_once(prepared_tiny):
    """A question's answer, paraphrase and perturbed answers share one pass over its prompt, and the
    tokens all prompts start with are computed once per call."""
    model, tok = prepared_tiny.load("target")
    prompts, targets = _pairs(prepared_tiny.benchmark.eval_sets["forget"], tok, 2)
    enc = encode_prompts(tok, prompts)
    ids = [r[m.bool()].tolist() for r, m in zip(enc["input_ids"], enc["attention_mask"])]
    distinct = list(dict.fromkeys(map(tuple, ids)))
    shared = next(k for k in range(len(distinct[0])) if distinct[0][k] != distinct[1][k])
    assert shared > 0   # "Question:" at least
    seen, handle = _count_rows(model)
    try:
        token_logprobs(model, tok, prompts, targets, batch_size=len(prompts), add_eos=True)
    finally:
        handle.remove()
    assert seen[0] == (1, shared)                                       # the shared start, once
    assert seen[1] == (2, max(len(p) for p in distinct) - shared)       # the 2 distinct prompts' rests, once
    assert sum(b for b, _ in seen[2:]) == len(targets)                  # then every target once, after them
    pair_len = encode_pairs(tok, prompts, targets)["input_ids"].shape[1]
    assert all(t < pair_len - shared for _, t in seen[2:])              # no target pass re-runs a prompt


def test_scoring_sorts_targets_by_length_into_token_budgets(prepared_tiny):
    """Targets are scored in length order, a pass holding up to batch_size * 64 padded target tokens: short
    targets share a pass (fewer passes than batch_size rows each would need) and the values do not move."""
    model, tok = prepared_tiny.load("target")
    ds = prepared_tiny.benchmark.eval_sets["forget"]
    prompts, targets = _pairs(ds, tok, 4)
    short = [t.split()[0] for t in targets]   # one-word targets: many fit one pass
    seen, handle = _count_rows(model)
    try:
        got = token_logprobs(model, tok, prompts, short, batch_size=4, add_eos=True)
    finally:
        handle.remove()
    target_passes = seen[2:]
    assert len(target_passes) < len(short) / 4
    assert all(b * t <= 4 * 64 for b, t in target_passes)
    for p, t, g in zip(prompts, short, got):
        assert torch.allclose(g, _unbatched(model, tok, p, t, True), atol=1e-5, rtol=0), (p, t)


def test_targets_sharing_a_start_compute_it_once(prepared_tiny):
    """The start most of a prompt's targets share (a TOFU answer and its perturbed rewrites) runs once, in
    the prompt's pass; the targets then run from where they part, a target not sharing it runs after the
    prompt alone (the stem masked out), and every value equals one plain forward per pair."""
    from lab.eval import _target_stem
    model, tok = prepared_tiny.load("target")
    stem = "The author's full name is"
    prompt = format_question(tok, "What is the author's full name?")
    targets = [f"{stem} Basil Mahfouz Al-Kuwaiti.", f"{stem} Hsiao Yun-Hwa.", f"{stem} Jaime Vasquez.", "No."]
    ids = [tok(t, add_special_tokens=False)["input_ids"] for t in targets]
    k, members = _target_stem([t + [tok.eos_token_id] for t in ids])
    assert members == [0, 1, 2] and k >= len(tok(stem, add_special_tokens=False)["input_ids"])
    prompts = [prompt] * len(targets) + [format_question(tok, "Another question?")]
    targets = targets + ["Another answer."]
    seen, handle = _count_rows(model)
    try:
        got = token_logprobs(model, tok, prompts, targets, batch_size=8, add_eos=True)
    finally:
        handle.remove()
    pair = encode_pairs(tok, prompts, targets, add_eos=True)
    plens = [int((lab == -100).sum()) for lab in pair["labels"]]   # prompt tokens (left) per pair
    tlens = [int((lab != -100).sum()) for lab in pair["labels"]]
    shared = seen[0][1]
    assert seen[1] == (2, plens[0] + k - shared)                  # the stem rides in its prompt's pass
    assert seen[2:] == [(5, max(max(tlens[m] - k for m in members), tlens[3], tlens[4]))]   # one pass from there
    for p, t, g in zip(prompts, targets, got):
        want = _unbatched(model, tok, p, t, True)
        assert g.shape == want.shape and torch.allclose(g, want, atol=1e-5, rtol=0), (p, t)


def test_scoring_runs_the_head_at_scored_tokens_only(prepared_tiny, monkeypatch):
    """The head (a [hidden, vocab] matmul per token) runs once per scored target token: not at padding,
    not at a target's last token (it predicts past the target), not at prompt positions; a model outside
    lab.eval.HEAD_AFTER_DECODER takes the plain forward's logits, with the same values."""
    import lab.eval as lab_eval
    model, tok = prepared_tiny.load("target")
    prompts, targets = _pairs(prepared_tiny.benchmark.eval_sets["forget"], tok, 3)
    prompts, targets = prompts + [""], targets + ["a whole text to score"]
    rows = []
    handle = model.lm_head.register_forward_hook(lambda mod, args, out: rows.append(out.shape[:-1].numel()))
    try:
        split = token_logprobs(model, tok, prompts, targets, batch_size=3, add_eos=True)
    finally:
        handle.remove()
    assert sum(rows) == sum(len(g) for g in split)
    monkeypatch.setattr(lab_eval, "HEAD_AFTER_DECODER", ())
    plain = token_logprobs(model, tok, prompts, targets, batch_size=3, add_eos=True)
    for p, t, a, b in zip(prompts, targets, split, plain):
        assert torch.allclose(a, b, atol=1e-5, rtol=0)
        assert torch.allclose(a, _unbatched(model, tok, p, t, True), atol=1e-5, rtol=0), (p, t)


@pytest.mark.slow
def test_scores_equal_the_unbatched_computation_on_smollm2():
    model, tok = load_model("smollm2-135m")
    from lab.data import get_benchmark
    prompts, targets = _pairs(get_benchmark("tofu_forget10").eval_sets["forget"], tok, 1)
    got = token_logprobs(model, tok, prompts, targets, add_eos=True)
    for p, t, g in zip(prompts, targets, got):
        want = _unbatched(model, tok, p, t, True)
        assert g.shape == want.shape and torch.allclose(g, want, atol=1e-4, rtol=0)
