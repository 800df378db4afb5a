"""Robustness probes (lab.probes, METHODS §8): the pure pieces by hand, then real probes on the prepared
tiny models (relearning recovers knowledge an unlearned model lost; attack rows never leak into the
held-out rows; the unlearned model is left as it was; lab probe RUN gives the same records later)."""
from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pandas as pd
import pytest
import torch

from lab import probes, runs, runs_views
from lab.data import format_question
from lab.experiments import VERDICTS


# ---------------------------------------------------------------- quantization by hand
def test_quantize_rtn_matches_a_hand_computation():
    w = torch.tensor([[0.70, -0.33, 1.00, 0.25],
                      [0.12, 0.00, -0.50, 0.20],
                      [0.00, 0.00, 0.00, 0.00]])
    # 4 bits: qmax 7; groups of 2 input columns per output row
    # row 0: group (0.70, -0.33): s = 0.1 -> (7, -3.3 -> -3) -> (0.7, -0.3); group (1.0, 0.25): s = 1/7
    #        -> (7, 1.75 -> 2) -> (1.0, 2/7)
    # row 1: group (0.12, 0): s = 0.12/7 -> (7, 0); group (-0.5, 0.2): s = 0.5/7 -> (-7, 2.8 -> 3) -> (-0.5, 1.5/7)
    # row 2: an all-zero group stays zero (no division by zero)
    want = torch.tensor([[0.70, -0.30, 1.00, 2 / 7],
                         [0.12, 0.00, -0.50, 1.5 / 7],
                         [0.00, 0.00, 0.00, 0.00]])
    got = probes.quantize_rtn(w, bits=4, group_size=2)
    assert torch.allclose(got, want, atol=1e-6), got
    assert got.dtype == w.dtype and got.shape == w.shape
    # 8 bits on the same groups: qmax 127, error at most half a step of each group
    q8 = probes.quantize_rtn(w, bits=8, group_size=2)
    step = torch.tensor([[0.7, 1.0], [0.12, 0.5], [1.0, 1.0]]).repeat_interleave(2, dim=1) / 127
    assert ((q8 - w).abs() <= step / 2 + 1e-7).all()


def test_quantize_rtn_groups_run_along_the_input_dimension_with_a_short_last_group():
    w = torch.full((2, 130), 0.3)
    w[:, 129] = 100.0                       # the short last group (columns 128, 129) holds the outlier
    q = probes.quantize_rtn(w, bits=4, group_size=128)
    assert torch.allclose(q[:, :128], w[:, :128])             # the first group never sees the outlier
    assert q[0, 128] == pytest.approx(0.0) and q[0, 129] == pytest.approx(100.0)  # 0.3 < half a step of 100/7
    with pytest.raises(ValueError, match="2-D"):
        probes.quantize_rtn(torch.ones(3), bits=4)


def test_quantize_model_rounds_linear_weights_only_and_skips_lm_head():
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=2, tie_word_embeddings=False))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    info = probes.quantize_model(model, bits=4, group_size=16)
    after = dict(model.named_parameters())
    assert info["quant_tensors"] == 7 and info["quant_params"] == 4 * 32 * 32 + 3 * 32 * 48   # q,k,v,o + mlp
    assert torch.equal(after["lm_head.weight"], before["lm_head.weight"])
    assert torch.equal(after["model.embed_tokens.weight"], before["model.embed_tokens.weight"])
    q = after["model.layers.0.mlp.up_proj.weight"]
    assert torch.equal(q, probes.quantize_rtn(before["model.layers.0.mlp.up_proj.weight"], 4, 16))
    assert 0 < info["quant_rel_error"] < 0.2


# ---------------------------------------------------------------- rows, options, prompts
def test_split_forget_first_tenth_attacks_the_rest_is_held_out():
    attack, held = probes.split_forget(40, 0.1)
    assert attack == [0, 1, 2, 3] and held == list(range(4, 40))
    assert probes.split_forget(5)[0] == [0]                       # at least one attack row
    with pytest.raises(ValueError, match="no held-out row"):
        probes.split_forget(1)


def test_check_options_fills_defaults_and_names_what_is_valid():
    names, opts = probes.check_options("relearn, quant4", {"relearn_steps": 3})
    assert names == ["relearn", "quant4"] and opts["relearn_steps"] == 3 and opts["quant_group_size"] == 128
    assert opts["relearn_fraction"] == 0.1 and opts["relearn_data"] == "answers"
    with pytest.raises(ValueError, match=r"unknown probes \['quant2'\]; valid: \['relearn', 'quant8'"):
        probes.check_options(["quant2"])
    with pytest.raises(ValueError, match="unknown probe options"):
        probes.check_options(["relearn"], {"steps": 3})
    with pytest.raises(ValueError, match="relearn_data='x'; valid"):
        probes.check_options(["relearn"], {"relearn_data": "x"})
    with pytest.raises(ValueError, match="relearn_fraction"):
        probes.check_options(["relearn"], {"relearn_fraction": 1.5})
    with pytest.raises(ValueError, match="probes run on TOFU"):
        probes.check_options(["quant4"], None, "muse_news")
    from lab.engine import UnlearnConfig
    cfg = UnlearnConfig(probes=["quant8"])                          # config records the filled options
    assert cfg.probe_options["quant_group_size"] == 128
    with pytest.raises(ValueError, match="unknown probes"):
        UnlearnConfig(probes=["nope"])


def test_fewshot_question_reads_as_a_k_shot_prompt():
    plain = SimpleNamespace(chat_template=None)
    q = probes.fewshot_question(plain, [("Who?", "Ann."), ("Where?", "Oslo.")], "When?")
    assert format_question(plain, q) == "Question: Who?\nAnswer: Ann.\n\nQuestion: Where?\nAnswer: Oslo.\n\n" \
                                        "Question: When?\nAnswer:"


def test_recovery_fraction_and_forget_means():
    assert probes.recovery(0.5, 0.2, 0.8) == pytest.approx(0.5)
    assert math.isnan(probes.recovery(0.5, 0.3, 0.3))
    rows = pd.DataFrame({"set": ["forget", "forget", "retain"], "row": [7, 8, 7], "rouge": [0.2, 0.4, 1.0],
                         "prob": [0.1, 0.3, 1.0]})
    assert probes.forget_means(rows, [7, 8]) == pytest.approx({"rouge": 0.3, "prob": 0.2})
    assert probes.forget_means(rows, [7, 9]) is None                # rows not covered: evaluate instead


def test_robustness_claims_verdicts_thresholds_and_model_utility_in_the_detail():
    def row(probe, unl, after, tgt, mu=0.5, probe_mu=0.4, floor_rec=None):
        return {"run_id": f"r-{probe}", "label": "NPO", "probe": probe, "unlearned_forget_rouge": unl,
                "forget_rouge": after, "target_forget_rouge": tgt, "floor_forget_rouge": 0.3,
                "recovery_rouge": probes.recovery(after, unl, tgt), "floor_recovery_rouge": floor_rec,
                "model_utility": mu, "probe_model_utility": probe_mu}
    table = pd.DataFrame([row("quant4", 0.2, 0.25, 0.9),            # recovery 0.071 <= 0.1: holds
                          row("relearn", 0.2, 0.41, 0.9, floor_rec=0.2),   # 0.3 > 0.1: does not hold
                          row("fewshot", 0.88, 0.9, 0.9, probe_mu=None),   # gap 0.02 < min_gap: not testable
                          row("quant8", 0.2, 0.21, 0.9, probe_mu=0.2)])    # MU 0.5 -> 0.2: the probe broke it
    quant, relearn, fewshot, broken = probes.robustness_claims(table, threshold=0.1, labels={"r-quant4": "GRU"})
    assert quant["claim"].startswith("GRU: forgetting survives") and quant["verdict"] == VERDICTS[True]
    assert "recovery 0.071" in quant["detail"] and "model utility 0.500 -> 0.400 under the probe" in quant["detail"]
    assert relearn["verdict"] == VERDICTS[False] and "retain model 0.200 of its own gap" in relearn["detail"]
    assert fewshot["verdict"] == VERDICTS[None] and "did not forget" in fewshot["detail"]
    assert "model utility" not in fewshot["detail"]                 # no probed MU: nothing invented
    assert broken["verdict"] == VERDICTS[None] and broken["detail"].startswith("the probe broke the model")
    assert "model utility 0.500 -> 0.200" in broken["detail"]
    kept = probes.robustness_claims(table.iloc[3:], min_utility_kept=0.3)[0]     # 0.2 >= 0.3 x 0.5: testable
    assert kept["verdict"] == VERDICTS[True]


# ---------------------------------------------------------------- real probes on the tiny models
FAST = dict(eval_limit=6, eval_batch_size=16, max_length=128, diagnostics=0)
PROBED = ["relearn", "quant4", "paraphrase", "fewshot"]     # quant8 is quant4's code path at 8 bits (tested above)


@pytest.fixture(scope="module")
def probed_run(prepared_tiny, tmp_path_factory):
    """GA until the tiny model has forgotten, then every probe in the same process."""
    from lab.engine import unlearn
    root = tmp_path_factory.mktemp("probe-runs")
    res = unlearn(method="ga", epochs=5, lr=1e-3, batch_size=8, runs_root=str(root), save_model=True,
                  probes=PROBED, probe_options={"relearn_steps": 10}, progress=False, **FAST)
    return res, root


def test_probe_records_rows_and_config(probed_run):
    res, _ = probed_run
    rec = runs.load_run(res.run_dir)
    assert rec.config["probes"] == PROBED and rec.config["probe_options"]["relearn_steps"] == 10
    pe = rec.probe_evals
    assert list(pe["probe"]) == PROBED
    assert set(pe["checkpoint"]) == {f"probe:{p}" for p in PROBED}
    rows = rec.rows
    for p in PROBED:
        r = rows[(rows["checkpoint"] == f"probe:{p}") & (rows["set"] == "forget")]
        assert len(r) == 6, p                                       # eval_limit rows of its own outputs
    para = rows[(rows["checkpoint"] == "probe:paraphrase") & (rows["set"] == "forget")]
    few = rows[(rows["checkpoint"] == "probe:fewshot") & (rows["set"] == "forget")]
    assert all(q.count("\nAnswer: ") == 3 for q in few["question"])     # 3 retain shots before each question
    assert not set(para["question"]) & set(rows[(rows["checkpoint"] == "unlearned") & (rows["set"] == "forget")]["question"])
    q4 = pe.set_index("probe").loc["quant4"]
    assert q4["quant_bits"] == 4 and q4["quant_group_size"] == 128 and q4["quant_tensors"] > 0
    assert q4["delta_forget_rouge"] == pytest.approx(q4["forget_rouge"] - q4["unlearned_forget_rouge"])
    summary = json.loads((res.run_dir / "summary.json").read_text())
    assert summary["status"] == "done" and set(summary["probes"]) == set(PROBED)


def test_relearning_recovers_and_attack_rows_never_leak(probed_run, prepared_tiny):
    res, _ = probed_run
    rec = runs.load_run(res.run_dir)
    r = rec.probe_evals.set_index("probe").loc["relearn"]
    settings = json.loads((res.run_dir / "summary.json").read_text())["probes"]["relearn"]
    forget_rows = list(prepared_tiny.benchmark.eval_sets["forget"]["row"])
    assert settings["attack_rows"] == forget_rows[:4]                # first 10 % of 40 rows
    rows = rec.rows
    held = rows[(rows["checkpoint"] == "probe:relearn") & (rows["set"] == "forget")]["row"].tolist()
    assert held == forget_rows[4:10] == settings["held_out_rows"]    # held out, cut to eval_limit
    assert not set(held) & set(settings["attack_rows"])
    # GA forgot (target far above unlearned); 10 relearning steps on 4 OTHER rows bring some of it back
    # (GA's 25 steps at 1e-3 collapse the tiny model: Prob ~1e-11 -> ~3e-3 after the attack, recovery ~0.3 %)
    assert r["target_forget_prob"] - r["unlearned_forget_prob"] > 0.2
    assert r["forget_prob"] > 100 * r["unlearned_forget_prob"] and r["recovery_prob"] > 0
    assert r["relearn_loss_last"] < r["relearn_loss_first"] and r["relearn_lr"] == prepared_tiny.config["lr"]
    assert r["recovery_prob"] == pytest.approx((r["forget_prob"] - r["unlearned_forget_prob"])
                                               / (r["target_forget_prob"] - r["unlearned_forget_prob"]))
    # the retain model never saw these rows: the same attack on it is the floor
    assert r["floor_forget_prob"] < r["target_forget_prob"] and not math.isnan(r["floor_recovery_prob"])


def test_probes_leave_the_unlearned_model_as_it_was(probed_run):
    from lab.models import load_model
    res, _ = probed_run
    saved, _ = load_model(str(res.run_dir / "model"))     # written before the probes ran
    for (n, a), b in zip(res.model.named_parameters(), saved.parameters()):
        assert torch.equal(a.detach(), b.detach()), n


def test_lab_probe_later_appends_the_same_records(probed_run):
    from lab.cli import main
    res, root = probed_run
    first = runs.load_run(res.run_dir).probe_evals.set_index("probe")
    assert main(["probe", res.run_dir.name, "--root", str(root), "--probes", "relearn",
                 "--probe-opt", "relearn_steps=10"]) == 0
    pe = runs.load_run(res.run_dir).probe_evals
    assert list(pe["probe"]) == [*PROBED, "relearn"]
    later = pe.iloc[-1:].set_index("probe")
    for p in ("relearn",):
        for k in ("forget_rouge", "forget_prob", "unlearned_forget_prob", "floor_forget_prob"):
            assert later.loc[p, k] == pytest.approx(first.loc[p, k], abs=1e-5), (p, k)
    table = runs_views.robustness_table([runs.load_run(res.run_dir)])
    assert list(table["probe"]) == PROBED                           # the latest record per probe
    assert table["model_utility"].notna().all() and table["recovery_rouge"].notna().any()


def test_lab_runs_robustness_prints_one_markdown_row_per_run_and_probe(probed_run, tmp_path, capsys):
    from lab.cli import main
    res, root = probed_run
    assert main(["runs", "robustness", "--root", str(root)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    table = runs_views.robustness_table([runs.load_run(res.run_dir)])
    body = [line.split(" | ") for line in lines[2:]]
    assert lines[0].startswith("| run | method | probe |") and len(body) == len(table) == len(PROBED)
    for cells, (_, r) in zip(body, table.iterrows()):
        assert cells[0] == f"| {r['run_id']}" and cells[2] == r["probe"]
        assert cells[4] == f"{r['model_utility']:.3f} -> {r['probe_model_utility']:.3f}"
        assert cells[5].startswith(f"{r['unlearned_forget_rouge']:.3f} -> {r['forget_rouge']:.3f} (")
    assert main(["runs", "robustness", "--root", str(tmp_path)]) == 2          # nothing probed: a clear error
    assert "no robustness probe records under" in capsys.readouterr().err


def test_lab_probe_needs_a_saved_model(prepared_tiny, tmp_path, capsys):
    from lab.cli import main
    from lab.engine import unlearn
    res = unlearn(method="ga", max_steps=1, runs_root=str(tmp_path), progress=False, **FAST)
    assert main(["probe", str(res.run_dir), "--probes", "quant8"]) == 2
    err = capsys.readouterr().err
    assert "no saved model" in err and "--save-model" in err


def test_continual_probes_after_the_last_task_keep_the_task_table(prepared_tiny, tmp_path):
    from lab.continual import continual
    res = continual(method="npo_gd", protocol="sequential", n_tasks=2, task_unit="rows", epochs=1, batch_size=8,
                    eval_limit=2, eval_max_new_tokens=16, max_length=128, eval_batch_size=8,
                    runs_root=str(tmp_path), probes=["quant4", "paraphrase"], progress=False)
    assert list(res.table.index) == ["initial", "after 0", "after 1"]
    rec = runs.load_run(res.run_dir)
    pe = rec.probe_evals
    assert list(pe["probe"]) == ["quant4", "paraphrase"] and set(pe["task"]) == {1} and pe["eval_task"].isna().all()
    long = runs_views.continual_table([rec])
    assert not {"probe_rows", "recovery_rouge", "quant_bits"} & set(long["metric"])   # probe records left out
    assert set(long["checkpoint_label"]) == {"initial", "after 0", "after 1"}
    rows = rec.rows
    # sequential: the final model forgot both tasks, so the probes ask every task's rows (cut to eval_limit)
    assert len(rows[(rows["checkpoint"] == "probe:quant4") & (rows["set"] == "forget")]) == 2
