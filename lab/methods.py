"""Named unlearning methods = objectives + a gradient combiner (+ modifiers), found by name.

A method says which objective terms make the forget gradient g_f and which make the retain gradient
g_r (each term: objective name, which batch it reads, weight), how g_f and g_r become the direction d
(`combiner`), and its hyper-parameters with defaults. The engine (lab.engine) does the rest.

    get_method("NPO+KL")          # names are case/punctuation-insensitive: npo_kl, NPO-KL, npo+kl
    get_method("GRU-SimNPO+GD")
    get_method("gdiff(0.1)")      # extended GDiff with c = 0.1
    get_method("lossnorm+autolr") # any method + AutoLR (NGDiff Alg. 1)
    list_methods()                # table of every method with its pieces

Sign convention (lab.geometry): g_f is the gradient of the forget objective as a loss to MINIMISE
(e.g. ga = -NLL), g_r of the retain loss; the optimizer steps theta <- theta - lr * d.
"""
from __future__ import annotations

import dataclasses
import re

import torch

from lab import geometry


@dataclasses.dataclass(frozen=True)
class Term:
    objective: str           # lab.objectives.OBJECTIVES key
    source: str = "forget"   # "forget" or "retain" batch
    weight: str | float = 1.0  # a number or the name of a hyper-parameter (e.g. "retain_weight")


@dataclasses.dataclass(frozen=True)
class Method:
    name: str
    forget: tuple[Term, ...]          # terms summed into g_f
    retain: tuple[Term, ...]          # terms summed into g_r
    combiner: str = "sum"             # "sum" (d = g_f + g_r, one gradient buffer suffices) or COMBINERS key
    defaults: dict = dataclasses.field(default_factory=dict)
    source: str = ""                  # paper / equation
    trainable: str | None = None      # "rmu": only the RMU layers' MLP output projections train
    autolr: bool = False              # NGDiff Alg. 1 learning-rate search (lab.engine.autolr_probe)
    paper_run: dict = dataclasses.field(default_factory=dict)  # the paper's run settings (lr, max_steps)

    @property
    def separate_gradients(self) -> bool:
        """Does d need g_f and g_r separately (two backward passes per step)?"""
        return self.combiner != "sum"


FORGET, RETAIN = "forget", "retain"
GA, CE = Term("ga"), Term("ce", RETAIN, "retain_weight")
NPO, SIMNPO, WGA = Term("npo"), Term("simnpo"), Term("wga")
UNDIAL, CEU, SATIMP = Term("undial"), Term("ceu"), Term("satimp")
KL = Term("kl", RETAIN, "retain_weight")
CE1 = Term("ce", RETAIN)  # unweighted retain NLL (combiners that weigh or normalise g_r themselves)

# Options METHODS.md names, one entry each: valid values, the default first. Every method that uses one
# has it in its defaults, so each run's saved config (method_args) records it even when not passed.
CHOICES = {
    "kl_form": ("forward", "reverse_answer"),   # KL(p_ref||p_theta), non-pad positions | KL(p_theta||p_ref), answers
    "simnpo_margin": ("paper", "authors"),      # delta (BLUR eq. 5) | beta*delta (SimNPO code, open-unlearning)
    "pcgrad_form": ("symmetric", "ngdiff"),     # Yu et al. 2020 | NGDiff 2.2 item 6's closed form
}
# an option value that swaps the objective a term computes: {option: {value: {objective: replacement}}}
OPTION_OBJECTIVES = {"kl_form": {"reverse_answer": {"kl": "kl_reverse_answer"}}}

NPO_ARGS = {"beta": 0.1}
KL_ARGS = {"kl_form": "forward"}
SIMNPO_ARGS = {"beta": 2.5, "delta": 0.0, "simnpo_margin": "paper"}
UNDIAL_ARGS = {"beta": 10.0}                  # UNDIAL (open-unlearning UNDIAL.yaml)
SATIMP_ARGS = {"beta1": 5.0, "beta2": 1.0}    # SatImp (open-unlearning SatImp.yaml)
# PDU: the dual weight lambda on the retain constraint L_r <= retain_eps starts at dual_init and takes a
# dual ascent step of size dual_step every step (open-unlearning PDU: eps 0.3 for TOFU, step 1)
PDU_ARGS = {"dual_init": 1.0, "retain_eps": 0.3, "dual_step": 1.0}
# RMU as WMDP's (BLUR App. C): layer 7 of a 32-layer 7B model with layers 5-7 trainable, c 6.5, alpha
# 1200. rmu_layer None: layer 7 scaled to the model's depth (fit_to_model), rmu_layers None: l-2..l.
RMU_ARGS = {"rmu_layer": None, "rmu_layers": None, "rmu_c": 6.5, "rmu_alpha": 1200.0}
GRU_ARGS = {"gamma": 0.8, "tau": None}  # GRU App. D: e.g. gamma 0.8, tau 1e-3 (Phi, TOFU)

METHODS: dict[str, Method] = {}


def _add(m: Method, *aliases: str) -> None:
    for key in (m.name, *aliases):
        METHODS[key] = m


# ---------------------------------------------------------------- GA / GradDiff / NPO family (sum)
_add(Method("ga", (GA,), (), source="gradient ascent (METHODS §1)"))
_add(Method("ga_rt", (GA,), (CE,), defaults={"retain_weight": 1.0},
            source="GradDiff: GA on forget + NLL on retain (NGDiff eq. 1)"), "graddiff", "gd")
_add(Method("ga_kl", (GA,), (KL,), defaults={**KL_ARGS, "retain_weight": 1.0}, source="GA + KL to theta_0"))
_add(Method("npo", (NPO,), (), defaults=dict(NPO_ARGS), source="NPO (NGDiff eq. 7, BLUR eq. 4)"))
_add(Method("npo_gd", (NPO,), (CE,), defaults={**NPO_ARGS, "retain_weight": 1.0},
            source="NPO + retain NLL"), "npo_rt")
_add(Method("npo_kl", (NPO,), (KL,), defaults={**NPO_ARGS, **KL_ARGS, "retain_weight": 1.0}, source="NPO + KL"))
_add(Method("simnpo", (SIMNPO,), (), defaults=dict(SIMNPO_ARGS), source="SimNPO (BLUR eq. 5)"))
_add(Method("simnpo_gd", (SIMNPO,), (CE,), defaults={**SIMNPO_ARGS, "retain_weight": 1.0},
            source="SimNPO + retain NLL"), "simnpo_rt")
_add(Method("wga", (WGA,), (), defaults={"alpha": 1.0}, source="weighted GA (GRU baseline)"))
_add(Method("dpo_rt", (Term("dpo"),), (CE,), defaults={"beta": 0.1, "retain_weight": 1.0},
            source="DPO, idk preferred over the forget answer, + retain NLL (ALKN baseline)"), "dpo")
_add(Method("idk", (Term("idk"),), (), source="NLL of 'I don't know' answers on forget questions"))
_add(Method("idk_rt", (Term("idk"),), (CE,), defaults={"retain_weight": 1.0}, source="IdK + retain NLL"))
_add(Method("rmu", (Term("rmu"),), (Term("rmu_retain", RETAIN, "rmu_alpha"),), defaults=dict(RMU_ARGS),
            source="RMU (BLUR eq. 20; WMDP)", trainable="rmu"))

# ---------------------------------------------------------------- open-unlearning's methods (METHODS §1)
_add(Method("undial", (UNDIAL,), (), defaults=dict(UNDIAL_ARGS),
            source="UNDIAL: self-distillation on adjusted logits (Dong et al. 2024; open-unlearning UNDIAL)"))
_add(Method("undial_gd", (UNDIAL,), (CE,), defaults={**UNDIAL_ARGS, "retain_weight": 1.0},
            source="UNDIAL + retain NLL (open-unlearning UNDIAL, retain_loss_type NLL)"), "undial_rt")
_add(Method("ceu", (CEU,), (), source="CE-U: cross-entropy unlearning (Yang et al. 2025, arXiv 2503.01224; "
            "open-unlearning CEU)"), "ce_u")
_add(Method("satimp", (SATIMP,), (), defaults=dict(SATIMP_ARGS),
            source="SatImp: saturation x importance token reweighting (open-unlearning SatImp)"))
_add(Method("satimp_gd", (SATIMP,), (CE,), defaults={**SATIMP_ARGS, "retain_weight": 0.1},
            source="SatImp + retain NLL, alpha 0.1 (open-unlearning SatImp)"), "satimp_rt")
# the retain term's weight is the dual variable: dual_init at the first step, then combiner state
_add(Method("pdu", (Term("pdu"),), (Term("ce", RETAIN, "dual_init"),), "pdu", dict(PDU_ARGS),
            "PDU: primal-dual unlearning, logit-margin flattening s.t. retain NLL <= eps (open-unlearning PDU)"))

# ---------------------------------------------------------------- multi-task combiners (NGDiff 2.2)
_add(Method("gdiff", (GA,), (CE1,), "gdiff", {"c": 0.5}, "extended GDiff d = c g_r + (1-c) g_f (NGDiff eq. 3)"))
_add(Method("lossnorm", (GA,), (CE1,), "lossnorm", source="LossNorm (NGDiff 2.2 item 4)"))
_add(Method("rlw", (GA,), (CE1,), "rlw", source="random loss weighting (NGDiff 2.2 item 5)"))
_add(Method("pcgrad", (GA,), (CE1,), "pcgrad", {"pcgrad_form": "symmetric"},
            "PCGrad (Yu et al. 2020; NGDiff 2.2 item 6 as pcgrad_form ngdiff)"))
_add(Method("imtl_g", (GA,), (CE1,), "imtl_g", source="IMTL-G (NGDiff 2.2 item 7)"))
_add(Method("ngdiff", (GA,), (CE1,), "ngdiff", source="NGDiff d = g_r/|g_r| + g_f/|g_f| (NGDiff sec. 3.2)"))
AUTOLR_ARGS = {"autolr_every": 10, "autolr_max_factor": None}  # NGDiff Remark 3.2: K = 10


def with_autolr(m: Method) -> Method:
    """Method + AutoLR (NGDiff Alg. 1; Table 3 pairs it with GDiff, NPO, LossNorm and NGDiff): the same
    pieces, with the lr set every autolr_every steps from probes of the retain loss along the update
    (the retain NLL for forget-only methods, METHODS §3). get_method("<name>+autolr") builds it."""
    if m.autolr:
        raise ValueError(f"method {m.name!r} already has AutoLR")
    return dataclasses.replace(m, name=f"{m.name}_autolr", defaults={**m.defaults, **AUTOLR_ARGS},
                               source=f"{m.source} + AutoLR (NGDiff Alg. 1)", autolr=True)


_add(with_autolr(METHODS["ngdiff"]))

# ---------------------------------------------------------------- GRU over a base (GRU Alg. 1)
# g_u = gradient of the base method's loss; the retain gradient whose EMA rectifies it is always the
# retain NLL. `retain_in_update`: the base's own loss contains that same retain NLL (GD-style bases),
# so g_u = g_f + retain_weight * g_r and the retain gradient is computed once.
GRU_BASES = {
    "ga": ((GA,), False, {}), "wga": ((WGA,), False, {"alpha": 1.0}), "npo": ((NPO,), False, NPO_ARGS),
    "gd": ((GA,), True, {}), "npo_kl": ((NPO, KL), False, {**NPO_ARGS, **KL_ARGS}),
    "npo_gd": ((NPO,), True, NPO_ARGS), "simnpo_gd": ((SIMNPO,), True, SIMNPO_ARGS),
    "undial": ((UNDIAL,), False, UNDIAL_ARGS), "undial_gd": ((UNDIAL,), True, UNDIAL_ARGS),
    "ceu": ((CEU,), False, {}), "satimp": ((SATIMP,), False, SATIMP_ARGS),
    "satimp_gd": ((SATIMP,), True, {**SATIMP_ARGS, "retain_weight": 0.1}),
}
for base, (terms, in_update, args) in GRU_BASES.items():
    defaults = {**GRU_ARGS, "retain_weight": 1.0, **args, "retain_in_update": in_update}
    _add(Method(f"gru_{base}", terms, (CE1,), "gru", defaults, f"GRU over {base} (GRU Alg. 1, eq. 8-9)"),
         *([f"gru_ga_rt", "gru_graddiff"] if base == "gd" else []),
         *(["gru_npo_rt"] if base == "npo_gd" else []))

# ---------------------------------------------------------------- BLUR (BLUR eq. 14)
_add(Method("blur_npo", (NPO,), (CE1,), "blur", {**NPO_ARGS, "gamma": 1.0}, "BLUR-NPO (BLUR eq. 14)"))
_add(Method("blur_ga", (GA,), (CE1,), "blur", {"gamma": 1.0}, "BLUR-GA (BLUR eq. 14)"))
_add(Method("blur_simnpo", (SIMNPO,), (CE1,), "blur", {**SIMNPO_ARGS, "gamma": 1.0}, "BLUR-SimNPO"))
_add(Method("blur_undial", (UNDIAL,), (CE1,), "blur", {**UNDIAL_ARGS, "gamma": 1.0}, "BLUR over UNDIAL"))
_add(Method("blur_ceu", (CEU,), (CE1,), "blur", {"gamma": 1.0}, "BLUR over CE-U"))
_add(Method("blur_satimp", (SATIMP,), (CE1,), "blur", {**SATIMP_ARGS, "gamma": 1.0}, "BLUR over SatImp"))
_add(Method("blur_rmu", (Term("rmu"),), (Term("rmu_retain", RETAIN, "rmu_alpha"),), "blur",
            {**RMU_ARGS, "gamma": 0.00125}, "BLUR-RMU (BLUR eq. 14 + eq. 20; WMDP's RMU settings, BLUR App. C)",
            trainable="rmu", paper_run={"lr": 4e-2, "max_steps": 150}))

# ---------------------------------------------------------------- fine-tuning ON the forget set (task vectors)
# Building blocks of model arithmetic (lab.taskvec, lab.alkn, lab.continual): these LEARN the forget set;
# the task vector theta_ft - theta is then subtracted. Run through `lab continual --method tv|alkn`.
_add(Method("finetune_forget", (Term("ce"),), (),
            source="task-vector fine-tuning: NLL on forget, minimised (METHODS §4; TV, TRU)"))
_add(Method("finetune_esl", (Term("esl"),), (), defaults={"esl_s": 10.0, "esl_form": "paper", "esl_k": 1.5},
            source="ALKN task-vector fine-tuning with entropic soft labels (ALKN eq. 6)"))

ENGINE_ARGS = ("autolr_every", "autolr_max_factor")


def normalise_name(name: str) -> str:
    return re.sub(r"[\s+\-]+", "_", name.strip().lower())


def get_method(name: str, **overrides) -> tuple[Method, dict]:
    """Look up a method by name -> (Method, args with defaults filled and overrides validated)."""
    key = normalise_name(name)
    autolr = key.endswith("_autolr") and key not in METHODS
    key = key.removesuffix("_autolr") if autolr else key
    match = re.fullmatch(r"gdiff\(([0-9.]+)\)", key)
    if match:
        key, overrides = "gdiff", {"c": float(match.group(1)), **overrides}
    if key not in METHODS:
        raise ValueError(f"unknown method {name!r}; valid: {', '.join(sorted(METHODS))} "
                         "(case and +/- insensitive; gdiff(c) sets c; a '+autolr' suffix adds AutoLR)")
    method = with_autolr(METHODS[key]) if autolr else METHODS[key]
    unknown = set(overrides) - set(method.defaults)
    if unknown:
        raise ValueError(f"method {method.name!r}: unknown options {sorted(unknown)}; "
                         f"valid: {sorted(method.defaults) or 'none'}")
    args = {**method.defaults, **overrides}
    if method.combiner == "gdiff" and not 0.0 <= args["c"] <= 1.0:
        raise ValueError(f"gdiff: c={args['c']} must lie in [0, 1]")
    for option, valid in CHOICES.items():
        if option in args and args[option] not in valid:
            raise ValueError(f"method {method.name!r}: {option}={args[option]!r}; valid: {', '.join(valid)}")
        swap = OPTION_OBJECTIVES.get(option, {}).get(args.get(option), {})
        if swap:  # e.g. kl_form reverse_answer: the kl terms compute kl_reverse_answer (its own units)
            terms = lambda ts: tuple(dataclasses.replace(t, objective=swap.get(t.objective, t.objective)) for t in ts)
            method = dataclasses.replace(method, forget=terms(method.forget), retain=terms(method.retain))
    return method, args


def fit_to_model(method: Method, args: dict, model) -> dict:
    """args with the model-dependent defaults filled in, so the run's config records what was used.
    RMU: rmu_layer None -> WMDP's layer 7 of 32 scaled to this depth, round(7 * n_layers / 32), at
    least 2 (three layers train) and at most the last layer (a 7B model's 32 layers: 7; SmolLM2's 30: 7;
    the tiny preset's 4: 2); rmu_layers None -> l-2..l (the MLP down-projections WMDP trains)."""
    if method.trainable != "rmu":
        return args
    n = model.config.num_hidden_layers
    layer = args["rmu_layer"]
    if layer is None:
        layer = min(n - 1, max(2, round(7 * n / 32)))
    if not 0 <= layer < n:
        raise ValueError(f"method {method.name!r}: rmu_layer={layer}; valid: 0..{n - 1} (the model has {n} layers)")
    layers = args["rmu_layers"] if args["rmu_layers"] is not None else list(range(max(0, layer - 2), layer + 1))
    return {**args, "rmu_layer": int(layer), "rmu_layers": [int(x) for x in layers]}


def list_methods():
    """One row per method (aliases folded): pieces and defaults, for notebooks and `lab methods`."""
    import pandas as pd
    seen, rows = set(), []
    for key, m in METHODS.items():
        if m.name in seen:
            continue
        seen.add(m.name)
        aliases = [k for k, v in METHODS.items() if v is m and k != m.name]
        fmt = lambda terms: " + ".join(f"{t.objective}@{t.source}" for t in terms)
        rows.append({"method": m.name, "aliases": ", ".join(aliases), "forget": fmt(m.forget),
                     "retain": fmt(m.retain), "combiner": m.combiner, "defaults": m.defaults,
                     "paper_run": m.paper_run or "", "source": m.source})
    return pd.DataFrame(rows)


# ---------------------------------------------------------------- combiner adapters
def retain_term_weights(method: Method, args: dict) -> tuple[float, list[float]]:
    """(lambda, w): g_r is the gradient of sum_i w_i * retain term i, d puts lambda on g_r, and
    lambda * w_i is each term's weight in the method. When the retain terms share one weight (a number
    or a hyper-parameter name such as retain_weight), lambda is that weight and every w_i = 1: g_r is
    the gradient of the UNWEIGHTED retain objective (METHODS §7, BLUR eq. 8). Terms with different
    weights keep them in g_r (lambda = 1), so d stays exact."""
    weights = [float(args[t.weight]) if isinstance(t.weight, str) else float(t.weight) for t in method.retain]
    if len({t.weight for t in method.retain}) == 1:
        return weights[0], [1.0] * len(weights)
    return 1.0, weights


def retain_weight(method: Method, args: dict, state: dict | None = None):
    """lambda, the weight d puts on the (unweighted) g_r: combiner state["retain_weight"] when a method
    keeps a dynamic one there (e.g. a primal-dual multiplier, a number or a 0-d tensor), else the
    retain terms' shared weight from args (retain_term_weights). GRU applies its retain_weight inside
    g_u (and reads it the same way), never to the g_r its EMA averages."""
    if method.combiner == "gru" or not method.retain:
        return 1.0
    if state is not None and "retain_weight" in state:
        return state["retain_weight"]
    return retain_term_weights(method, args)[0]


def combine(method: Method, args: dict, g_f, g_r, losses: dict, state: dict, generator=None, group=None):
    """g_f, g_r (lists of tensors; g_r may be empty) -> (d, info). `state` persists across steps.
    group: sharded gradients (FSDP2 local shards): global scalars are all-reduced over it.
    g_r and losses["loss_r"] are of the unweighted retain objective: the retain weight lambda
    (retain_weight) is applied here, so d is the method's direction exactly."""
    c = method.combiner
    lam = retain_weight(method, args, state)
    if c == "sum":
        return (geometry.add(g_f, g_r, alpha=lam) if g_r else g_f), {}
    if c == "pdu":
        return pdu_direction(args, g_f, g_r, losses["loss_r"], state, lam)
    if c != "gru" and g_r and not (isinstance(lam, (int, float)) and lam == 1.0):
        g_r = geometry.scale(g_r, lam)   # combiners read the weighted retain gradient and loss
        losses = {**losses, "loss_r": losses["loss_r"] * lam}
    if c == "gdiff":
        return geometry.gdiff_direction(g_f, g_r, c=args["c"], group=group)
    if c == "lossnorm":
        return geometry.lossnorm_direction(g_f, g_r, losses["loss_f"], losses["loss_r"], group=group)
    if c == "rlw":
        return geometry.rlw_direction(g_f, g_r, generator=generator, group=group)
    if c == "pcgrad" and args.get("pcgrad_form") == "ngdiff":
        return geometry.pcgrad_ngdiff_direction(g_f, g_r, group=group)
    if c in ("pcgrad", "imtl_g", "ngdiff"):
        return geometry.COMBINERS[c](g_f, g_r, group=group)
    if c == "blur":
        return geometry.blur_direction(g_f, g_r, gamma=args["gamma"], group=group)
    if c == "gru":
        # GRU Alg. 1 lines 5-12: g_u = base-loss gradient; EMA of retain gradients (eq. 9); rectify (eq. 8)
        g_u = geometry.add(g_f, g_r, alpha=lam_gru(args, state)) if args["retain_in_update"] else g_f
        if args["gamma"] is None:
            reference = g_r
        else:
            if "retain_grad_ema" not in state:
                state["retain_grad_ema"] = geometry.zeros_like(g_r)
            geometry.ema_update_(state["retain_grad_ema"], g_r, args["gamma"])
            reference = state["retain_grad_ema"]
        # g_u = g_f + w g_r is our own temporary: rectify it in place (one gradient-size list fewer)
        rectify = geometry.gru_rectify_ if args["retain_in_update"] else geometry.gru_rectify
        return rectify(g_u, reference, tau=args["tau"], group=group)
    raise ValueError(f"unknown combiner {c!r}; valid: sum, pdu, {', '.join(sorted(geometry.COMBINERS))}")


def pdu_direction(args: dict, g_f, g_r, loss_r, state: dict, lam):
    """Primal-dual unlearning (open-unlearning PDU): d = g_f + lambda g_r, lambda the dual weight on the
    retain constraint L_r <= retain_eps (L_r the unweighted retain NLL of this step); then the dual ascent
    lambda <- max(0, lambda + dual_step * (L_r - retain_eps)) into state["retain_weight"], the weight of
    the next step (a 0-d tensor: no host sync). info: the lambda this d used, as `dual_retain_weight`."""
    lam = torch.as_tensor(lam, dtype=torch.float32, device=loss_r.device)
    d = geometry.add(g_f, g_r, alpha=lam)
    violation = loss_r.detach().float() - args["retain_eps"]
    state["retain_weight"] = (lam + args["dual_step"] * violation).clamp(min=0)
    return d, {"dual_retain_weight": lam, "retain_violation": violation}


def lam_gru(args: dict, state: dict | None):
    """GRU's weight on g_r inside g_u (GD-style bases): combiner state first, as retain_weight."""
    return state["retain_weight"] if state is not None and "retain_weight" in state else args["retain_weight"]


def direction_coefficients(method: Method, args: dict, info: dict, state: dict | None = None):
    """(a, b) with d = a*g_f + b*g_r (g_r unweighted, as combine reads it) for the direction `combine`
    just returned (its `info`), or None where d is not such a combination of this step's g_f, g_r
    (PCGrad: coefficients not reported; GRU: the EMA reference). Lets geometry.alignment skip three
    passes over the gradients. `state`: the combiner state combine was given (a dynamic retain weight)."""
    if method.combiner == "pdu":   # the lambda d used (state already holds the next step's)
        return 1.0, info["dual_retain_weight"]
    ab = _weighted_coefficients(method, args, info)
    return None if ab is None else (ab[0], ab[1] * retain_weight(method, args, state))


def _weighted_coefficients(method: Method, args: dict, info: dict):
    c = method.combiner
    if c == "sum":
        return 1.0, 1.0
    if c == "gdiff":
        return (1.0, 1.0) if args["c"] is None else (1.0 - args["c"], args["c"])   # NGDiff eq. 1-3
    if c in ("lossnorm", "rlw"):
        return info["c_f"], info["c_r"]
    if c == "imtl_g":
        return info["a_f"], info["a_r"]
    if c == "pcgrad" and "c_t" in info:   # NGDiff's closed form: d = (1 - c_t) g_f + c_t g_r
        return 1 - info["c_t"], info["c_t"]
    if c == "ngdiff":   # 1/||g||, 0 for a zero-norm (skipped) term, as ngdiff_direction builds d
        return tuple(geometry._div(torch.ones_like(n), n) for n in (info["norm_f"], info["norm_r"]))
    if c == "blur":     # BLUR eq. 14; with ||g_f|| = 0 the g_f term vanishes whatever its coefficient
        return args["gamma"] - info["xi"], 1.0
    return None
