"""Dashboard: figure functions and derived tables (synthetic frames, fast) and every page under
streamlit's AppTest against real fixture runs (tests/dashboard_fixtures.py), a corrupt and a running run."""
from __future__ import annotations

import base64
import json
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

from dashboard import figures
from lab import runs_views

from dashboard_fixtures import CORRUPT_SHAPES, corrupt_runs, dashboard_runs  # noqa: F401  (session fixtures)

APP = Path(__file__).resolve().parents[1] / "dashboard" / "app.py"
def _keep_main_module():
    main = sys.modules["__main__"]
    yield
    sys.modules["__main__"] = main


# streamlit's script runner installs the app as sys.modules["__main__"] and leaves it there; a later
# multiprocessing spawn in the same worker (the DDP tests) would then re-run the app as its main.
# Module scope: set up before the module-scoped app_pages fixture renders; function scope: after each test.
_restore_main_module = pytest.fixture(scope="module", autouse=True)(_keep_main_module)
_restore_main_after_test = pytest.fixture(autouse=True)(_keep_main_module)


PAGES = {  # page file -> number of plotly charts with the full fixture selection
    "overview": 2, "geometry": 3, "alignment": 2, "tradeoffs": 1, "robustness": 3, "continual": 3, "masks": 4, "rows": 0}


# ---------------------------------------------------------------- figures.py (no streamlit)
def test_smooth_is_a_trailing_mean():
    s = pd.Series([0.0, 3.0, 6.0, 9.0])
    assert figures.smooth(s, 1).tolist() == [0.0, 3.0, 6.0, 9.0]
    assert figures.smooth(s, 2).tolist() == [0.0, 1.5, 4.5, 7.5]     # causal: no look-ahead
    with pytest.raises(ValueError, match="window must be >= 1"):
        figures.smooth(s, 0)


def test_pareto_front_directions_and_nan():
    x = [0.1, 0.2, 0.3, 0.2, np.nan]          # forgetting (lower is better here)
    y = [0.5, 0.8, 0.9, 0.7, 1.0]             # utility (higher is better)
    front = figures.pareto_front(x, y, x_higher=False, y_higher=True)
    assert front.tolist() == [True, True, True, False, False]   # (0.2, 0.7) is dominated by (0.2, 0.8)
    assert figures.pareto_front(x, y, x_higher=True).tolist() == [False, False, True, False, False]


def _trace(label, steps=6, **cols):
    df = pd.DataFrame({"step": range(steps), "label": label, **cols})
    return df


def test_geometry_figure_series_axes_and_gru_markers():
    gru = _trace("gru #a", cos_fr=[-0.5, 0.2, -0.1, 0.3, 0.1, -0.2], cos_pre=[-0.5, 0.2, -0.1, 0.3, 0.1, -0.2],
                 cos_post=[0.0, 0.2, 0.0, 0.3, 0.1, 0.0], projected=[1.0, 0, 1, 0, 0, 1],
                 cos_update_f=[0.9] * 6, cos_update_r=[np.nan, 0.1, np.nan, 0.2, np.nan, 0.3])
    npo = _trace("npo #b", cos_fr=[0.1, np.nan, 0.2, np.nan, 0.3, np.nan])
    fig = figures.geometry_figure(pd.concat([gru, npo], ignore_index=True), window=1)
    names = [t.name for t in fig.data]
    assert "gru #a · GRU cos pre-rectification" in names and "gru #a · GRU cos post-rectification" in names
    assert "gru #a · cos(-Δθ, g_r)" in names and "npo #b · cos(g_f, g_r)" in names
    assert not any(n.startswith("npo #b · GRU") for n in names)       # absent columns add no line
    npo_line = next(t for t in fig.data if t.name == "npo #b · cos(g_f, g_r)")
    assert list(npo_line.x) == [0, 2, 4]                                # diagnosed steps only, no NaN
    fired = next(t for t in fig.data if t.meta == "projected")
    assert list(fired.x) == [0, 2, 5]
    upd = next(t for t in fig.data if t.meta == "cos_update_r")
    assert upd.yaxis == "y2" and list(fig.layout.yaxis.range) == [-1.05, 1.05]
    assert fig.layout.xaxis2.title.text == "step"
    smooth = figures.geometry_figure(gru, window=2)
    assert next(t for t in smooth.data if t.meta == "cos_fr").y[1] == pytest.approx(-0.15)


def test_alignment_figure_shades_sign_regions_symmetrically():
    tr = _trace("blur #c", align_f=[0.5, 1.0, 2.0, 0.5, 1.0, 0.2], align_r=[-0.4, 0.1, 0.2, -0.1, 0.3, 0.5])
    fig = figures.alignment_figure(tr)
    assert [t.meta for t in fig.data] == ["align_f", "align_r"]
    shapes = fig.layout.shapes
    assert len(shapes) == 4                                     # green above 0 and red below, per panel
    assert {s.fillcolor for s in shapes} == set(figures.SIGN_COLORS.values())
    assert fig.layout.yaxis.range[0] == pytest.approx(-2.2) and fig.layout.yaxis.range[1] == pytest.approx(2.2)
    scatter = figures.alignment_scatter(tr)
    assert len(scatter.layout.shapes) == 4 and scatter.layout.xaxis.title.text == "A_f"
    empty = figures.alignment_figure(_trace("x", cos_fr=[0.0] * 6))
    assert not empty.data and "no alignment values" in empty.layout.annotations[0].text


def test_signed_log_alignment_scale_keeps_signs():
    assert figures.signed_log([-99.0, 0.0, 9.0]).tolist() == pytest.approx([-2.0, 0.0, 1.0])
    tr = _trace("ngdiff #e", align_f=[99.0] * 6, align_r=[-9.0] * 6)
    fig = figures.alignment_figure(tr, scale="signed log")
    assert list(fig.data[0].y) == pytest.approx([2.0] * 6) and list(fig.data[1].y) == pytest.approx([-1.0] * 6)
    assert "log10" in fig.layout.yaxis.title.text
    with pytest.raises(ValueError, match="valid: \\['linear', 'signed log'\\]"):
        figures.alignment_figure(tr, scale="log")


def test_lr_figure_marks_autolr_probes():
    tr = _trace("ngdiff #d", lr=[1e-3, 1e-3, 1e-3, 2e-3, 2e-3, 2e-3], autolr_probe=[1, np.nan, np.nan, 1, np.nan, np.nan],
                autolr_accepted=[0, np.nan, np.nan, 1, np.nan, np.nan])
    fig = figures.lr_figure(tr)
    probe = next(t for t in fig.data if t.meta == "autolr_probe")
    assert list(probe.x) == [0, 3] and list(probe.marker.symbol) == ["circle-open", "circle"]
    assert fig.layout.yaxis.type == "log"


def test_tradeoff_figure_colours_tasks_and_marks_front():
    pts = pd.DataFrame([
        dict(label="npo #1", kind="unlearn", task=None, utility=0.4, forgetting=0.2, hover="a"),
        dict(label="gru #2", kind="unlearn", task=None, utility=0.6, forgetting=0.3, hover="b"),
        dict(label="target", kind="target", task=None, utility=0.7, forgetting=0.9, hover="t"),
        dict(label="alkn #3", kind="continual", task=0, utility=0.65, forgetting=0.25, hover="c"),
        dict(label="alkn #3", kind="continual", task=1, utility=0.5, forgetting=0.1, hover="c"),
    ])
    fig = figures.tradeoff_figure(pts, "model_utility", "forget_rouge", forget_higher=False)
    cont = next(t for t in fig.data if t.name == "alkn #3")
    assert list(cont.marker.color) == [figures.TASK_PALETTE[0], figures.TASK_PALETTE[1]]
    front = next(t for t in fig.data if t.meta == "pareto")
    assert sorted(zip(front.x, front.y)) == [(0.1, 0.5), (0.25, 0.65)]       # the target is not a method
    assert [t.name for t in fig.data if t.meta == "task_legend"] == ["task 0", "task 1"]
    assert fig.layout.xaxis.title.text == "forget_rouge" and fig.layout.yaxis.title.text == "model_utility"
    star = next(t for t in fig.data if t.name == "target")
    assert star.marker.symbol == "star"


def test_jaccard_heatmap_is_symmetric_with_unit_diagonal():
    masks = pd.DataFrame({"task_a": [0, 0, 1, 0], "task_b": [1, 2, 2, 1], "scope": ["global"] * 3 + ["layer.0"],
                          "jaccard": [0.2, 0.3, 0.4, 0.9]})
    m = figures.jaccard_matrix(masks, "global")
    assert m.to_numpy().tolist() == [[1, 0.2, 0.3], [0.2, 1, 0.4], [0.3, 0.4, 1]]
    fig = figures.jaccard_heatmap(masks, "layer.0")
    assert np.asarray(fig.data[0].z).tolist() == [[1, 0.9], [0.9, 1]]
    per_scope = figures.scope_heatmap(masks)
    assert list(per_scope.data[0].y) == ["global", "layer.0"] and list(per_scope.data[0].x) == [
        "tasks 0–1", "tasks 0–2", "tasks 1–2"]


# ---------------------------------------------------------------- lab.runs_views (synthetic records)
def _rec(run_id, config, evals, trace=None, masks=None, status="done"):
    return SimpleNamespace(run_id=run_id, path=Path("/nonexistent") / run_id, config=config, summary={"status": status},
                           evals=pd.DataFrame(evals), trace=trace if trace is not None else pd.DataFrame(),
                           masks=masks if masks is not None else pd.DataFrame(), status=status, errors=[])


def _continual_rec(run_id="20260101-000000-continual-alkn-tiny-abc123", protocol="sequential"):
    ev = []
    for task, ckpt in ((-1, "initial"), (0, "unlearned"), (1, "unlearned")):
        ev.append(dict(step=0, epoch=0, task=task, eval_task=None, checkpoint=ckpt, model_utility=0.6 - 0.1 * (task + 1),
                       active_fraction=None if task < 0 else 0.1, tv_moved_fraction=None if task < 0 else 0.3))
        for k in (0, 1):
            forgotten = task >= k
            ev.append(dict(step=0, epoch=0, task=task, eval_task=k, checkpoint=ckpt,
                           forget_rouge=0.2 if forgotten else 0.9 - 0.1 * (task + 1),
                           forget_prob=0.1 if forgotten else 0.8 - 0.2 * (task + 1)))
    return _rec(run_id,
                {"kind": "continual", "method": "alkn", "protocol": protocol, "model": "tiny",
                 "benchmark": "tofu_subset"}, ev)


def test_tradeoff_table_points_per_run_and_per_task():
    single = _rec("20260101-000000-unlearn-npo-tiny-def456",
                  {"kind": "unlearn", "method": "npo", "model": "tiny", "benchmark": "tofu_subset", "lr": 1e-3},
                  [dict(step=0, epoch=0, checkpoint="initial", model_utility=0.6, forget_rouge=0.9),
                   dict(step=3, epoch=0, checkpoint="unlearned", model_utility=0.55, forget_rouge=0.5),
                   dict(step=6, epoch=0, checkpoint="unlearned", model_utility=0.5, forget_rouge=0.3)])
    pts = runs_views.tradeoff_table([single, _continual_rec()], "model_utility", "forget_rouge")
    assert run_points(pts, "npo #def456") == [(0.5, 0.3)]                 # final record only
    assert run_points(pts, "alkn [sequential] #abc123") == [(0.5, 0.2), (0.4, 0.2)]   # own task after each task
    target = pts[pts["kind"] == "target"]
    assert len(target) == 1 and target["utility"].iloc[0] == 0.6
    assert "lr=0.001" in pts.loc[pts["label"] == "npo #def456", "hover"].iloc[0]
    change = runs_views.tradeoff_table([single], "model_utility", "forget_rouge", change=True)
    assert change.loc[change["point"] == "final", "forgetting"].iloc[0] == pytest.approx(0.6)   # 0.9 -> 0.3


def run_points(pts, label):
    g = pts[pts["label"] == label]
    return [(round(u, 6), round(f, 6)) for u, f in zip(g["utility"], g["forgetting"])]


def test_continual_tables_and_cascading_degradation():
    rec = _continual_rec()
    casc = runs_views.cascading_table([rec])
    # task 1 before any unlearning (0.8) vs after task 0 (0.6): ALKN fig. 2a
    assert casc["eval_task"].tolist() == [1]
    assert casc[["before_any", "after_previous"]].values.tolist() == [pytest.approx([0.8, 0.6])]
    table = runs_views.task_table(rec)
    assert list(table.index) == ["initial", "after 0", "after 1"]
    assert table.loc["after 0", "forget_rouge[1]"] == pytest.approx(0.8)
    other = _continual_rec("20260101-000001-continual-alkn-tiny-fed987", "independent")
    diag = runs_views.task_diagnostics_table([rec, other])
    assert len(diag) == 4 and diag["task"].tolist() == [0, 1, 0, 1]         # 2 runs x 2 tasks, no cross product
    assert diag["tv_sparsity"].tolist() == pytest.approx([0.7] * 4)


def test_generations_table_shows_a_shared_initial_output_once():
    def rows(gen_initial, gen_unlearned):
        return pd.DataFrame({"set": "forget", "row": [3, 3, 4], "checkpoint": ["initial", "unlearned", "unlearned"],
                             "step": [0, 6, 6], "question": "q?", "answer": "a.",
                             "generation": [gen_initial, gen_unlearned, "other row"], "rouge": [1.0, 0.2, 0.0]})
    a = _rec("20260101-000000-unlearn-npo-tiny-aaaaaa", {"method": "npo"}, [])
    b = _rec("20260101-000000-unlearn-ga-tiny-bbbbbb", {"method": "ga"}, [])
    table = runs_views.generations_table([(a, rows("the answer", "x")), (b, rows("the answer", "y"))], "forget", 3)
    assert table[["label", "checkpoint", "generation"]].values.tolist() == [
        ["target (initial)", "initial", "the answer"], ["npo #aaaaaa", "unlearned", "x"], ["ga #bbbbbb", "unlearned", "y"]]
    assert runs_views.generations_table([(a, rows("p", "x"))], "retain", 3).empty


def test_robustness_table_one_row_per_probe_latest_record_and_figures():
    def probe(name, after, unl=0.2, target=0.9, floor=0.3):
        return dict(step=6, epoch=0, checkpoint=f"probe:{name}", probe=name, forget_rouge=after, forget_prob=after,
                    unlearned_forget_rouge=unl, target_forget_rouge=target, floor_forget_rouge=floor,
                    recovery_rouge=(after - unl) / (target - unl), model_utility=0.4)
    ev = [dict(step=0, epoch=0, checkpoint="initial", model_utility=0.6, forget_rouge=0.9),
          dict(step=6, epoch=0, checkpoint="unlearned", model_utility=0.5, forget_rouge=0.2),
          probe("quant4", 0.3), probe("relearn", 0.55), probe("quant4", 0.25)]   # quant4 rerun: the latest counts
    rec = _rec("20260101-000000-unlearn-npo-tiny-def456", {"kind": "unlearn", "method": "npo", "model": "tiny"}, ev)
    table = runs_views.robustness_table([rec, _continual_rec()])          # no probe records: no rows
    assert table["probe"].tolist() == ["relearn", "quant4"]               # lab.runs.PROBES order
    assert table["forget_rouge"].tolist() == pytest.approx([0.55, 0.25])
    assert table["recovery_rouge"].tolist() == pytest.approx([0.5, 0.05 / 0.7])
    assert table["model_utility"].tolist() == [0.5, 0.5] and table["probe_model_utility"].tolist() == [0.4, 0.4]
    assert runs_views.final_record(rec)["checkpoint"] == "unlearned"       # probes are not the final record
    fig = figures.robustness_figure(table, "rouge")
    assert [a.text for a in fig.layout.annotations] == ["relearning attack (held-out rows)", "4-bit weights"]
    floor = [t for t in fig.data if t.meta == "floor_forget_rouge"]
    assert len(floor) == 2 and list(floor[0].y) == [0.3]
    rec_fig = figures.recovery_figure(table, "rouge")
    assert list(rec_fig.data[0].x) == ["relearn", "quant4"]
    trade = figures.robustness_tradeoff_figure(table, "relearn", "rouge")
    assert list(trade.data[0].x) == pytest.approx([0.5]) and list(trade.data[0].y) == [0.5]
    assert runs_views.robustness_table([_continual_rec()]).empty
    empty = figures.robustness_figure(runs_views.robustness_table([]), "rouge")
    assert empty.layout.annotations[0].text == "no probe records among the selection"


def test_layer_active_table_groups():
    counts = pd.DataFrame({"task": [0, 0, 0], "name": ["a", "b", "c"], "layer": [0, 0, None],
                           "module": ["mlp", "attn", "embed"], "active": [1, 3, 10], "numel": [10, 10, 100]})
    by_layer = runs_views.layer_active_table(counts, "layer")
    assert dict(zip(by_layer["group"], by_layer["active_fraction"])) == {"layer.0": 0.2, "module.embed": 0.1}
    by_module = runs_views.layer_active_table(counts, "module")
    assert set(by_module["group"]) == {"module.mlp", "module.attn", "module.embed"}
    with pytest.raises(ValueError, match="valid: 'layer', 'module'"):
        runs_views.layer_active_table(counts, "block")


# ---------------------------------------------------------------- AppTest on the real fixture runs
def _app(root, **state):
    from streamlit.testing.v1 import AppTest
    at = AppTest.from_file(str(APP), default_timeout=120)
    at.session_state["runs_root"] = str(root)
    for k, v in state.items():
        at.session_state[k] = v
    return at.run()


def _page(at, name):
    if name != "overview":
        at.switch_page(f"views/{name}.py").run()
    assert not at.exception, f"{name}: {[e.value for e in at.exception]}"
    return at


def _decode(obj):
    """Plotly >= 6 writes numpy arrays as {"dtype", "bdata" (base64), "shape"}: back to nested lists."""
    if isinstance(obj, dict) and set(obj) <= {"dtype", "bdata", "shape"} and "bdata" in obj:
        arr = np.frombuffer(base64.b64decode(obj["bdata"]), dtype=np.dtype(obj["dtype"]))
        if "shape" in obj:
            arr = arr.reshape([int(n) for n in str(obj["shape"]).split(",")])
        return arr.tolist()
    if isinstance(obj, dict):
        return {k: _decode(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_decode(v) for v in obj]
    return obj


def _specs(at):
    """The figure JSON of every plotly element on the page (AppTest: element proto's spec)."""
    return [_decode(json.loads(el.proto.spec)) for el in at.get("plotly_chart")]


def _names(spec):
    return [t.get("name") for t in spec["data"]]


@pytest.fixture(scope="module")
def app_pages(dashboard_runs):
    """Every page rendered once with the default selection (all fixture runs)."""
    at = _app(dashboard_runs["root"])
    out = {}
    for name in PAGES:
        _page(at, name)
        out[name] = SimpleNamespace(specs=_specs(at), warnings=[w.value for w in at.warning],
                                    infos=[i.value for i in at.info], dataframes=[d.value for d in at.dataframe],
                                    markdown=[m.value for m in at.markdown], texts=[t.value for t in at.text])
    return out


@pytest.mark.parametrize("page", list(PAGES))
def test_every_page_renders_with_the_right_number_of_charts(app_pages, page):
    assert len(app_pages[page].specs) == PAGES[page], [s["layout"].get("title") for s in app_pages[page].specs]


def test_sidebar_picks_every_run_and_warns_about_broken_and_running(dashboard_runs, app_pages):
    at = _app(dashboard_runs["root"])
    assert sorted(at.session_state["selected_runs"]) == sorted(
        str(dashboard_runs[k]) for k in ("gru", "blur", "ngdiff", "npo", "alkn", "npo_gd_seq", "broken", "running"))
    warnings = " ".join(app_pages["overview"].warnings)
    assert "trace.parquet: unreadable" in warnings and "summary.json: unreadable" in warnings
    assert "still being written" in warnings
    runs_table = app_pages["overview"].dataframes[0]
    assert len(runs_table) == 8 and set(runs_table["status"]) == {"done", "running", "broken"}


def test_overview_charts(app_pages):
    metrics, losses = app_pages["overview"].specs
    assert {"model_utility", "forget_rouge"} <= set(metrics["data"][0]["x"])
    names = _names(losses)
    assert any(n.startswith("gru_npo_gd #") and n.endswith("forget loss") for n in names)
    assert losses["layout"]["xaxis"]["title"]["text"] == "step"


def test_geometry_page_spec(app_pages):
    geom, norms, lr = app_pages["geometry"].specs
    names = _names(geom)
    for series in ("cos(g_f, g_r)", "GRU cos pre-rectification", "GRU cos post-rectification", "cos(-Δθ, g_f)"):
        assert any(n.startswith("gru_npo_gd") and n.endswith(series) for n in names), series
    assert not any(n.startswith("npo #") and "GRU" in n for n in names)
    npo = next(t for t in geom["data"] if t["name"].startswith("npo #") and t["meta"] == "cos_fr")
    assert list(npo["x"]) == [0, 2, 4]                          # diagnostics every 2 steps
    assert geom["layout"]["yaxis"]["title"]["text"] == "cosine" and geom["layout"]["yaxis2"]["range"] == [-1.05, 1.05]
    assert norms["layout"]["yaxis"]["type"] == "log" and any(n.endswith("||g_r||") for n in _names(norms))
    probes = [t for t in lr["data"] if t.get("meta") == "autolr_probe"]
    assert len(probes) == 1 and probes[0]["name"].startswith("ngdiff_autolr")
    assert list(probes[0]["x"]) == [0, 3]                       # autolr_every=3 over 6 steps


def test_alignment_page_spec(app_pages):
    series, scatter = app_pages["alignment"].specs
    metas = {t["meta"] for t in series["data"]}
    assert metas == {"align_f", "align_r"}
    assert any(t["name"].startswith("blur_npo") for t in series["data"])
    assert len(series["layout"]["shapes"]) == 4
    lo, hi = series["layout"]["yaxis"]["range"]
    assert lo == pytest.approx(-hi) and hi > 0
    assert scatter["layout"]["xaxis"]["title"]["text"].startswith("A_f") and len(scatter["layout"]["shapes"]) == 4
    assert "log10" in series["layout"]["yaxis"]["title"]["text"]          # default: signed log scale


def test_alignment_linear_scale_plots_the_trace_values(dashboard_runs):
    at = _page(_app(dashboard_runs["root"]), "alignment")
    at.radio(key="alignment_scale").set_value("linear").run()
    series = _specs(at)[0]
    blur = next(t for t in series["data"] if t["name"].startswith("blur_npo #") and "running" not in t["name"]
                and t["meta"] == "align_f")
    trace = pd.read_parquet(dashboard_runs["blur"] / "trace.parquet")
    assert blur["y"] == pytest.approx(trace["align_f"].tolist()) and series["layout"]["yaxis"]["title"]["text"] == "A_f"


def test_tradeoffs_page_spec(app_pages, dashboard_runs):
    (fig,) = app_pages["tradeoffs"].specs
    names = _names(fig)
    for method in ("gru_npo_gd", "blur_npo", "ngdiff_autolr", "npo", "alkn [sequential]", "npo_gd [sequential]"):
        assert any(n.startswith(method + " #") for n in names), method
    assert "Pareto front" in names and any(n.startswith("target (tiny") for n in names)
    alkn = next(t for t in fig["data"] if t["name"].startswith("alkn"))
    assert len(alkn["x"]) == 2 and alkn["marker"]["color"][0] != alkn["marker"]["color"][1]   # one per task
    assert "lr=" in alkn["text"][0] and "task 1" in alkn["text"][1]
    assert fig["layout"]["xaxis"]["title"]["text"] == "forget_rouge"
    assert fig["layout"]["yaxis"]["title"]["text"] == "model_utility"


def test_robustness_page_spec(app_pages, dashboard_runs):
    panels, recovery, trade = app_pages["robustness"].specs
    titles = [a["text"] for a in panels["layout"]["annotations"]]
    assert titles[0] == "relearning attack (held-out rows)" and len(titles) == 5      # every probe of the gru run
    floor = [t for t in panels["data"] if t.get("meta") == "floor_forget_rouge"]
    assert len(floor) == 5 and any(x.startswith("gru_npo_gd #") for x in floor[0]["x"])
    relearn_x = floor[0]["x"]
    assert any(x.startswith("npo #") for x in relearn_x)                               # npo: relearn + quant4
    assert any(x.startswith("npo_gd [sequential]") for x in floor[2]["x"])            # continual: quant4 after task 1
    assert recovery["layout"]["yaxis"]["title"]["text"] == "recovery fraction"
    assert trade["layout"]["yaxis"]["title"]["text"] == "model_utility (final model)"
    table = app_pages["robustness"].dataframes[0]
    from lab import runs
    gru = runs.load_run(dashboard_runs["gru"]).probe_evals.set_index("probe")
    row = table[(table["run_id"] == dashboard_runs["gru"].name) & (table["probe"] == "relearn")].iloc[0]
    assert row["recovery_rouge"] == pytest.approx(gru.loc["relearn", "recovery_rouge"], nan_ok=True)


def test_continual_page_spec(app_pages):
    forget, utility, cascade = app_pages["continual"].specs
    assert len(forget["data"]) == 4                          # 2 runs x 2 evaluated tasks
    assert list(forget["data"][0]["x"]) == ["initial", "after 0", "after 1"]
    assert len(utility["data"]) == 2 and utility["layout"]["yaxis"]["title"]["text"] == "model_utility"
    assert [t["name"] for t in cascade["data"]] == ["before any unlearning", "after previous tasks"]
    assert len(cascade["data"][0]["x"]) == 2                 # task 1 of each continual run
    assert len(app_pages["continual"].dataframes) == 2       # per-task table per run


def test_masks_page_spec(app_pages):
    fractions, jac, per_scope, layers = app_pages["masks"].specs
    assert {t["meta"] for t in fractions["data"]} == {"active_fraction", "tv_sparsity"}
    sparsity = next(t for t in fractions["data"] if t["meta"] == "tv_sparsity")
    assert len(sparsity["y"]) == 4 and all(0 <= v <= 1 for v in sparsity["y"])     # 2 runs x 2 tasks
    z = np.asarray(jac["data"][0]["z"], dtype=float)
    assert z.shape == (2, 2) and np.allclose(np.diag(z), 1) and z[0, 1] == z[1, 0] and 0 <= z[0, 1] <= 1
    assert per_scope["data"][0]["y"][0] == "global" and any(s.startswith("layer.") for s in per_scope["data"][0]["y"])
    assert list(layers["data"][0]["x"]) == ["task 0", "task 1"]


def test_rows_page_shows_question_truth_and_generations(app_pages):
    page = app_pages["rows"]
    assert any("Question" in m for m in page.markdown) and any("Ground truth" in m for m in page.markdown)
    gens = page.dataframes[0]
    assert {"label", "checkpoint", "rouge", "prob"} <= set(gens.columns)
    assert {"initial", "unlearned"} <= set(gens["checkpoint"])
    # runs starting from the same prepared target share its output, shown once: one for the unlearning
    # runs (200 new tokens), one for the continual runs (eval_max_new_tokens=16)
    assert (gens["label"] == "target (initial)").sum() == 2
    assert len(page.texts) == len(gens) and all(isinstance(t, str) and t for t in page.texts)


def test_pages_survive_a_selection_of_only_broken_and_running_runs(dashboard_runs):
    at = _app(dashboard_runs["root"])
    at.session_state["selected_runs"] = [str(dashboard_runs["broken"]), str(dashboard_runs["running"])]
    at.run()
    for name in PAGES:
        _page(at, name)
        if name in ("continual", "masks"):           # neither run is continual: said, not an error
            assert "No continual runs" in at.info[0].value
        else:
            assert at.warning, name
    _page(at, "geometry")
    assert len(at.get("plotly_chart")) == 3          # the running run's partial trace still plots


def test_missing_root_and_argv_and_filters(dashboard_runs, tmp_path, monkeypatch):
    at = _app(tmp_path / "nope")
    assert not at.exception and "is not a folder" in at.sidebar.error[0].value
    from streamlit.testing.v1 import AppTest
    monkeypatch.setattr(sys, "argv", ["app.py", "--runs", str(dashboard_runs["root"])])
    at = AppTest.from_file(str(APP), default_timeout=120).run()
    assert at.text_input(key="runs_root").value == str(dashboard_runs["root"])
    at.multiselect(key="filter_kind").set_value(["continual"]).run()
    assert sorted(at.session_state["selected_runs"]) == sorted(str(dashboard_runs[k]) for k in ("alkn", "npo_gd_seq"))
    _page(at, "tradeoffs")


def test_picker_defaults_to_the_latest_experiment(tmp_path, monkeypatch):
    """Runs tagged with the experiment that made them: the sidebar offers each experiment (latest first,
    sections under their notebook) and selects the latest experiment's runs, not every run."""
    from test_runs_views import make_experiment_runs
    paths = {k: str(v) for k, v in make_experiment_runs(tmp_path, monkeypatch).items()}
    at = _app(tmp_path)
    assert not at.exception, [e.value for e in at.exception]
    picker = at.selectbox(key="experiment")
    assert picker.options[:3] == ["(all runs)", "my tag", "nbA (demo)"] and picker.value == "my tag"
    assert at.session_state["selected_runs"] == [paths["b"]]
    picker.set_value("nbA (demo)").run()
    assert at.session_state["selected_runs"] == [paths["a1"], paths["a2"]]
    at.selectbox(key="experiment").set_value("nbA (demo)/S1").run()
    assert at.session_state["selected_runs"] == [paths["a1"]]
    at.selectbox(key="experiment").set_value("(all runs)").run()
    assert sorted(at.session_state["selected_runs"]) == sorted(paths.values())
    _page(at, "tradeoffs")


def test_legends_group_runs_by_method():
    pts = pd.DataFrame({"label": ["ga #a1", "ga #b2", "npo #c3"], "kind": ["unlearn"] * 3, "method": ["ga", "ga", "npo"],
                        "forgetting": [0.2, 0.4, 0.3], "utility": [0.5, 0.4, 0.6], "hover": [""] * 3, "task": [None] * 3})
    fig = figures.tradeoff_figure(pts, "model_utility", "forget_rouge")
    runs_ = [t for t in fig.data if t.name and " #" in t.name]
    assert [(t.name, t.legendgroup) for t in runs_] == [("ga #a1", "ga"), ("ga #b2", "ga"), ("npo #c3", "npo")]
    assert [t.legendgrouptitle.text for t in runs_] == ["ga", None, "npo"]      # one title per method
    assert fig.layout.legend.groupclick == "toggleitem"
    trace = pd.DataFrame({"label": ["ga #a1"] * 2 + ["npo #c3"] * 2, "method": ["ga"] * 2 + ["npo"] * 2,
                          "step": [0, 1, 0, 1], "loss_f": [1.0, 2.0, 1.0, 0.5], "loss_r": [0.1] * 4})
    assert {t.legendgroup for t in figures.loss_figure(trace).data} == {"ga", "npo"}


def test_every_page_renders_beside_runs_broken_in_every_shape(corrupt_runs):
    """summary.json / config.yaml / eval.jsonl holding a list, a scalar, a truncated or an empty file, a cut or
    empty trace.parquet: each broken run is listed with its error, every page renders the rest."""
    paths = [str(corrupt_runs[k]) for k in ("good", *CORRUPT_SHAPES)]
    at = _app(corrupt_runs["root"], selected_runs=paths)
    assert not at.exception, [e.value for e in at.exception]
    warnings = " ".join(w.value for w in at.warning)
    assert all(corrupt_runs[shape].name in warnings for shape in CORRUPT_SHAPES), warnings
    assert len(at.dataframe[0].value) == 1 + len(CORRUPT_SHAPES)
    for name in PAGES:
        _page(at, name)
