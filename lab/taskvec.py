"""Model arithmetic on parameter lists (METHODS §4): task vectors, TV negation, TRU, UWC calibration.

    tau = task_vector(model, tok, forget, cfg)            # theta_ft - theta (model is left at theta)
    tv_unlearn(model, tok, forget, cfg, lam=1.0)          # theta <- theta - lam * tau        (TV)
    tru_unlearn(model, tok, forget, cfg, n_batches=4, stg=0.75)   # GRU sec. 4, eq. 11-13 (TRU)
    uwc_calibrate(model, theta_org, theta_u, utility_fn, target=0.9)  # GRU App. F (UWC)

Fine-tuning is the engine's one loop (lab.engine.unlearning_loop) with the method "finetune_forget"
(NLL on the forget rows, minimised) or "finetune_esl" (ALKN eq. 6); everything else works on lists of
per-parameter tensors in `model.parameters()` order, in place, with as few full copies as possible.
Under a launcher (`parallel`, lab.distributed) the lists hold the LOCAL tensors (FSDP2 shards under
fsdp, whole tensors under ddp), so the arithmetic is elementwise on each rank's shard and every dot /
norm is a local partial sum all-reduced over the group:

    tv_unlearn / negate_                 1 copy   (theta before fine-tuning)
    task_vector                          2 copies (theta, tau) to restore theta exactly; 1 without restore
    tru                                  3 copies (theta_org, running sum of rectified vectors, the
                                                   reference gradient h_b while it is needed)
    uwc_calibrate                        2 copies (theta_org and theta_u; the model holds theta_alpha)
AdamW state during fine-tuning adds 2 copies (freed when each fine-tuning ends). ALKN (lab.alkn) adds
the score m, G_r (or its int8 sign sketch) and the boolean union mask M.
"""
from __future__ import annotations

import dataclasses

import torch

from lab import distributed, geometry
from lab.engine import (LoopState, StepHooks, UnlearnConfig, _to, accumulate, encode_rows,
                        unlearning_loop)
from lab.methods import Term, get_method
from lab.objectives import ObjectiveContext


# ---------------------------------------------------------------- parameter lists
def trainable(model) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def snapshot(params) -> list[torch.Tensor]:
    """A detached copy of the parameter values (one model copy; under fsdp this rank's shards)."""
    return [distributed.local(p).detach().clone() for p in params]


@torch.no_grad()
def load_values_(params, values) -> None:
    """Copy `values` (a snapshot: local tensors) into the parameters."""
    for p, v in zip(params, values):
        distributed.local(p).copy_(v)


@torch.no_grad()
def negate_(params, theta_prev, lam: float) -> None:
    """In place: theta <- theta_prev - lam * (theta - theta_prev) (ALKN sec. 3.1; TV with lam)."""
    for p, t in zip(params, theta_prev):
        distributed.local(p).mul_(-lam).add_(t, alpha=1.0 + lam)


def _geo_group(parallel):
    # dots and norms sum over the group only when the lists are shards (ddp tensors are whole)
    return parallel.group if parallel is not None and parallel.sharded else None


def _scalar(x) -> float:
    return float(x.item() if isinstance(x, torch.Tensor) else x)


# ---------------------------------------------------------------- engine pieces
def _autocast_dtype(cfg: UnlearnConfig):
    return getattr(torch, cfg.autocast) if cfg.autocast else None


def finetune(model, tokenizer, forget, cfg: UnlearnConfig, *, method="finetune_forget", method_args=None,
             hooks: StepHooks | None = None, run=None, task=None, state: LoopState | None = None,
             progress=False, parallel=None) -> LoopState:
    """Fine-tune `model` on `forget` with the engine loop (cfg.epochs / max_steps / lr / batch_size);
    parallel: a lab.distributed.Parallel, handed to the loop (rows split, gradients reduced as in unlearn)."""
    m, args = get_method(method, **(method_args or {}))
    if m.retain:
        raise ValueError(f"finetune: method {m.name!r} has retain terms; use a forget-only fine-tuning "
                         "method such as 'finetune_forget' or 'finetune_esl'")
    return unlearning_loop(model, tokenizer, forget, [], m, args, cfg, run=run, task=task, hooks=hooks,
                           state=state, progress=progress, parallel=parallel)


def nll_gradient(model, tokenizer, dataset, cfg: UnlearnConfig, rows=None, parallel=None) -> list[torch.Tensor]:
    """Gradient of the mean token NLL over `rows` of a QA/text dataset (all rows by default), at the
    current weights, for the trainable parameters (local tensors). Micro-batches of cfg.eval_batch_size
    rows; under `parallel` each micro-batch is split rows rank::world and the gradient reduced over the
    group (whole under ddp, this rank's shards under fsdp)."""
    rows = list(range(len(dataset))) if rows is None else [int(r) for r in rows]
    if not rows:
        raise ValueError("nll_gradient: no rows")
    par = parallel or distributed.Parallel()
    chunks = [rows[i:i + cfg.eval_batch_size] for i in range(0, len(rows), cfg.eval_batch_size)]
    if len(chunks) > 1 and len(chunks[-1]) < par.world:   # every rank needs a row of every micro-batch
        chunks[-2] += chunks.pop()
    distributed.check_split(len(chunks[-1]), par.world, "nll_gradient: the last micro-batch")
    params = trainable(model)
    device = distributed.local(params[0]).device
    micro = [{"forget": _to(distributed.shard_rows(encode_rows(tokenizer, dataset, chunk, max_length=cfg.max_length),
                                                   par.rank, par.world), device)} for chunk in chunks]
    ctx = ObjectiveContext(args={}, autocast_dtype=_autocast_dtype(cfg))
    was = model.training
    model.eval()  # no dropout: G_r / h_b are gradients of the model as it is
    grads, _ = accumulate(model, params, (Term("ce"),), micro, ctx, {}, group=par.group, sharded=par.sharded)
    model.train(was)
    return [g.detach() for g in grads]


# ---------------------------------------------------------------- task vectors (TV)
def task_vector(model, tokenizer, forget, cfg: UnlearnConfig, *, restore=True, **finetune_kw) -> list[torch.Tensor]:
    """tau = theta_ft - theta of fine-tuning on `forget`. With restore=True the model goes back to theta
    exactly (2 copies: theta and tau; Adam turns even 1-ulp differences of the start into different
    sign-like first steps, so an approximate p - tau restore would not reproduce); with restore=False it
    stays at theta_ft (1 copy: tau is formed in place)."""
    distributed.wrap(model, finetune_kw.get("parallel"), autocast=cfg.autocast)   # fsdp: theta is then shards
    params = distributed.local_list(trainable(model))
    theta = snapshot(params)
    finetune(model, tokenizer, forget, cfg, **finetune_kw)
    with torch.no_grad():
        if not restore:
            for t, p in zip(theta, params):
                t.sub_(p).neg_()
            return theta
        tau = [p.detach() - t for p, t in zip(params, theta)]
        load_values_(params, theta)
    return tau


def tv_unlearn(model, tokenizer, forget, cfg: UnlearnConfig, *, lam: float = 1.0, **finetune_kw) -> dict:
    """TV baseline (METHODS §4): fine-tune on the forget set, theta <- theta - lam * tau. One copy."""
    distributed.wrap(model, finetune_kw.get("parallel"), autocast=cfg.autocast)   # fsdp: theta is then shards
    params = distributed.local_list(trainable(model))
    theta = snapshot(params)
    finetune(model, tokenizer, forget, cfg, **finetune_kw)
    group = _geo_group(finetune_kw.get("parallel"))
    tau_norm = _scalar(geometry.norm([p.detach() - t for p, t in zip(params, theta)], group))
    negate_(params, theta, lam)
    return {"lam": lam, "tau_norm": tau_norm}


# ---------------------------------------------------------------- TRU (GRU sec. 4)
@torch.no_grad()
def rectify_task_vector_(tau, h, group=None) -> dict:
    """TRU eq. 11, in place on tau: min ||T~ - T||^2 s.t. subtracting T~ does not raise the reference
    loss to first order.

    L(theta - T~) - L(theta) ~ -<T~, h> (h = gradient of the reference NLL), so the constraint is
    <T~, h> >= 0. Closed form (the projection of GRU eq. 8, which the garbled eq. 12 means):
    T~ = T - <T,h>/||h||^2 h when <T,h> < 0, else T unchanged. group: the lists are shards (fsdp)."""
    dot, hh = _scalar(geometry.dot(tau, h, group)), _scalar(geometry.dot(h, h, group))
    fired = dot < 0 and hh > 0
    if fired:
        for t, g in zip(tau, h):
            t.sub_(g, alpha=dot / hh)
    return {"dot_before": dot, "dot_after": _scalar(geometry.dot(tau, h, group)), "projected": float(fired)}


def rectify_task_vector(tau, h) -> tuple[list[torch.Tensor], dict]:
    """rectify_task_vector_ on a copy: (T~, info)."""
    out = [t.detach().clone() for t in tau]
    return out, rectify_task_vector_(out, h)


@torch.no_grad()
def tru(params, batches, finetune_fn, reference_grad_fn, *, stg: float, group=None) -> dict:
    """TRU (GRU eq. 11-13) on a parameter list.

    batches: list of row-index lists partitioning D_u. For each batch b: h_b = reference_grad_fn(rest)
    (NLL gradient on D_u minus b at theta_org), T_b = task vector of finetune_fn(b) from theta_org,
    rectified against h_b, normalised to unit norm; finally theta = theta_org - stg * mean_b(Tbar_b).
    Copies: theta_org, the running sum, h_b. params: local tensors (lab.distributed.local_list); group:
    they are shards (fsdp), so norms and dots are summed over it."""
    if len(batches) < 2:
        raise ValueError(f"TRU needs at least 2 batches (the rest of D_u is the reference); got {len(batches)}")
    theta = snapshot(params)
    total = [torch.zeros_like(p) for p in params]
    info = []
    for b, rows in enumerate(batches):
        rest = [r for other in batches[:b] + batches[b + 1:] for r in other]
        with torch.enable_grad():
            h = reference_grad_fn(rest)
            finetune_fn(rows)
        for p, t in zip(params, theta):  # params now hold T_b = theta_ft - theta_org (in place)
            p.sub_(t)
        tau = [p.detach() for p in params]
        tau_norm = _scalar(geometry.norm(tau, group))
        row = rectify_task_vector_(tau, h, group)   # T~_b, still in the parameters
        norm = _scalar(geometry.norm(tau, group))
        if norm > 0:
            for s, t in zip(total, tau):
                s.add_(t, alpha=1.0 / norm)         # Tbar_b = T~_b / ||T~_b||
        row.update(batch=b, rows=len(rows), tau_norm=tau_norm, rect_norm=norm)
        info.append(row)
        del h, tau
        load_values_(params, theta)
    for p, t, s in zip(params, theta, total):   # GRU eq. 13
        p.copy_(t - (stg / len(batches)) * s)
    return {"stg": stg, "n_batches": len(batches), "batches": info}


def tru_unlearn(model, tokenizer, forget, cfg: UnlearnConfig, *, n_batches: int = 4, stg: float = 0.75,
                method="finetune_forget", method_args=None, run=None, task=None, state: LoopState | None = None,
                progress=False, parallel=None) -> dict:
    """TRU on a forget set: random split into n_batches (seed cfg.seed), fine-tuning each with the engine
    (trace rows go to `run`; one LoopState `state` numbers the steps of all batches). parallel: as
    finetune (under fsdp the model is sharded first, so the arithmetic sees the shards)."""
    if not 2 <= n_batches <= len(forget):
        raise ValueError(f"tru: n_batches={n_batches}; valid: 2..{len(forget)} (rows in the forget set)")
    order = torch.randperm(len(forget), generator=torch.Generator().manual_seed(cfg.seed)).tolist()
    batches = [order[i::n_batches] for i in range(n_batches)]

    def finetune_fn(rows):
        finetune(model, tokenizer, forget.select(rows), cfg, method=method, method_args=method_args,
                 run=run, task=task, state=state, progress=progress, parallel=parallel)

    def reference_grad_fn(rows):
        return nll_gradient(model, tokenizer, forget, cfg, rows, parallel=parallel)

    distributed.wrap(model, parallel, autocast=cfg.autocast)   # fsdp: shard before taking the lists
    return tru(distributed.local_list(trainable(model)), batches, finetune_fn, reference_grad_fn, stg=stg,
               group=_geo_group(parallel))


# ---------------------------------------------------------------- UWC (GRU App. F)
@dataclasses.dataclass
class UWCResult:
    alpha: float            # weight of theta_u in alpha*theta_u + (1-alpha)*theta_org
    utility: float          # utility at alpha
    original: float         # utility of theta_org
    goal: float             # target * original
    history: list           # (alpha, utility) of every evaluation, in order


@torch.no_grad()
def uwc_calibrate(model, theta_org, theta_u, utility_fn, *, target: float = 0.9, original: float | None = None,
                  tol: float = 1e-2, max_iter: int = 30) -> UWCResult:
    """Largest alpha in [0, 1] with utility(alpha*theta_u + (1-alpha)*theta_org) >= target * original,
    by bisection (utility assumed to fall as alpha grows). utility_fn(model) -> float; `original` is
    evaluated at alpha=0 when not given. Leaves the model at the calibrated weights."""
    if not 0 < target <= 1:
        raise ValueError(f"uwc: target={target}; valid: a fraction in (0, 1], e.g. 0.85, 0.9, 0.95")
    params = trainable(model)
    history = []

    def at(alpha):
        for p, o, u in zip(params, theta_org, theta_u):
            p.copy_(o + alpha * (u - o))
        value = float(utility_fn(model))
        history.append((alpha, value))
        return value

    if original is None:
        original = at(0.0)
    goal = target * original
    best, best_u = 1.0, at(1.0)
    if best_u < goal:
        lo, hi, best, best_u = 0.0, 1.0, 0.0, original
        for _ in range(max_iter):
            if hi - lo <= tol:
                break
            mid = (lo + hi) / 2
            u = at(mid)
            if u >= goal:
                lo, best, best_u = mid, mid, u
            else:
                hi = mid
    if history[-1][0] != best:
        at(best)
    return UWCResult(alpha=best, utility=best_u, original=original, goal=goal, history=history)


def utility_fn_for(tokenizer, benchmark, *, key="model_utility", **evaluate_kw):
    """utility_fn for uwc_calibrate: lab.eval.evaluate(...)["metrics"][key]."""
    from lab.eval import evaluate

    def fn(model):
        return evaluate(model, tokenizer, benchmark, progress=False, **evaluate_kw)["metrics"][key]
    return fn
