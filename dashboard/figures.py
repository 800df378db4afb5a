"""Plotly figures for the dashboard: pure functions DataFrame -> go.Figure (no streamlit, no torch).

Inputs are the tables of lab.runs_views (trace_table, tradeoff_table, continual_table, ...). Every
figure colours a run the same way (run_colors) so runs can be followed across pages.
"""
from __future__ import annotations

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.colors import qualitative
from plotly.subplots import make_subplots

from lab import runs_views

PALETTE = qualitative.Plotly + qualitative.D3
TASK_PALETTE = qualitative.Set1
SIGN_COLORS = {"pos": "rgba(44,160,44,0.10)", "neg": "rgba(214,39,40,0.10)"}
# trace column -> (legend name, line dash); which series each geometry panel shows
COS_SERIES = {"cos_fr": ("cos(g_f, g_r)", "solid"), "cos_pre": ("GRU cos pre-rectification", "dot"),
              "cos_post": ("GRU cos post-rectification", "dash")}
UPDATE_SERIES = {"cos_update_f": ("cos(-Δθ, g_f)", "solid"), "cos_update_r": ("cos(-Δθ, g_r)", "dash")}
NORM_SERIES = {"grad_norm_f": ("||g_f||", "solid"), "grad_norm_r": ("||g_r||", "dash"),
               "norm_d": ("||d||", "dot")}
LOSS_SERIES = {"loss_f": ("forget loss", "solid"), "loss_r": ("retain loss", "dash")}
ALIGN_SERIES = {"align_f": "A_f = <g_f,d>/||g_f||²", "align_r": "A_r = <g_r,d>/||g_r||²"}


# ---------------------------------------------------------------- helpers
def run_colors(labels) -> dict:
    """Stable colour per run label (sorted order), shared by every page."""
    return {lab: PALETTE[i % len(PALETTE)] for i, lab in enumerate(sorted(set(labels)))}


def method_of(label: str) -> str | None:
    """The method in a run label (lab.runs_views.run_label: 'method [protocol] #digest'), else None."""
    return label.split(" ", 1)[0] if isinstance(label, str) and " #" in label else None


def group_legend_by_method(fig: go.Figure) -> go.Figure:
    """Legend entries of runs of one method together under the method's name (dozens of runs stay
    readable); clicking an entry toggles that run, clicking the method's title toggles them all."""
    titled = set()
    for trace in fig.data:
        method = method_of(trace.name)
        if method is None:
            continue
        trace.legendgroup = method
        if method not in titled and trace.showlegend is not False:
            trace.legendgrouptitle = dict(text=method)
            titled.add(method)
    fig.update_layout(legend=dict(groupclick="toggleitem", tracegroupgap=6))
    return fig


def smooth(values: pd.Series, window: int) -> pd.Series:
    """Trailing moving average over `window` points (1 = raw). Causal, so a spike never shows before it
    happened; the first points average what exists so far."""
    if window < 1:
        raise ValueError(f"smoothing window must be >= 1, got {window}")
    values = pd.Series(values, dtype=float)
    return values if window == 1 else values.rolling(window, min_periods=1).mean()


def pareto_front(x, y, x_higher: bool = True, y_higher: bool = True) -> np.ndarray:
    """Boolean mask of the points no other point dominates (at least as good on both axes, better on one).
    NaN points are never on the front."""
    x = np.asarray(x, dtype=float) * (1 if x_higher else -1)
    y = np.asarray(y, dtype=float) * (1 if y_higher else -1)
    ok = ~(np.isnan(x) | np.isnan(y))
    front = np.zeros(len(x), dtype=bool)
    for i in np.flatnonzero(ok):
        dominated = ok & (x >= x[i]) & (y >= y[i]) & ((x > x[i]) | (y > y[i]))
        front[i] = not dominated.any()
    return front


def _series(df: pd.DataFrame, column: str, window: int):
    """(steps, smoothed values) of one trace column, rows where it was measured only (diagnostics every
    k steps leave NaN between)."""
    d = df[["step", column]].dropna().sort_values("step")
    return d["step"].to_numpy(), smooth(d[column], window).to_numpy()


def _empty(title: str, note: str) -> go.Figure:
    fig = go.Figure()
    fig.update_layout(title=title, annotations=[dict(text=note, showarrow=False, xref="paper", yref="paper",
                                                     x=0.5, y=0.5)])
    return fig


def _run_lines(fig, trace, series: dict, window: int, colors: dict, row=None, col=None, legend=True):
    """One line per (run, column present) into fig (optionally a subplot cell). Returns #lines added."""
    n = 0
    for label, g in trace.groupby("label", sort=True):
        for column, spec in series.items():
            name, dash = spec if isinstance(spec, tuple) else (spec, "solid")
            if column not in g or g[column].isna().all():
                continue
            x, y = _series(g, column, window)
            fig.add_trace(go.Scatter(x=x, y=y, mode="lines", name=f"{label} · {name}", legendgroup=label,
                                     showlegend=legend, line=dict(color=colors[label], dash=dash),
                                     meta=column), row=row, col=col)
            n += 1
    return n


# ---------------------------------------------------------------- gradient geometry
def geometry_figure(trace: pd.DataFrame, window: int = 1) -> go.Figure:
    """Top: cos(g_f, g_r) per step (GRU: cos before/after rectification). Bottom: the realised update
    after the optimizer, cos(-Δθ, g_f) and cos(-Δθ, g_r) (METHODS §7)."""
    if trace.empty:
        return _empty("Gradient geometry", "no trace rows in the selected runs")
    colors = run_colors(trace["label"])
    fig = make_subplots(rows=2, cols=1, shared_xaxes=True, vertical_spacing=0.08,
                        subplot_titles=("cos(g_f, g_r) — GRU: pre / post rectification",
                                        "realised update after the optimizer: cos(-Δθ, g)"))
    _run_lines(fig, trace, COS_SERIES, window, colors, row=1, col=1)
    _run_lines(fig, trace, UPDATE_SERIES, window, colors, row=2, col=1)
    if "projected" in trace:   # GRU: steps where the projection fired
        for label, g in trace[trace["projected"] == 1].groupby("label"):
            fig.add_trace(go.Scatter(x=g["step"], y=g["cos_pre"], mode="markers", legendgroup=label,
                                     name=f"{label} · projection fired", meta="projected",
                                     marker=dict(color=colors[label], symbol="triangle-down", size=7)),
                          row=1, col=1)
    for r in (1, 2):
        fig.add_hline(y=0, line=dict(color="gray", width=1), row=r, col=1)
    fig.update_yaxes(title_text="cosine", range=[-1.05, 1.05], row=1, col=1)
    fig.update_yaxes(title_text="cosine", range=[-1.05, 1.05], row=2, col=1)
    fig.update_xaxes(title_text="step", row=2, col=1)
    fig.update_layout(title="Gradient geometry", height=600, legend=dict(groupclick="toggleitem"))
    return group_legend_by_method(fig)


def norms_figure(trace: pd.DataFrame, window: int = 1) -> go.Figure:
    """||g_f||, ||g_r|| and ||d|| per step, log scale."""
    if trace.empty:
        return _empty("Gradient norms", "no trace rows in the selected runs")
    fig = go.Figure()
    _run_lines(fig, trace, NORM_SERIES, window, run_colors(trace["label"]))
    fig.update_layout(title="Gradient norms", xaxis_title="step", yaxis_title="norm", yaxis_type="log",
                      height=400)
    return group_legend_by_method(fig)


def lr_figure(trace: pd.DataFrame) -> go.Figure:
    """Learning rate per step; AutoLR probe steps marked (filled: the fitted lr was accepted)."""
    if trace.empty:
        return _empty("Learning rate", "no trace rows in the selected runs")
    colors = run_colors(trace["label"])
    fig = go.Figure()
    _run_lines(fig, trace, {"lr": ("lr", "solid")}, 1, colors)
    if "autolr_probe" in trace:
        probes = trace[trace["autolr_probe"] == 1]
        for label, g in probes.groupby("label"):
            accepted = g["autolr_accepted"].fillna(0).to_numpy() == 1 if "autolr_accepted" in g \
                else np.ones(len(g), bool)
            fig.add_trace(go.Scatter(
                x=g["step"], y=g["lr"], mode="markers", name=f"{label} · AutoLR probe", legendgroup=label,
                meta="autolr_probe", marker=dict(color=colors[label], size=9, symbol=np.where(
                    accepted, "circle", "circle-open").tolist(), line=dict(width=1.5, color=colors[label])),
                customdata=g[[c for c in ("autolr_loss_minus", "autolr_loss_0", "autolr_loss_plus")
                              if c in g]].to_numpy(),
                hovertemplate="step %{x}<br>lr %{y:.3g}<br>L_R(-,0,+) = %{customdata}<extra></extra>"))
    fig.update_layout(title="Learning rate (AutoLR probes marked; open = fit rejected, lr kept)",
                      xaxis_title="step", yaxis_title="lr", yaxis_type="log", height=350)
    return group_legend_by_method(fig)


def loss_figure(trace: pd.DataFrame, window: int = 1) -> go.Figure:
    if trace.empty:
        return _empty("Losses", "no trace rows in the selected runs")
    fig = go.Figure()
    _run_lines(fig, trace, LOSS_SERIES, window, run_colors(trace["label"]))
    fig.update_layout(title="Forget and retain loss per step", xaxis_title="step", yaxis_title="loss",
                      height=380)
    return group_legend_by_method(fig)


# ---------------------------------------------------------------- alignment (BLUR fig. 2)
def _sign_bands(fig, lim, row=None, col=None):
    """Shade A > 0 (the step improves that objective to first order) green and A < 0 red."""
    kw = {} if row is None else dict(row=row, col=col)
    fig.add_hrect(y0=0, y1=lim, fillcolor=SIGN_COLORS["pos"], line_width=0, layer="below", **kw)
    fig.add_hrect(y0=-lim, y1=0, fillcolor=SIGN_COLORS["neg"], line_width=0, layer="below", **kw)


def signed_log(values):
    """sign(a) * log10(1 + |a|): keeps the sign (the regions that matter) while methods whose A values
    differ by orders of magnitude (NGDiff normalises, A ~ 1/||g||) stay readable on one axis."""
    v = pd.to_numeric(pd.Series(values), errors="coerce").to_numpy(dtype=float)
    return np.sign(v) * np.log10(1 + np.abs(v))


ALIGN_SCALES = ("linear", "signed log")


def _scaled(trace: pd.DataFrame, scale: str) -> pd.DataFrame:
    if scale not in ALIGN_SCALES:
        raise ValueError(f"alignment scale {scale!r}; valid: {list(ALIGN_SCALES)}")
    if scale == "linear":
        return trace
    cols = [c for c in ("align_f", "align_r") if c in trace]
    return trace.assign(**{c: signed_log(trace[c]) for c in cols})


def _symmetric_limit(values) -> float:
    v = np.abs(pd.to_numeric(pd.Series(values), errors="coerce").dropna().to_numpy())
    return float(v.max() * 1.1) if len(v) and v.max() > 0 else 1.0


def alignment_figure(trace: pd.DataFrame, window: int = 1, scale: str = "linear") -> go.Figure:
    """A_f and A_r per step (two panels), sign regions shaded, y symmetric about 0; scale "signed log"
    plots sign(A) log10(1+|A|) (smoothing applies to the plotted values)."""
    if trace.empty or not {"align_f", "align_r"} & set(trace.columns):
        return _empty("Alignment", "no alignment values (A_f, A_r) in the selected runs' traces")
    trace = _scaled(trace, scale)
    unit = "" if scale == "linear" else " (sign·log10(1+|A|))"
    colors = run_colors(trace["label"])
    fig = make_subplots(rows=2, cols=1, shared_xaxes=True, vertical_spacing=0.08,
                        subplot_titles=(ALIGN_SERIES["align_f"], ALIGN_SERIES["align_r"]))
    for r, column in enumerate(("align_f", "align_r"), 1):
        _run_lines(fig, trace, {column: (column.replace("align_", "A_"), "solid")}, window, colors,
                   row=r, col=1, legend=r == 1)
        lim = _symmetric_limit(trace[column]) if column in trace else 1.0
        _sign_bands(fig, lim, row=r, col=1)
        fig.update_yaxes(title_text=column.replace("align_", "A_") + unit, range=[-lim, lim], zeroline=True,
                         zerolinecolor="gray", row=r, col=1)
    fig.update_xaxes(title_text="step", row=2, col=1)
    fig.update_layout(title="Alignment of the update d with each objective (green: improves, red: worsens)",
                      height=600)
    return group_legend_by_method(fig)


def alignment_scatter(trace: pd.DataFrame, scale: str = "linear") -> go.Figure:
    """A_f against A_r, one point per diagnosed step; quadrants shaded: both improve (green), one
    objective pays for the other (grey), both worsen (red)."""
    cols = {"align_f", "align_r"}
    if trace.empty or not cols <= set(trace.columns):
        return _empty("A_f vs A_r", "no alignment values (A_f, A_r) in the selected runs' traces")
    unit = "" if scale == "linear" else " (sign·log10(1+|A|))"
    d = _scaled(trace, scale).dropna(subset=list(cols))
    colors = run_colors(trace["label"])
    fig = go.Figure()
    for label, g in d.groupby("label"):
        fig.add_trace(go.Scatter(x=g["align_f"], y=g["align_r"], mode="markers", name=label,
                                 marker=dict(color=colors[label], size=6, opacity=0.8), customdata=g["step"],
                                 hovertemplate="step %{customdata}<br>A_f %{x:.3g}<br>A_r %{y:.3g}<extra></extra>"))
    lx, ly = _symmetric_limit(d["align_f"]), _symmetric_limit(d["align_r"])
    quadrants = [((0, lx), (0, ly), SIGN_COLORS["pos"]), ((-lx, 0), (-ly, 0), SIGN_COLORS["neg"]),
                 ((-lx, 0), (0, ly), "rgba(127,127,127,0.08)"), ((0, lx), (-ly, 0), "rgba(127,127,127,0.08)")]
    for (x0, x1), (y0, y1), color in quadrants:
        fig.add_shape(type="rect", x0=x0, x1=x1, y0=y0, y1=y1, fillcolor=color, line_width=0, layer="below")
    fig.update_layout(title="A_f vs A_r per step (upper right: both objectives improve)",
                      xaxis=dict(title="A_f" + unit, range=[-lx, lx], zeroline=True, zerolinecolor="gray"),
                      yaxis=dict(title="A_r" + unit, range=[-ly, ly], zeroline=True, zerolinecolor="gray"),
                      height=450)
    return group_legend_by_method(fig)


# ---------------------------------------------------------------- trade-offs (NGDiff fig. 1, ALKN fig. 4)
def tradeoff_figure(points: pd.DataFrame, utility: str, forgetting: str, *, forget_higher: bool | None = None,
                    change: bool = False) -> go.Figure:
    """Utility (y) vs forgetting (x): one marker per single run (coloured by run), continual runs one
    marker per task (coloured by task, symbol per run), the target as a star, the Pareto front of the
    unlearned points (target excluded) as a dashed line. Directions come from lab.runs_views.METRICS
    (forget_higher overrides the forgetting one); with change=True x is already "more forgotten = larger"."""
    if forget_higher is None:
        forget_higher = runs_views.higher_is_better(forgetting)
    utility_higher = runs_views.higher_is_better(utility)
    xlabel = f"{'change of ' if change else ''}{forgetting}"
    title = f"{utility} vs {xlabel}"
    if points.empty:
        return _empty(title, "no evaluated runs among the selection")
    colors = run_colors(points["label"])
    fig = go.Figure()
    symbols = ["circle", "square", "diamond", "triangle-up", "cross", "x", "pentagon", "hexagon"]
    single = points[points["kind"] != "continual"]
    for label, g in single[single["kind"] != "target"].groupby("label"):
        fig.add_trace(go.Scatter(x=g["forgetting"], y=g["utility"], mode="markers", name=label,
                                 marker=dict(color=colors[label], size=12), text=g["hover"],
                                 hovertemplate="%{text}<br>x %{x:.4g}<br>y %{y:.4g}<extra></extra>"))
    for label, g in single[single["kind"] == "target"].groupby("label"):
        fig.add_trace(go.Scatter(x=g["forgetting"], y=g["utility"], mode="markers", name=label,
                                 marker=dict(color="black", size=16, symbol="star"), text=g["hover"],
                                 hovertemplate="%{text}<br>x %{x:.4g}<br>y %{y:.4g}<extra></extra>"))
    cont = points[points["kind"] == "continual"]
    for i, (label, g) in enumerate(cont.groupby("label")):
        g = g.sort_values("task")
        fig.add_trace(go.Scatter(
            x=g["forgetting"], y=g["utility"], mode="markers+lines", name=label,
            line=dict(color="lightgray", width=1),
            marker=dict(size=12, symbol=symbols[i % len(symbols)],
                        color=[TASK_PALETTE[int(t) % len(TASK_PALETTE)] for t in g["task"]],
                        line=dict(width=1, color="black")),
            text=[f"{h}<br>task {int(t)}" for h, t in zip(g["hover"], g["task"])],
            hovertemplate="%{text}<br>x %{x:.4g}<br>y %{y:.4g}<extra></extra>"))
    for t in sorted(cont["task"].dropna().astype(int).unique()):   # legend keys for the task colours
        fig.add_trace(go.Scatter(x=[None], y=[None], mode="markers", name=f"task {t}", meta="task_legend",
                                 marker=dict(size=10, color=TASK_PALETTE[t % len(TASK_PALETTE)])))
    # the front over the unlearned models (the untouched target would trivially sit on it)
    front_x_higher = True if change else forget_higher
    runs_only = points[points["kind"] != "target"]
    on = pareto_front(runs_only["forgetting"], runs_only["utility"], x_higher=front_x_higher,
                      y_higher=utility_higher)
    if on.any():
        f = runs_only[on].sort_values("forgetting")
        fig.add_trace(go.Scatter(x=f["forgetting"], y=f["utility"], mode="lines", name="Pareto front",
                                 meta="pareto", line=dict(color="black", dash="dash", width=1.5),
                                 hoverinfo="skip"))
    better = f"{'up' if utility_higher else 'down'} and {'right' if front_x_higher else 'left'}"
    fig.update_layout(title=f"{title} (better: {better}; task colours = continual task index)",
                      xaxis_title=xlabel, yaxis_title=utility, height=520)
    return group_legend_by_method(fig)


# ---------------------------------------------------------------- continual
def continual_forget_figure(long: pd.DataFrame, metric: str = "forget_rouge") -> go.Figure:
    """Per continual run, `metric` of every task's forget set after each task (ALKN per-task curves):
    one line per (run, eval task), coloured by eval task, symbol per run."""
    d = long[(long["metric"] == metric) & long["eval_task"].notna()]
    if d.empty:
        return _empty(f"{metric} per task", f"no per-task {metric} in the selected continual runs")
    order = d.drop_duplicates("task").sort_values("task")["checkpoint_label"].tolist()
    fig = go.Figure()
    dashes = ["solid", "dash", "dot", "dashdot", "longdash"]
    for i, (label, g) in enumerate(d.groupby("label")):
        for k, gk in g.groupby("eval_task"):
            gk = gk.sort_values("task")
            fig.add_trace(go.Scatter(x=gk["checkpoint_label"], y=gk["value"], mode="lines+markers",
                                     name=f"{label} · task {int(k)}", legendgroup=label,
                                     line=dict(color=TASK_PALETTE[int(k) % len(TASK_PALETTE)],
                                               dash=dashes[i % len(dashes)])))
    fig.update_layout(title=f"{metric} of each task's forget set after each task", xaxis_title="checkpoint",
                      yaxis_title=metric, height=450)
    fig.update_xaxes(categoryorder="array", categoryarray=order)
    return group_legend_by_method(fig)


def continual_utility_figure(long: pd.DataFrame, metric: str = "model_utility") -> go.Figure:
    """Utility after each task, one line per run, dash by protocol (sequential vs independent vs joint)."""
    d = long[(long["metric"] == metric) & long["eval_task"].isna()]
    if d.empty:
        return _empty(f"{metric} per task", f"no {metric} in the selected continual runs")
    colors = run_colors(d["label"])
    dash = {"sequential": "solid", "independent": "dash", "joint": "dot"}
    order = d.drop_duplicates("task").sort_values("task")["checkpoint_label"].tolist()
    fig = go.Figure()
    for label, g in d.groupby("label"):
        g = g.sort_values("task")
        fig.add_trace(go.Scatter(x=g["checkpoint_label"], y=g["value"], mode="lines+markers", name=label,
                                 line=dict(color=colors[label], dash=dash.get(g["protocol"].iloc[0], "dashdot"))))
    fig.update_layout(title=f"{metric} after each task (solid: sequential, dashed: independent, dotted: joint)",
                      xaxis_title="checkpoint", yaxis_title=metric, height=420)
    fig.update_xaxes(categoryorder="array", categoryarray=order)
    return group_legend_by_method(fig)


def cascading_figure(table: pd.DataFrame, metric: str = "forget_prob") -> go.Figure:
    """ALKN fig. 2a: task k's `metric` before any unlearning vs after the previous tasks (bars)."""
    if table.empty:
        return _empty("Cascading degradation", "needs a continual run with >= 2 tasks")
    x = [f"{l} · task {int(k)}" for l, k in zip(table["label"], table["eval_task"])]
    fig = go.Figure([
        go.Bar(x=x, y=table["before_any"], name="before any unlearning", marker_color="#1f77b4"),
        go.Bar(x=x, y=table["after_previous"], name="after previous tasks", marker_color="#ff7f0e"),
    ])
    fig.update_layout(barmode="group", title=f"Cascading degradation: {metric} of task k before it is unlearned",
                      xaxis_title="run · task", yaxis_title=metric, height=420)
    return fig


# ---------------------------------------------------------------- masks
def jaccard_matrix(masks: pd.DataFrame, scope: str = "global") -> pd.DataFrame:
    """Symmetric task x task Jaccard matrix of one scope (diagonal 1)."""
    d = masks[masks["scope"] == scope]
    tasks = sorted(set(d["task_a"].astype(int)) | set(d["task_b"].astype(int)))
    m = pd.DataFrame(np.eye(len(tasks)), index=tasks, columns=tasks)
    for a, b, j in zip(d["task_a"].astype(int), d["task_b"].astype(int), d["jaccard"]):
        m.loc[a, b] = m.loc[b, a] = j
    return m


def jaccard_heatmap(masks: pd.DataFrame, scope: str = "global", title: str | None = None) -> go.Figure:
    m = jaccard_matrix(masks, scope)
    if m.empty:
        return _empty("Mask overlap", f"no mask overlap rows for scope {scope!r}")
    labels = [f"task {t}" for t in m.index]
    fig = go.Figure(go.Heatmap(z=m.to_numpy(), x=labels, y=labels, zmin=0, zmax=1, colorscale="Viridis",
                               text=np.round(m.to_numpy(), 3), texttemplate="%{text}",
                               colorbar=dict(title="Jaccard")))
    fig.update_layout(title=title or f"Jaccard overlap of task masks ({scope})", height=420,
                      yaxis=dict(autorange="reversed"))
    return fig


def _scope_key(scope: str):
    kind, _, rest = scope.partition(".")
    return (0 if kind == "global" else 1 if kind == "layer" else 2, int(rest) if rest.isdigit() else 0, rest)


def scope_heatmap(masks: pd.DataFrame) -> go.Figure:
    """Jaccard per scope (rows: global, layer.<i>, module.<type>) and task pair (columns)."""
    if masks.empty:
        return _empty("Mask overlap per layer / module", "no mask overlap rows")
    d = masks.assign(pair=[f"{int(a)}–{int(b)}" for a, b in zip(masks["task_a"], masks["task_b"])])
    wide = d.pivot_table(index="scope", columns="pair", values="jaccard", aggfunc="last")
    wide = wide.loc[sorted(wide.index, key=_scope_key)]
    fig = go.Figure(go.Heatmap(z=wide.to_numpy(), x=[f"tasks {p}" for p in wide.columns], y=list(wide.index),
                               zmin=0, zmax=1, colorscale="Viridis", colorbar=dict(title="Jaccard")))
    fig.update_layout(title="Jaccard overlap per layer and module type", height=max(300, 24 * len(wide) + 120),
                      yaxis=dict(autorange="reversed"))
    return fig


def task_fraction_figure(diag: pd.DataFrame) -> go.Figure:
    """Per run and task: the mask's active fraction and the realised task-vector sparsity (fraction of
    parameters the task left unchanged, 1 - tv_moved_fraction; METHODS §7)."""
    series = [("active_fraction", "mask active fraction"), ("tv_sparsity", "realised task-vector sparsity")]
    series = [(c, n) for c, n in series if c in diag and diag[c].notna().any()]
    if diag.empty or not series:
        return _empty("Active fraction per task", "no per-task mask diagnostics in the selected runs")
    fig = go.Figure()
    x = [f"{l} · task {int(t)}" for l, t in zip(diag["label"], diag["task"])]
    for column, name in series:
        # values printed on the bars: a sparsity of 0 (every parameter moved) is a result, not a missing bar
        text = [f"{v:.3f}" if pd.notna(v) else "" for v in diag[column]]
        fig.add_trace(go.Bar(x=x, y=diag[column], name=name, meta=column, text=text, textposition="outside"))
    fig.update_layout(barmode="group", title="Mask active fraction and realised task-vector sparsity per task",
                      xaxis_title="run · task", yaxis_title="fraction of parameters", yaxis_range=[0, 1.05],
                      height=400)
    return fig


def layer_active_heatmap(layer_active: pd.DataFrame, title: str = "Mask active fraction per layer") -> go.Figure:
    if layer_active.empty:
        return _empty(title, "no mask_counts.parquet in the selected run")
    wide = layer_active.pivot_table(index="group", columns="task", values="active_fraction", aggfunc="last")
    wide = wide.loc[sorted(wide.index, key=_scope_key)]
    fig = go.Figure(go.Heatmap(z=wide.to_numpy(), x=[f"task {int(t)}" for t in wide.columns], y=list(wide.index),
                               zmin=0, colorscale="Blues", colorbar=dict(title="active")))
    fig.update_layout(title=title, height=max(300, 24 * len(wide) + 120), yaxis=dict(autorange="reversed"))
    return fig


def metrics_bar_figure(table: pd.DataFrame, metrics) -> go.Figure:
    """Final metrics per run (overview): grouped bars, one group per metric."""
    metrics = [m for m in metrics if m in table and table[m].notna().any()]
    if table.empty or not metrics:
        return _empty("Final metrics", "no evaluated runs among the selection")
    colors = run_colors(table["label"])
    fig = go.Figure([go.Bar(x=metrics, y=[row[m] for m in metrics], name=row["label"],
                            marker_color=colors[row["label"]]) for _, row in table.iterrows()])
    fig.update_layout(barmode="group", title="Final metrics per run", yaxis_title="value", height=400)
    return group_legend_by_method(fig)


# ---------------------------------------------------------------- robustness probes (METHODS §8)
PROBE_TITLES = {"relearn": "relearning attack (held-out rows)", "quant8": "8-bit weights", "quant4": "4-bit weights",
                "paraphrase": "paraphrased questions", "fewshot": "few-shot prefix"}


def robustness_figure(table: pd.DataFrame, metric: str = "rouge") -> go.Figure:
    """One panel per probe (lab.runs_views.robustness_table): per run, forget_<metric> of the final model
    (grey bar) and under the probe (coloured bar), the target (black diamond) and the retain model as the
    floor (red bar marker; after the same attack for relearn), all on the probe's rows."""
    title = f"forget_{metric}: unlearned vs under each probe"
    if table.empty:
        return _empty(title, "no probe records among the selection")
    probes = list(dict.fromkeys(table["probe"]))
    fig = make_subplots(rows=1, cols=len(probes), shared_yaxes=True,
                        subplot_titles=[PROBE_TITLES.get(p, p) for p in probes])
    series = [("unlearned", f"unlearned_forget_{metric}", "bar", "#b0b0b0"),
              ("under the probe", f"forget_{metric}", "bar", "#1f77b4"),
              ("target", f"target_forget_{metric}", "diamond", "black"),
              ("retain model (floor)", f"floor_forget_{metric}", "line-ew-open", "#d62728")]
    for col, probe in enumerate(probes, start=1):
        g = table[table["probe"] == probe]
        for name, column, kind, color in series:
            common = dict(name=name, legendgroup=name, showlegend=col == 1, meta=column,
                          hovertemplate=f"%{{x}}<br>{name} %{{y:.4g}}<extra>{probe}</extra>")
            if kind == "bar":
                fig.add_trace(go.Bar(x=g["label"], y=g[column], marker_color=color, **common), row=1, col=col)
            else:
                fig.add_trace(go.Scatter(x=g["label"], y=g[column], mode="markers",
                                         marker=dict(symbol=kind, size=26 if kind.startswith("line") else 11,
                                                     color=color, line=dict(width=3, color=color)),
                                         **common), row=1, col=col)
    fig.update_layout(title=title, barmode="group", height=430, margin=dict(t=80),
                      legend=dict(orientation="h", y=-0.25))
    fig.update_yaxes(title_text=f"forget_{metric}", row=1, col=1)
    return fig


def recovery_figure(table: pd.DataFrame, metric: str = "rouge") -> go.Figure:
    """Recovery fraction (probe - unlearned) / (target - unlearned) of forget_<metric>, grouped by probe,
    one bar per run; 0 = nothing came back, 1 = back at the target."""
    title = f"recovery of forget_{metric}: (probe - unlearned) / (target - unlearned)"
    column = f"recovery_{metric}"
    if table.empty or table[column].isna().all():
        return _empty(title, "no recovery values among the selection")
    colors = run_colors(table["label"])
    fig = go.Figure()
    for label, g in table.groupby("label", sort=True):
        fig.add_trace(go.Bar(x=g["probe"], y=g[column], name=label, marker_color=colors[label], meta=column,
                             hovertemplate="%{x}<br>recovery %{y:.3f}<extra>" + label + "</extra>"))
    for y, dash in ((0, "solid"), (1, "dash")):
        fig.add_hline(y=y, line=dict(color="gray", width=1, dash=dash))
    fig.update_layout(title=title, barmode="group", xaxis_title="probe", yaxis_title="recovery fraction",
                      height=400)
    return fig


def robustness_tradeoff_figure(table: pd.DataFrame, probe: str = "relearn", metric: str = "rouge") -> go.Figure:
    """Utility of the final model (y) vs how much a probe brings back (x = recovery fraction): durable
    forgetting at no utility cost sits top-left."""
    title = f"model_utility vs recovery of forget_{metric} ({probe})"
    g = table[table["probe"] == probe].dropna(subset=[f"recovery_{metric}", "model_utility"]) \
        if not table.empty else table
    if g.empty:
        return _empty(title, f"no runs with a {probe} recovery and a model utility")
    colors = run_colors(table["label"])
    fig = go.Figure()
    for label, r in g.groupby("label", sort=True):
        fig.add_trace(go.Scatter(x=r[f"recovery_{metric}"], y=r["model_utility"], mode="markers+text", name=label,
                                 text=r["method"], textposition="top center",
                                 marker=dict(size=13, color=colors[label]),
                                 hovertemplate=label + "<br>recovery %{x:.3f}<br>model_utility %{y:.4g}<extra></extra>"))
    fig.update_layout(title=title, xaxis_title=f"recovery fraction ({probe}, forget_{metric})",
                      yaxis_title="model_utility (final model)", height=420)
    return fig
