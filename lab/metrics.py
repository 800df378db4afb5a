"""TOFU / MUSE metric arithmetic (METHODS §6) as pure functions on numbers, arrays and strings.

lab/eval.py runs the model and calls these; tests/test_metrics.py checks them against the real
evaluation logs in shared/data/reference/. Conventions, and the log each was verified against:

- ROUGE-L: rouge_score RougeScorer(["rougeL"], use_stemmer=True), score(target=ref, prediction=pred).
  Recall reproduces every logged rougeL_recall of TOFU_EVAL.json (open-unlearning) and of
  tofu_locuslab eval_log*.json; F1 reproduces every logged rougeL_f1 of MUSE_EVAL.json.
- Truth ratio R = exp(mean perturbed log-prob - paraphrased log-prob), from length-normalised
  (mean-token) log-probs = geometric mean of perturbed p / p_paraphrased (TOFU §2.5.1). R < 1 means the
  model prefers the paraphrased (true) answer. Both logs store this same R per row:
  locuslab `truth_ratio` = exp(avg_paraphrased_loss - mean(average_perturb_loss)) (NOT its inverse,
  whatever shared/data/README.md suggests: 1/R is off by orders of magnitude), and open-unlearning
  `*_Truth_Ratio` / `forget_truth_ratio` value_by_index scores. On real authors / world facts the
  "paraphrased" answer is the answer itself (open-unlearning ra_/wf_Q_A_Prob avg_loss).
  open-unlearning itself computes exp(mean perturbed log-prob) / (exp(paraphrased log-prob) + 1e-10):
  truth_ratio(..., eps=1e-10) reproduces its logged per-row R exactly; the default eps=0 (TOFU definition,
  locuslab logs to 1.3e-6) differs only where p_paraphrased is tiny (world facts: up to 2% at loss 19).
- Normalised Prob on real authors / world facts (computed in lab/eval.py, not here): open-unlearning
  logs p / (p + sum p_perturbed + 1e-10), exactly (ra_/wf_Q_A_Prob_normalised).
- Truth-ratio stat: forget -> mean(min(R, 1/R)) (open-unlearning forget_truth_ratio agg);
  utility -> mean(max(0, 1 - R)) (retain_/ra_/wf_Truth_Ratio agg).
- Forget quality = ks_2samp(R_unlearned_forget, R_retain_forget).pvalue: reproduces the logged
  forget_quality of all 12 open-unlearning full-vs-retain pairs. (TOFU's own aggregate code feeds 1/R;
  the KS statistic is invariant under the monotone map R -> 1/R, so the p-value is the same.)
- Model utility = harmonic mean of the 9 aggregates {retain, ra, wf} x {Prob (ra/wf: normalised),
  ROUGE-L recall, truth-ratio stat}: reproduces the logged model_utility.
- Min-K%: mean of the int(n * k) (at least 1) lowest token log-probs, open-unlearning's rounding
  (evals/metrics/mia/min_k.py: num_k = max(1, int(len(lp) * k))). open-unlearning logs the NEGATED
  value (a mean NLL, loss-like); here min_k_percent returns the mean log-prob (higher = member).
- zlib: loss / len(zlib.compress(text.encode("utf-8"))) with loss = MEAN token NLL of the answer and
  text = the answer only: logged mia_loss score / mia_zlib score equals the compressed length of the
  ground-truth answer on 392/400 forget rows (the other 8 differ by one byte: open-unlearning compresses
  the detokenised answer). Pass the mean NLL, not the sum, to match open-unlearning.
- MIA AUC: ROC AUC with members (forget) positive and higher score = member. open-unlearning logs
  loss-like per-row scores for loss, min_k (= -min_k_percent) and zlib; feeding them through
  membership_score reproduces every logged mia_loss / mia_min_k / mia_zlib AUC (TOFU and MUSE, ~1e-16).
- PrivLeak: open-unlearning and MUSE use AUC' = 1 - (member-positive AUC) and
  privleak = (AUC'_unl - AUC'_ref) / (AUC'_ref + 1e-10) * 100 (1e-10: open-unlearning's guard).
  With member-positive AUCs a, r that is (r - a) / (1 - r) * 100: memorising model about -100,
  retain model 0. Reproduces every logged privleak to ~1e-12: full vs retain min_k AUC (TOFU, e.g.
  -99.86 for Llama-2-7b forget10; MUSE target vs retrain: -99.81) and the retain / retrain models
  against open-unlearning's default reference r = 0.5.
"""
from __future__ import annotations

import math
import zlib
from collections.abc import Mapping

import numpy as np
from rouge_score import rouge_scorer
from scipy.stats import ks_2samp, rankdata

_ROUGE = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
TRUTH_RATIO_KINDS = ("forget", "utility")
MIA_SCORES = ("loss", "min_k", "zlib")
PRIVLEAK_EPS = 1e-10  # open-unlearning's guard in the PrivLeak denominator (logs match to ~1e-12)


# ---------------------------------------------------------------- ROUGE
def _rouge_l(pred, ref):
    for name, s in (("pred", pred), ("ref", ref)):
        if not isinstance(s, str):
            raise TypeError(f"ROUGE-L {name} must be a str, got {type(s).__name__}: {s!r:.80}")
    return _ROUGE.score(ref, pred)["rougeL"]


def rouge_l_recall(pred: str, ref: str) -> float:
    """ROUGE-L recall of a generation against the reference answer (TOFU)."""
    return float(_rouge_l(pred, ref).recall)


def rouge_l_f1(pred: str, ref: str) -> float:
    """ROUGE-L F1 of a generation against the reference (MUSE verbmem / knowmem)."""
    return float(_rouge_l(pred, ref).fmeasure)


# ---------------------------------------------------------------- truth ratio, forget quality, utility
def truth_ratio(paraphrased_logprob, perturbed_logprobs, eps: float = 0.0):
    """R = exp(mean(perturbed) - paraphrased) from mean-token log-probs (TOFU §2.5.1).

    scalar + (k,) -> float; (n,) + (n, k) -> array (n,).
    eps > 0 gives open-unlearning's exp(mean(perturbed)) / (exp(paraphrased) + eps); eps=1e-10
    reproduces its logged truth ratios exactly, but caps R once p_paraphrased < ~1e-8 (answer loss > 18).
    """
    para = np.asarray(paraphrased_logprob, dtype=float)
    try:
        pert = np.asarray(perturbed_logprobs, dtype=float)
    except ValueError as e:  # ragged list of lists
        raise ValueError(f"perturbed_logprobs must be rectangular (k per row): {e}") from None
    if pert.shape[-1:] == (0,):
        raise ValueError("truth_ratio needs at least one perturbed answer per row, got 0")
    if eps < 0:
        raise ValueError(f"truth_ratio eps must be >= 0, got {eps}")
    if (para.ndim, pert.ndim) == (0, 1) or (para.ndim == 1 and pert.ndim == 2 and len(pert) == len(para)):
        pert_mean = pert.mean(axis=-1)
        R = np.exp(pert_mean - para) if eps == 0 else np.exp(pert_mean) / (np.exp(para) + eps)
        return float(R) if para.ndim == 0 else R
    raise ValueError(f"truth_ratio takes scalar + (k,) or (n,) + (n, k); got shapes {para.shape} "
                     f"and {pert.shape}")


def truth_ratio_stat(R, kind: str = "forget") -> float:
    """forget: mean(min(R, 1/R)) (1 = indistinguishable); utility: mean(max(0, 1 - R)) (METHODS §6)."""
    R = np.asarray(R, dtype=float)
    if kind not in TRUTH_RATIO_KINDS:
        raise ValueError(f"unknown truth-ratio kind {kind!r}; valid: {', '.join(TRUTH_RATIO_KINDS)}")
    if R.size == 0:
        raise ValueError("truth_ratio_stat of an empty array")
    if kind == "forget":
        with np.errstate(divide="ignore"):  # R = 0 -> min(0, inf) = 0
            return float(np.mean(np.minimum(R, 1 / R)))
    return float(np.mean(np.maximum(0.0, 1 - R)))


def _finite_1d(x, name) -> np.ndarray:
    x = np.asarray(x, dtype=float).ravel()
    if x.size == 0:
        raise ValueError(f"{name} is empty")
    bad = np.flatnonzero(~np.isfinite(x))
    if bad.size:
        raise ValueError(f"{name} has non-finite values at rows {bad[:10].tolist()}")
    return x


def forget_quality(r_unlearned, r_reference) -> float:
    """KS-test p-value between the forget-set truth ratios of the unlearned and retain models (TOFU)."""
    a = _finite_1d(r_unlearned, "r_unlearned")
    b = _finite_1d(r_reference, "r_reference")
    return float(ks_2samp(a, b).pvalue)


def model_utility(values) -> float:
    """Harmonic mean of the TOFU utility numbers (dict name -> value, or a sequence); 0 if any is 0."""
    items = list(values.items()) if isinstance(values, Mapping) else list(enumerate(values))
    if not items:
        raise ValueError("model_utility of no values")
    for key, v in items:
        if not isinstance(v, (int, float, np.number)) or math.isnan(v) or v < 0:
            raise ValueError(f"model_utility value {key!r} = {v!r}: must be a number >= 0")
    if any(v == 0 for _, v in items):
        return 0.0
    return float(len(items) / sum(1 / v for _, v in items))


# ---------------------------------------------------------------- membership inference
def min_k_percent(token_logprobs, k: float = 0.4) -> float:
    """Mean of the lowest max(1, int(n * k)) token log-probs (Min-K% Prob; open-unlearning rounding)."""
    if not 0 < k <= 1:
        raise ValueError(f"min_k_percent k must be in (0, 1], got {k}")
    lp = np.asarray(token_logprobs, dtype=float).ravel()
    if lp.size == 0:
        raise ValueError("min_k_percent of an empty sequence of token log-probs")
    n = max(1, int(len(lp) * k))
    return float(np.sort(lp)[:n].mean())


def zlib_score(loss: float, text: str) -> float:
    """loss / zlib entropy (bytes of zlib-compressed UTF-8 text); open-unlearning passes the mean NLL."""
    if not isinstance(text, str):
        raise TypeError(f"zlib_score text must be a str, got {type(text).__name__}")
    return float(loss) / len(zlib.compress(text.encode("utf-8")))


def membership_score(score_name: str, values) -> np.ndarray:
    """Orient attack scores so that higher = more likely a member."""
    values = np.asarray(values, dtype=float)
    if score_name in ("loss", "zlib"):  # members have low loss
        return -values
    if score_name == "min_k":  # a mean log-prob: members high
        return values.copy()
    raise ValueError(f"unknown MIA score {score_name!r}; valid: {', '.join(MIA_SCORES)}")


def mia_auc(member_scores, nonmember_scores) -> float:
    """ROC AUC, members positive, higher = member: P(member > non-member) + P(tie) / 2 (Mann-Whitney U)."""
    m = _finite_1d(member_scores, "member_scores")
    n = _finite_1d(nonmember_scores, "nonmember_scores")
    ranks = rankdata(np.concatenate([m, n]))  # ties get average ranks -> count 1/2
    u = ranks[:len(m)].sum() - len(m) * (len(m) + 1) / 2
    return float(u / (len(m) * len(n)))


def privleak(auc_unlearned: float, auc_reference: float) -> float:
    """PrivLeak in % from member-positive AUCs: (AUC'_unl - AUC'_ref) / AUC'_ref * 100, AUC' = 1 - AUC.

    (MUSE / open-unlearning convention; see the module docstring.) Memorising model -> about -100,
    retain model -> 0. With no retain model open-unlearning uses auc_reference = 0.5.
    """
    for name, a in (("auc_unlearned", auc_unlearned), ("auc_reference", auc_reference)):
        if not 0 <= a <= 1:
            raise ValueError(f"{name} must be an AUC in [0, 1], got {a}")
    if auc_reference == 1:
        raise ValueError("auc_reference = 1 gives AUC' = 0: PrivLeak is undefined")
    ref = 1 - auc_reference
    return float(((1 - auc_unlearned) - ref) / (ref + PRIVLEAK_EPS) * 100)
