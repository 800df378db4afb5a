"""LoRA adapters (peft) for unlearning runs (METHODS §9 "Adapters").

The engine trains whatever has requires_grad, so wrapping the model with peft makes the gradient lists
g_f, g_r (and every combiner and diagnostic on them) the adapter parameters alone. Evaluation and saved
weights use the merged model, built on a copy so the training model (and its base weights) stay as
they are and training continues unchanged after a mid-run evaluation.

    spec = parse_spec("r=16,alpha=32,dropout=0,targets=q_proj,k_proj,v_proj,o_proj")
    model = wrap(model, spec)            # base frozen, adapters trainable (B = 0: same outputs as base)
    plain = merged_copy(model)           # a transformers model with W + (alpha/r) B A
"""
import contextlib
import copy

import torch

DEFAULTS = {"r": 16, "alpha": 32, "dropout": 0.0, "targets": ["q_proj", "k_proj", "v_proj", "o_proj"]}


def parse_spec(spec) -> dict | None:
    """'r=16,alpha=32,dropout=0,targets=q_proj,k_proj' (or a dict, or None) -> the full adapter config.
    Names after targets= without '=' are more target modules."""
    if spec is None or spec is False or spec == "":
        return None
    if isinstance(spec, str):
        items, key = {}, None
        for part in (p.strip() for p in spec.split(",") if p.strip()):
            if "=" in part:
                key, value = (s.strip() for s in part.split("=", 1))
                items[key] = [value] if key == "targets" else value
            elif key == "targets":
                items["targets"].append(part)
            else:
                raise ValueError(f"--lora {spec!r}: {part!r} is not KEY=VALUE; valid keys: {', '.join(DEFAULTS)}")
        spec = items
    if not isinstance(spec, dict):
        raise ValueError(f"lora={spec!r}: give 'r=16,alpha=32,dropout=0,targets=q_proj,v_proj' or a dict")
    unknown = sorted(set(spec) - set(DEFAULTS))
    if unknown:
        raise ValueError(f"lora: unknown key(s) {', '.join(unknown)}; valid: {', '.join(DEFAULTS)}")
    out = {**DEFAULTS, **spec}
    try:
        out["r"], out["alpha"], out["dropout"] = int(out["r"]), float(out["alpha"]), float(out["dropout"])
    except (TypeError, ValueError):
        raise ValueError(f"lora: r must be an integer, alpha and dropout numbers; got r={out['r']!r}, "
                         f"alpha={out['alpha']!r}, dropout={out['dropout']!r}") from None
    if out["r"] < 1 or not 0 <= out["dropout"] < 1:
        raise ValueError(f"lora: need r >= 1 and 0 <= dropout < 1; got r={out['r']}, dropout={out['dropout']}")
    targets = out["targets"]
    out["targets"] = [targets] if isinstance(targets, str) else [str(t) for t in targets]
    if not out["targets"]:
        raise ValueError("lora: targets is empty; name the linear modules to adapt, e.g. targets=q_proj,v_proj")
    return out


def linear_names(model) -> list[str]:
    """The distinct last names of the model's linear modules (what `targets` may name)."""
    return sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules()
                   if isinstance(m, torch.nn.Linear) and name})


def wrap(model, spec: dict, seed: int = 0):
    """The model with LoRA adapters on `spec['targets']` (a peft model; the base weights frozen).
    A's random init is drawn from `seed` (not the global generator), so a config gives one run."""
    from peft import LoraConfig, get_peft_model
    valid = linear_names(model)
    missing = [t for t in spec["targets"] if t not in valid]
    if missing:
        raise ValueError(f"lora: target module(s) {', '.join(missing)} not in the model; "
                         f"its linear modules: {', '.join(valid)}")
    config = LoraConfig(r=spec["r"], lora_alpha=spec["alpha"], lora_dropout=spec["dropout"],
                        target_modules=list(spec["targets"]), bias="none", task_type="CAUSAL_LM")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return get_peft_model(model, config)


def is_wrapped(model) -> bool:
    from peft import PeftModel
    return isinstance(model, PeftModel)


def merged_copy(model):
    """A plain transformers model with the adapters merged in (the model itself if not wrapped)."""
    if not is_wrapped(model):
        return model
    was = model.training
    out = copy.deepcopy(model).merge_and_unload()
    model.train(was)
    return out.train(was)


def base_copy(model):
    """A frozen copy of the base model without adapters (the reference theta_0 of KL / NPO objectives)."""
    if not is_wrapped(model):
        return copy.deepcopy(model)
    return copy.deepcopy(model).unload()


def adapters_off(model):
    """Context: the base model's outputs (peft's disable_adapter; a no-op when not wrapped)."""
    return model.disable_adapter() if is_wrapped(model) else contextlib.nullcontext()


def save_adapter(model, path) -> None:
    """Write the adapter weights and adapter_config.json to `path` (peft's save_pretrained)."""
    model.save_pretrained(path)
