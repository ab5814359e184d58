"""A static PNG of a figure (``nas plot --png``), drawn by the system's Chromium, headless and offline.

Plotly's own PNG route, kaleido, downloads a browser at first use, which cannot work on a closed
network; the system's Chromium runs the plotly.js the package ships instead, the HTML page's own
renderer.
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import plotly.graph_objects as go
from plotly.offline import get_plotlyjs
from plotly.utils import PlotlyJSONEncoder

from nas.spec.errors import NasError

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
# Headless and quiet on a closed network: without these it stalls on update checks.
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--hide-scrollbars",
    "--mute-audio",
)


def find_chromium() -> str:
    """The Chromium binary: ``$NAS_CHROMIUM``, else the first of :data:`CHROMIUM_NAMES` on the PATH."""
    wanted = os.environ.get("NAS_CHROMIUM")
    if wanted:
        if not (Path(wanted).is_file() and os.access(wanted, os.X_OK)):
            raise NasError(f"NAS_CHROMIUM={wanted}: not an executable file")
        return wanted
    for name in CHROMIUM_NAMES:
        found = shutil.which(name)
        if found:
            return found
    raise NasError(
        "--png needs Chromium: install it (Debian: `apt-get install chromium`) or set NAS_CHROMIUM "
        "to its path; the HTML page needs nothing"
    )


def write_png(
    path: Path, figure: go.Figure, *, width: int = 1200, height: int | None = None, timeout_s: float = 90.0
) -> Path:
    """A static PNG of one figure, drawn by the system's Chromium (headless, offline) with the
    plotly.js of the plotly package: the HTML page's own renderer, and no kaleido, whose browser
    download cannot work on a closed network. Twice the pixels, for a sharp image.

    The page draws the figure, asks plotly for its image (``Plotly.toImage``, which also reads back
    3-D WebGL scenes, where a screenshot of the window caught them blank) and writes the data URL
    into the document, which Chromium prints with ``--dump-dom``.
    """
    chromium = find_chromium()
    height = int(height or figure.layout.height or 600)
    fig = go.Figure(figure).update_layout(width=width, height=height)
    spec = fig.to_plotly_json()
    script = (
        "const spec = " + json.dumps(spec, cls=PlotlyJSONEncoder) + ";\n"
        "Plotly.newPlot('fig', spec.data, spec.layout, {staticPlot: true})"
        f".then(gd => Plotly.toImage(gd, {{format: 'png', width: {width}, height: {height}, scale: 2}}))"
        ".then(url => { document.getElementById('out').textContent = url; })"
        ".catch(e => { document.getElementById('out').textContent = 'error: ' + e; });"
    )
    script = script.replace("</", "<\\/")  # hover text may hold "</b>": keep it from closing the script
    page = (f"<!doctype html><html><head><meta charset='utf-8'><script>{get_plotlyjs()}</script></head><body>"
            f"<div id='fig' style='width:{width}px;height:{height}px'></div><pre id='out'></pre>"
            f"<script>{script}</script></body></html>")  # fmt: skip
    path = Path(path).resolve()
    with tempfile.TemporaryDirectory(prefix="nas-png-") as tmp:
        html_file = Path(tmp) / "figure.html"
        html_file.write_text(page, encoding="utf-8")
        cmd = [chromium, *CHROMIUM_FLAGS, f"--user-data-dir={tmp}/profile", f"--window-size={width},{height}",
               "--virtual-time-budget=15000", "--dump-dom", html_file.as_uri()]  # fmt: skip
        try:
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
        except subprocess.TimeoutExpired:
            raise NasError(f"{chromium} did not draw the figure within {timeout_s:g} s") from None
    found = re.search(r"<pre id=\"out\">(.*?)</pre>", r.stdout, re.S)
    out = found.group(1).strip() if found else ""
    if r.returncode != 0 or not out.startswith("data:image/png;base64,"):
        why = out or ((r.stderr or "").strip().splitlines() or ["no output"])[-1]
        raise NasError(f"{chromium} could not draw {path.name} (exit {r.returncode}): {why[:300]}")
    path.write_bytes(base64.b64decode(out.split(",", 1)[1]))
    return path

