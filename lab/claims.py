"""The claims ledger: every paper notebook's verdicts, per executed profile, in one committed page.

A paper notebook calls `lab.experiments.claim(...)` once per claim; inside a kernel that also publishes
the record as a display output of type CLAIM_MIME (invisible in the HTML report, kept in the executed
notebook). `lab.report.run_notebook` then writes `<out>/<name>-<profile>.claims.json` beside the report:
the claims plus where they came from (notebook, profile, parameters, date, commit, command, seconds).

    lab claims                                  # reports/*.claims.json -> docs/claims.md
    lab claims --reports reports other/ --out docs/claims.md

The ledger groups claims by paper; each claim gets one verdict (+ the numbers behind it) per profile
that was executed, so a reader sees what holds at each scale without running anything.
"""
from __future__ import annotations

import datetime
import json
import os
import subprocess
from pathlib import Path

CLAIM_MIME = "application/vnd.lab.claim+json"
# notebook -> the paper it reproduces (the ledger's sections, in this order)
PAPERS = {"alkn_continual": "ALKN (continual unlearning, adaptive localisation of knowledge)",
          "ngdiff_mto": "NGDiff (unlearning as multi-task optimisation)",
          "gru_rectification": "GRU / TRU (gradient rectified unlearning)",
          "blur_bilevel": "BLUR (bi-level unlearning)",
          "00_quickstart": "Quickstart (no paper)"}
# profile -> what it runs on, for the column headers
PROFILE_SCALES = {"smoke": "tiny, smoke", "demo": "tiny, demo", "cpu": "tiny, cpu", "real": "SmolLM2-135M, real",
                  "gpu": "paper scale, gpu"}
PROFILE_ORDER = ["demo", "cpu", "real", "gpu", "smoke"]
FIELDS = ("claim", "verdict", "detail")


def publish(record: dict) -> None:
    """Show a claim record to the notebook machinery (no-op outside a kernel)."""
    try:
        from IPython import get_ipython
        from IPython.display import display
    except ImportError:
        return
    if get_ipython() is None or not hasattr(get_ipython(), "kernel"):
        return
    display({CLAIM_MIME: record}, raw=True)


def extract(nb) -> list[dict]:
    """The claim records an executed notebook (nbformat node) published, in execution order."""
    out = []
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        for o in cell.get("outputs", []):
            data = o.get("data", {})
            if CLAIM_MIME in data:
                rec = data[CLAIM_MIME]
                out.append(json.loads(rec) if isinstance(rec, str) else dict(rec))
    return out


def without_claims(nb):
    """A copy of an executed notebook without the claim outputs (HTML exporters cannot render them)."""
    import copy
    nb = copy.deepcopy(nb)
    for cell in nb.cells:
        if cell.cell_type == "code":
            cell.outputs = [o for o in cell.get("outputs", []) if CLAIM_MIME not in o.get("data", {})]
    return nb


def git_commit(repo: Path | None = None) -> str:
    """HEAD's short hash, '+dirty' when tracked files differ from it; 'unknown' outside a git checkout."""
    repo = repo or Path(__file__).resolve().parents[1]
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=repo, capture_output=True,
                              text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=repo,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("+dirty" if dirty else "")


def reused_runs() -> bool:
    """Whether this execution's grids took earlier executions' finished runs (lab report --reuse-runs)."""
    from lab.runs import REUSE_ENV
    return bool(os.environ.get(REUSE_ENV))


def claims_file(nb, *, notebook: str, profile: str, params: dict, seconds: float, out: Path) -> Path | None:
    """Write <out>/<notebook>-<profile>.claims.json from an executed notebook; None if it made no claims."""
    from lab.runs import atomic_write_json
    records = extract(nb)
    path = Path(out) / f"{notebook}-{profile}.claims.json"
    if not records:
        path.unlink(missing_ok=True)
        return None
    meta = {"notebook": notebook, "paper": PAPERS.get(notebook, notebook), "profile": profile,
            "params": params, "date": datetime.date.today().isoformat(), "commit": git_commit(),
            "command": f"lab report {notebook} --profile {profile}" + (" --reuse-runs" if reused_runs() else ""),
            "seconds": round(seconds, 1),
            "claims": records}
    atomic_write_json(path, meta)
    return path


def load(path: Path) -> dict:
    """One claims file, validated: a clear error naming the file and what is wrong."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: not a readable claims file ({e})") from None
    missing = [k for k in ("notebook", "profile", "claims") if not isinstance(data, dict) or k not in data]
    if missing:
        raise ValueError(f"{path}: claims file lacks {missing} (expected keys notebook, profile, claims, ...)")
    for i, c in enumerate(data["claims"]):
        if not isinstance(c, dict) or not {"claim", "verdict"} <= set(c):
            raise ValueError(f"{path}: claim {i} must be an object with 'claim' and 'verdict', got {c!r}")
    return data


def find(dirs) -> list[Path]:
    dirs = [dirs] if isinstance(dirs, (str, Path)) else dirs
    return sorted(p for d in dirs for p in Path(d).glob("*.claims.json"))


def _short(verdict: str) -> str:
    return {"holds at this scale": "holds", "does not hold at this scale": "does not hold",
            "not testable at this scale": "not testable"}.get(verdict, verdict)


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def build(files) -> str:
    """Markdown ledger from claims files (later files win for the same notebook + profile)."""
    runs: dict[tuple[str, str], dict] = {}
    for f in files:
        data = load(f)
        runs[(data["notebook"], data["profile"])] = data
    if not runs:
        raise ValueError("no claims files given (run `lab report NAME --profile P` first: it writes "
                         "<out>/<name>-<profile>.claims.json)")
    notebooks = sorted({n for n, _ in runs}, key=lambda n: (list(PAPERS).index(n) if n in PAPERS else 99, n))
    lines = ["# Claims ledger", "",
             "Every verdict below was computed by a paper notebook from its own runs (`lab.experiments.claim`),",
             "collected by `lab claims` from the `*.claims.json` files `lab report` writes beside each report.",
             "A profile's column is empty where that profile was not executed. Regenerate: run the reports, then `lab claims`.",
             ""]
    summary = ["| paper | profile | holds | does not hold | not testable | date | commit | command | time |",
               "|---|---|---|---|---|---|---|---|---|"]
    body = []
    for nb in notebooks:
        profiles = sorted({p for n, p in runs if n == nb},
                          key=lambda p: (PROFILE_ORDER.index(p) if p in PROFILE_ORDER else 99, p))
        texts: list[str] = []
        for p in profiles:
            for c in runs[(nb, p)]["claims"]:
                if c["claim"] not in texts:
                    texts.append(c["claim"])
        paper = runs[(nb, profiles[0])].get("paper", PAPERS.get(nb, nb))
        for p in profiles:
            data = runs[(nb, p)]
            counts = {v: sum(_short(c["verdict"]) == v for c in data["claims"])
                      for v in ("holds", "does not hold", "not testable")}
            summary.append(f"| {paper} | {PROFILE_SCALES.get(p, p)} | {counts['holds']} | {counts['does not hold']} | "
                           f"{counts['not testable']} | {data.get('date', '')} | `{data.get('commit', '')}` | "
                           f"`{data.get('command', '')}` | {data.get('seconds', '')} s |")
        body += [f"## {paper}", "", f"Notebook `notebooks/{nb}.ipynb`.", "",
                 "| claim | paper's number | " + " | ".join(PROFILE_SCALES.get(p, p) for p in profiles) + " |",
                 "|---|---|" + "---|" * len(profiles)]
        for text in texts:
            by_profile = {p: next((c for c in runs[(nb, p)]["claims"] if c["claim"] == text), None) for p in profiles}
            paper_value = next((c.get("paper", "") for c in by_profile.values() if c and c.get("paper")), "")
            cells = [("**" + _short(c["verdict"]) + "**" + (f": {_cell(c.get('detail', ''))}" if c.get("detail") else ""))
                     if c else "" for c in by_profile.values()]
            body.append(f"| {_cell(text)} | {_cell(paper_value)} | " + " | ".join(cells) + " |")
        body.append("")
    return "\n".join(lines + ["## Summary", ""] + summary + [""] + body)


def write(dirs=("reports",), out: str | Path = "docs/claims.md") -> Path:
    from lab.runs import atomic_write_text
    files = find(dirs)
    if not files:
        raise ValueError(f"no *.claims.json in {[str(d) for d in ([dirs] if isinstance(dirs, (str, Path)) else dirs)]} "
                         "(run `lab report NAME --profile P` first)")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, build(files) + "\n")
    return out


# ---------------------------------------------------------------- headline figures (docs/figures)
PLOTLY_MIME = "application/vnd.plotly.v1+json"


def headline_figure(notebook_path: str | Path):
    """The first plotly figure an executed notebook shows (each paper notebook's first figure is its
    headline table's plot), as a plotly Figure; None if it shows none."""
    import nbformat
    import plotly.io as pio
    nb = nbformat.read(str(notebook_path), as_version=4)
    for c in nb.cells:
        for out in c.get("outputs", []) if c.cell_type == "code" else []:
            data = out.get("data", {}).get(PLOTLY_MIME)
            if data is not None:
                return pio.from_json(json.dumps(data))
    return None


def export_figures(claims_files, out_dir: str | Path = "docs/figures", profiles=("real",)) -> list[Path]:
    """For every claims file of a profile in `profiles` whose executed notebook lies beside it
    (<name>-<profile>.ipynb, as `lab report` writes them), its headline figure as
    <out_dir>/<name>-<profile>.png (plotly static export: kaleido drives the system Chromium)."""
    from lab.runs import atomic_write_bytes
    written = []
    for f in claims_files:
        data = load(f)
        if data["profile"] not in profiles:
            continue
        report = Path(f).with_name(f"{data['notebook']}-{data['profile']}.ipynb")
        fig = headline_figure(report) if report.exists() else None
        if fig is None:
            continue
        out = Path(out_dir) / f"{data['notebook']}-{data['profile']}.png"
        out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(out, figure_png(fig, what=str(report)))
        written.append(out)
    return written


FIGURE_EXPORT_TRIES = 3


def figure_png(fig, what: str = "figure", width: int = 900, height: int = 520) -> bytes:
    """The plotly figure as PNG bytes through kaleido + the system Chromium. MathJax off: kaleido would
    fetch it from a CDN these machines cannot reach (the figures use no LaTeX). A headless Chromium
    under load now and then evaluates kaleido's render call before its page scripts are in
    ("kaleido_scopes is not defined", seen once in CI): a fresh browser is tried up to
    FIGURE_EXPORT_TRIES times before the error, naming the figure, is raised."""
    import kaleido
    spec = fig.to_dict()
    opts = dict(format="png", width=width, height=height, scale=1)
    for attempt in range(1, FIGURE_EXPORT_TRIES + 1):
        try:
            return kaleido.calc_fig_sync(spec, opts=opts, kopts={"mathjax": False})
        except Exception as e:      # kaleido's own errors have no common base class
            if attempt == FIGURE_EXPORT_TRIES:
                raise RuntimeError(f"could not export the headline figure of {what} as PNG after "
                                   f"{attempt} tries (kaleido + Chromium): {type(e).__name__}: {e}") from e
