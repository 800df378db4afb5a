"""Gradient geometry on lists of per-parameter tensors: dot/norm/cos, the gradient combiners of
METHODS.md §2 (+ clip, §3) and the alignment diagnostics of §7.

Conventions
  * A "gradient" is a list of per-parameter tensors (same shapes as the trainable parameters).
  * g_f = gradient of the forget objective as a loss to MINIMISE (for GA the loss is -NLL, so g_f is
    the paper's -grad L_F); g_r = gradient of the retain loss. The optimizer steps
    theta <- theta - lr * d, so every combiner returns a descent direction d for both objectives.
  * Global scalars <a,b>, ||a|| are sums over ALL tensors (never per tensor).
  * Every function returns NEW lists and never modifies its inputs, unless its name ends in `_`.
  * Combiners return (d, info): info is a dict of 0-d tensors for the run trace.

Performance rules (these run every step between backward and optimizer step)
  * no flattened copy of the whole gradient (no torch.cat); per-tensor reductions are
    torch.dot(a.reshape(-1), b.reshape(-1)) on views and torch._foreach_norm, stacked and summed;
  * no host syncs: every scalar stays a 0-d tensor on the gradients' device, float32 (float64 when a
    gradient is float64; bf16/fp16 per-tensor partials are cast to float32 before summing). Branches
    are branch-free torch.where / clamp, e.g. GRU's "project only if <g_u, gbar_r> < 0" is the
    coefficient clamp(dot, max=0) / ||gbar_r||^2;
  * d is built with torch._foreach_* ops, one new list per combiner; a 0-d tensor coefficient is read as
    a number on the CPU (no device sync there) so the scaling fuses into the add (fresh gradient-size
    CPU allocations page-fault), and stays a tensor on an accelerator (torch._foreach_mul(list, 0-d)).

Zero-norm guards: a zero gradient never gives NaN. cos = 0 when either norm is 0; A_f/A_r = 0 when the
norm is 0; NGDiff skips a zero-norm term; BLUR with ||g_f|| = 0 returns g_r; PCGrad/GRU do not project
onto a zero gradient; IMTL-G with one zero gradient returns the other; LossNorm skips a zero-loss term.
"Zero" is a squared norm of 0 in the accumulation dtype: a float32 gradient of total norm below ~1e-19
(squares underflow) counts as zero.

Sharding: `group` (a torch.distributed process group, e.g. dist.group.WORLD) on dot/norm and everything
built on them all_reduce(SUM)s the per-rank partial sums before use, so FSDP-style shards (each rank
holding some tensors, or slices of them) give the same scalars as the full gradient; norm =
sqrt(all-reduced sum of squares). All partial sums one function needs go in ONE all_reduce. With
group=None nothing is communicated (DDP gradients are already replicated). Every combiner takes
group= for a uniform signature; gdiff and lossnorm need no global scalar (losses arrive already
global), RLW broadcasts the first rank's draws.

    from lab import geometry
    d, info = geometry.COMBINERS["blur"](g_f, g_r, gamma=1.0)
    diag = geometry.alignment(g_f, g_r, d)    # cos_fr, align_f (== gamma), align_r, norm_f, ...
"""
from __future__ import annotations

import numbers

import torch
import torch.distributed as dist


# ---------------------------------------------------------------- scalar plumbing
def _acc_dtype(tensors) -> torch.dtype:
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _device(tensors):
    return tensors[0].device if len(tensors) else torch.device("cpu")


def _check_pair(a, b, what="a, b"):
    if len(a) != len(b):
        raise ValueError(f"gradient lists {what} differ in length: {len(a)} vs {len(b)} tensors")
    for i, (x, y) in enumerate(zip(a, b)):
        if x.shape != y.shape:
            raise ValueError(f"gradient lists {what} differ at tensor {i}: shape "
                             f"{tuple(x.shape)} vs {tuple(y.shape)}")


def _squared_norm(a, dtype):
    """Local sum of squares of a non-empty list: one read of each tensor (torch._foreach_norm)."""
    return torch.stack(torch._foreach_norm(list(a), 2, dtype=dtype)).square().sum()


def _partial_dots(pairs, dtype, device, squares_by_norm=False):
    """Local sums <a,b> for each (a, b) in pairs, as one 1-d tensor (one entry per pair).
    squares_by_norm: <a,a> as a sum of squared per-tensor norms, one read of a instead of two (memory
    bound: SmolLM2 18 vs 40 ms), equal up to rounding; diagnostics use it, combiners keep exact dots."""
    out = []
    for a, b in pairs:
        if len(a) == 0:
            out.append(torch.zeros((), dtype=dtype, device=device))
            continue
        if squares_by_norm and a is b:
            out.append(_squared_norm(a, dtype))
            continue
        # per-tensor dot on views; bf16/fp16 partials cast to float32 before summing
        out.append(torch.stack([torch.dot(x.reshape(-1), y.reshape(-1)).to(dtype)
                                for x, y in zip(a, b)]).sum())
    return torch.stack(out)


# Below this many elements in all, CPU gradient arithmetic runs on one thread: each op on a small
# tensor costs less than waking OpenMP's pool (PASSIVE waiting, lab/__init__.py). tiny (1.3M): 38 dots
# take 2.3 ms on 2 threads, 0.24 ms on one. SmolLM2 (135M) keeps all threads (dots 64 vs 88 ms).
FEW_THREADS_BELOW = 1 << 24


class few_threads:
    """Context: one intra-op thread while the list ops on `tensors` run, when they are small and on CPU."""

    def __init__(self, tensors):
        self.active = (len(tensors) > 0 and tensors[0].device.type == "cpu"
                       and sum(t.numel() for t in tensors) < FEW_THREADS_BELOW)
        self.threads = None

    def __enter__(self):
        if self.active and torch.get_num_threads() > 1:
            self.threads = torch.get_num_threads()
            torch.set_num_threads(1)
        return self

    def __exit__(self, *exc):
        if self.threads is not None:
            torch.set_num_threads(self.threads)
            self.threads = None


def _all_reduce(t, group):
    if group is not None:
        dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group)
    return t


def _sums(pairs, group=None, squares_by_norm=False):
    """Global <a,b> for every pair: local partial sums, then ONE all_reduce over `group`."""
    tensors = [t for a, b in pairs for t in (*a, *b)]
    for a, b in pairs:
        _check_pair(a, b)
    return _all_reduce(_partial_dots(pairs, _acc_dtype(tensors), _device(tensors), squares_by_norm), group)


def _div(num, den):
    """num / den, 0 where den == 0 (never NaN/inf from a zero denominator)."""
    ok = den > 0
    return torch.where(ok, num / torch.where(ok, den, torch.ones_like(den)), torch.zeros_like(num))


def _sqrt(x):
    return x.clamp(min=0).sqrt()  # squared norms from dots can round to -0.0


def _cos(ab, aa, bb):
    return _div(ab, _sqrt(aa) * _sqrt(bb)).clamp(-1.0, 1.0)  # product of roots: no overflow of aa*bb


def _coef(c):
    """A 0-d tensor coefficient as a Python number when it lives on the CPU (reading it there is free,
    no device sync), so foreach ops fuse the scaling into their one pass with no temporary list: fresh
    CPU allocations of gradient size page-fault (GRU on SmolLM2: 1.9 s of muls per step -> 0.4 s).
    On an accelerator it stays a tensor: no host sync."""
    if isinstance(c, torch.Tensor) and c.device.type == "cpu":
        return c.item()
    return c


def _add_scaled_(out, c, g):
    """In place: out += c * g (c a number or a 0-d tensor)."""
    c = _coef(c)
    if isinstance(c, numbers.Number):
        torch._foreach_add_(out, list(g), alpha=c)
    else:
        tmp = torch._foreach_mul(list(g), c)
        torch._foreach_add_(out, tmp)
        del tmp


def _lincomb(*terms):
    """sum_k c_k * g_k for (c_k, g_k) pairs; c a Python number or a 0-d tensor. Allocates ONE new list
    (plus, on an accelerator, one temporary per tensor coefficient after the first)."""
    terms = [(_coef(c), g) for c, g in terms]
    unit = [i for i, (c, _) in enumerate(terms) if isinstance(c, numbers.Number) and c == 1.0]
    if unit:  # a unit-coefficient term first: it fuses with the next one (sum is order-free)
        terms.insert(0, terms.pop(unit[0]))
    (c0, g0), rest = terms[0], terms[1:]
    if rest and unit and isinstance(rest[0][0], numbers.Number):
        c1, g1 = rest.pop(0)   # a + c1*b in one pass
        out = list(torch._foreach_add(list(g0), list(g1), alpha=c1))
    else:
        out = list(torch._foreach_mul(list(g0), c0))
    for c, g in rest:
        _add_scaled_(out, c, g)
    return out


# ---------------------------------------------------------------- dot / norm / cos
@torch.no_grad()
def dot(a, b, group=None) -> torch.Tensor:
    """<a, b> summed over all tensors (and over the ranks of `group`): a 0-d tensor."""
    return _sums([(a, b)], group)[0]


@torch.no_grad()
def norm(a, group=None) -> torch.Tensor:
    """||a|| over all tensors (and ranks): sqrt of the (all-reduced) sum of per-tensor squared norms."""
    dtype, device = _acc_dtype(a), _device(a)
    if len(a) == 0:
        sq = torch.zeros((), dtype=dtype, device=device)
    else:
        sq = _squared_norm(a, dtype)
    return _sqrt(_all_reduce(sq, group))


@torch.no_grad()
def cos(a, b, group=None) -> torch.Tensor:
    """cos(a, b); 0 when either norm is 0."""
    ab, aa, bb = _sums([(a, b), (a, a), (b, b)], group)
    return _cos(ab, aa, bb)


# ---------------------------------------------------------------- list arithmetic
@torch.no_grad()
def add(a, b, alpha=1.0):
    """a + alpha * b (alpha a number or a 0-d tensor)."""
    _check_pair(a, b)
    return _lincomb((1.0, a), (alpha, b))


@torch.no_grad()
def scale(a, c):
    """c * a (c a number or a 0-d tensor)."""
    return list(torch._foreach_mul(list(a), c))


@torch.no_grad()
def zeros_like(a):
    return [torch.zeros_like(t) for t in a]


@torch.no_grad()
def ema_update_(ema, g, gamma):
    """In place: ema = (1 - gamma) * ema + gamma * g (GRU eq. 9, METHODS §2 GRU row). Returns ema."""
    if not 0.0 <= gamma <= 1.0:
        raise ValueError(f"EMA gamma must be in [0, 1], got {gamma!r}")
    _check_pair(ema, g, "ema, g")
    torch._foreach_lerp_(ema, list(g), gamma)  # ema + gamma * (g - ema)
    return ema


# ---------------------------------------------------------------- combiners (METHODS §2)
@torch.no_grad()
def gdiff_direction(g_f, g_r, c=None, retain_weight=1.0, group=None):
    """Extended GDiff (NGDiff eq. 1-3): d = c*g_r + (1-c)*g_f ; c None -> GradDiff d = g_f + w*g_r."""
    _check_pair(g_f, g_r, "g_f, g_r")
    if c is None:
        return _lincomb((1.0, g_f), (retain_weight, g_r)), {}
    if not 0.0 <= c <= 1.0:
        raise ValueError(f"gdiff c must be in [0, 1] (1 = GD on retain, 0 = GA), got {c!r}")
    return _lincomb((1.0 - c, g_f), (c, g_r)), {}


@torch.no_grad()
def lossnorm_direction(g_f, g_r, loss_f, loss_r, group=None):
    """LossNorm (NGDiff 2.2 item 4, c_t/(1-c_t) = L_F/L_R): d = g_r/|L_r| + g_f/|L_f|.

    A zero loss skips its term. Losses are numbers or 0-d tensors (already global under sharding).
    |L_r| rather than L_r: identical for the usual non-negative retain losses, and a negative one
    must not flip the retain direction."""
    _check_pair(g_f, g_r, "g_f, g_r")
    dtype, device = _acc_dtype([*g_f, *g_r]), _device(g_f)
    lf, lr = (torch.as_tensor(x, device=device).detach().to(dtype).abs() for x in (loss_f, loss_r))
    one = torch.ones((), dtype=dtype, device=device)
    cf, cr = _div(one, lf), _div(one, lr)
    return _lincomb((cf, g_f), (cr, g_r)), {"c_f": cf, "c_r": cr}


@torch.no_grad()
def rlw_direction(g_f, g_r, generator=None, group=None):
    """RLW (NGDiff 2.2 item 5): (c_f, c_r) = softmax of two N(0,1) draws; d = c_f*g_f + c_r*g_r.

    Draws on the generator's device (default: the gradients'); with `group` the draws of the group's
    first rank are broadcast so every shard uses the same weights."""
    _check_pair(g_f, g_r, "g_f, g_r")
    dtype, device = _acc_dtype([*g_f, *g_r]), _device(g_f)
    gen_device = generator.device if generator is not None else device
    lam = torch.randn(2, generator=generator, device=gen_device)
    c = torch.softmax(lam, 0).to(device=device, dtype=dtype, non_blocking=True)
    if group is not None:
        dist.broadcast(c, group_src=0, group=group)
    return _lincomb((c[0], g_f), (c[1], g_r)), {"c_f": c[0], "c_r": c[1]}


@torch.no_grad()
def pcgrad_direction(g_f, g_r, group=None):
    """PCGrad (NGDiff 2.2 item 6, Yu et al. 2020): where <g_f,g_r> < 0 project each gradient off the
    ORIGINAL other one, then sum:
        d = g_f - min(<f,r>,0)/||g_r||^2 g_r  +  g_r - min(<f,r>,0)/||g_f||^2 g_f."""
    fr, ff, rr = _sums([(g_f, g_r), (g_f, g_f), (g_r, g_r)], group)
    neg = fr.clamp(max=0)
    # d = (1 - neg/ff) g_f + (1 - neg/rr) g_r ; neg = 0 whenever a norm is 0
    d = _lincomb((1 - _div(neg, ff), g_f), (1 - _div(neg, rr), g_r))
    return d, {"conflict": (fr < 0).to(fr.dtype)}


@torch.no_grad()
def pcgrad_ngdiff_direction(g_f, g_r, group=None):
    """PCGrad as the closed form NGDiff 2.2 item 6 prints (pcgrad_form "ngdiff", METHODS §2): only the
    forget gradient is projected off g_r, in the scalarisation d = c_t g_r + (1 - c_t) g_f with
    c_t/(1-c_t) = 1 + <g_F,g_R>/||g_R||^2 where they conflict. The paper's g_F is the ascent gradient
    (-g_f here), so the ratio is k = 1 - min(<g_f,g_r>, 0)/||g_r||^2 >= 1 and c_t = k/(1+k):
    d = (g_f + k g_r)/(1+k) = (g_f projected off g_r + g_r)/(1+k). No conflict (or g_r = 0): d = (g_f + g_r)/2."""
    fr, rr = _sums([(g_f, g_r), (g_r, g_r)], group)
    k = 1 - _div(fr.clamp(max=0), rr)
    c_t = k / (1 + k)
    return _lincomb((1 - c_t, g_f), (c_t, g_r)), {"c_t": c_t, "conflict": (fr < 0).to(fr.dtype)}


@torch.no_grad()
def imtl_g_direction(g_f, g_r, group=None):
    """IMTL-G closed form for two tasks (NGDiff 2.2 item 7; Liu et al. 2021): d = a_f g_f + a_r g_r,
    a_f + a_r = 1, with equal projections of d on u_f = g_f/||g_f|| and u_r = g_r/||g_r||:
        a_r = <g_f, u_f - u_r> / <g_f - g_r, u_f - u_r>.
    Written in Gram scalars: numerator ||g_f|| (1 - cos), denominator (||g_f|| + ||g_r||)(1 - cos), so
    a_r = ||g_f|| / (||g_f|| + ||g_r||) in the limit cos -> 1 (parallel gradients: 0/0), which is used
    there. One zero gradient: d = the other gradient (its projection on a zero u is 0, so the
    equal-projection condition would force d = 0); both zero: a_f = a_r = 1/2, d = 0."""
    fr, ff, rr = _sums([(g_f, g_r), (g_f, g_f), (g_r, g_r)], group)
    nf, nr = _sqrt(ff), _sqrt(rr)
    num = nf - _div(fr, nr)                                  # <g_f, u_f - u_r>
    den = nf + nr - _div(fr, nr) - _div(fr, nf)              # <g_f - g_r, u_f - u_r>
    tol = torch.finfo(ff.dtype).eps ** 0.5 * (nf + nr)      # |1 - cos| below sqrt(eps): limit form
    half = torch.full_like(ff, 0.5)
    a_r = torch.where(den > tol, _div(num, den), _div(nf, nf + nr))
    a_r = torch.where(nr == 0, torch.zeros_like(a_r), a_r)   # g_r = 0: d = g_f
    a_r = torch.where(nf == 0, torch.where(nr == 0, half, torch.ones_like(a_r)), a_r)  # g_f = 0: d = g_r
    a_f = 1 - a_r
    return _lincomb((a_f, g_f), (a_r, g_r)), {"a_f": a_f, "a_r": a_r}


@torch.no_grad()
def ngdiff_direction(g_f, g_r, group=None):
    """NGDiff (NGDiff sec. 3.2): d = g_r/||g_r|| + g_f/||g_f||, a zero-norm term skipped.
    Lemma 4: <g_f, d> >= 0 and <g_r, d> >= 0 (Cauchy-Schwarz). c_t = weight on g_r after rescaling
    to sum 1 = ||g_f|| / (||g_f|| + ||g_r||) (METHODS §7 trace)."""
    ff, rr = _sums([(g_f, g_f), (g_r, g_r)], group)
    nf, nr = _sqrt(ff), _sqrt(rr)
    one = torch.ones_like(nf)
    d = _lincomb((_div(one, nf), g_f), (_div(one, nr), g_r))
    return d, {"norm_f": nf, "norm_r": nr, "c_t": _div(nf, nf + nr)}


@torch.no_grad()
def clip_to_norm(d, tau, group=None):
    """Scale d to norm tau when ||d|| > tau (GRU eq. 10 / Alg. 1 l. 13-15, METHODS §3 clip)."""
    s = _clip_scale(d, tau, group)
    return list(torch._foreach_mul(list(d), _coef(s))), {"clip_scale": s}


@torch.no_grad()
def clip_to_norm_(d, tau, group=None):
    """clip_to_norm in place (d is the caller's temporary)."""
    s = _clip_scale(d, tau, group)
    torch._foreach_mul_(d, _coef(s))
    return d, {"clip_scale": s}


def _clip_scale(d, tau, group):
    if not tau > 0:
        raise ValueError(f"clip norm tau must be > 0, got {tau!r}")
    n = norm(d, group)
    return torch.where(n > tau, tau / torch.where(n > tau, n, torch.ones_like(n)), torch.ones_like(n))


@torch.no_grad()
def gru_rectify(g_u, g_r_ref, tau=None, group=None):
    """GRU Alg. 1 l. 8-15 / eq. 8: d = g_u - min(<g_u,gbar>,0)/||gbar||^2 * gbar (projection only when
    they conflict; none onto a zero gbar), then clip to norm tau if tau is not None.
    g_r_ref = gbar_r, the EMA of retain gradients kept by the caller (ema_update_, eq. 9).
    info: cos_pre = cos(g_u, gbar), cos_post = cos(d before clip, gbar) (>= 0 up to rounding),
    projected = 1.0 if the projection fired else 0.0."""
    return _gru_rectify(g_u, g_r_ref, tau, group, inplace=False)


@torch.no_grad()
def gru_rectify_(g_u, g_r_ref, tau=None, group=None):
    """gru_rectify building d in g_u's own tensors (g_u a temporary of the caller: one list fewer)."""
    return _gru_rectify(g_u, g_r_ref, tau, group, inplace=True)


def _gru_rectify(g_u, g_r_ref, tau, group, inplace):
    _check_pair(g_u, g_r_ref, "g_u, g_r_ref")
    ur, rr, uu = _sums([(g_u, g_r_ref), (g_r_ref, g_r_ref), (g_u, g_u)], group)
    coef = _div(ur.clamp(max=0), rr)  # rr from the same dot as ur: g_u = -gbar gives coef -1 exactly
    if inplace:
        d = g_u
        _add_scaled_(d, -coef, g_r_ref)
    else:
        d = _lincomb((1.0, g_u), (-coef, g_r_ref))
    dr, dd = _sums([(d, g_r_ref), (d, d)], group)  # measured on the actual d, not assumed
    # a d at rounding level of g_u (g_u ~ anti-parallel to gbar) has no meaningful direction: cos 0
    meaningful = dd > torch.finfo(dd.dtype).eps * uu
    cos_post = torch.where(meaningful, _cos(dr, dd, rr), torch.zeros_like(dr))
    info = {"cos_pre": _cos(ur, uu, rr), "cos_post": cos_post, "projected": (ur < 0).to(ur.dtype)}
    if tau is not None:
        d, clip_info = clip_to_norm_(d, tau, group)   # d is new (or the caller's temporary) either way
        info.update(clip_info)
    return d, info


@torch.no_grad()
def blur_direction(g_f, g_r, gamma=1.0, group=None):
    """BLUR eq. 14: d = gamma*g_f + g_r - xi*g_f, xi = <g_f,g_r>/||g_f||^2 (Gram-Schmidt: g_r minus its
    projection on g_f); ||g_f|| = 0 -> d = g_r. Then A_f = <g_f,d>/||g_f||^2 = gamma exactly (eq. 8)."""
    fr, ff = _sums([(g_f, g_r), (g_f, g_f)], group)
    xi = _div(fr, ff)
    c_f = torch.where(ff > 0, gamma - xi, torch.zeros_like(xi))
    return _lincomb((c_f, g_f), (1.0, g_r)), {"xi": xi}


# ---------------------------------------------------------------- diagnostics (METHODS §7)
@torch.no_grad()
def alignment(g_f, g_r, d, group=None, *, d_coef=None) -> dict:
    """cos_fr = cos(g_f, g_r); align_f = <g_f,d>/||g_f||^2, align_r = <g_r,d>/||g_r||^2 (BLUR eq. 8:
    A > 0 means theta - lr*d improves that objective to first order); norm_f, norm_r, norm_d.
    0 where undefined (zero norm), never NaN. One all_reduce under `group`.
    d_coef=(a, b): the caller knows d = a*g_f + b*g_r (every combiner but PCGrad and GRU; see
    lab.methods.direction_coefficients), so <g_f,d>, <g_r,d> come from the Gram matrix of g_f, g_r:
    3 norms + 1 dot instead of 6 dots (SmolLM2: a dot is a 40 ms read of 2 x 0.5 GB, a norm 18 ms).
    Same values up to rounding."""
    # ||d|| is measured even with d_coef: a*<f,d> + b*<r,d> cancels to rounding noise when d ~ 0
    pairs = [(g_f, g_f), (g_r, g_r), (d, d), (g_f, g_r)]
    if d_coef is None:
        pairs += [(g_f, d), (g_r, d)]
    else:
        _check_pair(g_f, d, "g_f, d")
    sums = _sums(pairs, group, squares_by_norm=True)
    ff, rr, dd, fr = sums[:4]
    if d_coef is None:
        fd, rd = sums[4], sums[5]
    else:  # d = a g_f + b g_r: <g_f,d>, <g_r,d> follow from the Gram matrix of (g_f, g_r)
        a, b = (torch.as_tensor(c, dtype=ff.dtype, device=ff.device) for c in d_coef)
        fd, rd = a * ff + b * fr, a * fr + b * rr
    return {"cos_fr": _cos(fr, ff, rr), "align_f": _div(fd, ff), "align_r": _div(rd, rr),
            "norm_f": _sqrt(ff), "norm_r": _sqrt(rr), "norm_d": _sqrt(dd)}


@torch.no_grad()
def update_cosines(descent, g_f, g_r=None, *, norm_f=None, norm_r=None, group=None) -> dict:
    """cos_update_f = cos(descent, g_f), cos_update_r = cos(descent, g_r) for the realised update
    descent = theta_old - theta_new (METHODS §7). norm_f / norm_r: ||g_f||, ||g_r|| when the caller has
    them already (from alignment), saving a pass over each gradient. One all_reduce under `group`."""
    grads = {"f": (g_f, norm_f), "r": (g_r, norm_r)} if g_r is not None else {"f": (g_f, norm_f)}
    pairs = [(descent, descent)] + [(descent, g) for g, _ in grads.values()]
    pairs += [(g, g) for g, n in grads.values() if n is None]
    sums = iter(_sums(pairs, group, squares_by_norm=True))
    norm_u = _sqrt(next(sums))
    dots = {k: next(sums) for k in grads}
    return {f"cos_update_{k}": _div(dots[k], norm_u * (n.to(norm_u.dtype) if n is not None else _sqrt(next(sums))))
            .clamp(-1.0, 1.0) for k, (g, n) in grads.items()}


# The engine looks combiners up by name (lab.methods.combine). "gru" takes (g_u, g_r_ref, tau).
COMBINERS = {
    "gdiff": gdiff_direction,
    "lossnorm": lossnorm_direction,
    "rlw": rlw_direction,
    "pcgrad": pcgrad_direction,
    "imtl_g": imtl_g_direction,
    "ngdiff": ngdiff_direction,
    "blur": blur_direction,
    "gru": gru_rectify,
}
