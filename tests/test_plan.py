"""lab.plan: exact parameter counts, and the predicted peak of one engine step vs the measured one (CPU)."""
import pytest
import torch

from lab.plan import GiB, model_config, parse_lora, plan

from lab import engine
from lab.bench import _peak_memory
from lab.data import tofu_subset
from lab.engine import LoopState, UnlearnConfig
from lab.methods import get_method
from lab.models import load_model

def measure(model_name, method_name, batch, length):
    torch.manual_seed(0)
    model, tok = load_model(model_name)
    model.train()
    data = tofu_subset()
    rows = list(range(batch))
    micro = [engine._to({"forget": engine.encode_rows(tok, data.forget, rows, max_length=length),
                         "retain": engine.encode_rows(tok, data.retain, rows, max_length=length)}, "cpu")]
    method, args = get_method(method_name)
    cfg = UnlearnConfig(method=method_name, model=model_name, lr=1e-7, batch_size=batch, max_length=length, diagnostics=0)
    ctx = engine.make_context(model, method, args, data.forget, tok, cfg, None)
    params = engine.trainable_parameters(model, method, args)
    opt = torch.optim.AdamW(params, lr=1e-7)
    state = LoopState()
    gen = torch.Generator().manual_seed(0)
    step = lambda: engine._step(model, params, opt, method, args, ctx, micro, state, cfg, 1e-7, rlw_gen=gen, group=None, autolr_due=False)
    step()
    def nbytes(ts): return sum(t.numel() * t.element_size() for t in ts if torch.is_tensor(t))
    live = nbytes(model.parameters()) + nbytes(v for s in opt.state.values() for v in s.values())
    live += nbytes(t for v in state.combiner_state.values() for t in (v if isinstance(v, list) else [v]))
    if getattr(ctx, "ref_model", None) is not None:
        live += nbytes(ctx.ref_model.parameters())
    peak = _peak_memory({"s": step}, "cpu")["s"]
    seq = max(micro[0][k]["input_ids"].shape[1] for k in ("forget", "retain"))
    return live + peak, seq


@pytest.mark.parametrize("name", ["tiny", pytest.param("smollm2-135m", marks=pytest.mark.slow)])
def test_parameter_counts_equal_the_real_models(name):
    model, _ = load_model(name)
    real = sum(p.numel() for p in model.parameters())
    assert plan(name, "npo_gd", batch_size=1, max_length=8, dtype="fp32")["n_params"] == real


def test_smollm2_table_entry_matches_its_config():
    import json
    from lab.models import cache_root
    path = cache_root() / "smollm2-135m-instruct" / "config.json"
    if not path.exists():
        pytest.skip("smollm2-135m not converted in this cache")
    real, ours = json.loads(path.read_text()), model_config("smollm2-135m")
    for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
              "num_key_value_heads", "vocab_size", "tie_word_embeddings"):
        assert getattr(ours, k) == real[k], k


def test_lora_trainable_count_is_r_times_in_plus_out():
    p = plan("tiny", "npo_gd", lora="r=4,alpha=8,targets=q_proj,v_proj", batch_size=1, max_length=8)
    from lab.models import TINY
    h, layers = TINY["hidden_size"], TINY["num_hidden_layers"]
    assert p["n_trainable"] == layers * 2 * 4 * (h + h)
    assert parse_lora("r=16,alpha=32,targets=q_proj,k_proj")["targets"] == ["q_proj", "k_proj"]
    with pytest.raises(ValueError, match="valid"):
        parse_lora("rank=4")


def test_separate_gradient_methods_hold_more_lists():
    one = plan("tiny", "npo_gd", batch_size=2, max_length=32, dtype="fp32")["items"]
    two = plan("tiny", "gru_npo_gd", batch_size=2, max_length=32, dtype="fp32")["items"]
    assert "g_r" not in one and "g_r" in two and "GRU EMA" in two


def test_fsdp_shards_weights_and_states():
    full = plan("llama-2-7b", "gru_npo_gd", parallel="fsdp", gpus=8, batch_size=32, micro_batch_size=8,
                max_length=512)
    one = plan("llama-2-7b", "gru_npo_gd", batch_size=32, micro_batch_size=8, max_length=512)
    assert full["items"]["AdamW state"] * 8 == pytest.approx(one["items"]["AdamW state"])
    assert not one["fits"] and full["total"] < one["total"]


@pytest.mark.parametrize("name,method,batch,length", [
    ("tiny", "npo_gd", 8, 256), ("tiny", "gru_npo_gd", 8, 256),
    pytest.param("smollm2-135m", "gru_npo_gd", 2, 64, marks=pytest.mark.slow)])
def test_predicted_peak_within_15_percent_of_measured(name, method, batch, length):
    measured, seq = measure(name, method, batch, length)
    predicted = plan(name, method, batch_size=batch, max_length=seq, dtype="fp32")["total"]
    assert 0.85 <= predicted / measured <= 1.15, (predicted / 2 ** 20, measured / 2 ** 20)


def test_cli_plan_prints_table_and_verdict(capsys):
    from lab.cli import main
    main(["plan", "--model", "tiny", "--method", "gru_npo_gd", "--batch-size", "2", "--max-length", "32"])
    out = capsys.readouterr().out
    assert "GRU EMA" in out and "fits in 80 GiB" in out


# ---------------------------------------------------------------- the GPU parameter files (issue 17)
import pathlib
import re
import shlex

import yaml

GPU_PARAMS = sorted((pathlib.Path(__file__).resolve().parents[1] / "notebooks" / "params" / "gpu").glob("*.yaml"))
# a header line of a gpu yaml: "#   [muse] lab plan --model M --method X ... -> 31.2 GiB per device"
PLAN_LINE = re.compile(r"^#\s+(?:\[(?P<part>muse)\]\s+)?(?P<cmd>lab plan .+?)\s+->\s+(?P<gib>[\d.]+) GiB per device")
# the yaml keys each `lab plan` option must equal (MUSE parts: muse_<key>, else the shared key)
YAML_KEYS = {"model": "model", "batch_size": "batch_size", "micro_batch_size": "micro_batch_size",
             "max_length": "max_length"}


def plan_lines(path):
    return [m.groupdict() for line in path.read_text().splitlines() if (m := PLAN_LINE.match(line))]


def _yaml_value(params, part, key):
    if part and f"{part}_{key}" in params:
        return params[f"{part}_{key}"]
    return params.get(key, 512 if key == "max_length" else None)   # the engine's max_length default


@pytest.mark.parametrize("path", GPU_PARAMS, ids=lambda p: p.name)
def test_gpu_params_state_a_setting_that_lab_plan_says_fits(path):
    """Every gpu yaml states, as `lab plan` commands in its header, a setting for each model it runs;
    the commands name the file's own model / batch / micro-batch / length, lab plan says they fit, and
    the GiB the header prints is what lab plan predicts today."""
    from lab.cli import build_parser
    params, lines = yaml.safe_load(path.read_text()), plan_lines(path)
    assert lines, f"{path.name}: no '# lab plan ... -> X GiB per device' line in its header"
    models = {params["model"]} | ({params["muse_model"]} if "muse_model" in params else set())
    assert models <= {a.model for a in (build_parser().parse_args(shlex.split(l["cmd"])[1:]) for l in lines)}, \
        f"{path.name}: a model without a lab plan line"
    for line in lines:
        args = build_parser().parse_args(shlex.split(line["cmd"])[1:])
        for key, yaml_key in YAML_KEYS.items():
            assert getattr(args, key) == _yaml_value(params, line["part"], yaml_key), (path.name, line["cmd"], key)
        p = plan(args.model, args.method, parallel=args.parallel, gpus=args.gpus, lora=args.lora,
                 batch_size=args.batch_size, micro_batch_size=args.micro_batch_size, max_length=args.max_length,
                 dtype=args.dtype, gradient_checkpointing=args.gradient_checkpointing, gpu_memory=args.gpu_memory,
                 diagnostics=args.diagnostics)
        assert p["fits"], (path.name, line["cmd"], p["total"] / GiB)
        assert p["total"] / GiB == pytest.approx(float(line["gib"]), abs=0.05), (path.name, line["cmd"])


def test_a_gpu_params_line_that_does_not_fit_fails(tmp_path):
    """The check above can fail: full Llama-2-7B GRU on one 80 GiB GPU does not fit."""
    bad = tmp_path / "bad.yaml"
    bad.write_text("# lab plan --model llama-2-7b --method gru_npo_gd --batch-size 32 --micro-batch-size 8 "
                   "--max-length 512 -> 150.0 GiB per device\nmodel: llama-2-7b\nbatch_size: 32\nmicro_batch_size: 8\n")
    with pytest.raises(AssertionError, match="bad.yaml"):
        test_gpu_params_state_a_setting_that_lab_plan_says_fits(bad)
