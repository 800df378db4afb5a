"""The `lab` command line: help, bad input (exit code 2, clear message), a real unlearning run."""
import subprocess
import sys

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
