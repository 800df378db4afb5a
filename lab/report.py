"""Notebook reports: execute a notebook under papermill with a parameter profile, write
`reports/<name>-<profile>.ipynb` and a self-contained HTML next to it.

Notebooks start with `from lab.report import notebook_setup; notebook_setup()` so plotly figures are
embedded in the saved outputs (visible offline, and surviving nbconvert to HTML).
"""
from __future__ import annotations


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
