"""The `lab` command line: help, bad input (exit code 2, clear message), a real unlearning run."""
import json
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest

from lab import runs
from lab.cli import main


def test_help_for_every_command(capsys):
    for argv in (["--help"], ["prepare", "--help"], ["eval", "--help"], ["unlearn", "--help"],
                 ["runs", "--help"], ["demo", "--help"]):
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 0
    assert "--method" in capsys.readouterr().out


def test_unknown_model_offline_exits_2_and_lists_presets(capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main(["eval", "--model", "no-such-model", "--limit", "1"]) == 2
    err = capsys.readouterr().err
    assert "no-such-model" in err and "tiny" in err and "smollm2-135m" in err


def test_unknown_method_and_option(capsys):
    assert main(["unlearn", "--method", "graddif"]) == 2
    assert "valid:" in capsys.readouterr().err
    assert main(["unlearn", "--method", "npo", "--set", "epoch=3"]) == 2
    assert "unknown config keys ['epoch']" in capsys.readouterr().err


def test_unlearn_writes_a_run(prepared_tiny, tmp_path, capsys):
    code = main(["unlearn", "--method", "npo_gd", "--max-steps", "2", "--eval-limit", "4",
                 "--runs", str(tmp_path)])
    assert code == 0
    (path,) = runs.find_runs(tmp_path)
    rec = runs.load_run(path)
    assert rec.status == "done" and rec.config["method"] == "npo_gd" and len(rec.trace) == 2
    assert list(rec.evals["checkpoint"]) == ["initial", "unlearned"]
    assert main(["runs", "--root", str(tmp_path)]) == 0
    assert path.name in capsys.readouterr().out
    assert main(["runs", "show", path.name, "--root", str(tmp_path)]) == 0


def test_runs_on_empty_root(tmp_path, capsys):
    assert main(["runs", "--root", str(tmp_path)]) == 0
    assert "no runs" in capsys.readouterr().out


def test_python_dash_m_entry_point():
    out = subprocess.run([sys.executable, "-m", "lab", "methods"], capture_output=True, text=True, check=True)
    assert "blur_npo" in out.stdout and "gru_npo_gd" in out.stdout


# ---------------------------------------------------------------- every expected failure: one line, no traceback
def _one_error_line(err, command):
    """The one error line (stderr may also hold progress bars)."""
    lines = [ln for ln in err.splitlines() if ln.startswith(f"lab {command}")]
    assert len(lines) == 1 and lines[0].startswith(f"lab {command}: error: "), err
    assert "Traceback" not in err, err
    return lines[0]


@pytest.fixture
def no_work(monkeypatch):
    """Any run starting fails the test: the flags must be refused before."""
    import lab.continual
    import lab.engine

    def started(*a, **k):
        raise AssertionError("work started")
    monkeypatch.setattr(lab.engine, "unlearn", started)
    monkeypatch.setattr(lab.continual, "continual", started)


@pytest.mark.parametrize("argv, flag, valid", [
    (["unlearn", "--max-steps", "0"], "--max-steps", ">= 1"),
    (["unlearn", "--eval-limit", "0"], "--eval-limit", ">= 1"),
    (["unlearn", "--micro-batch-size", "0"], "--micro-batch-size", ">= 1"),
    (["unlearn", "--diagnostics", "-1"], "--diagnostics", ">= 0"),
    (["unlearn", "--eval-every", "-2"], "--eval-every", ">= 0"),
    (["unlearn", "--lr", "-0.001"], "--lr", "> 0"),
    (["continual", "--max-steps", "0"], "--max-steps", ">= 1"),
    (["continual", "--eval-limit", "0"], "--eval-limit", ">= 1"),
    (["eval", "--limit", "0"], "--limit", ">= 1"),
])
def test_out_of_range_flags_are_refused_with_the_valid_range(no_work, capsys, argv, flag, valid):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {flag}: " in err and f"valid: " in err and valid in err


@pytest.mark.parametrize("setting", ["max_steps=0", "eval_limit=0", "micro_batch_size=0", "diagnostics=-1",
                                     "eval_every=-1"])
def test_out_of_range_set_values_are_refused_before_any_work(no_work, capsys, setting):
    assert main(["unlearn", "--set", setting]) == 2
    line = _one_error_line(capsys.readouterr().err, "unlearn")
    assert setting.split("=")[0] in line and "valid: an int >=" in line


def test_help_shows_the_defaults(capsys):
    with pytest.raises(SystemExit):
        main(["unlearn", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "per model: tiny 0.001, smollm2-135m 1e-05, other models 1e-05" in out
    assert "passes over the forget set (default: 5)" in out and "forget rows per step (default: 8)" in out
    with pytest.raises(SystemExit):
        main(["continual", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "passes over each task (default: " in out and "per model: tiny 0.001" in out


def test_bad_yaml_config_names_the_file(tmp_path, capsys):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("method: npo_gd\nlr: [1e-3\n")
    assert main(["unlearn", "--config", str(cfg)]) == 2
    line = _one_error_line(capsys.readouterr().err, "unlearn")
    assert f"--config {cfg}: not valid YAML" in line and "line" in line


def test_bad_model_paths_are_one_line_errors(tmp_path, capsys):
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text('{"model_type": "llama", "hidden_size": 8, "num_hidden_layers": 1, '
                                        '"num_attention_heads": 1, "intermediate_size": 8, "vocab_size": 10}')
    assert main(["eval", "--model", str(folder), "--limit", "1"]) == 2        # OSError: no weights in the folder
    assert "no file named model.safetensors" in _one_error_line(capsys.readouterr().err, "eval")
    assert main(["eval", "--model", str(tmp_path / "nope" / "model"), "--limit", "1"]) == 2
    assert "does not exist" in _one_error_line(capsys.readouterr().err, "eval")


def test_bad_model_name_fails_before_prepare_starts_workers(monkeypatch, capsys):
    import lab.prepare

    def started(*a, **k):
        raise AssertionError("a prepare worker started")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(lab.prepare.subprocess, "Popen", started)
    monkeypatch.setattr(lab.prepare, "finetune_checkpoint", started)
    assert main(["prepare", "--model", "no-such-model"]) == 2
    assert "unknown model 'no-such-model'" in _one_error_line(capsys.readouterr().err, "prepare")


def test_null_field_in_a_data_row_names_file_and_row(shared_data, tmp_path, capsys, monkeypatch):
    # main() exports --data as $LAB_DATA for the process: restore it for the tests that run after this one
    monkeypatch.setenv("LAB_DATA", str(shared_data))
    root = tmp_path / "data"
    shutil.copytree(shared_data / "tofu", root / "tofu")
    full = root / "tofu" / "full.json"
    lines = full.read_text().splitlines()
    first = json.loads(lines[0])
    records = first if isinstance(first, list) else [first]
    records[3]["answer"] = None
    lines[0] = json.dumps(records if isinstance(first, list) else records[0])
    full.write_text("\n".join(lines) + "\n")
    assert main(["eval", "--data", str(root), "--limit", "1"]) == 2
    line = _one_error_line(capsys.readouterr().err, "eval")
    assert f"{full}: record 4 (row 3) has null ['answer']" in line


def test_no_data_root_and_no_hub_says_where_it_looked(monkeypatch, capsys):
    from lab import data
    monkeypatch.delenv("LAB_DATA", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(data, "data_root", lambda root=None: None)
    assert main(["eval", "--limit", "1"]) == 2
    line = _one_error_line(capsys.readouterr().err, "eval")
    assert "set LAB_DATA or pass --data" in line and "shared/data does not exist" in line and "locuslab/TOFU" in line


def test_debug_shows_the_traceback_and_unexpected_errors_say_so(monkeypatch, capsys, tmp_path):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("lr: [\n")
    assert main(["unlearn", "--config", str(cfg), "--debug"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and err.strip().splitlines()[-1].startswith("lab unlearn: error: --config")
    import lab.cli

    def bug(args):
        raise TypeError("unsupported operand")
    monkeypatch.setattr(lab.cli, "cmd_methods", bug)
    monkeypatch.setattr(sys, "argv", ["lab"])
    assert lab.cli.main(["methods"]) == 1
    line = _one_error_line(capsys.readouterr().err, "methods")
    assert "TypeError: unsupported operand" in line and "--debug" in line


def test_runs_show_into_a_closed_pipe_exits_quietly(tmp_path):
    with runs.create_run({"kind": "unlearn", "method": "GA"}, root=tmp_path) as run:
        for s in range(200):
            run.log_step({"step": s, "loss_f": 1.0})
        run.log_eval({"step": 200, "checkpoint": "unlearned", **{f"metric_{i}": 0.5 for i in range(300)}})
    proc = subprocess.Popen([sys.executable, "-m", "lab", "runs", "show", run.path.name, "--root", str(tmp_path)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    proc.stdout.close()                      # like `| head` that has read what it wanted
    err = proc.stderr.read()
    proc.wait()
    assert err == "", err


def test_runs_lists_broken_runs_of_every_shape_and_shows_them(tmp_path, capsys):
    with runs.create_run({"kind": "unlearn", "method": "GA"}, root=tmp_path) as run:
        run.log_step({"step": 0, "loss_f": 1.0})
        run.log_eval({"step": 1, "checkpoint": "unlearned", "forget_rouge": 0.5})
    shapes = {"list": "[1, 2]", "scalar": "3", "truncated": '{"status": "do', "empty": ""}
    for shape, text in shapes.items():
        bad = tmp_path / f"bad-{shape}"
        shutil.copytree(run.path, bad)
        (bad / runs.SUMMARY).write_text(text)
        (bad / runs.EVAL).write_text(text)
    assert main(["runs", "--root", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert run.path.name in out and all(re.search(rf"bad-{s} +broken ", out) for s in shapes), out
    for shape in shapes:
        assert main(["runs", "show", f"bad-{shape}", "--root", str(tmp_path)]) == 0
        out = capsys.readouterr().out
        assert "status=broken" in out and "summary.json: unreadable" in out and "eval.jsonl: unreadable" in out


# ---------------------------------------------------------------- interruptions and divergence on real runs
def test_ctrl_c_during_lab_unlearn_keeps_the_run(prepared_tiny, tmp_path):
    root = tmp_path / "runs"
    proc = subprocess.Popen([sys.executable, "-m", "lab", "unlearn", "--method", "npo_gd", "--epochs", "1000",
                             "--eval-limit", "2", "--runs", str(root), "--set", "max_length=128"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300      # a bound against hanging, not a timing claim
    while not (runs.find_runs(root) and len(runs.load_run(runs.find_runs(root)[0]).trace) >= 3):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130
    (path,) = runs.find_runs(root)
    lines = [ln for ln in err.splitlines() if ln.startswith("lab unlearn")]
    assert lines == [f"lab unlearn: interrupted; the run so far is kept in {path} (status interrupted)"], err
    assert "Traceback" not in err
    rec = runs.load_run(path)
    assert rec.status == "interrupted" and rec.errors == [] and len(rec.trace) >= 3
    assert list(rec.evals["checkpoint"]) == ["initial"] and not (path / runs.LOCK).exists()
    listed = subprocess.run([sys.executable, "-m", "lab", "runs", "--root", str(root)], capture_output=True,
                            text=True, check=True).stdout
    assert "interrupted" in listed and path.name in listed


def test_divergence_is_one_line_naming_the_last_good_weights(prepared_tiny, tmp_path, capsys):
    code = main(["unlearn", "--method", "ga", "--max-steps", "20", "--eval-limit", "2", "--lr", "1e30",
                 "--runs", str(tmp_path), "--set", "max_length=128"])
    assert code == 1
    (path,) = runs.find_runs(tmp_path)
    line = _one_error_line(capsys.readouterr().err, "unlearn")
    assert "diverged" in line and str(path / "last_good") in line
    assert runs.load_run(path).status == "diverged" and (path / "last_good" / "config.json").exists()


def test_tag_flag_records_the_experiment_in_the_run_config(tmp_path, monkeypatch, capsys):
    """`lab unlearn --tag T` / `lab continual --tag T`: every run the command creates has experiment T."""
    from types import SimpleNamespace
    from lab import cli as lab_cli, continual as lab_continual, engine, runs

    def fake(cfg, **kw):
        with runs.create_run({"kind": "unlearn", "method": cfg["method"]}, root=tmp_path) as run:
            pass
        return SimpleNamespace(run_dir=run.path, metrics={}, table=__import__("pandas").DataFrame())
    monkeypatch.setattr(engine, "unlearn", fake)
    monkeypatch.setattr(lab_continual, "continual", fake)
    assert lab_cli.main(["unlearn", "--method", "ga", "--tag", "sweep 1", "--runs", str(tmp_path)]) == 0
    assert lab_cli.main(["continual", "--method", "alkn", "--tag", "cl", "--runs", str(tmp_path)]) == 0
    tags = sorted(runs.load_run(p).config.get("experiment") for p in runs.find_runs(tmp_path))
    assert tags == ["cl", "sweep 1"] and runs.current_experiment() is None


def test_set_values_read_exponent_floats():
    # PyYAML (YAML 1.1) reads '1e-4' as a string; --set lr=1e-4 reached AdamW as 'str' and crashed
    from lab.cli import _kv
    got = _kv(["lr=1e-4", "epochs=5", "warmup=0.1", "autocast=bfloat16", "eval_limit=null", "extras=false"])
    assert got == {"lr": 1e-4, "epochs": 5, "warmup": 0.1, "autocast": "bfloat16", "eval_limit": None, "extras": False}
    assert isinstance(got["lr"], float)
