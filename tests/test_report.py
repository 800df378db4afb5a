"""lab.report: notebook / profile lookup, the parameters-cell rules, papermill execution into .ipynb + offline
HTML, failing cells kept as .failed.ipynb, and `lab report`. Uses throw-away notebooks in tmp_path."""
import contextlib
import json
import os
from pathlib import Path

import nbformat
import pytest

from lab import cli, report


def _notebook(folder: Path, name: str, params: str, *cells: str, profiles: dict | None = None) -> Path:
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    first = nbformat.v4.new_code_cell(params)
    first.metadata["tags"] = ["parameters"]
    nb.cells = [nbformat.v4.new_markdown_cell(f"# {name}"), first, *[nbformat.v4.new_code_cell(c) for c in cells]]
    folder.mkdir(parents=True, exist_ok=True)
    nbformat.write(nb, folder / f"{name}.ipynb")
    for profile, text in (profiles or {}).items():
        (folder / "params" / profile).mkdir(parents=True, exist_ok=True)
        (folder / "params" / profile / f"{name}.yaml").write_text(text)
    return folder / f"{name}.ipynb"


PLOT = ("from lab.report import notebook_setup\nnotebook_setup()",
        "import plotly.express as px\nprint('n is', n, 'runs in', runs_root)\n"
        "px.bar(x=list(range(n)), y=list(range(n))).show()")


@pytest.fixture
def books(tmp_path):
    folder = tmp_path / "notebooks"
    _notebook(folder, "good", "n = 3\nruns_root = 'runs'  # comment\n", *PLOT, profiles={"smoke": "n: 2\n"})
    _notebook(folder, "bad", "n = 1\n", "x = 1", "raise RuntimeError('boom in cell')", "print('never')",
              profiles={"smoke": "n: 2\n"})
    return folder


def test_lists_notebooks_and_profiles(books):
    assert report.list_notebooks(books) == ["bad", "good"]
    assert report.list_profiles("good", books) == ["cpu", "smoke"]
    assert report.notebook_parameters("good", books) == {"n": 3, "runs_root": "runs"}
    assert report.profile_parameters("good", "smoke", books) == {"n": 2}
    assert report.profile_parameters("good", "cpu", books) == {}


def test_unknown_notebook_profile_and_parameter_name_the_valid_ones(books, tmp_path):
    with pytest.raises(ValueError, match=r"unknown notebook 'nope'; valid: \['bad', 'good'\]"):
        report.run_notebook("nope", notebooks=books, out=tmp_path / "r")
    with pytest.raises(ValueError, match=r"unknown profile 'gpu'; valid: \['cpu', 'smoke'\]"):
        report.run_notebook("good", "gpu", notebooks=books, out=tmp_path / "r")
    with pytest.raises(ValueError, match=r"unknown parameters \['m'\].*defines \['n', 'runs_root'\]"):
        report.run_notebook("good", params={"m": 1}, notebooks=books, out=tmp_path / "r")
    (books / "params" / "smoke" / "good.yaml").write_text("n: 2\nepochz: 3\n")     # a typo in a profile file
    with pytest.raises(ValueError, match=r"good.yaml: unknown parameters \['epochz'\]"):
        report.profile_parameters("good", "smoke", books)
    with pytest.raises(ValueError, match="runs_root"):   # 'bad' has no runs_root parameter to set
        report.run_notebook("bad", runs_root=tmp_path / "runs", notebooks=books, out=tmp_path / "r")
    assert not (tmp_path / "r").exists() or not any((tmp_path / "r").iterdir())


@pytest.mark.parametrize("source, error", [
    ("n = 1 + 2\n", "line 1: only `name = <literal>`"),
    ("import os\n", "line 1: only"),
    ("a = 1\nb = f(a)\n", "line 2: only"),
    ("a, b = 1, 2\n", "line 1: only"),
    ("n = (\n", "not valid Python"),
])
def test_parameters_cell_holds_literals_only(source, error):
    with pytest.raises(ValueError, match=error):
        report.parse_parameters(source)
    assert report.parse_parameters("# c\nx = [1, 'a', None]\ny = {'k': -1e-3}\n") == {"x": [1, "a", None],
                                                                                   "y": {"k": -1e-3}}


def test_exactly_one_parameters_cell(books):
    nb = nbformat.read(books / "good.ipynb", as_version=4)
    nb.cells[2].metadata["tags"] = ["parameters"]
    with pytest.raises(ValueError, match="exactly one code cell tagged 'parameters', found 2"):
        report.parameters_cell(nb)
    nb.cells[1].metadata["tags"] = nb.cells[2].metadata["tags"] = []
    with pytest.raises(ValueError, match="found 0"):
        report.parameters_cell(nb)


def test_run_notebook_writes_ipynb_and_offline_html(books, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    ipynb, html = report.run_notebook("good", "smoke", out="reports", params={"n": 4}, runs_root="my-runs",
                                      notebooks=books, progress=False)
    assert ipynb == Path("reports/good-smoke.ipynb") and html == Path("reports/good-smoke.html")
    nb = nbformat.read(ipynb, as_version=4)
    text = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    assert f"n is 4 runs in {tmp_path / 'my-runs'}" in text           # override beats profile; runs_root absolute
    page = html.read_text()
    assert "plotly.js v" in page and "Plotly.newPlot" in page            # the bundle and the figure are inline
    assert '<script src="http' not in page and "cdnjs" not in page      # nothing to fetch from the internet
    assert sorted(p.name for p in Path("reports").iterdir()) == ["good-smoke.html", "good-smoke.ipynb"]


def test_failing_cell_keeps_failed_notebook_and_names_the_cell(books, tmp_path):
    out = tmp_path / "reports"
    with pytest.raises(report.NotebookError, match=r"notebook 'bad' \(profile 'smoke'\) failed in cell In \[4\] .*"
                                                   r"RuntimeError: boom in cell") as err:
        report.run_notebook("bad", "smoke", out=out, notebooks=books, progress=False)
    failed = out / "bad-smoke.failed.ipynb"
    # executed: parameters [1], injected parameters [2], x = 1 [3], raise [4]; the last cell never ran
    assert err.value.failed_path == failed and err.value.cell_index == 4 and failed.is_file()
    assert "raise RuntimeError('boom in cell')" in str(err.value)
    nb = nbformat.read(failed, as_version=4)
    code = {c.execution_count: c for c in nb.cells if c.cell_type == "code"}
    assert any(o.output_type == "error" for o in code[4].outputs) and code[None].source == "print('never')"
    assert not (out / "bad-smoke.ipynb").exists() and not (out / "bad-smoke.html").exists()
    assert not list(out.glob(".*running*"))                             # no temp file left behind


def test_run_notebooks_goes_on_after_a_failure_and_cli_exit_code(books, tmp_path, monkeypatch, capsys):
    rows = report.run_notebooks(profile="smoke", out=tmp_path / "r", notebooks=books, progress=False)
    assert [(r["notebook"], r["status"]) for r in rows] == [("bad", "failed"), ("good", "ok")]
    assert rows[0]["report"].endswith("bad-smoke.failed.ipynb") and "boom in cell" in rows[0]["error"]
    monkeypatch.setattr(report, "NOTEBOOKS", books)
    with pytest.raises(SystemExit, match="name one notebook or pass --all"):
        cli.main(["report"])
    assert cli.main(["report", "nope"]) == 2                             # ValueError -> exit code 2 with message
    assert "unknown notebook 'nope'" in capsys.readouterr().err
    assert cli.main(["report", "good", "--profile", "smoke", "--out", str(tmp_path / "c"), "-p", "n=5"]) == 0
    assert "n is 5" in json.dumps(nbformat.read(tmp_path / "c" / "good-smoke.ipynb", as_version=4))
    with pytest.raises(SystemExit) as stop:
        cli.main(["report", "--all", "--profile", "smoke", "--out", str(tmp_path / "c")])
    assert stop.value.code == 1                                          # one notebook failed


def test_demo_runs_every_notebook_then_starts_the_dashboard(prepared_tiny, books, tmp_path, monkeypatch, capsys):
    """`lab demo` on throw-away notebooks: prepare (cached), the demo profile of each, summary, dashboard."""
    import subprocess
    (books / "bad.ipynb").unlink()
    (books / "params" / "demo").mkdir()
    (books / "params" / "demo" / "good.yaml").write_text("n: 6\n")
    monkeypatch.setattr(report, "NOTEBOOKS", books)
    monkeypatch.setattr(report, "REPO", tmp_path)                      # no dashboard/app.py here
    args = ["demo", "--runs", str(tmp_path / "runs"), "--out", str(tmp_path / "reports")]
    assert cli.main(args) == 0
    out = capsys.readouterr().out
    assert "good" in out and "ok" in out and "total wall time" in out and "no dashboard at" in out
    assert (tmp_path / "reports" / "good-demo.html").is_file()
    (tmp_path / "dashboard").mkdir()
    (tmp_path / "dashboard" / "app.py").write_text("")
    calls = []
    monkeypatch.setattr(subprocess, "run", lambda cmd, **kw: calls.append(cmd) or subprocess.CompletedProcess(cmd, 0))
    assert cli.main(args + ["--port", "8765"]) == 0
    assert "http://localhost:8765" in capsys.readouterr().out
    assert calls and calls[0][1:4] == ["-m", "streamlit", "run"] and calls[0][-2:] == ["--runs", str(tmp_path / "runs")]
    assert " ".join(report.STREAMLIT_FLAGS) in " ".join(calls[0])
    calls.clear()
    assert cli.main(args + ["--no-dashboard"]) == 0 and not calls


def _listening(port: int) -> list[str]:
    """Local addresses (hex, as the kernel writes them) of the TCP sockets listening on `port`."""
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError):
            for line in Path(table).read_text().splitlines()[1:]:
                local, state = line.split()[1], line.split()[3]
                addr, hexport = local.rsplit(":", 1)
                if state == "0A" and int(hexport, 16) == port:   # 0A = LISTEN
                    found.append(addr)
    return found


LOOPBACK = {"0100007F", "00000000000000000000000001000000"}   # 127.0.0.1, ::1 (little-endian words)


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/net/tcp").exists(), reason="needs Linux /proc/net/tcp")
def test_dashboard_started_from_another_folder_listens_on_localhost_only(tmp_path):
    """`lab demo --dashboard-only` run outside the repository (where .streamlit/config.toml is not read):
    the server listens on loopback only and does not collect usage statistics."""
    import socket
    import subprocess
    import sys
    import time
    import urllib.request

    from dashboard import screenshots
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    log = tmp_path / "streamlit.log"
    env = {**os.environ, "PYTHONPATH": str(report.REPO)}
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "lab", "demo", "--dashboard-only", "--runs", "runs",
                                 "--port", str(port)], cwd=elsewhere, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 120
        while True:
            assert proc.poll() is None, log.read_text()[-2000:]
            with contextlib.suppress(OSError):
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/_stcore/health", timeout=2) as r:
                    if r.read().strip() == b"ok":
                        break
            assert time.time() < deadline, f"no dashboard on port {port}: {log.read_text()[-2000:]}"
            time.sleep(0.5)
        addresses = _listening(port)
        assert addresses and set(addresses) <= LOOPBACK, addresses      # not 0.0.0.0 / :: (all interfaces)
    finally:
        screenshots.stop_process(proc, timeout=15)
    text = log.read_text()
    assert "Network URL" not in text and f"URL: http://localhost:{port}" in text
    assert str(elsewhere / "runs") in text                                   # --runs relative to the caller
    # usage statistics: only the browser learns the setting (websocket), so check what the lab passes
    cmd = report.dashboard_command("runs", port)
    assert cmd[cmd.index("--browser.gatherUsageStats") + 1] == "false"


def test_runs_made_by_a_notebook_are_tagged_with_notebook_and_section(tmp_path):
    """run_notebook tags the kernel's runs '<notebook> (<profile>)'; lab.experiments adds the '## ' heading
    above the cell that runs the grid (here: experiment_tag(), what run_grid uses)."""
    from lab import runs
    make = ("from lab import runs, experiments\n"
            "with runs.experiment(experiments.experiment_tag()):\n"
            "    with runs.create_run({'kind': 'unlearn', 'method': '%s'}, root=runs_root):\n"
            "        pass")
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    params = nbformat.v4.new_code_cell("runs_root = 'runs'")
    params.metadata["tags"] = ["parameters"]
    nb.cells = [nbformat.v4.new_markdown_cell("# Tagged"), params, nbformat.v4.new_code_cell(make % "ga"),
                nbformat.v4.new_markdown_cell("Some text\n\n## 2. Table 3: a / b"), nbformat.v4.new_code_cell("x = 1"),
                nbformat.v4.new_markdown_cell("### a sub-heading"), nbformat.v4.new_code_cell(make % "npo")]
    books = tmp_path / "notebooks"
    books.mkdir()
    nbformat.write(nb, books / "tagged.ipynb")
    report.run_notebook("tagged", out=tmp_path / "out", runs_root=tmp_path / "runs", notebooks=books, progress=False)
    tags = {r.config["method"]: r.config.get("experiment") for r in map(runs.load_run, runs.find_runs(tmp_path / "runs"))}
    assert tags == {"ga": "tagged (cpu)", "npo": "tagged (cpu)/2. Table 3: a / b"}
    assert runs.current_experiment() is None and os.environ.get(runs.EXPERIMENT_ENV) is None   # this process untouched
