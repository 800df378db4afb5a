"""lab.lora: LoRA adapters through the one engine (METHODS §9 "Adapters")."""
import pytest
import torch
import yaml

from lab import lora
from lab.engine import UnlearnConfig, trainable_parameters, unlearn
from lab.methods import get_method

SPEC = "r=4,alpha=8,dropout=0,targets=q_proj,k_proj,v_proj,o_proj"


def test_parse_spec_full_and_defaults():
    assert lora.parse_spec(SPEC) == {"r": 4, "alpha": 8.0, "dropout": 0.0,
                                     "targets": ["q_proj", "k_proj", "v_proj", "o_proj"]}
    assert lora.parse_spec("r=8") == {**lora.DEFAULTS, "r": 8}
    assert lora.parse_spec(None) is None
    assert lora.parse_spec({"targets": "v_proj"})["targets"] == ["v_proj"]


@pytest.mark.parametrize("spec, message", [
    ("rank=4", "unknown key(s) rank; valid: r, alpha, dropout, targets"),
    ("r=four", "r must be an integer"),
    ("r=0", "need r >= 1"),
    ("r=4,q_proj", "'q_proj' is not KEY=VALUE"),
])
def test_parse_spec_errors(spec, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        UnlearnConfig(method="gru_npo_gd", lora=spec)


def test_unknown_target_lists_linear_modules():
    from lab.prepare import prepare
    model, _ = prepare(model="tiny", benchmark="tofu_subset", verbose=False).load("target")
    with pytest.raises(ValueError, match=r"target module\(s\) qkv not in the model; its linear modules: .*q_proj"):
        lora.wrap(model, lora.parse_spec("targets=qkv"))


def test_lora_gru_npo_gd_end_to_end(tmp_path):
    from lab.eval import evaluate
    from lab.prepare import prepare
    prepared = prepare(model="tiny", benchmark="tofu_subset", verbose=False)
    base, _ = prepared.load("target")
    kw = dict(method="gru_npo_gd", model="tiny", max_steps=3, batch_size=4, eval_limit=2,
              runs_root=str(tmp_path), lora=SPEC, save_model=True)
    res = unlearn(progress=False, eval_every=1, **kw)
    model = res.model

    # the gradient lists are the adapter parameters only
    method, args = get_method("gru_npo_gd")
    params = trainable_parameters(model, method, args)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert names and all("lora_" in n for n in names) and len(params) == len(names)

    # base weights bit-identical to the prepared target; adapters moved (B starts at 0)
    base_state = base.state_dict()
    merged_names = set()
    for name, p in model.get_base_model().named_parameters():
        if "lora_" in name:
            if "lora_B" in name:
                assert p.abs().sum() > 0, name
            continue
        key = name.replace(".base_layer", "")
        merged_names.add(key)
        assert torch.equal(p, base_state[key]), key
    assert merged_names == {n for n, _ in base.named_parameters()}

    # every diagnostic column is filled in
    trace = res.trace
    for col in ("grad_norm_f", "grad_norm_r", "cos_fr", "align_f", "align_r", "cos_update_f", "cos_update_r"):
        assert col in trace and trace[col].notna().all(), col

    # final evaluation == evaluating the merged model separately
    again = evaluate(lora.merged_copy(model), res.tokenizer, prepared.benchmark, reference=prepared.retain_eval,
                     limit=2, progress=False)
    assert again["metrics"] == pytest.approx(res.metrics, rel=1e-6, nan_ok=True)

    # run files: the adapter config, merged weights and the adapter
    config = yaml.safe_load((res.run_dir / "config.yaml").read_text())
    assert config["lora"] == {"r": 4, "alpha": 8.0, "dropout": 0.0,
                              "targets": ["q_proj", "k_proj", "v_proj", "o_proj"]}
    assert (res.run_dir / "adapter" / "adapter_config.json").exists()
    from transformers import AutoModelForCausalLM
    saved = AutoModelForCausalLM.from_pretrained(res.run_dir / "model")
    assert not any("lora" in k for k in saved.state_dict())
    merged = lora.merged_copy(model).state_dict()
    assert all(torch.equal(v, merged[k]) for k, v in saved.state_dict().items())

    # mid-run evaluations do not change training: the same trace without them
    plain = unlearn(progress=False, **kw)
    cols = ["loss_f", "loss_r", "grad_norm_f", "cos_fr"]
    assert plain.trace[cols].to_numpy() == pytest.approx(trace[cols].to_numpy(), rel=1e-6)
