"""lab.claims: claim records published by notebooks -> claims files -> the markdown ledger (fixture files,
not a rerun of the notebooks)."""
import json
import pathlib

import nbformat
import pytest

from lab import claims, experiments
from lab.cli import main

FIXTURES = pathlib.Path(__file__).parent / "fixtures" / "claims"


def test_ledger_from_fixture_files_has_one_column_per_executed_profile():
    text = claims.build(claims.find(FIXTURES))
    # papers in the notebook order of PAPERS (ALKN, NGDiff, GRU, BLUR): NGDiff before BLUR
    assert text.index("## NGDiff") < text.index("## BLUR")
    ngdiff = text[text.index("## NGDiff"):text.index("## BLUR")]
    header = next(line for line in ngdiff.splitlines() if line.startswith("| claim |"))
    assert header == "| claim | paper's number | tiny, demo | SmolLM2-135M, real |"
    row = next(line for line in ngdiff.splitlines() if line.startswith("| NGDiff has the best TruthRatio"))
    cells = [c.strip() for c in row.strip("|").split(" | ")]
    assert cells[1] == "0.55 (Table 1)"
    assert cells[2].startswith("**holds**: NGDiff 0.612") and cells[3].startswith("**does not hold**: NGDiff 0.40")
    # a claim made only by one profile leaves the other profile's cell empty; pipes are escaped
    only_real = next(line for line in ngdiff.splitlines() if line.startswith("| Only on the real model"))
    assert only_real.split(" | ")[2] == ""
    assert "MUSE: a \\| pipe" in ngdiff
    summary = text[text.index("## Summary"):text.index("## NGDiff")]
    assert ("| NGDiff (unlearning as multi-task optimisation) | tiny, demo | 1 | 1 | 1 | 2026-12-01 | `abc1234` | "
            "`lab report ngdiff_mto --profile demo` | 55.0 s |") in summary
    assert "| SmolLM2-135M, real | 1 | 1 | 0 | 2026-12-02 | `def5678`" in summary


def test_lab_claims_cli_writes_the_ledger(tmp_path, capsys):
    out = tmp_path / "docs" / "claims.md"
    assert main(["claims", "--reports", str(FIXTURES), "--out", str(out)]) == 0
    assert out.read_text() == claims.build(claims.find(FIXTURES)) + "\n"
    assert "3 claims files" in capsys.readouterr().out


@pytest.mark.parametrize("content, message", [("[1, 2]", "lacks"), ("{\"notebook\": 1", "not a readable"),
                                              ('{"notebook": "x", "profile": "demo", "claims": [3]}', "claim 0")])
def test_a_broken_claims_file_is_named_in_the_error(tmp_path, content, message):
    bad = tmp_path / "x-demo.claims.json"
    bad.write_text(content)
    with pytest.raises(ValueError, match=message) as err:
        claims.build([bad])
    assert str(bad) in str(err.value)


def test_no_claims_files_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="lab report"):
        claims.write([tmp_path], tmp_path / "claims.md")


def test_claims_file_from_an_executed_notebook(tmp_path):
    """What run_notebook does after execution: the CLAIM_MIME outputs -> <name>-<profile>.claims.json."""
    rec = experiments.claim("X beats Y", True, "0.5 vs 0.4", paper="0.9 (Table 2)")
    assert rec == {"claim": "X beats Y", "verdict": "holds at this scale", "detail": "0.5 vs 0.4", "paper": "0.9 (Table 2)"}
    nb = nbformat.v4.new_notebook()
    cell = nbformat.v4.new_code_cell("claim(...)")
    cell.outputs = [nbformat.v4.new_output("stream", name="stdout", text="[HOLDS] X beats Y"),
                    nbformat.v4.new_output("display_data", data={claims.CLAIM_MIME: rec})]
    nb.cells = [nbformat.v4.new_markdown_cell("# t"), cell]
    path = claims.claims_file(nb, notebook="ngdiff_mto", profile="demo", params={"a": 1}, seconds=1.23, out=tmp_path)
    data = json.loads(path.read_text())
    assert path.name == "ngdiff_mto-demo.claims.json"
    assert data["claims"] == [rec] and data["params"] == {"a": 1} and data["seconds"] == 1.2
    assert data["command"] == "lab report ngdiff_mto --profile demo" and data["commit"]
    assert claims.extract(claims.without_claims(nb)) == [] and len(nb.cells[1].outputs) == 2
    # a notebook without claims writes no file (and removes a stale one)
    assert claims.claims_file(nbformat.v4.new_notebook(), notebook="ngdiff_mto", profile="demo", params={},
                              seconds=0, out=tmp_path) is None
    assert not path.exists()


def test_headline_figures_are_exported_as_png(tmp_path, browser_available):
    # an executed report with two plotly figures and its claims file beside it, as `lab report` writes them
    import plotly.express as px
    import plotly.io as pio
    from lab.claims import PLOTLY_MIME
    nb = nbformat.v4.new_notebook()
    for title in ("Table 2 at this scale", "Figure 7"):
        c = nbformat.v4.new_code_cell("px.scatter(...)")
        fig = px.scatter(x=[0.3, 0.5], y=[-4.0, -1.0], title=title)
        c.outputs = [nbformat.v4.new_output("display_data", data={PLOTLY_MIME: json.loads(pio.to_json(fig))})]
        nb.cells.append(c)
    nbformat.write(nb, str(tmp_path / "gru_rectification-real.ipynb"))
    (tmp_path / "gru_rectification-real.claims.json").write_text(json.dumps(
        {"notebook": "gru_rectification", "profile": "real", "claims": [{"claim": "x", "verdict": "holds at this scale"}]}))
    (tmp_path / "blur_bilevel-demo.claims.json").write_text(json.dumps(   # a demo profile: no figure by default
        {"notebook": "blur_bilevel", "profile": "demo", "claims": [{"claim": "y", "verdict": "holds at this scale"}]}))
    assert claims.headline_figure(tmp_path / "gru_rectification-real.ipynb").layout.title.text == "Table 2 at this scale"
    out = tmp_path / "figures"
    assert main(["claims", "--reports", str(tmp_path), "--out", str(tmp_path / "claims.md"), "--figures", str(out)]) in (0, None)
    pngs = sorted(out.iterdir())
    assert [p.name for p in pngs] == ["gru_rectification-real.png"]
    data = pngs[0].read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    import struct
    assert struct.unpack(">II", data[16:24]) == (900, 520)     # the exported size


def test_figure_export_retries_a_transient_browser_failure_then_names_the_figure(monkeypatch):
    # kaleido failing once (as Chromium under load did in CI) is retried with a fresh browser; failing
    # every time raises one error that names the figure. MathJax stays off (its CDN is unreachable here).
    import kaleido
    import plotly.express as px
    calls = []

    def flaky(spec, opts, kopts):
        calls.append(kopts)
        if len(calls) < 2:
            raise RuntimeError("ReferenceError: kaleido_scopes is not defined")
        return b"\x89PNG fake"
    monkeypatch.setattr(kaleido, "calc_fig_sync", flaky)
    fig = px.scatter(x=[0, 1], y=[1, 0])
    assert claims.figure_png(fig, what="r.ipynb") == b"\x89PNG fake"
    assert len(calls) == 2 and all(k == {"mathjax": False} for k in calls)

    def broken(spec, opts, kopts):
        raise RuntimeError("chromium crashed")
    monkeypatch.setattr(kaleido, "calc_fig_sync", broken)
    with pytest.raises(RuntimeError, match=r"headline figure of r\.ipynb .* 3 tries.*chromium crashed"):
        claims.figure_png(fig, what="r.ipynb")
