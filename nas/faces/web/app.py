"""`nas ui`: a read-only web page over the results database.

Pages: the studies (``/``), one study's figures and trial table (``/study/NAME``), one trial
(``/study/NAME/trial/N``) and studies side by side (``/compare?study=A&study=B``). The JSON under
``/api/`` is what the page polls while a search runs, and what a script can read.

Everything is read through :class:`nas.store.Store` and drawn by :mod:`nas.faces.plots` (a face, in
DESIGN.md's layers: no SQL, no torch here). HTML is rendered on the server with Jinja2; plotly.js
is served from the plotly package itself, so the page works on a closed network. A study of
thousands of trials is read once per request (three queries) and drawn from an even sample of at
most ``max_points`` trials, the front always kept.

Errors: a missing study or trial is a 404 page, a bad query parameter a 400, a database that
cannot be read a 503 with its one-line reason; never a traceback in the page.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import re
import shlex
import threading
from collections.abc import AsyncIterator
from datetime import datetime
from functools import cache
from pathlib import Path
from typing import Annotated, Any

import plotly.graph_objects as go
import plotly.io as pio
from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from jinja2 import Environment, FileSystemLoader, select_autoescape
from starlette.exceptions import HTTPException

from nas.faces import plots
from nas.spec.errors import NasError
from nas.store import Store, StudyRow, TrialRow

log = logging.getLogger("nas.faces.web.app")

SPEC_FIELDS = (
    "vocab_size",
    "d_model",
    "n_layers",
    "layer_sharing",
    "share_repeat",
    "attention",
    "n_heads",
    "n_kv_heads",
    "head_dim",
    "mla_latent_rank",
    "mla_rope_dim",
    "rope_theta",
    "context_length",
    "ffn",
    "ffn_ratio",
    "activation",
    "norm",
    "tied_embeddings",
    "bitwidth",
)
"""ArchSpec's fields, by name (nas.spec.arch is not imported: it is plain data, but the page needs only the names)."""
AXES = tuple(plots.FIGURES)
FEASIBILITY = {
    "all": "every trial",
    "feasible": "complete, within budgets",
    "front": "on the Pareto front",
    "over-budget": "over a budget",
    "failed": "failed",
    "running": "running",
}
SORTS = (
    "number",
    "state",
    "params",
    "val_bpb",
    "decode_ms",
    "prefill_ms",
    "peak_memory_mb",
    "model_mb",
    "label",
    "seconds",
)
LABEL_RE = re.compile(r"^(all|none|measured:[\w.\-@]+|estimated:[\w.\-]+)$")
NAME_RE = re.compile(r"^[^\x00-\x1f/]{1,200}$")
DEFAULT_LIMIT = 500


class BadRequest(Exception):
    """A query parameter the page cannot use: becomes a 400 naming it."""


# --- the app ---------------------------------------------------------------------------------------------
def create_app(db_url: str, *, refresh_s: float = 5.0, max_points: int = 1000) -> FastAPI:
    """The web app over the database at ``db_url``, read-only.

    The schema must be this code's (``nas db upgrade`` otherwise: the page never writes).
    ``refresh_s``: how often an open study page asks whether the study has changed.
    ``max_points``: at most this many trials (besides the front) are drawn per figure.
    """
    store = Store(db_url, upgrade=False)

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        store.close()

    app = FastAPI(title="nas", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    app.state.store = store
    ctx = _Ctx(store=store, refresh_s=refresh_s, max_points=max_points)

    @app.exception_handler(HTTPException)
    async def _http_error(request: Request, exc: HTTPException) -> Response:
        return _error(request, exc.status_code, str(exc.detail))

    @app.exception_handler(RequestValidationError)
    async def _bad_params(request: Request, exc: RequestValidationError) -> Response:
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ())[1:]) or "request"
        return _error(request, 400, f"bad {where}: {first.get('msg', 'invalid value')}")

    @app.exception_handler(BadRequest)
    async def _bad_request(request: Request, exc: BadRequest) -> Response:
        return _error(request, 400, str(exc))

    @app.exception_handler(NasError)
    async def _store_error(request: Request, exc: NasError) -> Response:
        return _error(request, 503, f"the database cannot be read: {exc}")

    @app.exception_handler(Exception)
    async def _bug(request: Request, exc: Exception) -> Response:
        log.exception("error on %s", request.url.path)
        return _error(request, 500, "internal error (the server's log has the details)")

    @app.get("/", response_class=HTMLResponse)
    def index() -> str:
        studies = store.list_studies()
        return _render(
            "index.html",
            title="studies",
            studies=studies,
            db=store.url,
            refresh_s=refresh_s,
            stamp=_studies_stamp(studies),
        )

    @app.get("/study/{name}", response_class=HTMLResponse)
    def study_page(
        name: str,
        x: str = "decode_ms",
        y: str = "val_bpb",
        color: str | None = None,
        feasibility: str = "all",
        label: str = "all",
        sort: str = "number",
        desc: bool = False,
        limit: int = Query(DEFAULT_LIMIT, ge=1, le=100_000),
    ) -> str:
        view = _View.parse(
            x=x, y=y, color=color, feasibility=feasibility, label=label, sort=sort, desc=desc, limit=limit
        )
        full = ctx.load(name)
        rows, matching = view.rows(full)
        labels = sorted({p.label for p in full.points if p.label})
        return _render(
            "study.html",
            title=name,
            data=full,
            study=name,
            view=view,
            state=dataclasses.asdict(view),
            rows=rows,
            matching=matching,
            labels=labels,
            facts=plots.study_facts(full),
            db=store.url,
            refresh_s=refresh_s,
            stamp=_study_stamp(full.study, store),
            axes=AXES,
            colours=_colour_choices(full),
            feasibility=FEASIBILITY,
        )

    @app.get("/study/{name}/trial/{number}", response_class=HTMLResponse)
    def trial_page(name: str, number: int) -> str:
        study, trial = _trial(store, name, number)
        m = store.get_measurement(id=trial.measurement_id) if trial.measurement_id is not None else None
        spec = store.get_architecture(arch_id=trial.arch_id).spec.to_dict() if trial.arch_id else None
        curve = _curve_figure(trial)
        front = {t.number for t in store.pareto(study=name)}
        return _render(
            "trial.html",
            title=f"{name} · trial {number}",
            study=study,
            t=trial,
            m=m,
            spec=spec,
            on_front=number in front,
            curve_json=pio.to_json(curve, validate=False) if curve else None,
            export=_export_command(store.url, name, number, db_default=ctx.db_is_default(db_url)),
            db=store.url,
        )

    @app.get("/compare", response_class=HTMLResponse)
    def compare_page(
        study: Annotated[list[str] | None, Query()] = None, x: str = "decode_ms", y: str = "val_bpb"
    ) -> str:
        study = study or []
        if len(study) < 2:
            raise BadRequest("compare needs two studies or more: /compare?study=A&study=B")
        _View.parse(x=x, y=y)
        datas = [ctx.load(n, thin=True) for n in study]
        fig = plots.compare_figure(datas, x=x, y=y)
        return _render(
            "compare.html", title="compare", studies=study, fig_json=pio.to_json(fig, validate=False), db=store.url
        )

    # --- JSON -----------------------------------------------------------------------------------------------
    @app.get("/api/studies")
    def api_studies() -> list[dict[str, Any]]:
        return [_study_json(s) for s in store.list_studies()]

    @app.get("/api/study/{name}")
    def api_study(name: str) -> dict[str, Any]:
        study = _study(store, name)
        return {**_study_json(study), "stamp": _study_stamp(study, store)}

    @app.get("/api/study/{name}/trials")
    def api_trials(
        name: str,
        feasibility: str = "all",
        label: str = "all",
        sort: str = "number",
        desc: bool = False,
        limit: int = Query(100_000, ge=1, le=100_000),
    ) -> dict[str, Any]:
        view = _View.parse(feasibility=feasibility, label=label, sort=sort, desc=desc, limit=limit)
        full = ctx.load(name)
        rows, matching = view.rows(full)
        return {"study": name, "matching": matching, "trials": [_point_json(p) for p in rows]}

    @app.get("/api/study/{name}/rows")
    def api_rows(
        name: str,
        feasibility: str = "all",
        label: str = "all",
        sort: str = "number",
        desc: bool = False,
        limit: int = Query(DEFAULT_LIMIT, ge=1, le=100_000),
    ) -> dict[str, Any]:
        """The trial table's rows as HTML, for the page's filters and its refresh."""
        view = _View.parse(feasibility=feasibility, label=label, sort=sort, desc=desc, limit=limit)
        full = ctx.load(name)
        rows, matching = view.rows(full)
        html = _ENV.get_template("rows.html").render(rows=rows, study=name)
        facts = _ENV.get_template("facts.html").render(facts=plots.study_facts(full))
        return {
            "html": html,
            "facts": facts,
            "shown": len(rows),
            "matching": matching,
            "total": len(full.points),
            "stamp": _study_stamp(full.study, store),
        }

    @app.get("/api/study/{name}/figures")
    def api_figures(name: str, x: str = "decode_ms", y: str = "val_bpb", color: str | None = None) -> Response:
        view = _View.parse(x=x, y=y, color=color)
        stamp, data = ctx.read(name, thin=True)
        if view.color is not None and view.color not in _colour_choices(data):
            raise BadRequest(f"color={view.color!r}: not a figure or a search dimension of {name!r}")
        key = (name, stamp, x, y, color)  # the same study as read, the same view: the same figures
        body = ctx.figures.get(key)
        if body is None:
            figs = _study_figures(data, view)
            body = "{" + ",".join(f'"{k}":{pio.to_json(f, validate=False)}' for k, f in figs.items()) + "}"
            with ctx.lock:
                ctx.figures[key] = body
                while len(ctx.figures) > 16:
                    ctx.figures.pop(next(iter(ctx.figures)))
        return Response(body, media_type="application/json")

    @app.get("/api/study/{name}/trial/{number}")
    def api_trial(name: str, number: int) -> dict[str, Any]:
        _, t = _trial(store, name, number)
        out = {f.name: getattr(t, f.name) for f in dataclasses.fields(t)}
        return _jsonable(out)

    @app.get("/static/plotly.min.js")
    def plotly_js() -> Response:
        return Response(
            _plotly_js(), media_type="application/javascript", headers={"Cache-Control": "public, max-age=86400"}
        )

    @app.get("/favicon.ico")
    def favicon() -> Response:
        return Response(status_code=204)

    return app


@dataclasses.dataclass
class _Ctx:
    store: Store
    refresh_s: float
    max_points: int

    cache: dict[str, tuple[str, plots.StudyData, plots.StudyData | None]] = dataclasses.field(default_factory=dict)
    lock: threading.Lock = dataclasses.field(default_factory=threading.Lock)
    figures: dict[tuple[Any, ...], str] = dataclasses.field(default_factory=dict)

    def load(self, name: str, *, thin: bool = False) -> plots.StudyData:
        return self.read(name, thin=thin)[1]

    def read(self, name: str, *, thin: bool = False) -> tuple[str, plots.StudyData]:
        """The study's stamp, and the whole study without specs or a sample of it with specs for
        figures.

        Reading a study of 10,000 trials takes about a second (its trials and its measurements);
        two small queries (trial counts by state, the front) say whether anything changed since
        the last read, so a page, its figures, its table's sorting and its refresh reuse one read.
        """
        stamp = _study_stamp(_study(self.store, name), self.store)
        with self.lock:
            hit = self.cache.get(name)
        if hit is None or hit[0] != stamp:
            hit = (stamp, plots.load_study(self.store, name, specs=False), None)
        if thin and hit[2] is None:
            hit = (stamp, hit[1], plots.thinned(self.store, hit[1], self.max_points))
        with self.lock:
            self.cache[name] = hit
            while len(self.cache) > 8:  # a few studies open at once; the oldest read goes
                self.cache.pop(next(iter(self.cache)))
        return stamp, (hit[2] if thin else hit[1])  # type: ignore[return-value]

    @staticmethod
    def db_is_default(url: str) -> bool:
        from nas.store import default_db_url

        return url == default_db_url()


@dataclasses.dataclass(frozen=True)
class _View:
    """The study page's query parameters, checked once (a bad one is a 400 naming it)."""

    x: str = "decode_ms"
    y: str = "val_bpb"
    color: str | None = None
    feasibility: str = "all"
    label: str = "all"
    sort: str = "number"
    desc: bool = False
    limit: int = DEFAULT_LIMIT

    @classmethod
    def parse(cls, **kw: Any) -> _View:
        view = cls(**kw)
        for key in ("x", "y"):
            if getattr(view, key) not in AXES:
                raise BadRequest(f"{key}={getattr(view, key)!r}: choose one of {', '.join(AXES)}")
        if view.x == view.y:
            raise BadRequest("x and y must be different figures")
        if view.color is not None and view.color not in AXES and view.color not in SPEC_FIELDS:
            raise BadRequest(f"color={view.color!r}: choose a figure ({', '.join(AXES)}) or a spec field")
        if view.feasibility not in FEASIBILITY:
            raise BadRequest(f"feasibility={view.feasibility!r}: choose one of {', '.join(FEASIBILITY)}")
        if not LABEL_RE.match(view.label):
            raise BadRequest(f"label={view.label!r}: all, none, measured:<where> or estimated:<how>")
        if view.sort not in SORTS:
            raise BadRequest(f"sort={view.sort!r}: choose one of {', '.join(SORTS)}")
        return view

    def keep(self, p: plots.TrialPoint) -> bool:
        f = self.feasibility
        ok = (
            f == "all"
            or (f == "feasible" and p.feasible)
            or (f == "front" and p.on_front)
            or (f == "over-budget" and (p.state == "infeasible" or (p.state == "complete" and not p.feasible)))
            or (f in ("failed", "running") and p.state == f)
        )
        if ok and self.label != "all":
            ok = (p.label is None) if self.label == "none" else p.label == self.label
        return ok

    def rows(self, data: plots.StudyData) -> tuple[list[plots.TrialPoint], int]:
        """The table's rows after the filters, sorted, at most ``limit``; and how many matched."""
        rows = [p for p in data.points if self.keep(p)]
        rows.sort(key=self._key, reverse=self.desc)
        if self.sort != "number":  # missing values last, whatever the order
            rows.sort(key=lambda p: self._key(p)[0])
        return rows[: self.limit], len(rows)

    def _key(self, p: plots.TrialPoint) -> tuple[bool, Any]:
        if self.sort == "number":
            return (False, p.number)
        if self.sort == "state":
            return (False, (p.state, p.number))
        if self.sort == "label":
            return (p.label is None, (p.label or "", p.number))
        if self.sort == "seconds":
            s = _seconds(p)
            return (s is None, s or 0.0)
        v = p.figures.get(self.sort)
        return (v is None, v if v is not None else 0.0)


def _study(store: Store, name: str) -> StudyRow:
    if not NAME_RE.match(name):
        raise BadRequest("bad study name")
    study = store.find_study(name=name)
    if study is None:
        raise HTTPException(404, f"no study {name!r} in {store.url}")
    return study


def _trial(store: Store, name: str, number: int) -> tuple[StudyRow, TrialRow]:
    study = _study(store, name)
    trial = store.find_trial(study=name, number=number)
    if trial is None:
        raise HTTPException(404, f"study {name!r} has no trial {number}")
    return study, trial


def _seconds(p: plots.TrialPoint) -> float | None:
    return None if p.finished_at is None else (p.finished_at - p.started_at).total_seconds()


def _study_stamp(study: StudyRow, store: Store | None = None) -> str:
    """Changes whenever a trial starts or ends (and, given the store, when the front changes):
    what the page's refresh and the read cache compare."""
    counts = "-".join(f"{k}{v}" for k, v in sorted(study.trial_counts.items()))
    if store is None:
        return counts
    return counts + "/" + ",".join(str(t.number) for t in store.pareto(study=study.name))


def _studies_stamp(studies: list[StudyRow]) -> str:
    return "|".join(f"{s.name}:{_study_stamp(s)}" for s in studies)


def _study_json(s: StudyRow) -> dict[str, Any]:
    return {
        "name": s.name,
        "space": s.space,
        "profile": s.profile,
        "trials": s.trial_counts,
        "n_trials": s.n_trials,
        "objectives": [o.to_dict() for o in s.objectives],
        "created_at": s.created_at.isoformat(),
    }


def _point_json(p: plots.TrialPoint) -> dict[str, Any]:
    return _jsonable(
        {
            "number": p.number,
            "state": p.state,
            "feasible": p.feasible,
            "on_front": p.on_front,
            "architecture": p.summary,
            "arch_id": p.arch_id,
            "label": p.label,
            "figures": p.figures,
            "failed_stage": p.stage,
            "failure_reason": p.reason,
            "constraints": p.constraints,
            "started_at": p.started_at,
            "finished_at": p.finished_at,
        }
    )


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, datetime):
        return value.isoformat()
    return value


def _colour_choices(data: plots.StudyData) -> list[str]:
    dims = data.dimensions() if any(p.spec for p in data.points) else []
    return [*AXES, *(d for d in SPEC_FIELDS if d in dims or not dims)]


def _study_figures(data: plots.StudyData, view: _View) -> dict[str, go.Figure]:
    return {
        "pareto": plots.pareto_figure(data, x=view.x, y=view.y, color=view.color),
        "pareto3d": plots.pareto3d_figure(data),
        "hypervolume": plots.hypervolume_figure(data, x=view.x, y=view.y),
        "dimensions": plots.dimensions_figure(data, objective=view.y),
    }


def _curve_figure(t: TrialRow) -> go.Figure | None:
    """Training loss against tokens seen (the curve's points are [step, tokens, loss, lr, seconds])."""
    if not t.curve:
        return None
    pts = [p for p in t.curve if isinstance(p, (list, tuple)) and len(p) >= 3 and p[2] is not None]
    fig = go.Figure(
        go.Scatter(
            x=[p[1] for p in pts],
            y=[p[2] for p in pts],
            mode="lines+markers",
            name="train loss",
            customdata=[p[0] for p in pts],
            hovertemplate="step %{customdata}, %{x:,} tokens: loss %{y:.4f}<extra></extra>",
        )
    )
    fig.update_xaxes(title_text="tokens seen")
    fig.update_yaxes(title_text="training loss (nats/token)")
    return plots.styled(fig, f"trial {t.number}: training loss", height=340)


def _export_command(db: str, study: str, number: int, *, db_default: bool) -> str:
    cmd = ["nas", "export", study, "--trial", str(number), "--out", f"{study}-trial{number}"]
    if not db_default:
        cmd += ["--db", db]
    return shlex.join(cmd)


@cache
def _plotly_js() -> str:
    from plotly.offline import get_plotlyjs

    return get_plotlyjs()


def _wants_json(request: Request) -> bool:
    return request.url.path.startswith("/api/") or "application/json" in request.headers.get("accept", "")


def _error(request: Request, status: int, message: str) -> Response:
    if _wants_json(request):
        return JSONResponse({"error": message, "status": status}, status_code=status)
    titles = {400: "Bad request", 404: "Not found", 500: "Internal error", 503: "Database unavailable"}
    body = _render("error.html", title=titles.get(status, str(status)), status=status, message=message, db=None)
    return HTMLResponse(body, status_code=status)


# --- templates ---------------------------------------------------------------------------------------
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


def _render(template: str, **values: Any) -> str:
    return _ENV.get_template(template).render(css=plots.PAGE_CSS, web_css=WEB_CSS, **values)
