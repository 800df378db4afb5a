"""Notebook reports: execute a notebook under papermill with a parameter profile, write
`reports/<name>-<profile>.ipynb` and a self-contained HTML next to it.

    run_notebook("alkn_continual", profile="demo")     # -> (reports/alkn_continual-demo.ipynb, ....html)
    list_notebooks()                                    # ['00_quickstart', 'alkn_continual', ...]
    list_profiles("alkn_continual")                     # ['cpu', 'demo', 'gpu', 'smoke']

Profiles: "cpu" = the notebook's own `parameters` cell (the embedded CPU default); any other profile P
is the YAML file notebooks/params/P/<name>.yaml (smoke: seconds, for the tests; demo: `lab demo`;
gpu: paper scale). Its keys must be names assigned in the parameters cell, so a typo fails here
instead of being silently injected as an unused variable.

Notebooks start with `from lab.report import notebook_setup; notebook_setup()` so plotly figures are
embedded in the saved outputs (visible offline, and surviving nbconvert to HTML).
"""
from __future__ import annotations

import ast
import os
import re
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
NOTEBOOKS = REPO / "notebooks"
CPU_PROFILE = "cpu"
KERNEL = "python3"

# nbconvert's lab template: the same page without the CDN scripts (require.js, MathJax, mermaid) that
# would need internet. Plotly does not need them: notebook_setup() embeds plotly.js itself.
_OFFLINE_TEMPLATE = """{%- extends 'index.html.j2' -%}
{%- block html_head_js_requirejs -%}{%- endblock html_head_js_requirejs -%}
{%- block html_head_js_mathjax -%}{%- endblock html_head_js_mathjax -%}
{%- block html_head_js_mermaidjs -%}{%- endblock html_head_js_mermaidjs -%}
"""
# plotly's HTML renderer adds a MathJax CDN <script src=...> to every figure (hard-coded in plotly);
# figures render without it, and offline it could only fail to load.
_REMOTE_SCRIPT = re.compile(r"<script\b[^>]*\bsrc=[\"']https?://[^\"']*[\"'][^>]*>\s*</script>", re.I)


def notebook_setup(plotly_renderer: str = "plotly_mimetype+notebook") -> None:
    """Call at the top of a notebook: plotly figures embedded offline, wide pandas tables."""
    import pandas as pd
    import plotly.io as pio

    # "notebook" embeds plotly.js once in the output (offline); "plotly_mimetype" keeps the figure JSON
    # for JupyterLab. nbconvert's HTML exporter renders the text/html part, so figures survive.
    pio.renderers.default = plotly_renderer
    pd.set_option("display.width", 200)
    pd.set_option("display.max_columns", 40)
    pd.set_option("display.precision", 4)


class NotebookError(RuntimeError):
    """A notebook cell raised; the executed notebook was saved as `failed_path`."""

    def __init__(self, message: str, failed_path: Path | None = None, cell_index: int | None = None):
        super().__init__(message)
        self.failed_path = failed_path
        self.cell_index = cell_index


# ---------------------------------------------------------------- notebooks, parameters, profiles
def list_notebooks(notebooks: str | os.PathLike | None = None) -> list[str]:
    """Names (file stems) of the notebooks in notebooks/, sorted (00_quickstart first)."""
    root = Path(notebooks or NOTEBOOKS)
    return sorted(p.stem for p in root.glob("*.ipynb") if not p.name.startswith("."))


def notebook_path(name: str, notebooks: str | os.PathLike | None = None) -> Path:
    root = Path(notebooks or NOTEBOOKS)
    stem = name[:-len(".ipynb")] if name.endswith(".ipynb") else name
    path = root / f"{stem}.ipynb"
    if not path.is_file():
        raise ValueError(f"unknown notebook {name!r}; valid: {list_notebooks(root)} (in {root})")
    return path


def list_profiles(name: str, notebooks: str | os.PathLike | None = None) -> list[str]:
    """'cpu' (the notebook's own defaults) and every P with notebooks/params/P/<name>.yaml."""
    path = notebook_path(name, notebooks)
    params = path.parent / "params"
    found = sorted(d.name for d in params.iterdir() if (d / f"{path.stem}.yaml").is_file()) \
        if params.is_dir() else []
    return [CPU_PROFILE, *[p for p in found if p != CPU_PROFILE]]


def parameters_cell(nb, where: str = "notebook") -> tuple[int, str]:
    """(index, source) of the one cell tagged `parameters`; ValueError when there is none or several."""
    hits = [(i, c) for i, c in enumerate(nb["cells"])
            if c.get("cell_type") == "code" and "parameters" in c.get("metadata", {}).get("tags", [])]
    if len(hits) != 1:
        raise ValueError(f"{where}: expected exactly one code cell tagged 'parameters', found {len(hits)}")
    i, cell = hits[0]
    source = cell["source"] if isinstance(cell["source"], str) else "".join(cell["source"])
    return i, source


def parse_parameters(source: str, where: str = "parameters cell") -> dict:
    """The parameters cell as {name: value}: it may hold only `name = <literal>` lines (and comments);
    derived values belong in later cells so papermill overrides reach them."""
    try:
        tree = ast.parse(source)
    except SyntaxError as e:
        raise ValueError(f"{where}: not valid Python ({e})") from None
    values = {}
    for node in tree.body:
        ok = (isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name))
        if ok:
            try:
                values[node.targets[0].id] = ast.literal_eval(node.value)
                continue
            except ValueError:
                pass
        raise ValueError(f"{where}, line {node.lineno}: only `name = <literal>` assignments are allowed, "
                         f"got {ast.unparse(node)!r}")
    return values


def notebook_parameters(name: str, notebooks: str | os.PathLike | None = None) -> dict:
    """The defaults in a notebook's parameters cell (= the 'cpu' profile)."""
    import nbformat
    path = notebook_path(name, notebooks)
    nb = nbformat.read(path, as_version=4)
    _, source = parameters_cell(nb, str(path))
    return parse_parameters(source, f"{path} parameters cell")


def profile_parameters(name: str, profile: str = CPU_PROFILE,
                       notebooks: str | os.PathLike | None = None) -> dict:
    """The parameter overrides of a profile ({} for 'cpu'), checked against the parameters cell."""
    import yaml
    path = notebook_path(name, notebooks)
    profiles = list_profiles(name, notebooks)
    if profile not in profiles:
        raise ValueError(f"notebook {path.stem!r}: unknown profile {profile!r}; valid: {profiles} "
                         f"(a profile P is the file notebooks/params/P/{path.stem}.yaml)")
    if profile == CPU_PROFILE:
        return {}
    file = path.parent / "params" / profile / f"{path.stem}.yaml"
    values = yaml.safe_load(file.read_text()) or {}
    if not isinstance(values, dict):
        raise ValueError(f"{file}: expected a mapping of parameter names to values")
    check_parameter_names(values, notebook_parameters(path.stem, notebooks), str(file))
    return values


def check_parameter_names(values: dict, defaults: dict, where: str) -> None:
    unknown = sorted(set(values) - set(defaults))
    if unknown:
        raise ValueError(f"{where}: unknown parameters {unknown}; the notebook's parameters cell defines "
                         f"{sorted(defaults)}")


# ---------------------------------------------------------------- HTML
def notebook_html(nb) -> str:
    """Self-contained HTML of an executed notebook (lab template, no CDN scripts; plotly.js is inline
    in the notebook_setup() output)."""
    import jinja2
    from nbconvert import HTMLExporter
    offline = jinja2.DictLoader({"offline.html.j2": _OFFLINE_TEMPLATE})
    exporter = HTMLExporter(template_name="lab", extra_loaders=[offline])
    exporter.template_file = "offline.html.j2"
    body, _ = exporter.from_notebook_node(nb)
    return _REMOTE_SCRIPT.sub("", body)


# ---------------------------------------------------------------- execution
def run_notebook(name: str, profile: str = CPU_PROFILE, out: str | os.PathLike = "reports",
                 params: dict | None = None, runs_root: str | os.PathLike | None = None, *,
                 notebooks: str | os.PathLike | None = None, progress: bool = True,
                 timeout: int | None = None) -> tuple[Path, Path]:
    """Execute notebook `name` with the `profile` parameters (+ `params` overrides; `runs_root` sets the
    notebook's runs_root parameter) into out/<name>-<profile>.ipynb and .html; returns both paths.

    The notebook runs in the caller's working directory, so relative paths (runs_root="runs") mean
    the same as on the command line. On a cell error the executed notebook is kept as
    out/<name>-<profile>.failed.ipynb and NotebookError names the notebook and the cell.
    """
    import nbformat
    import papermill as pm
    from lab import claims
    from lab.runs import atomic_write_text

    src = notebook_path(name, notebooks)
    name = src.stem
    defaults = notebook_parameters(name, notebooks)
    values = {**profile_parameters(name, profile, notebooks), **(params or {})}
    if runs_root is not None:
        values["runs_root"] = str(Path(runs_root).resolve())
    check_parameter_names(values, defaults, f"notebook {name!r} (profile {profile!r}, overrides)")

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"{name}-{profile}"
    final, failed, html = out / f"{stem}.ipynb", out / f"{stem}.failed.ipynb", out / f"{stem}.html"
    tmp = out / f".{stem}.{os.getpid()}.running.ipynb"
    # the kernel inherits this environment: PASSIVE OpenMP waiting before torch loads (see lab/__init__)
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if progress:
        shown = ", ".join(f"{k}={v!r}" for k, v in values.items()) or "notebook defaults"
        print(f"[report] {name} ({profile}): {shown}", flush=True)
    started = time.time()
    try:
        pm.execute_notebook(str(src), str(tmp), parameters=values, kernel_name=KERNEL, language="python",
                            progress_bar=progress, cwd=os.getcwd(), execution_timeout=timeout,
                            extra_arguments=[_experiment_exec_line(f"{name} ({profile})", src)])
    except pm.PapermillExecutionError as e:
        os.replace(tmp, failed)
        source = "\n".join(e.source.splitlines()[:8])
        # the failed notebook shows the cell as In [exec_count]; cell_index counts papermill's
        # injected-parameters cell (and the saved copy has papermill's error banner on top)
        raise NotebookError(f"notebook {name!r} (profile {profile!r}) failed in cell In [{e.exec_count}] "
                            f"(cell {e.cell_index} of the executed notebook): {e.ename}: {e.evalue}\n"
                            f"--- cell source ---\n{source}\n--- executed notebook saved as {failed}",
                            failed, e.cell_index) from None
    except BaseException:
        if tmp.exists():   # kernel died, timeout, Ctrl-C: keep what ran for inspection
            os.replace(tmp, failed)
        raise
    nb = nbformat.read(tmp, as_version=4)
    # the notebook's claim verdicts beside its report, for the claims ledger (`lab claims`)
    claims.claims_file(nb, notebook=name, profile=profile, params=values, seconds=time.time() - started, out=out)
    atomic_write_text(html, notebook_html(claims.without_claims(nb)))
    os.chmod(html, 0o644)   # the atomic writer's temp file is private; a report is meant to be shared
    os.replace(tmp, final)
    failed.unlink(missing_ok=True)
    return final, html


NOTEBOOK_ENV = "LAB_NOTEBOOK"   # the executing notebook's source: lab.experiments finds section headings in it


def _experiment_exec_line(tag: str, src: Path) -> str:
    """Kernel option that tags the runs the notebook makes (lab.runs.EXPERIMENT_ENV, in the kernel only:
    notebooks run side by side share this process's environment)."""
    from lab.runs import EXPERIMENT_ENV
    return (f"--IPKernelApp.exec_lines=import os; os.environ[{EXPERIMENT_ENV!r}] = {tag!r}; "
            f"os.environ[{NOTEBOOK_ENV!r}] = {str(src)!r}")


def run_notebooks(names: list[str] | None = None, profile: str = CPU_PROFILE,
                  out: str | os.PathLike = "reports", params: dict | None = None,
                  runs_root: str | os.PathLike | None = None, *,
                  notebooks: str | os.PathLike | None = None, progress: bool = True, jobs: int = 1) -> list[dict]:
    """Run several notebooks (default: all) with one profile, going on after a failure.

    Every notebook must have the profile (checked before anything runs). Returns one dict per notebook
    (in the order of `names`): notebook, status ('ok' | 'failed'), seconds, report (html path) or error.
    jobs > 1: that many kernels at once, each with 1/jobs of the CPU threads (OMP_NUM_THREADS), the
    longest notebooks first (small models use threads poorly: side-by-side kernels finish sooner)."""
    names = list_notebooks(notebooks) if names is None else [notebook_path(n, notebooks).stem for n in names]
    if not names:
        raise ValueError(f"no notebooks in {Path(notebooks or NOTEBOOKS)}")
    for n in names:   # every profile file and override valid before the first notebook starts
        values = {**profile_parameters(n, profile, notebooks), **(params or {})}
        if runs_root is not None:
            values["runs_root"] = str(runs_root)
        check_parameter_names(values, notebook_parameters(n, notebooks),
                              f"notebook {n!r} (profile {profile!r})")
    def one(n):
        t0 = time.time()
        try:
            _, html = run_notebook(n, profile, out, params, runs_root, notebooks=notebooks,
                                   progress=progress and jobs == 1)
            row = {"notebook": n, "status": "ok", "seconds": round(time.time() - t0, 1), "report": str(html)}
        except NotebookError as e:
            print(f"[report] {e}", flush=True)
            row = {"notebook": n, "status": "failed", "seconds": round(time.time() - t0, 1),
                   "report": str(e.failed_path), "error": str(e).splitlines()[0]}
        if jobs > 1 and progress:
            print(f"[report] {n} ({profile}): {row['status']} in {row['seconds']} s", flush=True)
        return row

    if jobs <= 1:
        return [one(n) for n in names]
    from concurrent.futures import ThreadPoolExecutor
    # kernels inherit the environment: set it once for all of them (os.environ is process-wide)
    saved = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = str(max(1, len(os.sched_getaffinity(0)) // jobs))
    order = sorted(names, key=lambda n: -EXPECTED_SECONDS.get(n, 0))
    try:
        with ThreadPoolExecutor(jobs) as pool:
            done = dict(zip(order, pool.map(one, order)))
    finally:
        if saved is None:
            os.environ.pop("OMP_NUM_THREADS", None)
        else:
            os.environ["OMP_NUM_THREADS"] = saved
    return [done[n] for n in names]


# ---------------------------------------------------------------- the dashboard and JupyterLab servers
# Streamlit reads .streamlit/config.toml only from its working directory: every way the lab starts it
# passes these, so `lab demo` from any folder serves on this machine only and sends no usage statistics.
STREAMLIT_FLAGS = ["--server.address", "localhost", "--browser.gatherUsageStats", "false",
                   "--server.headless", "true", "--server.fileWatcherType", "none"]


def dashboard_command(runs_root: str | os.PathLike = "runs", port: int = 8501) -> list[str]:
    """argv that serves dashboard/app.py on localhost:<port> over runs_root (any working directory)."""
    import sys
    return [sys.executable, "-m", "streamlit", "run", str(REPO / "dashboard" / "app.py"), *STREAMLIT_FLAGS,
            "--server.port", str(port), "--", "--runs", os.path.abspath(runs_root)]


def serve_dashboard(runs_root: str | os.PathLike = "runs", port: int = 8501) -> int:
    """Serve the dashboard until Ctrl-C (blocking); returns streamlit's exit code (0 after Ctrl-C)."""
    import subprocess
    print(f"lab: dashboard at http://localhost:{port}  over {os.path.abspath(runs_root)}  (Ctrl-C to stop)",
          flush=True)
    try:
        return subprocess.run(dashboard_command(runs_root, port), check=False).returncode
    except KeyboardInterrupt:
        return 0


def notebook_command(port: int = 8888, token: str | None = None, open_browser: bool = True,
                     notebooks: str | os.PathLike | None = None) -> list[str]:
    """argv that opens JupyterLab on notebooks/ on localhost:<port> with this interpreter's kernel.

    token None: JupyterLab makes one and prints the URL holding it. The server's own interpreter is the
    native kernel (python3 = the venv's python, also what `make setup` installs as the sys-prefix kernel);
    no update / news / extension-index checks (they would need the internet)."""
    import sys
    cmd = [sys.executable, "-m", "jupyterlab", f"--ServerApp.root_dir={Path(notebooks or NOTEBOOKS)}",
           "--ServerApp.ip=localhost", f"--ServerApp.port={port}", "--ServerApp.port_retries=0",
           "--KernelSpecManager.ensure_native_kernel=True", f"--MappingKernelManager.default_kernel_name={KERNEL}",
           "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate", "--LabApp.news_url=None",
           "--LabApp.extension_manager=readonly", f"--ServerApp.open_browser={open_browser}"]
    if hasattr(os, "geteuid") and os.geteuid() == 0:   # containers run as root; Jupyter refuses it otherwise
        cmd.append("--ServerApp.allow_root=True")
    if token is not None:
        cmd.append(f"--IdentityProvider.token={token}")
    return cmd


def serve_notebooks(port: int = 8888, token: str | None = None, open_browser: bool = True) -> int:
    """JupyterLab on notebooks/ until Ctrl-C (blocking); returns its exit code (0 after Ctrl-C)."""
    import subprocess
    print(f"lab: JupyterLab on {NOTEBOOKS} at http://localhost:{port}/lab  (Ctrl-C to stop)", flush=True)
    try:
        return subprocess.run(notebook_command(port, token, open_browser), check=False).returncode
    except KeyboardInterrupt:
        return 0


# demo-profile wall times on 2 CPU cores (README): the scheduling order of run_notebooks(jobs > 1)
EXPECTED_SECONDS = {"gru_rectification": 86, "blur_bilevel": 78, "alkn_continual": 65, "ngdiff_mto": 58,
                    "00_quickstart": 25}
