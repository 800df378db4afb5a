"""lab.geometry: hand-computed combiner examples, flattened references, hypothesis properties,
no host syncs, and 2-process (gloo) sharded equivalence.

Most hand examples use one 3-vector split into 2 tensors (shape (2,) and (1, 1)):
    f = g_f = (1, 1, 0),  r = g_r = (-2, 0, 2)
    <f,r> = -2, ||f||^2 = 2, ||r||^2 = 8, cos = -2 / (sqrt2 * 2 sqrt2) = -1/2.
"""
import math
import os
import socket
from datetime import timedelta

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lab import geometry as G

SQ2 = math.sqrt(2.0)


def grad(a, b, c, dtype=torch.float32):
    return [torch.tensor([a, b], dtype=dtype), torch.tensor([[c]], dtype=dtype)]


def flat(g):  # test-only reference: the flattened vector the library must never build
    return torch.cat([t.reshape(-1).double() for t in g])


def close(g, expected, tol=1e-6):
    assert isinstance(g, list) and [t.shape for t in g] == [(2,), (1, 1)]
    got = flat(g).tolist()
    assert got == pytest.approx(expected, abs=tol), (got, expected)


def val(x):
    assert isinstance(x, torch.Tensor) and x.dim() == 0, x
    return float(x)


F, R = (1.0, 1.0, 0.0), (-2.0, 0.0, 2.0)
ZERO = (0.0, 0.0, 0.0)


# ---------------------------------------------------------------- dot / norm / cos / arithmetic
def test_dot_norm_cos_by_hand():
    f, r = grad(*F), grad(*R)
    assert val(G.dot(f, r)) == -2.0
    assert val(G.norm(r)) == pytest.approx(2 * SQ2)
    assert val(G.cos(f, r)) == pytest.approx(-0.5)
    assert val(G.cos(f, grad(*ZERO))) == 0.0 and val(G.cos(grad(*ZERO), grad(*ZERO))) == 0.0
    assert val(G.norm(grad(*ZERO))) == 0.0


def test_list_arithmetic():
    f, r = grad(*F), grad(*R)
    close(G.add(f, r, alpha=0.5), [0.0, 1.0, 1.0])                     # f + r/2
    close(G.add(f, r, alpha=torch.tensor(-1.0)), [3.0, 1.0, -2.0])     # tensor coefficient
    close(G.scale(r, torch.tensor(0.25)), [-0.5, 0.0, 0.5])
    close(G.zeros_like(r), [0.0, 0.0, 0.0])
    ema = G.zeros_like(r)
    out = G.ema_update_(ema, r, 0.8)                                   # 0.2*0 + 0.8*r
    assert out is ema
    close(ema, [-1.6, 0.0, 1.6])
    G.ema_update_(ema, f, 0.5)                                         # 0.5*(-1.6,0,1.6) + 0.5*(1,1,0)
    close(ema, [-0.3, 0.5, 0.8])


@pytest.mark.parametrize("dtype,rtol", [(torch.float32, 1e-5), (torch.float64, 1e-12),
                                        (torch.bfloat16, 2e-2)])
def test_dot_norm_cos_match_flattened_reference(dtype, rtol):
    gen = torch.Generator().manual_seed(1)
    shapes = [(7, 3), (5,), (2, 2, 4), (1,), (64,)]
    a = [torch.randn(s, generator=gen).to(dtype) for s in shapes]
    b = [torch.randn(s, generator=gen).to(dtype) + 0.5 * x.float().to(dtype) for s, x in zip(shapes, a)]
    fa, fb = flat(a), flat(b)
    for got, ref in [(G.dot(a, b), fa @ fb), (G.norm(a), fa.norm()),
                     (G.cos(a, b), fa @ fb / (fa.norm() * fb.norm()))]:
        assert got.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
        assert float(got) == pytest.approx(float(ref), rel=rtol)


def test_mismatched_lists_are_a_clear_error():
    with pytest.raises(ValueError, match="length"):
        G.dot(grad(*F), grad(*R)[:1])
    with pytest.raises(ValueError, match="tensor 1"):
        G.blur_direction(grad(*F), [torch.zeros(2), torch.zeros(3)])
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        G.gdiff_direction(grad(*F), grad(*R), c=1.5)
    with pytest.raises(ValueError, match="tau"):
        G.clip_to_norm(grad(*F), 0.0)


# ---------------------------------------------------------------- combiners by hand
def test_gdiff_by_hand():
    f, r = grad(*F), grad(*R)
    d, info = G.gdiff_direction(f, r, c=0.25)          # 0.25 r + 0.75 f = (-0.5+0.75, 0.75, 0.5)
    close(d, [0.25, 0.75, 0.5])
    assert info == {}
    d, _ = G.gdiff_direction(f, r, retain_weight=2.0)   # f + 2 r
    close(d, [-3.0, 1.0, 4.0])
    close(G.gdiff_direction(f, r, c=0.0)[0], list(F))   # c = 0: GA only


def test_lossnorm_by_hand():
    f, r = grad(*F), grad(*R)
    # GA loss L_f = -2 (negative NLL), L_r = 0.5: d = r/0.5 + f/2 = (-4,0,4) + (0.5,0.5,0)
    d, info = G.lossnorm_direction(f, r, torch.tensor(-2.0), 0.5)
    close(d, [-3.5, 0.5, 4.0])
    assert val(info["c_f"]) == 0.5 and val(info["c_r"]) == 2.0
    d, info = G.lossnorm_direction(f, r, 0.0, 0.5)      # zero forget loss: its term is skipped
    close(d, [-4.0, 0.0, 4.0])
    assert val(info["c_f"]) == 0.0


def test_rlw_by_hand():
    f, r = grad(*F), grad(*R)
    # torch.randn(2) with seed 0 = (1.5409961, -0.2934289): c_f = 1 / (1 + e^(-0.2934289 - 1.5409961))
    d, info = G.rlw_direction(f, r, generator=torch.Generator().manual_seed(0))
    c_f = 0.8622880236
    assert val(info["c_f"]) == pytest.approx(c_f, abs=1e-6)
    assert val(info["c_r"]) == pytest.approx(1 - c_f, abs=1e-6)
    close(d, [c_f - 2 * (1 - c_f), c_f, 2 * (1 - c_f)], tol=1e-5)   # c_f f + c_r r
    gen = torch.Generator().manual_seed(1)
    draws = [val(G.rlw_direction(f, r, generator=gen)[1]["c_f"]) for _ in range(5)]
    assert len(set(draws)) == 5 and all(0 < c < 1 for c in draws)    # fresh weights every step


def test_pcgrad_by_hand():
    f, r = grad(*F), grad(*R)
    # conflict (<f,r> = -2): f' = f - (-2/8) r = (0.5, 1, 0.5) ; r' = r - (-2/2) f = (-1, 1, 2)
    d, info = G.pcgrad_direction(f, r)
    close(d, [-0.5, 2.0, 2.5])
    assert val(info["conflict"]) == 1.0
    d, info = G.pcgrad_direction(f, grad(0.0, 1.0, 1.0))  # <f, (0,1,1)> = 1 >= 0: plain sum
    close(d, [1.0, 2.0, 1.0])
    assert val(info["conflict"]) == 0.0


def test_pcgrad_ngdiff_closed_form_by_hand():
    """NGDiff 2.2 item 6: c/(1-c) = 1 + <g_F,g_R>/||g_R||^2 with the ascent gradient g_F = -g_f.
    f, r conflict (<f,r> = -2, ||r||^2 = 8): k = 1 + 2/8 = 1.25, c = 1.25/2.25 = 5/9,
    d = (4/9) f + (5/9) r = (4/9 - 10/9, 4/9, 10/9) - only f is projected off r, then rescaled by 1/(1+k)."""
    f, r = grad(*F), grad(*R)
    d, info = G.pcgrad_ngdiff_direction(f, r)
    close(d, [-6 / 9, 4 / 9, 10 / 9])
    assert val(info["c_t"]) == pytest.approx(5 / 9) and val(info["conflict"]) == 1.0
    # the same direction as f projected off r (0.5, 1, 0.5) plus r, over 1 + k
    close(d, [(0.5 - 2) / 2.25, 1 / 2.25, (0.5 + 2) / 2.25])
    # differs from the symmetric form, which also projects r off f
    assert flat(d).tolist() != pytest.approx(flat(G.pcgrad_direction(f, r)[0]).tolist())
    d, info = G.pcgrad_ngdiff_direction(f, grad(0.0, 1.0, 1.0))   # no conflict: c = 1/2, d = (f + r)/2
    close(d, [0.5, 1.0, 0.5])
    assert val(info["c_t"]) == 0.5 and val(info["conflict"]) == 0.0
    z = grad(0.0, 0.0, 0.0)
    close(G.pcgrad_ngdiff_direction(f, z)[0], [0.5, 0.5, 0.0])   # zero g_r: no projection onto it


def test_imtl_g_by_hand():
    f, r = grad(*F), grad(*R)
    # a_r = <f, u_f - u_r> / <f - r, u_f - u_r> = (sqrt2 + 2/(2 sqrt2)) / (3 sqrt2 + 1/sqrt2 + 2/sqrt2)
    #     = (3/sqrt2) / (9/sqrt2) = 1/3 ; d = 2/3 f + 1/3 r = (0, 2/3, 2/3)
    d, info = G.imtl_g_direction(f, r)
    close(d, [0.0, 2 / 3, 2 / 3])
    assert val(info["a_r"]) == pytest.approx(1 / 3) and val(info["a_f"]) == pytest.approx(2 / 3)
    # equal projections: <d,u_f> = (2/3)/sqrt2 = <d,u_r> = (4/3)/(2 sqrt2)
    # parallel gradients (0/0 in the formula): limit a_r = ||f|| / (||f|| + ||2f||) = 1/3
    d, info = G.imtl_g_direction(f, grad(2.0, 2.0, 0.0))
    assert val(info["a_r"]) == pytest.approx(1 / 3)
    close(d, [4 / 3, 4 / 3, 0.0])                        # 2/3 f + 1/3 (2f)


def test_ngdiff_by_hand():
    f, r = grad(*F), grad(*R)
    # f/sqrt2 + r/(2 sqrt2) = (0, 1, 1)/sqrt2 ; c_t = ||f|| / (||f|| + ||r||) = 1/3
    d, info = G.ngdiff_direction(f, r)
    close(d, [0.0, 1 / SQ2, 1 / SQ2])
    assert val(info["norm_f"]) == pytest.approx(SQ2) and val(info["norm_r"]) == pytest.approx(2 * SQ2)
    assert val(info["c_t"]) == pytest.approx(1 / 3)
    assert val(G.dot(f, d)) == pytest.approx(1 / SQ2) and val(G.dot(r, d)) == pytest.approx(SQ2)


def test_blur_by_hand():
    f, r = grad(*F), grad(*R)
    # xi = <f,r>/||f||^2 = -1 ; d = (gamma - xi) f + r
    d, info = G.blur_direction(f, r)                     # gamma 1: 2 f + r = (0, 2, 2)
    close(d, [0.0, 2.0, 2.0])
    assert val(info["xi"]) == -1.0
    d, _ = G.blur_direction(f, r, gamma=0.5)             # 1.5 f + r = (-0.5, 1.5, 2)
    close(d, [-0.5, 1.5, 2.0])
    assert val(G.alignment(f, r, d)["align_f"]) == pytest.approx(0.5)   # A_f = gamma


def test_gru_by_hand():
    f, r = grad(*F), grad(*R)
    # <f, r> = -2 < 0: d = f - (-2/8) r = (0.5, 1, 0.5), <d, r> = -1 + 0 + 1 = 0
    d, info = G.gru_rectify(f, r)
    close(d, [0.5, 1.0, 0.5])
    assert val(info["projected"]) == 1.0
    assert val(info["cos_pre"]) == pytest.approx(-0.5) and val(info["cos_post"]) == pytest.approx(0.0, abs=1e-7)
    # clip to tau 0.5: ||d|| = sqrt(1.5), scale 0.5/sqrt(1.5) = 0.4082483
    d, info = G.gru_rectify(f, r, tau=0.5)
    close(d, [0.2041241, 0.4082483, 0.2041241])
    assert val(info["clip_scale"]) == pytest.approx(0.4082483)
    # no conflict: <(0,1,1), r> = 2 >= 0, d = g_u, cos = 2 / (sqrt2 * 2 sqrt2) = 0.5 before and after
    d, info = G.gru_rectify(grad(0.0, 1.0, 1.0), r, tau=10.0)
    close(d, [0.0, 1.0, 1.0])
    assert val(info["projected"]) == 0.0 and val(info["clip_scale"]) == 1.0
    assert val(info["cos_pre"]) == pytest.approx(0.5) and val(info["cos_post"]) == pytest.approx(0.5)


def test_gru_cos_post_of_a_rounding_level_direction_is_zero():
    # 1-element (hence parallel) opposite gradients: d = g_u - (<g_u,g>/||g||^2) g is pure rounding
    # (5.6e-17 here, of either sign); its "cosine" would be +-1 and is reported as 0
    g_u = [torch.tensor([0.4122299139789227], dtype=torch.float64)]
    ref = [torch.tensor([-6.552430146515258], dtype=torch.float64)]
    d, info = G.gru_rectify(g_u, ref)
    assert abs(float(d[0])) < 1e-15
    assert val(info["cos_pre"]) == -1.0 and val(info["cos_post"]) == 0.0


def test_clip_and_alignment_by_hand():
    d, info = G.clip_to_norm(grad(3.0, 0.0, 4.0), 1.0)   # ||d|| = 5 -> d/5
    close(d, [0.6, 0.0, 0.8])
    assert val(info["clip_scale"]) == pytest.approx(0.2)
    d, info = G.clip_to_norm(grad(3.0, 0.0, 4.0), 10.0)  # already short: unchanged
    close(d, [3.0, 0.0, 4.0])
    a = G.alignment(grad(*F), grad(*R), grad(0.0, 2.0, 2.0))
    # <f,d> = 2, <r,d> = 4 ; A_f = 2/2, A_r = 4/8
    expected = {"cos_fr": -0.5, "align_f": 1.0, "align_r": 0.5, "norm_f": SQ2, "norm_r": 2 * SQ2,
                "norm_d": 2 * SQ2}
    assert {k: pytest.approx(val(v)) for k, v in a.items()} == expected


def test_zero_norm_gradients_fall_back_without_nan():
    f, r, z = grad(*F), grad(*R), grad(*ZERO)
    s = 1 / SQ2
    cases = {  # (combiner call, documented fallback)
        "ngdiff f=0": (lambda: G.ngdiff_direction(z, r), [-s, 0.0, s]),    # r/||r|| only
        "ngdiff r=0": (lambda: G.ngdiff_direction(f, z), [s, s, 0.0]),
        "ngdiff both": (lambda: G.ngdiff_direction(z, z), [0.0] * 3),
        "blur f=0": (lambda: G.blur_direction(z, r, gamma=0.7), list(R)),   # d = g_r
        "blur r=0": (lambda: G.blur_direction(f, z), list(F)),              # gamma f
        "imtl f=0": (lambda: G.imtl_g_direction(z, r), list(R)),            # the other gradient
        "imtl r=0": (lambda: G.imtl_g_direction(f, z), list(F)),
        "imtl both": (lambda: G.imtl_g_direction(z, z), [0.0] * 3),
        "pcgrad f=0": (lambda: G.pcgrad_direction(z, r), list(R)),
        "pcgrad r=0": (lambda: G.pcgrad_direction(f, z), list(F)),
        "gru ref=0": (lambda: G.gru_rectify(f, z, tau=1.0), [s, s, 0.0]),   # no projection, clip
        "gru g_u=0": (lambda: G.gru_rectify(z, r), [0.0] * 3),
        "lossnorm": (lambda: G.lossnorm_direction(z, z, 0.0, 0.0), [0.0] * 3),
        "clip": (lambda: G.clip_to_norm(z, 1.0), [0.0] * 3),
    }
    for name, (call, expected) in cases.items():
        d, info = call()
        close(d, expected)
        for k, v in info.items():
            assert math.isfinite(val(v)), (name, k)
    assert val(G.imtl_g_direction(z, r)[1]["a_r"]) == 1.0
    assert val(G.imtl_g_direction(z, z)[1]["a_r"]) == 0.5
    assert val(G.gru_rectify(f, z)[1]["projected"]) == 0.0
    for a in (G.alignment(z, r, r), G.alignment(z, z, z)):
        assert all(math.isfinite(val(v)) for v in a.values())
        assert val(a["align_f"]) == 0.0 and val(a["cos_fr"]) == 0.0


def test_exactly_opposite_gradients():
    gen = torch.Generator().manual_seed(3)
    f = [torch.randn(4, 3, generator=gen), torch.randn(5, generator=gen)]
    r = [-t for t in f]
    zero = lambda d: all(torch.equal(t, torch.zeros_like(t)) for t in d)
    d, info = G.gru_rectify(f, r)        # projected onto r's orthogonal complement: exactly 0
    assert zero(d) and val(info["projected"]) == 1.0 and val(info["cos_pre"]) == pytest.approx(-1.0)
    assert val(info["cos_post"]) == 0.0
    assert zero(G.pcgrad_direction(f, r)[0])     # f' = f + r = 0 and r' = r + f = 0
    # f/||f|| - f/||f||: zero up to one rounding (the add fuses the second scaling: FMA)
    assert all(t.abs().max() <= 2 * torch.finfo(t.dtype).eps * (a.abs().max() / val(G.norm(f)))
               for t, a in zip(G.ngdiff_direction(f, r)[0], f))
    d, _ = G.gru_rectify_([t.clone() for t in f], r)   # in place on the caller's copy: exactly 0 as well
    assert zero(d)
    d, info = G.imtl_g_direction(f, r)           # a_r = 1/2 (u_f - u_r = 2 u_f), d = (f - f)/2
    assert zero(d) and val(info["a_r"]) == pytest.approx(0.5)
    d, info = G.blur_direction(f, r, gamma=0.5)  # xi = -1: d = (0.5 + 1) f - f = 0.5 f
    assert val(info["xi"]) == pytest.approx(-1.0)
    assert all(torch.allclose(a, 0.5 * b, atol=1e-6) for a, b in zip(d, f))
    assert val(G.cos(f, r)) == pytest.approx(-1.0)


def test_registry_names():
    assert set(G.COMBINERS) == {"gdiff", "lossnorm", "rlw", "pcgrad", "imtl_g", "ngdiff", "blur", "gru"}
    assert G.COMBINERS["blur"] is G.blur_direction and G.COMBINERS["gru"] is G.gru_rectify


# ---------------------------------------------------------------- no host syncs
def _all_combiner_calls(f, r):
    return [
        lambda: G.gdiff_direction(f, r, c=0.3), lambda: G.gdiff_direction(f, r),
        lambda: G.lossnorm_direction(f, r, torch.tensor(-1.5), torch.tensor(0.7)),
        lambda: G.rlw_direction(f, r, generator=torch.Generator().manual_seed(0)),
        lambda: G.pcgrad_direction(f, r), lambda: G.pcgrad_ngdiff_direction(f, r),
        lambda: G.imtl_g_direction(f, r), lambda: G.ngdiff_direction(f, r), lambda: G.blur_direction(f, r, gamma=0.5),
        lambda: G.gru_rectify(f, r, tau=0.1), lambda: G.clip_to_norm(f, 0.1),
    ]


def test_no_host_sync(monkeypatch):
    """On an accelerator nothing here reads a value back to the host. The meta device stands in for one
    (it takes the same non-CPU path; on the CPU, 0-d coefficients are read as numbers: free there)."""
    calls = []
    for name in ("item", "tolist", "numpy", "__bool__", "__float__", "__int__", "__index__"):
        original = getattr(torch.Tensor, name)

        def spy(self, *a, _name=name, _original=original, **kw):
            calls.append(_name)
            return _original(self, *a, **kw)
        monkeypatch.setattr(torch.Tensor, name, spy)
    f = [torch.empty(3, 4, device="meta"), torch.empty(6, device="meta")]
    r = [torch.empty(3, 4, device="meta"), torch.empty(6, device="meta")]
    outs = [call() for call in _all_combiner_calls(f, r)]
    outs.append(G.gru_rectify_(G.scale(f, 1.0), r, tau=0.1))
    outs.append((None, G.update_cosines(f, r, f)))
    outs.append((None, G.alignment(f, r, f)))
    outs.append((None, {"dot": G.dot(f, r), "norm": G.norm(f), "cos": G.cos(f, r)}))
    ema = G.zeros_like(r)
    G.ema_update_(ema, r, 0.8)
    assert calls == []
    for _, info in outs:
        for k, v in info.items():
            assert isinstance(v, torch.Tensor) and v.dim() == 0 and v.dtype == torch.float32, k


# ---------------------------------------------------------------- hypothesis properties (float64)
VALUES = st.one_of(st.just(0.0), st.floats(1e-6, 10), st.floats(-10, -1e-6))


@st.composite
def gradient_lists(draw, n=2):
    """n gradient lists with the same random shapes; float64 values 0 or 1e-6 <= |x| <= 10 (squares
    of far tinier values underflow, and the library then treats the gradient as zero)."""
    shapes = draw(st.lists(st.lists(st.integers(1, 3), min_size=1, max_size=3).map(tuple),
                           min_size=1, max_size=4))
    size = sum(math.prod(s) for s in shapes)
    out = []
    for _ in range(n):
        values = draw(st.lists(VALUES, min_size=size, max_size=size))
        flat_t, pos, g = torch.tensor(values, dtype=torch.float64), 0, []
        for s in shapes:
            g.append(flat_t[pos:pos + math.prod(s)].reshape(s).clone())
            pos += math.prod(s)
        out.append(g)
    return out


PROPS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@PROPS
@given(gradient_lists())
def test_prop_dot_norm_cos_equal_flattened(grads):
    a, b = grads
    fa, fb = flat(a), flat(b)
    assert float(G.dot(a, b)) == pytest.approx(float(fa @ fb), rel=1e-12, abs=1e-12)
    assert float(G.norm(a)) == pytest.approx(float(fa.norm()), rel=1e-12, abs=1e-12)
    if fa.norm() > 0 and fb.norm() > 0:
        assert float(G.cos(a, b)) == pytest.approx(float(fa @ fb / (fa.norm() * fb.norm())), abs=1e-12)


@PROPS
@given(gradient_lists())
def test_prop_gru_rectified_direction_does_not_oppose_reference(grads):
    g_u, ref = grads
    d, info = G.gru_rectify(g_u, ref)
    nu, nr = float(G.norm(g_u)), float(G.norm(ref))
    assert float(G.dot(d, ref)) >= -1e-12 * (nu * nr + 1)
    assert float(info["cos_post"]) >= -1e-9
    fired = float(G.dot(g_u, ref)) < 0
    assert float(info["projected"]) == float(fired)
    if not fired:
        assert all(torch.equal(x, y) for x, y in zip(d, g_u))
    # clipping changes the length only
    dc, ci = G.gru_rectify(g_u, ref, tau=0.5)
    assert float(G.norm(dc)) <= 0.5 + 1e-12
    assert all(torch.allclose(x, float(ci["clip_scale"]) * y) for x, y in zip(dc, d))


@PROPS
@given(gradient_lists(), st.floats(0.0, 2.0))
def test_prop_blur_align_f_is_gamma(grads, gamma):
    g_f, g_r = grads
    d, info = G.blur_direction(g_f, g_r, gamma=gamma)
    nf, nr = float(G.norm(g_f)), float(G.norm(g_r))
    a = G.alignment(g_f, g_r, d)
    if nf > 0:
        tol = 1e-11 * (1 + abs(float(info["xi"])) + nr / nf)   # rounding of <g_f,d> relative to ||g_f||^2
        assert abs(float(a["align_f"]) - gamma) <= tol
        # the g_r part is orthogonal to g_f (Gram-Schmidt): d - gamma g_f is g_r minus its projection
        assert abs(float(G.dot(g_f, G.add(d, g_f, alpha=-gamma)))) <= tol * nf * nf
    else:
        assert all(torch.equal(x, y) for x, y in zip(d, g_r))


@PROPS
@given(gradient_lists())
def test_prop_ngdiff_lemma_4(grads):
    g_f, g_r = grads
    d, _ = G.ngdiff_direction(g_f, g_r)
    tol = 1e-12 * (float(G.norm(g_f)) + float(G.norm(g_r)) + 1)
    assert float(G.dot(g_f, d)) >= -tol and float(G.dot(g_r, d)) >= -tol


@PROPS
@given(gradient_lists())
def test_prop_pcgrad_projected_components(grads):
    g_f, g_r = grads
    d, info = G.pcgrad_direction(g_f, g_r)
    f, r = flat(g_f), flat(g_r)
    fr = float(f @ r)
    if fr < 0:   # f' = f - <f,r>/||r||^2 r, r' = r - <f,r>/||f||^2 f, each projected off the ORIGINAL other
        fp, rp = f - fr / float(r @ r) * r, r - fr / float(f @ f) * f
        scale = float(f.norm() * r.norm()) + 1
        assert abs(float(fp @ r)) <= 1e-11 * scale and abs(float(rp @ f)) <= 1e-11 * scale
        expected = fp + rp
    else:
        expected = f + r
    assert float(info["conflict"]) == float(fr < 0)
    assert torch.allclose(flat(d), expected, rtol=1e-10, atol=1e-10)


@PROPS
@given(gradient_lists())
def test_prop_imtl_g_equal_projections(grads):
    g_f, g_r = grads
    d, info = G.imtl_g_direction(g_f, g_r)
    nf, nr = float(G.norm(g_f)), float(G.norm(g_r))
    assert float(info["a_f"]) + float(info["a_r"]) == pytest.approx(1.0, abs=1e-12)
    assert torch.allclose(flat(d), float(info["a_f"]) * flat(g_f) + float(info["a_r"]) * flat(g_r),
                          atol=1e-10)
    if nf > 0 and nr > 0:
        p_f, p_r = float(G.dot(d, g_f)) / nf, float(G.dot(d, g_r)) / nr
        assert p_f == pytest.approx(p_r, abs=1e-7 * (nf + nr))


@PROPS
@given(gradient_lists(3))
def test_prop_inputs_never_modified_and_outputs_fresh(grads):
    f, r, d0 = grads
    before = [[t.clone() for t in g] for g in grads]
    outs = [call()[0] for call in _all_combiner_calls(f, r)]
    G.alignment(f, r, d0), G.add(f, r), G.scale(f, 2.0)
    for g, b in zip(grads, before):
        assert all(torch.equal(x, y) for x, y in zip(g, b))
    inputs = {t.data_ptr() for g in grads for t in g}
    for d in outs:
        assert isinstance(d, list) and not inputs & {t.data_ptr() for t in d}


# ---------------------------------------------------------------- 2-process sharded equivalence
def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _full_lists():
    gen = torch.Generator().manual_seed(7)
    shapes = [(3, 4), (5,), (2, 3), (7,), (6, 3)]
    f = [torch.randn(s, generator=gen, dtype=torch.float64) for s in shapes]
    r = [torch.randn(s, generator=gen, dtype=torch.float64) - 0.3 * x for s, x in zip(shapes, f)]
    return f, r


def _shard(g, rank):
    """rank 0: tensors 0, 1 and rows 0-2 of tensor 4 ; rank 1: tensors 2, 3 and rows 3-5 of tensor 4."""
    whole = [g[0], g[1]] if rank == 0 else [g[2], g[3]]
    return whole + [g[4][:3] if rank == 0 else g[4][3:]]


def _calls(f, r, group, seed):
    return {
        "gdiff": lambda: G.gdiff_direction(f, r, c=0.3, group=group),
        "lossnorm": lambda: G.lossnorm_direction(f, r, -1.5, 0.7, group=group),
        "rlw": lambda: G.rlw_direction(f, r, generator=torch.Generator().manual_seed(seed), group=group),
        "pcgrad": lambda: G.pcgrad_direction(f, r, group=group),
        "pcgrad_ngdiff": lambda: G.pcgrad_ngdiff_direction(f, r, group=group),
        "imtl_g": lambda: G.imtl_g_direction(f, r, group=group),
        "ngdiff": lambda: G.ngdiff_direction(f, r, group=group),
        "blur": lambda: G.blur_direction(f, r, gamma=0.7, group=group),
        "gru": lambda: G.gru_rectify(f, r, tau=0.5, group=group),
        "clip": lambda: G.clip_to_norm(f, 0.5, group=group),
    }


def _sharded_worker(rank, world, port):
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=60))
    torch.set_num_threads(1)
    try:
        f, r = _full_lists()
        fs, rs, W = _shard(f, rank), _shard(r, rank), dist.group.WORLD
        full_scalars = {"dot": G.dot(f, r), "norm": G.norm(f), "cos": G.cos(f, r), **G.alignment(f, r, f)}
        shard_scalars = {"dot": G.dot(fs, rs, group=W), "norm": G.norm(fs, group=W),
                         "cos": G.cos(fs, rs, group=W), **G.alignment(fs, rs, fs, group=W)}
        local_only = G.dot(fs, rs)   # without the group it is only this rank's partial sum
        assert abs(float(local_only) - float(full_scalars["dot"])) > 1e-3
        for k, v in full_scalars.items():
            assert torch.allclose(shard_scalars[k], v, rtol=1e-12, atol=1e-12), k
        # rank 1 seeds its RLW generator differently: the broadcast from rank 0 must win
        full, sharded = _calls(f, r, None, seed=0), _calls(fs, rs, W, seed=rank)
        for name in full:
            d, info = full[name]()
            ds, infos = sharded[name]()
            for a, b in zip(ds, _shard(d, rank)):
                assert torch.allclose(a, b, rtol=1e-12, atol=1e-12), name
            for k, v in info.items():
                assert torch.allclose(infos[k], v, rtol=1e-12, atol=1e-12), (name, k)
    finally:
        dist.destroy_process_group()


def test_sharded_equals_single_process():
    import torch.multiprocessing as mp
    mp.spawn(_sharded_worker, args=(2, _free_port()), nprocs=2, join=True)


def test_combiners_leave_inputs_alone_and_in_place_variants_match():
    gen = torch.Generator().manual_seed(5)
    f = [torch.randn(3, 4, generator=gen), torch.randn(6, generator=gen)]
    r = [torch.randn(3, 4, generator=gen), torch.randn(6, generator=gen)]
    f0, r0 = [t.clone() for t in f], [t.clone() for t in r]
    outs = [call() for call in _all_combiner_calls(f, r)]
    assert all(torch.equal(a, b) for a, b in zip(f + r, f0 + r0))        # no combiner wrote into g_f, g_r
    assert all(d[0] is not f[0] and d[0] is not r[0] for d, _ in outs)   # each returned its own list
    for tau in (None, 0.1):
        want, want_info = G.gru_rectify(f, r, tau=tau)
        u = [t.clone() for t in f]
        got, got_info = G.gru_rectify_(u, r, tau=tau)
        assert got is u and all(torch.equal(a, b) for a, b in zip(got, want))
        assert {k: val(v) for k, v in got_info.items()} == {k: val(v) for k, v in want_info.items()}
        c = [t.clone() for t in want]
        assert G.clip_to_norm_(c, 0.05)[0] is c
        assert all(torch.equal(a, b) for a, b in zip(c, G.clip_to_norm(want, 0.05)[0]))
