"""lab bench-eval: the lab's TOFU suite against an open-unlearning-style baseline, same model, same rows.

    lab bench-eval --model smollm2-135m --rows 16            # 3 interleaved rounds, 2 threads, fp32
    lab bench-eval --markdown bench/results/eval-smollm2-135m-cpu.json   # the README table

The baseline is open-unlearning's TOFU evaluation re-implemented from its published settings (it is not
a dependency): batch 32, rows in dataset order, right-padded scoring with full-vocabulary logits at every
position, one padded sub-batch per perturbed answer, the paraphrased answers in their own pass, one
forward pass per MIA attack (loss, Min-K%, zlib) over forget and holdout, and generation with
model.generate (greedy, left-padded, until every row of a batch has stopped or 200 new tokens). Both sides
score answers followed by EOS (the TOFU / open-unlearning convention, METHODS §6; Min-K% without the
EOS) and use token-identical prompts with correct attention masks: open-unlearning's collator masks every
token equal to the pad token, which for SmolLM2 (pad = EOS = <|im_end|>) hides the real <|im_end|>
tokens inside the chat prompt; the baseline does not copy that.

Per-row values (answer loss, truth ratio, normalised probability, Min-K%, zlib, the generation and its
ROUGE-L) and the aggregate metrics of both sides are checked equal (fp32 tolerance for scores, exact
for generations) BEFORE any time is reported; a generation may differ only where the two runs' greedy
choice was a near-tie of logits, which is reported.
"""
from __future__ import annotations

import argparse
import inspect
import json
import os
import platform
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from lab import eval as lab_eval
from lab import metrics, runs
from lab.data import encode_pairs, encode_prompts, format_question, get_benchmark

SETS = ("forget", "retain", "real_authors", "world_facts", "holdout")
GENERATION_SETS = SETS[:4]
COMPONENTS = ("scoring", "generation", "mia", "total")
COMPONENT_NAMES = {"scoring": "scoring (Prob, paraphrased/perturbed, truth ratio)",
                   "generation": "generation + ROUGE", "mia": "MIA", "total": "total"}
ROW_COLUMNS = ("loss", "truth_ratio", "prob_normalised", "min_k", "zlib")   # compared to fp32 tolerance
METRIC_KEYS = tuple(f"{s}_{k}" for s in GENERATION_SETS for k in ("prob", "rouge", "truth_ratio")) + (
    "model_utility", "mia_loss_auc", "mia_min_k_auc", "mia_zlib_auc")
RTOL, ATOL = 1e-4, 1e-4   # nats / relative: fp32 rounding through 30 layers differs by batch layout
NEAR_TIE = 1e-3   # logit gap under which two greedy runs may choose differently (float rounding)


# ---------------------------------------------------------------- the open-unlearning-style baseline
@torch.no_grad()
def _baseline_logprobs(model, tok, prompts, targets, batch_size):
    """open-unlearning's evaluate_probability: batches in dataset order, right-padded, answer + EOS,
    cross-entropy over full logits; per pair the log-probs of its labelled tokens."""
    out = []
    for s in range(0, len(prompts), batch_size):
        enc = encode_pairs(tok, prompts[s:s + batch_size], targets[s:s + batch_size], add_eos=True)
        logits = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).logits
        labels = enc["labels"][:, 1:]
        nll = F.cross_entropy(logits[:, :-1].transpose(1, 2), labels, ignore_index=-100, reduction="none")
        out += [-nll[j][labels[j] != -100] for j in range(len(labels))]
    return out


@torch.no_grad()
def _baseline_generate(model, tok, prompts, batch_size, max_new_tokens):
    out = []
    for s in range(0, len(prompts), batch_size):
        enc = encode_prompts(tok, prompts[s:s + batch_size])   # the real mask (see the module docstring)
        gen = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, use_cache=True,
                             pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
        out += [t.strip() for t in tok.batch_decode(gen[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)]
    return out


def _mean_lp(t) -> float:
    return float(t.mean()) if t.numel() else float("nan")


def baseline_tofu(model, tok, data: dict, *, batch_size=32, max_new_tokens=200, mia_k=0.4) -> tuple:
    """(rows, seconds per component) of the open-unlearning-style evaluation of `data` (set -> Dataset)."""
    secs = dict.fromkeys(COMPONENTS, 0.0)
    frames = []
    t_all = time.perf_counter()
    for name in SETS:
        ds = data[name]
        prompts = [format_question(tok, q) for q in ds["question"]]
        answers = list(ds["answer"])
        rows = pd.DataFrame({"set": name, "row": list(ds["row"]), "answer": answers})
        if name != "holdout":
            t0 = time.perf_counter()
            ans = _baseline_logprobs(model, tok, prompts, answers, batch_size)        # <set>_Q_A_Prob
            rows["loss"] = [-_mean_lp(t) for t in ans]
            if "perturbed_answer" in ds.column_names:
                para = (_baseline_logprobs(model, tok, prompts, list(ds["paraphrased_answer"]), batch_size)
                        if "paraphrased_answer" in ds.column_names else ans)
                pert = [list(p) for p in ds["perturbed_answer"]]
                per_k = [_baseline_logprobs(model, tok, prompts, [p[k] for p in pert], batch_size)
                         for k in range(len(pert[0]))]                                  # one sub-batch per k
                pert_mean = np.array([[_mean_lp(per_k[k][i]) for k in range(len(per_k))] for i in range(len(ds))])
                para_mean = np.array([_mean_lp(t) for t in para])
                rows["truth_ratio"] = metrics.truth_ratio(para_mean, pert_mean)
                p_true = np.exp(-rows["loss"].to_numpy())
                rows["prob_normalised"] = p_true / (p_true + np.exp(pert_mean).sum(1))
            secs["scoring"] += time.perf_counter() - t0
            t0 = time.perf_counter()
            rows["generation"] = _baseline_generate(model, tok, prompts, batch_size, max_new_tokens)
            rows["rouge"] = [metrics.rouge_l_recall(g, a) for g, a in zip(rows["generation"], answers)]
            secs["generation"] += time.perf_counter() - t0
        frames.append(rows)
    # MIA: one pass per attack over members (forget) and non-members (holdout), as open-unlearning's
    # mia_loss / mia_min_k / mia_zlib metrics each run their own forward passes
    t0 = time.perf_counter()
    by = {f["set"].iloc[0]: f for f in frames}
    for attack in ("loss", "min_k", "zlib"):
        for name in ("forget", "holdout"):
            ds = data[name]
            lp = _baseline_logprobs(model, tok, [format_question(tok, q) for q in ds["question"]],
                                    list(ds["answer"]), batch_size)
            loss = np.array([-_mean_lp(t) for t in lp])
            if attack == "loss":
                by[name]["loss"] = loss
            elif attack == "min_k":
                by[name]["min_k"] = [metrics.min_k_percent(t[:-1].numpy(), mia_k) for t in lp]
            else:
                by[name]["zlib"] = [metrics.zlib_score(l, a) for l, a in zip(loss, ds["answer"])]
    secs["mia"] = time.perf_counter() - t0
    secs["total"] = time.perf_counter() - t_all
    return pd.concat(frames, ignore_index=True), secs


# ---------------------------------------------------------------- the lab's suite, timed by component
def lab_tofu(model, tok, benchmark, rows: int) -> tuple:
    """(rows, metrics, seconds per component) of lab.eval.evaluate on the first `rows` rows of each set.
    Components are timed by wrapping lab.eval's model primitives: scoring = token_logprobs on the QA sets,
    MIA = on holdout (forget's MIA scores reuse its answer scores), generation = generate (+ ROUGE)."""
    secs = dict.fromkeys(COMPONENTS, 0.0)
    originals = {k: getattr(lab_eval, k) for k in ("token_logprobs", "generate")}

    def timed(fn):
        def wrapper(*a, **kw):
            t0 = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                part = ("generation" if fn is originals["generate"] else
                        "mia" if str(kw.get("desc") or "").startswith("holdout") else "scoring")
                secs[part] += time.perf_counter() - t0
        return wrapper

    # GradNorm (a per-sample backward) is not among the baseline's attacks
    options = inspect.signature(getattr(lab_eval, "_eval_options", lambda base: None)).parameters
    kw = {"mia_gradnorm": False} if "mia_gradnorm" in options else {}
    try:
        for k, fn in originals.items():
            setattr(lab_eval, k, timed(fn))
        t0 = time.perf_counter()
        res = lab_eval.evaluate(model, tok, benchmark, limit=rows, progress=False, **kw)
        secs["total"] = time.perf_counter() - t0
    finally:
        for k, fn in originals.items():
            setattr(lab_eval, k, fn)
    return res["rows"], res["metrics"], secs


# ---------------------------------------------------------------- equality of the two
def aggregate(rows: pd.DataFrame) -> dict:
    """The TOFU aggregates (METHODS §6) of a rows frame with the columns both sides produce."""
    by = {n: g for n, g in rows.groupby("set")}
    m = {}
    for name in GENERATION_SETS:
        g = by[name]
        m[f"{name}_prob"] = float((g["prob_normalised"] if name in ("real_authors", "world_facts")
                                   else np.exp(-g["loss"])).mean())
        m[f"{name}_rouge"] = float(g["rouge"].mean())
        m[f"{name}_truth_ratio"] = float(metrics.truth_ratio_stat(
            g["truth_ratio"].to_numpy(), kind="forget" if name == "forget" else "utility"))
    m["model_utility"] = float(metrics.model_utility({k: m[k] for k in METRIC_KEYS[3:12]}))
    for score in ("loss", "min_k", "zlib"):
        m[f"mia_{score}_auc"] = float(metrics.mia_auc(
            metrics.membership_score(score, by["forget"][score].to_numpy()),
            metrics.membership_score(score, by["holdout"][score].to_numpy())))
    return m


def _first_diff(a: list, b: list) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


@torch.no_grad()
def near_tie(model, tok, prompt: str, ours: str, theirs: str) -> dict:
    """Where two greedy generations part: the top-2 logit gap of the unbatched model at the first token
    where their token sequences differ (both re-tokenised from the texts)."""
    a, b = (tok(x, add_special_tokens=False)["input_ids"] for x in (ours, theirs))
    k = _first_diff(a, b)
    enc = encode_prompts(tok, [prompt])
    ids = torch.cat([enc["input_ids"], torch.tensor([a[:k]], dtype=torch.long).reshape(1, -1)], 1)
    top = model(input_ids=ids).logits[0, -1].float().topk(2).values
    gap = float(top[0] - top[1])
    return {"token": k, "logit_gap": gap, "near_tie": gap < NEAR_TIE}


def compare(model, tok, ours: pd.DataFrame, ours_metrics: dict, base: pd.DataFrame) -> dict:
    """Check the two evaluations equal; raise AssertionError naming the first difference otherwise."""
    key = ["set", "row"]
    both = ours.merge(base, on=key, suffixes=("", "_base"), validate="one_to_one")
    if len(both) != len(base) or len(both) != len(ours):
        raise AssertionError(f"the two evaluations cover different rows: {len(ours)} vs {len(base)}")
    report = {"rows": len(both), "max_abs_diff": {}, "generation_differences": []}
    for col in ROW_COLUMNS:
        sel = both[f"{col}_base"].notna()   # min_k / zlib: the baseline's MIA sets only
        x, y = both.loc[sel, col].to_numpy(float), both.loc[sel, f"{col}_base"].to_numpy(float)
        report["max_abs_diff"][col] = float(np.max(np.abs(x - y))) if len(x) else 0.0
        if not np.allclose(x, y, rtol=RTOL, atol=ATOL):
            i = int(np.argmax(np.abs(x - y) - RTOL * np.abs(y)))
            r = both.loc[sel].iloc[i]
            raise AssertionError(f"{col} differs at {r['set']} row {r['row']}: {x[i]!r} (lab) vs {y[i]!r} (baseline)")
    gen = both[both["set"] != "holdout"]
    tied = set()
    for _, r in gen[gen["generation"] != gen["generation_base"]].iterrows():
        prompt = format_question(tok, r["question"])
        tie = near_tie(model, tok, prompt, r["generation"], r["generation_base"])
        report["generation_differences"].append({"set": r["set"], "row": int(r["row"]), **tie})
        if not tie["near_tie"]:
            raise AssertionError(f"generation differs at {r['set']} row {r['row']} (token {tie['token']}, logit "
                                 f"gap {tie['logit_gap']:.3g}: not a near-tie):\n lab: {r['generation']!r}\n "
                                 f"baseline: {r['generation_base']!r}")
        tied.add((r["set"], r["row"]))
    exact = gen[[(s, w) not in tied for s, w in zip(gen["set"], gen["row"])]]
    if not np.array_equal(exact["rouge"].to_numpy(), exact["rouge_base"].to_numpy()):
        raise AssertionError("ROUGE differs on rows with identical generations")
    ours_agg, base_agg = aggregate(ours), aggregate(base)
    report["metrics"] = {}
    for k in METRIC_KEYS:
        if k in ours_metrics and not np.isclose(ours_metrics[k], ours_agg[k], rtol=RTOL, atol=ATOL):
            raise AssertionError(f"lab's reported {k} = {ours_metrics[k]!r} is not its rows' aggregate {ours_agg[k]!r}")
        report["metrics"][k] = {"lab": ours_metrics.get(k, ours_agg[k]), "baseline": base_agg[k]}
        if tied and k.endswith("_rouge") or tied and k == "model_utility":
            continue   # a reported near-tie moved this aggregate; everything else must match
        if not np.isclose(ours_agg[k], base_agg[k], rtol=RTOL, atol=ATOL):
            raise AssertionError(f"{k} differs: {ours_agg[k]!r} (lab) vs {base_agg[k]!r} (baseline)")
    return report


# ---------------------------------------------------------------- the benchmark
def run_bench_eval(model_name="smollm2-135m", rows=16, rounds=3, threads=2, batch_size=32, benchmark="tofu_forget10",
                   out=None, log=print) -> dict:
    """Interleaved rounds (the side going first alternates), equality checked every round before any time
    is kept; medians [min, max] per component. Writes `out` after every round (a partial run is kept)."""
    from lab.models import load_model
    torch.set_num_threads(threads)
    model, tok = load_model(model_name)
    bench = get_benchmark(benchmark)
    data = {n: bench.eval_sets[n].select(range(min(rows, len(bench.eval_sets[n])))) for n in SETS}
    result = {"model": model_name, "benchmark": benchmark, "rows_per_set": rows, "threads": threads,
              "dtype": str(next(model.parameters()).dtype), "device": "cpu",
              "attn_implementation": model.config._attn_implementation,
              "baseline_batch_size": batch_size, "lab_batch_size": "evaluate() defaults",
              "torch": torch.__version__, "transformers": __import__("transformers").__version__,
              "cpu_count": os.cpu_count(), "platform": platform.platform(), "rounds": [], "equality": None}
    for r in range(rounds):
        order = ("lab", "baseline") if r % 2 == 0 else ("baseline", "lab")
        rnd = {"order": list(order), "loadavg_before": os.getloadavg()}
        for side in order:
            log(f"round {r + 1}/{rounds}: {side} ...")
            if side == "lab":
                ours, ours_metrics, rnd["lab"] = lab_tofu(model, tok, bench, rows)
            else:
                base, rnd["baseline"] = baseline_tofu(model, tok, data, batch_size=batch_size)
            log(f"  {side}: " + ", ".join(f"{k} {v:.1f} s" for k, v in rnd[side].items()))
        rnd["loadavg_after"] = os.getloadavg()
        report = compare(model, tok, ours, ours_metrics, base)   # raises before any time is kept
        result["equality"] = report
        result["rounds"].append(rnd)
        result["summary"] = summarize(result["rounds"])
        if out:
            runs.atomic_write_json(out, result)
    return result


def summarize(rounds: list) -> dict:
    out = {}
    for c in COMPONENTS:
        lab = [r["lab"][c] for r in rounds]
        base = [r["baseline"][c] for r in rounds]
        out[c] = {"lab_median": float(np.median(lab)), "lab_min": min(lab), "lab_max": max(lab),
                  "baseline_median": float(np.median(base)), "baseline_min": min(base), "baseline_max": max(base),
                  "speedup": float(np.median(base) / np.median(lab)) if np.median(lab) > 0 else float("nan")}
    return out


def format_markdown(result: dict) -> str:
    s = result["summary"]
    n = len(result["rounds"])
    lines = [f"| component | lab | open-unlearning-style baseline (batch {result['baseline_batch_size']}) | "
             f"baseline / lab |", "|---|---|---|---|"]
    for c in COMPONENTS:
        v = s[c]
        lines.append(f"| {COMPONENT_NAMES[c]} | {v['lab_median']:.1f} s [{v['lab_min']:.1f}, {v['lab_max']:.1f}] | "
                     f"{v['baseline_median']:.1f} s [{v['baseline_min']:.1f}, {v['baseline_max']:.1f}] | "
                     f"{v['speedup']:.2f}x |")
    loads = [x for r in result["rounds"] for x in (r["loadavg_before"][0], r["loadavg_after"][0])]
    eq = result["equality"]
    lines.append("")
    lines.append(f"{result['model']}, {result['rows_per_set']} rows per set, {result['dtype']}, "
                 f"{result['threads']} threads, {result['attn_implementation']}; median [min, max] of {n} "
                 f"interleaved rounds; 1-minute load average {min(loads):.1f}-{max(loads):.1f} on "
                 f"{result['cpu_count']} cores. Equal before timing: {eq['rows']} rows, max |diff| "
                 + ", ".join(f"{k} {v:.1e}" for k, v in eq["max_abs_diff"].items())
                 + f"; generations differing: {len(eq['generation_differences'])}.")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(prog="lab bench-eval", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--rows", type=int, default=16, help="rows of each TOFU eval set (default 16)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--benchmark", default="tofu_forget10")
    p.add_argument("--out", default="bench/results", help="folder for eval-<model>-cpu.json")
    p.add_argument("--markdown", metavar="JSON", help="print the README table of a saved result and exit")
    args = p.parse_args(argv)
    if args.markdown:
        print(format_markdown(json.loads(Path(args.markdown).read_text())))
        return
    if args.rows < 1 or args.rounds < 1 or args.threads < 1:
        raise SystemExit(f"lab bench-eval: --rows {args.rows}, --rounds {args.rounds}, --threads {args.threads}; "
                         "valid: each >= 1")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"eval-{args.model}-cpu.json"
    result = run_bench_eval(args.model, rows=args.rows, rounds=args.rounds, threads=args.threads,
                            benchmark=args.benchmark, out=path)
    print(format_markdown(result))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
