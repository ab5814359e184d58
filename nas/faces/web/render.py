"""The page's HTML, rendered on the server from the Jinja2 templates in ``templates/``.

Every page carries the CSS of :mod:`nas.faces.plots.page` (so the web page and ``nas plot``'s file
look alike) and the web page's own few rules; figures are formatted by :func:`nas.faces.plots.fmt`
in both.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from jinja2 import Environment, FileSystemLoader, select_autoescape

from nas.faces import plots

WEB_CSS = """
form.controls { display:flex; flex-wrap:wrap; gap:8px 16px; align-items:center; margin: 0 0 10px; }
form.controls label { font-size:12px; color:var(--muted); }
form.controls select { font: inherit; padding: 2px 4px; }
table.data th a { color: inherit; text-decoration: none; } table.data th a.sorted { color: var(--accent); }
nav.tabs a { margin-right: 14px; }
.live { font-size:12px; color:var(--muted); } .live.changed { color:#1b6b2a; }
.grid2 { display:grid; grid-template-columns: minmax(0,1fr) minmax(0,1fr); gap: 14px; }
@media (max-width: 900px) { .grid2 { grid-template-columns: 1fr; } }
table.kv td:first-child { color: var(--muted); white-space: nowrap; padding-right: 14px; }
.error { color:#a11; } .big { font-size: 44px; font-weight: 700; color: #c7ced9; margin: 10px 0 0; }
"""

TEMPLATES = Path(__file__).with_name("templates")
_ENV = Environment(loader=FileSystemLoader(TEMPLATES), autoescape=select_autoescape(["html"]), trim_blocks=False)
_ENV.globals["fmt"] = plots.fmt


def render(template: str, **values: Any) -> str:
    """A whole page (the template extends ``base.html``)."""
    return _ENV.get_template(template).render(css=plots.PAGE_CSS, web_css=WEB_CSS, **values)


def fragment(template: str, **values: Any) -> str:
    """A piece of a page (the trial table's rows, the facts) that the page's script puts in place
    when it filters or refreshes: no CSS, no frame."""
    return _ENV.get_template(template).render(**values)
