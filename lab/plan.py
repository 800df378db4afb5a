"""`lab plan`: predicted memory per device of one unlearning step, before launching it.

Parameter shapes are exact (the HF model built on the meta device from a public config); the saved
activations are counted on the meta device too (a forward under saved_tensors_hooks, on 1- and
2-layer copies of the model: saved = head + layers * per-layer). Which gradient-size lists are alive
at the peak follows lab.engine._step: separate-gradient methods hold g_f while g_r accumulates in
.grad (then d beside them, unless the combiner rectifies in place); single-gradient methods hold one.
dtype bf16 = mixed precision: frozen weights and compute in bf16, trainable master weights, gradients
and AdamW state in fp32 (FSDP2's MixedPrecisionPolicy, reduce in fp32).
"""
import contextlib
import json

import torch

GiB = 2 ** 30
_LLAMA = dict(model_type="llama", hidden_act="silu", tie_word_embeddings=False, rms_norm_eps=1e-5)
CONFIGS = {  # public configs of the papers' models (config.json on the hub), architecture fields only
    "llama-2-7b": dict(_LLAMA, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=32, vocab_size=32000,
                       max_position_embeddings=4096),
    "llama-3.1-8b": dict(_LLAMA, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                         num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                         max_position_embeddings=131072),
    "llama-3.2-1b": dict(_LLAMA, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                         num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                         max_position_embeddings=131072, tie_word_embeddings=True),
    "zephyr-7b-beta": dict(model_type="mistral", hidden_act="silu", hidden_size=4096, intermediate_size=14336,
                           num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                           vocab_size=32000, max_position_embeddings=32768, tie_word_embeddings=False),
    "phi-1.5": dict(model_type="phi", hidden_size=2048, intermediate_size=8192, num_hidden_layers=24,
                    num_attention_heads=32, vocab_size=51200, max_position_embeddings=2048,
                    partial_rotary_factor=0.5, tie_word_embeddings=False),
    "smollm2-135m": dict(_LLAMA, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, vocab_size=49152,
                         max_position_embeddings=8192, tie_word_embeddings=True, head_dim=64),
}
ALIASES = {
    "meta-llama/Llama-2-7b-hf": "llama-2-7b", "meta-llama/Llama-2-7b-chat-hf": "llama-2-7b",
    "iclm-7b": "llama-2-7b", "llama2-7b": "llama-2-7b", "meta-llama/Llama-3.1-8B": "llama-3.1-8b",
    "meta-llama/Llama-3.1-8B-Instruct": "llama-3.1-8b", "meta-llama/Llama-3.2-1B": "llama-3.2-1b",
    "meta-llama/Llama-3.2-1B-Instruct": "llama-3.2-1b", "HuggingFaceH4/zephyr-7b-beta": "zephyr-7b-beta",
    "microsoft/phi-1_5": "phi-1.5", "phi-1_5": "phi-1.5", "smollm2": "smollm2-135m",
    "HuggingFaceTB/SmolLM2-135M-Instruct": "smollm2-135m",
    # the MUSE-News target (ICLM-7B / Llama-2-7B, fine-tuned on the news): the Llama-2-7B architecture
    "muse-bench/MUSE-News_target": "llama-2-7b", "muse-bench/MUSE-news_target": "llama-2-7b",
}
DTYPE_BYTES = {"fp32": 4, "bf16": 2}
PARALLEL = ("none", "ddp", "fsdp")


def model_config(name: str):
    """The HF config of a model name (CONFIGS key, alias, or 'tiny')."""
    from transformers import AutoConfig
    if name == "tiny":
        from lab.models import TINY, TINY_VOCAB
        return AutoConfig.for_model("llama", vocab_size=TINY_VOCAB, **TINY)
    key = ALIASES.get(name, name).lower()
    if key not in CONFIGS:
        raise ValueError(f"lab plan: unknown model {name!r}; valid: tiny, {', '.join(CONFIGS)}, "
                         f"{', '.join(ALIASES)}")
    fields = dict(CONFIGS[key])
    return AutoConfig.for_model(fields.pop("model_type"), **fields)


def _meta_model(config):
    from transformers import AutoModelForCausalLM
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")


def parse_lora(spec: str | None) -> dict | None:
    """'r=16,alpha=32,targets=q_proj,k_proj' -> {'r': 16, 'alpha': 32, 'targets': [...]} (None: no LoRA)."""
    if not spec:
        return None
    out, key = {"r": 16, "alpha": 32, "targets": ["q_proj", "k_proj", "v_proj", "o_proj"]}, None
    targets = []
    for part in spec.split(","):
        if "=" in part:
            key, value = part.split("=", 1)
            if key == "targets":
                targets = [value]
            elif key in ("r", "alpha"):
                out[key] = int(value)
            elif key == "dropout":
                out[key] = float(value)
            else:
                raise ValueError(f"--lora: unknown key {key!r}; valid: r, alpha, dropout, targets")
        elif key == "targets":
            targets.append(part)
        else:
            raise ValueError(f"--lora: cannot parse {part!r} (form r=16,alpha=32,targets=q_proj,v_proj)")
    if targets:
        out["targets"] = targets
    return out


def _saved_bytes(model, batch: int, length: int, dtype) -> int:
    """Bytes autograd saves for backward in one forward with labels (meta device). The (s, s) attention
    matrices the meta math path saves are skipped: the real sdpa / flash kernels do not keep them."""
    param_storages = {p.untyped_storage()._cdata for p in model.parameters()}
    seen, total = set(), [0]

    def pack(t):
        key = t.untyped_storage()._cdata
        if key not in seen and key not in param_storages and not (t.dim() >= 2 and t.shape[-1] == t.shape[-2] == length):
            seen.add(key)
            total[0] += t.untyped_storage().nbytes()
        return t

    ids = torch.zeros(batch, length, dtype=torch.long, device="meta")
    auto = (torch.autocast("cpu", dtype=torch.bfloat16) if dtype == "bf16" else contextlib.nullcontext())
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), auto:
        model(input_ids=ids, labels=ids)
    return total[0]


def activation_bytes(config, batch: int, length: int, dtype="fp32", checkpointing=False) -> dict:
    """{'saved': saved activations of one forward, 'layer': per decoder layer, 'head': the rest}."""
    import copy
    counts = []
    for n in (1, 2):
        c = copy.deepcopy(config)
        c.num_hidden_layers = n
        counts.append(_saved_bytes(_meta_model(c), batch, length, dtype))
    layer, head = counts[1] - counts[0], 2 * counts[0] - counts[1]
    n_layers = config.num_hidden_layers
    if checkpointing:   # each layer keeps its input; one layer's activations exist during its recompute
        saved = head + n_layers * batch * length * config.hidden_size * DTYPE_BYTES[dtype] + layer
    else:
        saved = head + n_layers * layer
    return {"saved": saved, "layer": layer, "head": head}


def _needs(method) -> set:
    from lab.objectives import get_objective
    return {n for t in (*method.forget, *method.retain) for n in get_objective(t.objective).needs}


def plan(model="tiny", method="gru_npo_gd", parallel="none", gpus=1, lora=None, batch_size=32,
         micro_batch_size=None, max_length=512, dtype="bf16", gradient_checkpointing=False,
         gpu_memory=80.0, diagnostics=False, optimizer="adamw") -> dict:
    """Predicted bytes per device of one step: {'items': {name: bytes}, 'total', 'fits', ...}.
    lora: a parse_lora dict or spec string. gpu_memory in GiB."""
    from lab.methods import get_method
    if parallel not in PARALLEL:
        raise ValueError(f"lab plan: unknown --parallel {parallel!r}; valid: {', '.join(PARALLEL)}")
    if dtype not in DTYPE_BYTES:
        raise ValueError(f"lab plan: unknown --dtype {dtype!r}; valid: {', '.join(DTYPE_BYTES)}")
    if parallel == "none" and gpus != 1:
        raise ValueError("lab plan: --parallel none runs on one device (--gpus 1)")
    lora = parse_lora(lora) if isinstance(lora, str) else lora
    m, args = get_method(method)
    config = model_config(model)
    net = _meta_model(config)
    n_params = sum(p.numel() for p in net.parameters())
    layers = net.model.layers
    layer_params = sum(p.numel() for p in layers[0].parameters())
    if lora:
        n_train = sum(lora["r"] * (mod.in_features + mod.out_features) for name, mod in net.named_modules()
                      if isinstance(mod, torch.nn.Linear) and name.rsplit(".", 1)[-1] in lora["targets"])
        if n_train == 0:
            raise ValueError(f"--lora targets {lora['targets']} match no Linear module of {model}")
    else:
        n_train = n_params
    shard = gpus if parallel == "fsdp" else 1
    cb = DTYPE_BYTES[dtype]
    master = 4   # trainable weights, their gradients and optimizer state in fp32
    frozen_bytes = (n_params if lora else 0) * cb
    train_bytes = n_train * master
    items = {}
    items["weights"] = (frozen_bytes + train_bytes) / shard
    if shard > 1:   # FSDP2 all-gathers one layer (in the compute dtype) at a time; the next prefetched
        items["weights (gathered layers)"] = 2 * layer_params * cb
    grad = train_bytes / shard
    separate = m.separate_gradients or (diagnostics and bool(m.retain))
    items["g_f"] = grad
    if separate:
        items["g_r"] = grad
        if m.combiner != "gru" or not args.get("retain_in_update", True):
            items["d"] = grad    # the combiners allocate d; GRU rectifies g_u = g_f + w g_r in place
    if m.combiner == "gru" and args.get("gamma") is not None:
        items["GRU EMA"] = grad
    if diagnostics:
        items["pre-step parameter buffer"] = grad
    if m.name.startswith("alkn") or getattr(m, "combiner", "") == "alkn":
        items["ALKN score + mask"] = grad + n_train / shard   # fp32 score, bool mask
    if "ref_model" in _needs(m):
        items["reference model"] = n_params * (cb if dtype == "bf16" else 4) / shard
    if optimizer == "adamw":
        items["AdamW state"] = 2 * train_bytes / shard
    micro = micro_batch_size or batch_size
    per_rank = max(1, micro // (gpus if parallel != "none" else 1))
    act = activation_bytes(config, per_rank, max_length, dtype, gradient_checkpointing)
    items["activations"] = act["saved"]
    # backward transient: the logits' gradient and the log-softmax's, fp32, beside the saved ones
    items["logits transient"] = 2 * per_rank * max_length * config.vocab_size * 4
    total = sum(items.values())
    return {"model": model, "method": method, "parallel": parallel, "gpus": gpus, "lora": lora,
            "dtype": dtype, "batch_size": batch_size, "micro_batch_size": micro, "rows_per_device": per_rank,
            "max_length": max_length, "gradient_checkpointing": gradient_checkpointing,
            "n_params": n_params, "n_trainable": n_train, "separate_gradients": separate,
            "items": items, "total": total, "gpu_memory": gpu_memory, "fits": total <= gpu_memory * GiB}


def format_plan(p: dict) -> str:
    lines = [f"model={p['model']} ({p['n_params']:,} params, {p['n_trainable']:,} trainable) method={p['method']} "
             f"parallel={p['parallel']} gpus={p['gpus']} dtype={p['dtype']} batch={p['batch_size']} "
             f"micro={p['micro_batch_size']} ({p['rows_per_device']} rows/device) length={p['max_length']}"
             + (" checkpointing" if p["gradient_checkpointing"] else "")]
    w = max(len(k) for k in p["items"])
    for k, v in p["items"].items():
        lines.append(f"  {k:<{w}}  {v / GiB:9.3f} GiB")
    lines.append(f"  {'total per device':<{w}}  {p['total'] / GiB:9.3f} GiB")
    verdict = "fits" if p["fits"] else "does NOT fit"
    lines.append(f"{verdict} in {p['gpu_memory']:g} GiB per device")
    return "\n".join(lines)


def to_json(p: dict) -> str:
    return json.dumps(p, indent=2, default=str)
