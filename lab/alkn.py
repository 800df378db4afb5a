"""ALKN: adaptive localization of knowledge negation for continual unlearning (ALKN paper; METHODS §1, §3, §4).

Per task t (ALKN Alg. 1): fine-tune theta^{t-1} on D_u^t with the entropic soft-label loss (ESL, eq. 6),
masking the fine-tuning by dynamic gradient sparsity (DGS, eq. 7-9, App. D, E.2) and slowing the
parameters of earlier tasks' masks (adaptive parameter modulation, APM, eq. 10); then negate
theta^t = theta^{t-1} - lam * (theta_ft^t - theta^{t-1}) and grow the union mask M |= mask^t.

    opts = alkn_options("alkn_wo_apm", lam=0.8)          # alkn | alkn_wo_esl | alkn_wo_dgs | alkn_wo_apm | tv
    out = alkn_task(model, tok, forget_t, retain, cfg, opts, prev_mask=M)   # one task, in place
    M = masks.union(M, out["mask"])

DGS and APM reach the engine loop only through lab.engine.StepHooks: `on_direction` updates the score m
from G_u and masks the gradient (eq. 7), `on_update` masks the realised AdamW update and scales it per
element (APM). Memory beyond the engine: theta^{t-1} (1 copy), m (1), G_r (1, or an int8 sign sketch
with `gr_lean`), M (bool).

Options (alkn_options; defaults = paper / METHODS):
  lam 0.8, esl True, esl_s 10, esl_form paper|official (released code, esl_k 1.5),
  dgs True, rho_start 1.0 -> rho_end 0.3 (active fraction, linear over the task's steps),
  mask_alignment agree|oppose (sign of G_u*G_r in the score; agree = paper and released code),
  mask_target update|grad (update: masked coordinates do not move under AdamW; grad: released code),
  mask_p_k 0.5 (mu = mask_p_k * std(G_u*G_r) each step; dgs_mu fixes mu instead),
  quantile auto|exact|estimate (exact kthvalue up to 2^24 entries, else an O(n) histogram estimate),
  apm element|per_tensor|off, apm_low 0.1 (alpha_l / alpha_h),
  retain_grad_rows None (all retain rows) or a number of seeded random rows for G_r,
  gr_lean False, gr_lean_top 0.1, gr_lean_a 10 (ALKN App. E.4: signs of the largest |G_r| entries).

T-Rouge (ALKN App. G): build_trouge_corpus(model, tok) generates from short prefixes, ranks by perplexity
with zlib and lowercase filters, dedupes, keeps the top N, splits 70/30 and caches the corpus per model
under $LAB_CACHE/trouge/; trouge(model, tok, corpus) = mean ROUGE-L recall of completions;
utility_with_trouge(metrics, value) folds it into MU as ALKN does.
"""
from __future__ import annotations

import hashlib
import json
import math
import re
import zlib
from pathlib import Path

import torch

from lab import distributed, geometry
from lab.engine import LoopState, StepHooks, UnlearnConfig
from lab.objectives import esl_loss, esl_weights  # noqa: F401 (ALKN eq. 6; an objective, public here too)
from lab.taskvec import finetune, negate_, nll_gradient, snapshot, trainable

EXACT_QUANTILE_MAX = 2 ** 24

ALKN_DEFAULTS = dict(
    lam=0.8, esl=True, esl_s=10.0, esl_form="paper", esl_k=1.5,
    dgs=True, rho_start=1.0, rho_end=0.3, mask_alignment="agree", mask_target="update",
    mask_p_k=0.5, dgs_mu=None, quantile="auto",
    apm="element", apm_low=0.1,
    retain_grad_rows=None, gr_lean=False, gr_lean_top=0.1, gr_lean_a=10.0,
)
# ablations by name (ALKN Table 1); "tv" = plain task-vector negation (no module), same lam
VARIANTS = {
    "alkn": {}, "alkn_wo_esl": {"esl": False}, "alkn_wo_dgs": {"dgs": False}, "alkn_wo_apm": {"apm": "off"},
    "tv": {"esl": False, "dgs": False, "apm": "off"},
}
CHOICES = {"esl_form": ("paper", "official"), "mask_alignment": ("agree", "oppose"),
           "mask_target": ("update", "grad"), "quantile": ("auto", "exact", "estimate"),
           "apm": ("element", "per_tensor", "off")}


def normalise_variant(name: str) -> str:
    return re.sub(r"[\s+\-/]+", "_", name.strip().lower())


def alkn_options(name: str = "alkn", **overrides) -> dict:
    """Options of an ALKN variant (VARIANTS) with overrides, validated."""
    key = normalise_variant(name)
    if key not in VARIANTS:
        raise ValueError(f"unknown ALKN variant {name!r}; valid: {sorted(VARIANTS)}")
    unknown = set(overrides) - set(ALKN_DEFAULTS)
    if unknown:
        raise ValueError(f"{key}: unknown options {sorted(unknown)}; valid: {sorted(ALKN_DEFAULTS)}")
    opts = {**ALKN_DEFAULTS, **VARIANTS[key], **overrides, "variant": key}
    if opts["apm"] is False or opts["apm"] is None:
        opts["apm"] = "off"
    if opts["apm"] is True:
        opts["apm"] = "element"
    for k, valid in CHOICES.items():
        if opts[k] not in valid:
            raise ValueError(f"{key}: {k}={opts[k]!r}; valid: {list(valid)}")
    if not 0 < opts["rho_end"] <= opts["rho_start"] <= 1:
        raise ValueError(f"{key}: need 0 < rho_end <= rho_start <= 1, got {opts['rho_start']} -> {opts['rho_end']}")
    if not 0 <= opts["apm_low"] <= 1:
        raise ValueError(f"{key}: apm_low={opts['apm_low']}; valid: [0, 1] (a fraction of the lr)")
    if not 0 < opts["gr_lean_top"] <= 1:
        raise ValueError(f"{key}: gr_lean_top={opts['gr_lean_top']}; valid: (0, 1]")
    return opts


# ---------------------------------------------------------------- thresholds (ALKN App. E.2)
def _numel(tensors) -> int:
    return sum(t.numel() for t in tensors)


def _device(tensors):
    return tensors[0].device if len(tensors) else torch.device("cpu")


def score_threshold(scores, rho: float, method: str = "auto", group=None) -> float:
    """eta such that a fraction ~rho of all entries have score >= eta (-inf: all of them).

    exact: the round(rho*n)-th largest value (kthvalue on the concatenation); estimate: O(n) histogram
    refinement (three passes of 1024 bins), for models too large to concatenate.
    group: `scores` are this rank's shards (fsdp) and the quantile is over the entries of every rank, the
    same eta on each: n is all-reduced; exact all-gathers the scores (auto: up to EXACT_QUANTILE_MAX
    entries in all; 3 collectives), estimate all-reduces min / max and each pass's bin counts (5)."""
    n = _numel(scores)
    if group is not None:
        n = int(distributed.group_sums([n], group, _device(scores))[0])
    n_keep = int(round(rho * n))
    if n_keep >= n:
        return -math.inf
    n_keep = max(n_keep, 1)
    if method == "auto":
        method = "exact" if n <= EXACT_QUANTILE_MAX else "estimate"
    if method == "exact":
        flat = torch.cat([s.detach().reshape(-1).float() for s in scores])
        flat = distributed.gather_flat(flat, group)   # kthvalue does not depend on the order of entries
        return float(flat.kthvalue(n - n_keep + 1).values)
    if method == "estimate":
        return _estimate_threshold(scores, n_keep, group=group)
    raise ValueError(f"quantile={method!r}; valid: 'auto', 'exact', 'estimate'")


def _estimate_threshold(scores, n_keep: int, bins: int = 1024, passes: int = 3, group=None) -> float:
    # a shard may hold no entries (FSDP2 gives a small tensor's rows to the first ranks)
    entries = [s for s in scores if s.numel()]
    lo = min((float(s.min()) for s in entries), default=math.inf)
    hi = max((float(s.max()) for s in entries), default=-math.inf)
    device = _device(scores)
    lo, hi = distributed.group_extrema(lo, hi, group, device)
    above = 0.0                                   # entries known to lie above the current window
    for _ in range(passes):
        if not hi > lo:
            return lo
        # integer-valued float64 counts: summed exactly in any order, so every rank and world size agree
        counts = sum((torch.histc(s.detach().float().reshape(-1), bins, lo, hi).double() for s in entries),
                     torch.zeros(bins, dtype=torch.float64, device=device))
        counts = distributed.all_reduce_sum_(counts, group)
        rev = counts.flip(0)
        cum = above + rev.cumsum(0)
        target = torch.tensor([float(n_keep)], dtype=cum.dtype, device=cum.device)
        idx = int(torch.searchsorted(cum, target).clamp(max=bins - 1))
        b = bins - 1 - idx
        width = (hi - lo) / bins
        above_bin = float(cum[idx] - rev[idx])
        in_bin = float(rev[idx])
        lo, hi = lo + b * width, lo + (b + 1) * width
        if in_bin <= 0:
            return lo
        frac = (n_keep - above_bin) / in_bin
        estimate = hi - frac * (hi - lo)          # linear inside the bin
        above = above_bin
    return estimate


# ---------------------------------------------------------------- G_r (ALKN eq. 9, App. E.4)
class RetainGradient:
    """G_r = mean retain NLL gradient at theta^{t-1}, kept whole or as the App. E.4 sketch: the signs of
    the gr_lean_top largest |G_r| entries (int8), with G_u*G_r estimated by ALKN eq. 56:
    G_u*(sketch==0) + a*G_u*(sketch==1) - a*G_u*(sketch==-1). group: `grads` are shards (fsdp), the
    top fraction is over every rank's entries; the product with G_u is elementwise, so it stays local."""

    def __init__(self, grads, lean=False, top=0.1, a=10.0, quantile="auto", group=None):
        self.lean, self.a = lean, a
        if lean:
            eta = score_threshold([g.abs() for g in grads], top, quantile, group)
            self.signs = [(torch.sign(g) * (g.abs() >= eta)).to(torch.int8) for g in grads]
            self.full = None
        else:
            self.full, self.signs = grads, None

    def product(self, g_u) -> list[torch.Tensor]:
        if not self.lean:
            return [u * g for u, g in zip(g_u, self.full)]
        return [u * torch.where(s == 0, 1.0, self.a * s.to(u.dtype)) for u, s in zip(g_u, self.signs)]

    def dot(self, delta, group=None) -> float:
        """G_r . delta: the first-order change of the retain loss for a step delta (NaN when lean);
        group: G_r and delta are shards (fsdp), the dot sums over it."""
        return float("nan") if self.lean else float(geometry.dot(self.full, delta, group))


def retain_gradient(model, tokenizer, retain, cfg: UnlearnConfig, opts: dict | None = None,
                    parallel=None) -> RetainGradient:
    """G_r at the current weights over the retain set (or opts['retain_grad_rows'] seeded random rows);
    parallel: rows split across ranks, the gradient all-reduced (lab.taskvec.nll_gradient; fsdp: shards)."""
    opts = opts or ALKN_DEFAULTS
    rows = None
    if opts.get("retain_grad_rows"):
        n = min(int(opts["retain_grad_rows"]), len(retain))
        rows = torch.randperm(len(retain), generator=torch.Generator().manual_seed(cfg.seed))[:n].tolist()
    grads = nll_gradient(model, tokenizer, retain, cfg, rows, parallel=parallel)
    return RetainGradient(grads, lean=opts.get("gr_lean", False), top=opts.get("gr_lean_top", 0.1),
                          a=opts.get("gr_lean_a", 10.0), quantile=opts.get("quantile", "auto"),
                          group=shard_group(parallel))


def shard_group(parallel):
    """The group ALKN's reductions sum over: fsdp's (lists are shards); None in one process and under ddp
    (every rank holds the same whole, all-reduced tensors, so local values are already the totals)."""
    return parallel.group if parallel is not None and parallel.sharded else None


# ---------------------------------------------------------------- DGS + APM as engine hooks
class ALKNHooks:
    """Dynamic gradient sparsity (ALKN eq. 7-9) and adaptive parameter modulation (eq. 10) for one task.

    on_direction at local step k: mask_k = 1[m >= eta_k] with eta_k the (1 - rho_k) quantile of m
    (rho linear rho_start -> rho_end over the task), then the score update of eq. 9 with this step's
    G_u (Alg. 1 updates m after the parameter step): m += sign * lam * G_u*G_r - mu * M, sign = +1
    (agree) or -1 (oppose); returns the masked gradient (eq. 7).
    on_update: mask_target=update restores masked coordinates (AdamW momentum and weight decay would
    move them); APM scales the remaining update by apm_low on M (element) or per tensor.
    group (fsdp): params, gradients, m, masks and M are this rank's shards (local tensors); the quantile,
    mu, the active fraction and the per-tensor densities sum over the group, so every rank takes the same
    decisions. Collectives per step: the threshold's (score_threshold) + 1 (mu and the active count)."""

    def __init__(self, params, opts: dict, total_steps: int, retain_grad: RetainGradient | None,
                 prev_mask=None, group=None):
        self.opts, self.total = opts, max(int(total_steps), 1)
        self.group, self.device = group, _device(params)   # collectives run on the parameters' device
        self.dgs = bool(opts["dgs"])
        if self.dgs and retain_grad is None:
            raise ValueError("DGS needs the retain gradient G_r (retain_gradient(...))")
        self.retain_grad = retain_grad
        self.prev = None
        if prev_mask is not None and self._sums([sum(int(m.sum()) for m in prev_mask)])[0] > 0:
            self.prev = [m.to(p.device) for m, p in zip(prev_mask, params)]
        self.m = [torch.zeros_like(p, dtype=torch.float32) for p in params] if self.dgs else None
        self.mask = None
        self.k = 0
        self.extras: dict = {}
        self.apm = opts["apm"] if self.prev is not None else "off"
        self.tensor_scale = self._per_tensor_scale() if self.apm == "per_tensor" else None

    def _sums(self, values) -> list:
        """Per-rank numbers summed over the group (one collective); one process: the values."""
        return distributed.group_sums(values, self.group, self.device)

    def _per_tensor_scale(self) -> list[float]:
        # released code: tensors ranked by previous-mask density, the denser half at apm_low x lr
        if self.group is None:
            density = [float(m.float().mean()) for m in self.prev]
        else:   # shards: each tensor's density from its counts over all ranks
            sums = self._sums([int(m.sum()) for m in self.prev] + [m.numel() for m in self.prev])
            k = len(self.prev)
            density = [c / n if n else 0.0 for c, n in zip(sums[:k], sums[k:])]
        order = sorted(range(len(density)), key=lambda i: -density[i])
        slow = {i for i in order[:math.ceil(len(order) / 2)] if density[i] > 0}
        return [self.opts["apm_low"] if i in slow else 1.0 for i in range(len(density))]

    def rho(self, k: int) -> float:
        start, end = self.opts["rho_start"], self.opts["rho_end"]
        return start if self.total == 1 else start + (end - start) * min(k, self.total - 1) / (self.total - 1)

    def _mask(self, rho):
        eta = score_threshold(self.m, rho, self.opts["quantile"], self.group)
        return [m >= eta for m in self.m], eta

    @torch.no_grad()
    def on_direction(self, step, params, g_f, g_r, d):
        rho = self.rho(self.k)
        self.mask, eta = self._mask(rho)
        prod = self.retain_grad.product(g_f)
        # the mask's active count, and for mu the moments of G_u*G_r: totals over all entries (one collective)
        stats = [sum(int(x.sum()) for x in self.mask), _numel(prod)]
        if self.opts["dgs_mu"] is None:
            stats += [sum(float(p.double().sum()) for p in prod), sum(float(p.double().pow(2).sum()) for p in prod)]
        stats = self._sums(stats)
        active, n = stats[0] / stats[1], stats[1]
        if self.opts["dgs_mu"] is not None:
            mu = float(self.opts["dgs_mu"])
        else:  # mu = mask_p_k * std of G_u*G_r over all entries (released code)
            s1, s2 = stats[2], stats[3]
            mu = self.opts["mask_p_k"] * math.sqrt(max(s2 / n - (s1 / n) ** 2, 0.0))
        sign = 1.0 if self.opts["mask_alignment"] == "agree" else -1.0
        for i, (m, p) in enumerate(zip(self.m, prod)):
            m.add_(p, alpha=sign * self.opts["lam"])              # ALKN eq. 9
            if self.prev is not None and mu:
                m.sub_(self.prev[i].to(m.dtype), alpha=mu)
        self.k += 1
        self.extras = {"active_fraction": active, "dgs_rho": rho, "dgs_eta": eta, "dgs_mu": mu}
        return [x * mk for x, mk in zip(d, self.mask)]             # ALKN eq. 7

    @torch.no_grad()
    def on_update(self, step, params, before):
        low = self.opts["apm_low"]
        for i, (p, b) in enumerate(zip(params, before)):
            if self.dgs and self.opts["mask_target"] == "update":
                p.copy_(torch.where(self.mask[i], p, b))
            if self.apm == "element":                               # ALKN eq. 10, on the update
                p.copy_(torch.where(self.prev[i], torch.lerp(b, p, low), p))
            elif self.apm == "per_tensor" and self.tensor_scale[i] != 1.0:
                p.copy_(torch.lerp(b, p, self.tensor_scale[i]))

    def step_hooks(self) -> StepHooks | None:
        update = (self.dgs and self.opts["mask_target"] == "update") or self.apm != "off"
        if not self.dgs and not update:
            return None
        return StepHooks(on_direction=self.on_direction if self.dgs else None,
                         on_update=self.on_update if update else None, shards=self.group is not None)

    def final_mask(self):
        """The task's mask 1[m >= eta] at rho_end on the final score (Alg. 1: M = M | mask^t); under fsdp
        this rank's shards (lab.distributed.full_masks gathers them)."""
        if not self.dgs:
            return None
        return [x.cpu() for x in self._mask(self.opts["rho_end"])[0]]


class TraceExtras:
    """A Run stand-in that adds the hooks' latest per-step values (active_fraction, ...) to each trace row
    before passing it on (the engine appends the same dict to its LoopState trace)."""

    def __init__(self, run, hooks: ALKNHooks):
        self.run, self.hooks = run, hooks

    def log_step(self, row):
        row.update(self.hooks.extras)
        if self.run is not None:
            self.run.log_step(row)


def task_steps(cfg: UnlearnConfig, n_rows: int) -> int:
    """Optimizer steps the engine loop takes on n_rows forget rows."""
    return min(cfg.epochs * math.ceil(n_rows / cfg.batch_size), cfg.max_steps or 10 ** 12)


def alkn_task(model, tokenizer, forget, retain, cfg: UnlearnConfig, opts: dict, *, prev_mask=None,
              retain_grad: RetainGradient | None = None, theta_prev=None, run=None, task=None,
              state: LoopState | None = None, progress=False, parallel=None) -> dict:
    """One ALKN task in place: fine-tune (ESL / CE, DGS, APM), then negate with lam (Alg. 1).
    parallel: the engine loop's (ddp: DGS / APM see the same all-reduced gradients on every rank, so
    scores and masks stay identical; fsdp: every list is this rank's shards, prev_mask too, and the
    hooks reduce over the group: the returned mask is local).

    Returns {"mask": the task's mask or None, "state": the loop state, "hooks": ALKNHooks}."""
    distributed.wrap(model, parallel, autocast=cfg.autocast)   # fsdp: shard first, theta_prev is then shards
    params = trainable(model)
    theta_prev = snapshot(params) if theta_prev is None else theta_prev
    if opts["dgs"] and retain_grad is None:
        retain_grad = retain_gradient(model, tokenizer, retain, cfg, opts, parallel=parallel)
    hooks = ALKNHooks(distributed.local_list(params), opts, task_steps(cfg, len(forget)), retain_grad, prev_mask,
                      group=shard_group(parallel))
    if opts["esl"]:
        method, margs = "finetune_esl", {k: opts[k] for k in ("esl_s", "esl_form", "esl_k")}
    else:
        method, margs = "finetune_forget", {}
    state = finetune(model, tokenizer, forget, cfg, method=method, method_args=margs, hooks=hooks.step_hooks(),
                     run=TraceExtras(run, hooks), task=task, state=state, progress=progress, parallel=parallel)
    mask = hooks.final_mask()
    negate_(params, theta_prev, opts["lam"])
    return {"mask": mask, "state": state, "hooks": hooks}


# ---------------------------------------------------------------- T-Rouge (ALKN App. G)
def _cache_root() -> Path:
    from lab.prepare import cache_root
    return cache_root() / "trouge"


def _weights_hash(model) -> str:
    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def _default_prefix_texts() -> list[str]:
    # generic text the model was not fine-tuned on (news excerpts), as ALKN samples Common Crawl
    from lab.data import load_muse_news
    return [t for t in load_muse_news("privleak/retain2")["text"] if t.strip()]


def _ngrams(words, n=6) -> set:
    return {tuple(words[i:i + n]) for i in range(max(len(words) - n + 1, 0))}


def _log_ppl(model, tokenizer, texts, batch_size) -> list[float]:
    from lab.eval import token_logprobs
    bos = tokenizer.bos_token or ""
    lps = token_logprobs(model, tokenizer, [bos] * len(texts), texts, batch_size=batch_size)
    return [float(-lp.mean()) if lp.numel() else float("inf") for lp in lps]


@torch.no_grad()
def build_trouge_corpus(model, tokenizer, *, n_generate: int = 200, top_n: int = 50, prefix_texts=None,
                        prefix_tokens=(5, 10), max_new_tokens: int = 64, top_k: int = 40, seed: int = 0,
                        filter_quantile: float = 0.1, min_words: int = 8, exclude_texts=None,
                        batch_size: int = 16, cache: bool = True) -> list[dict]:
    """A TRAVIS-style utility corpus from the model itself (ALKN App. G), cached per model weights.

    1. prefixes: 5-10 tokens from random positions of `prefix_texts` (default MUSE-News privleak/retain2);
    2. top-k sampling of max_new_tokens tokens from each prefix (seeded);
    3. drop texts under min_words words, the most repetitive (lowest zlib compression ratio) and the
       lowest lowercase ratio (log ppl(lowercased) / log ppl) - each the bottom filter_quantile - and
       texts sharing a 6-word n-gram with `exclude_texts` (e.g. the forget answers: they are no utility);
    4. rank by perplexity (lowest first, the MIA criterion of eq. 59), dedupe (normalised text, 6-gram
       overlap with a kept text), keep top_n;
    5. prompt = first 70% of the words, target = the last 30%.
    Returns a list of {"prompt", "target", "text", "ppl", "zlib_ratio", "lower_ratio"}."""
    import numpy as np
    params = dict(n_generate=n_generate, top_n=top_n, prefix_tokens=list(prefix_tokens),
                  max_new_tokens=max_new_tokens, top_k=top_k, seed=seed, filter_quantile=filter_quantile,
                  min_words=min_words, prefixes=None if prefix_texts is None else
                  hashlib.sha256("\n".join(prefix_texts).encode()).hexdigest()[:12],
                  exclude=None if exclude_texts is None else
                  hashlib.sha256("\n".join(exclude_texts).encode()).hexdigest()[:12])
    key = hashlib.sha256(json.dumps({**params, "weights": _weights_hash(model)}, sort_keys=True)
                         .encode()).hexdigest()[:16]
    path = _cache_root() / f"{key}.json"
    if cache and path.is_file():
        return json.loads(path.read_text())["rows"]

    from lab.data import encode_prompts
    texts = prefix_texts if prefix_texts is not None else _default_prefix_texts()
    if not texts:
        raise ValueError("build_trouge_corpus: no prefix texts")
    g = torch.Generator().manual_seed(seed)
    prefixes = []
    for _ in range(n_generate):
        ids = tokenizer(texts[int(torch.randint(len(texts), (1,), generator=g))],
                        add_special_tokens=False)["input_ids"]
        n = int(torch.randint(prefix_tokens[0], prefix_tokens[1] + 1, (1,), generator=g))
        start = int(torch.randint(max(len(ids) - n, 0) + 1, (1,), generator=g))
        prefixes.append(tokenizer.decode(ids[start:start + n]).strip())
    was = model.training
    model.eval()
    device = next(model.parameters()).device
    torch.manual_seed(seed)
    generated = []
    for i in range(0, len(prefixes), batch_size):
        enc = encode_prompts(tokenizer, prefixes[i:i + batch_size])
        enc = {k: v.to(device) for k, v in enc.items()}
        out = model.generate(**enc, do_sample=True, top_k=top_k, max_new_tokens=max_new_tokens,
                             pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None
                             else tokenizer.eos_token_id)
        generated += tokenizer.batch_decode(out, skip_special_tokens=True)
    model.train(was)
    cands = [" ".join(t.split()) for t in generated]
    cands = [t for t in cands if len(t.split()) >= min_words]
    if exclude_texts:
        banned = set().union(*(_ngrams(e.lower().split()) for e in exclude_texts))
        cands = [t for t in cands if not (_ngrams(t.lower().split()) & banned)]
    if not cands:
        raise ValueError("build_trouge_corpus: no candidate survived the length/exclusion filters; "
                         "raise n_generate or max_new_tokens")
    log_ppl = np.array(_log_ppl(model, tokenizer, cands, batch_size))
    log_ppl_lower = np.array(_log_ppl(model, tokenizer, [t.lower() for t in cands], batch_size))
    zlib_ratio = np.array([len(zlib.compress(t.encode())) / len(t.encode()) for t in cands])
    lower_ratio = log_ppl_lower / np.maximum(log_ppl, 1e-6)
    keep = ((zlib_ratio >= np.quantile(zlib_ratio, filter_quantile))
            & (lower_ratio >= np.quantile(lower_ratio, filter_quantile)) & np.isfinite(log_ppl))
    rows, seen, kept_grams = [], set(), set()
    for i in np.argsort(log_ppl):
        if not keep[i]:
            continue
        text = cands[i]
        norm = re.sub(r"\W+", " ", text.lower()).strip()
        grams = _ngrams(norm.split())
        if norm in seen or grams & kept_grams:
            continue
        seen.add(norm)
        kept_grams |= grams
        words = text.split()
        cut = math.ceil(0.7 * len(words))
        rows.append({"prompt": " ".join(words[:cut]), "target": " ".join(words[cut:]), "text": text,
                     "ppl": float(math.exp(log_ppl[i])), "zlib_ratio": float(zlib_ratio[i]),
                     "lower_ratio": float(lower_ratio[i])})
        if len(rows) >= top_n:
            break
    if cache:
        from lab import runs
        path.parent.mkdir(parents=True, exist_ok=True)
        runs.atomic_write_json(path, {"params": params, "rows": rows})
    return rows


def trouge(model, tokenizer, corpus, *, max_new_tokens: int | None = None, batch_size: int = 16) -> dict:
    """T-Rouge: mean ROUGE-L recall of the model's greedy completion of each prompt against its target."""
    from lab import metrics
    from lab.eval import generate
    if not corpus:
        raise ValueError("trouge: empty corpus")
    prompts = [r["prompt"] for r in corpus]
    n_new = max_new_tokens or max(len(tokenizer(r["target"], add_special_tokens=False)["input_ids"])
                                  for r in corpus) + 8
    outs = generate(model, tokenizer, prompts, max_new_tokens=n_new, batch_size=batch_size)
    recall = [float(metrics.rouge_l_recall(o, r["target"])) for o, r in zip(outs, corpus)]
    return {"trouge": sum(recall) / len(recall), "generations": outs, "recall": recall}


UTILITY_KEYS = [f"{s}_{k}" for s in ("retain", "real_authors", "world_facts")
                for k in ("prob", "rouge", "truth_ratio")]


def utility_with_trouge(metrics: dict, trouge_value: float) -> float:
    """ALKN's MU: harmonic mean of the 9 TOFU utility numbers and T-Rouge (lab.metrics.model_utility)."""
    from lab.metrics import model_utility
    missing = [k for k in UTILITY_KEYS if k not in metrics]
    if missing:
        raise ValueError(f"utility_with_trouge: metrics lack {missing} (a TOFU evaluate() result is needed)")
    return model_utility({**{k: float(metrics[k]) for k in UTILITY_KEYS}, "trouge": float(trouge_value)})
