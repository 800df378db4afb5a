"""End to end: `lab notebook` (JupyterLab on notebooks/, localhost, the venv's kernel) started from another
folder; the system Chromium (headless, Selenium + Debian chromedriver) opens a notebook and sees its
parameters cell rendered. Skipped - loudly, with the apt-get command - only when the browser is missing."""
from __future__ import annotations

import contextlib
import json
import os
import secrets
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import nbformat
import pytest

from dashboard import screenshots
from lab import report

NOTEBOOK = "00_quickstart"
# what the page shows of the notebook's parameters cell: every line of a cell is a .cm-line element
_CELLS_JS = """
return Array.from(document.querySelectorAll('.jp-Notebook .jp-CodeCell .jp-InputArea-editor'))
    .map(e => Array.from(e.querySelectorAll('.cm-line')).map(l => l.textContent).join('\\n'));
"""


def _get_json(url: str):
    with urllib.request.urlopen(url, timeout=5) as r:
        return json.loads(r.read())


@contextlib.contextmanager
def jupyterlab(tmp_path, timeout: float = 180.0):
    """`python -m lab notebook` on a free port from tmp_path (its own Jupyter config/runtime/data folders,
    so nothing of the user's is read or written); yields (base URL, token)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    token = secrets.token_hex(16)
    home = tmp_path / "jupyter"
    env = {**os.environ, "JUPYTER_CONFIG_DIR": str(home / "config"), "JUPYTER_RUNTIME_DIR": str(home / "runtime"),
           "JUPYTERLAB_WORKSPACES_DIR": str(home / "workspaces"), "JUPYTERLAB_SETTINGS_DIR": str(home / "settings"),
           "PYTHONPATH": str(report.REPO)}
    log = tmp_path / "jupyterlab.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "lab", "notebook", "--port", str(port), "--token", token,
                                 "--no-browser"], cwd=tmp_path, env=env, stdout=out, stderr=subprocess.STDOUT)
    base = f"http://localhost:{port}"
    try:
        deadline = time.time() + timeout
        while True:
            assert proc.poll() is None, log.read_text()[-3000:]
            with contextlib.suppress(OSError, ValueError):
                if "started" in _get_json(f"{base}/api/status?token={token}"):
                    break
            assert time.time() < deadline, f"JupyterLab did not answer on {base}: {log.read_text()[-3000:]}"
            time.sleep(0.5)
        yield base, token, port
    finally:
        screenshots.stop_process(proc, timeout=20)


@pytest.mark.slow
def test_jupyterlab_opens_a_notebook_with_its_parameters_cell(browser_available, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait
    from test_report import LOOPBACK, _listening

    nb = nbformat.read(report.notebook_path(NOTEBOOK), as_version=4)
    _, params = report.parameters_cell(nb)
    first_line = params.splitlines()[0]
    with jupyterlab(tmp_path) as (base, token, port):
        assert set(_listening(port)) <= LOOPBACK and _listening(port)      # localhost only
        specs = _get_json(f"{base}/api/kernelspecs?token={token}")
        kernel = specs["kernelspecs"][specs["default"]]["spec"]
        assert specs["default"] == report.KERNEL and Path(kernel["argv"][0]).parent == Path(sys.executable).parent
        contents = _get_json(f"{base}/api/contents?token={token}")          # the server's root is notebooks/
        assert f"{NOTEBOOK}.ipynb" in {c["name"] for c in contents["content"]}
        with screenshots.browser() as driver:
            driver.get(f"{base}/lab/tree/{NOTEBOOK}.ipynb?token={token}")
            WebDriverWait(driver, 120).until(lambda d: any(first_line in c for c in d.execute_script(_CELLS_JS)))
            cells = driver.execute_script(_CELLS_JS)
            shown = next(c for c in cells if first_line in c)
            # the whole parameters cell, line for line (the cell JupyterLab rendered is the tagged one)
            assert shown.splitlines() == params.splitlines()
            driver.save_screenshot(str(tmp_path / "jupyterlab.png"))
            assert driver.find_elements(By.CSS_SELECTOR, ".jp-NotebookPanel")
    assert (tmp_path / "jupyterlab.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
