"""lab.taskvec: negation arithmetic, TRU rectification and its first-order property, UWC bisection,
task vectors through the engine on the tiny preset."""
import math

import pytest
import torch

from lab import taskvec
from lab.engine import UnlearnConfig
from lab.methods import get_method
from lab.objectives import get_objective


def test_negate_hand_values():
    p = [torch.nn.Parameter(torch.tensor([1.0, 2.0])), torch.nn.Parameter(torch.tensor([[3.0]]))]
    prev = [torch.tensor([0.0, 1.0]), torch.tensor([[1.0]])]
    taskvec.negate_(p, prev, 0.8)   # theta = prev - 0.8 (p - prev)
    assert p[0].tolist() == pytest.approx([-0.8, 0.2]) and p[1].item() == pytest.approx(-0.6)


def test_rectification_hand_values():
    # conflict: <T, h> = -1 < 0 -> T~ = T - (<T,h>/||h||^2) h = [1, 0] + 0.5 [-1, -1]
    rect, info = taskvec.rectify_task_vector([torch.tensor([1.0, 0.0])], [torch.tensor([-1.0, -1.0])])
    assert rect[0].tolist() == pytest.approx([0.5, -0.5])
    assert info["projected"] == 1.0 and info["dot_before"] == pytest.approx(-1.0)
    assert info["dot_after"] == pytest.approx(0.0, abs=1e-7)
    # no conflict: unchanged
    rect, info = taskvec.rectify_task_vector([torch.tensor([1.0, 1.0])], [torch.tensor([1.0, 0.0])])
    assert rect[0].tolist() == [1.0, 1.0] and info["projected"] == 0.0
    # zero reference gradient: nothing to project on
    rect, info = taskvec.rectify_task_vector([torch.tensor([1.0, -2.0])], [torch.zeros(2)])
    assert rect[0].tolist() == [1.0, -2.0] and info["projected"] == 0.0


# ---------------------------------------------------------------- TRU on a toy regression
def _toy(seed=0):
    """Linear regression y = x . w* + noise with a SHARED direction: fitting one batch also lowers the
    loss on the others, so raw task vectors conflict with the rest-of-D_u gradient."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(24, 5, generator=g) + torch.tensor([2.0, 0, 0, 0, 0])
    y = x @ torch.tensor([1.0, -1.0, 0.5, 0.0, 2.0]) + 0.1 * torch.randn(24, generator=g)
    w = torch.nn.Parameter(torch.zeros(5))
    return x, y, w


def _loss(x, y, w, rows):
    rows = torch.tensor(rows)
    return ((x[rows] @ w - y[rows]) ** 2).mean()


def _grad(x, y, w, rows):
    w0 = w.detach().clone().requires_grad_(True)
    return [torch.autograd.grad(_loss(x, y, w0, rows), w0)[0]]


def _finetune(x, y, w, rows, steps=20, lr=0.02):
    for _ in range(steps):
        g = _grad(x, y, w, rows)[0]
        with torch.no_grad():
            w.sub_(lr * g)


def test_tru_first_order_property_and_eq13():
    x, y, w = _toy()
    batches = [list(range(0, 8)), list(range(8, 16)), list(range(16, 24))]
    theta = w.detach().clone()
    # by hand: T_b, h_b, rectified, normalised
    expected = torch.zeros(5)
    conflicts = 0
    for b, rows in enumerate(batches):
        rest = [r for o in batches[:b] + batches[b + 1:] for r in o]
        h = _grad(x, y, w, rest)
        _finetune(x, y, w, rows)
        tau = [w.detach() - theta]
        with torch.no_grad():
            w.copy_(theta)
        conflicts += float(taskvec.geometry.dot(tau, h)) < 0
        rect, info = taskvec.rectify_task_vector(tau, h)
        # first order: d/de L_rest(theta - e T~) at 0 = -<T~, h> <= 0, checked by finite differences
        for vec, must_not_raise in ((rect[0], True), (tau[0], False)):
            eps = 1e-3
            with torch.no_grad():
                slope = (_loss(x, y, theta - eps * vec, rest) - _loss(x, y, theta + eps * vec, rest)) / (2 * eps)
            if must_not_raise:
                assert slope <= 1e-4 * float(vec.norm() * h[0].norm())
            elif info["projected"]:
                assert slope > 0          # the raw task vector WOULD raise the reference loss
        expected += rect[0] / rect[0].norm()
    assert conflicts >= 1                 # the toy really exercises the projection
    out = taskvec.tru([w], batches, lambda rows: _finetune(x, y, w, rows),
                      lambda rows: _grad(x, y, w, rows), stg=0.6)
    assert torch.allclose(w.detach(), theta - 0.6 * expected / 3, atol=1e-6)   # GRU eq. 13
    assert all(r["dot_after"] >= -1e-6 * max(1.0, abs(r["dot_before"])) for r in out["batches"])
    assert sum(r["projected"] for r in out["batches"]) == conflicts


def test_tru_needs_two_batches():
    x, y, w = _toy()
    with pytest.raises(ValueError, match="at least 2 batches"):
        taskvec.tru([w], [[0, 1]], lambda r: None, lambda r: None, stg=0.5)


# ---------------------------------------------------------------- UWC
def test_uwc_bisection_hits_its_target():
    model = torch.nn.Linear(3, 2)
    theta_org = [p.detach().clone() for p in model.parameters()]
    g = torch.Generator().manual_seed(0)
    direction = [torch.randn(p.shape, generator=g) for p in theta_org]
    norm = math.sqrt(sum(float(d.pow(2).sum()) for d in direction))
    theta_u = [o + d / norm for o, d in zip(theta_org, direction)]      # ||theta_u - theta_org|| = 1

    def utility(m):   # 1 at theta_org, falling with the distance: U(alpha) = 1 / (1 + alpha^2)
        dist = sum(float((p.detach() - o).pow(2).sum()) for p, o in zip(m.parameters(), theta_org))
        return 1.0 / (1.0 + dist)

    res = taskvec.uwc_calibrate(model, theta_org, theta_u, utility, target=0.9, tol=1e-3)
    alpha_star = math.sqrt(1 / 0.9 - 1)                                 # U(alpha*) = 0.9 exactly
    assert res.original == pytest.approx(1.0) and res.goal == pytest.approx(0.9)
    assert res.alpha <= alpha_star and alpha_star - res.alpha <= 1e-3
    assert res.utility >= res.goal and utility(model) == pytest.approx(res.utility)   # model left at alpha
    # a target the unlearned model already meets: alpha = 1, two evaluations only
    res = taskvec.uwc_calibrate(model, theta_org, theta_u, utility, target=0.45)   # U(1) = 0.5
    assert res.alpha == 1.0 and len(res.history) == 2
    with pytest.raises(ValueError, match="target=1.5"):
        taskvec.uwc_calibrate(model, theta_org, theta_u, utility, target=1.5)


# ---------------------------------------------------------------- through the engine (tiny preset)
@pytest.fixture(scope="module")
def tiny():
    from lab.data import tofu_subset
    from lab.models import load_model
    bench = tofu_subset(n_retain_authors=1, n_forget_authors=1)
    model, tok = load_model("tiny", seed=0)
    return model, tok, bench


def _cfg(**kw):
    return UnlearnConfig(**{**dict(method="finetune_forget", lr=1e-3, batch_size=4, max_steps=2, max_length=96,
                                   eval_batch_size=8), **kw})


def test_finetune_methods_are_registered():
    m, args = get_method("finetune_esl")
    assert [t.objective for t in m.forget] == ["esl"] and not m.retain and args["esl_s"] == 10.0
    assert "ref_token_logprob" in get_objective("esl").needs
    assert [t.objective for t in get_method("finetune_forget")[0].forget] == ["ce"]


def test_task_vector_and_tv_negation_on_tiny(tiny):
    model, tok, bench = tiny
    params = taskvec.trainable(model)
    theta = taskvec.snapshot(params)
    forget = bench.forget.select(range(8))
    tau = taskvec.task_vector(model, tok, forget, _cfg())
    assert float(taskvec.geometry.norm(tau)) > 0
    assert all(torch.allclose(p, t, atol=1e-6) for p, t in zip(params, theta))   # restored
    info = taskvec.tv_unlearn(model, tok, forget, _cfg(), lam=0.5)                # same seed: same tau
    assert info["tau_norm"] == pytest.approx(float(taskvec.geometry.norm(tau)), rel=1e-4)
    assert all(torch.allclose(p, t - 0.5 * d, atol=1e-6) for p, t, d in zip(params, theta, tau))
    taskvec.load_values_(params, theta)


def test_tru_unlearn_on_tiny(tiny):
    model, tok, bench = tiny
    params = taskvec.trainable(model)
    theta = taskvec.snapshot(params)
    out = taskvec.tru_unlearn(model, tok, bench.forget.select(range(8)), _cfg(max_steps=1), n_batches=2, stg=0.1)
    assert len(out["batches"]) == 2
    step = math.sqrt(sum(float((p.detach() - t).pow(2).sum()) for p, t in zip(params, theta)))
    assert 0 < step <= 0.1 + 1e-5     # ||stg * mean of unit vectors|| <= stg
    for row in out["batches"]:
        assert row["dot_after"] >= -1e-6 * max(1.0, abs(row["dot_before"]))
    with pytest.raises(ValueError, match="n_batches=1"):
        taskvec.tru_unlearn(model, tok, bench.forget.select(range(8)), _cfg(), n_batches=1)
    taskvec.load_values_(params, theta)
