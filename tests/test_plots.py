"""The figures of a study (nas.faces.plots) and `nas plot`: what each figure shows, read through the
store from a synthetic study that holds every kind of trial (tests/browse_helpers.py)."""

from __future__ import annotations

import itertools
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from nas.faces import plots
from nas.store import Store
from tests.browse_helpers import DECODE_BUDGET_MS, ROOT, keep_artifact, make_study, require_chromium


@pytest.fixture(scope="module")
def db(tmp_path_factory: pytest.TempPathFactory) -> str:
    url = f"sqlite:///{tmp_path_factory.mktemp('plots') / 'nas.db'}"
    with Store(url) as store:
        make_study(store, "synthetic", n_complete=16)
        make_study(store, "other", n_complete=10, seed=3, extras=False)
    return url


@pytest.fixture(scope="module")
def data(db: str) -> plots.StudyData:
    with Store(db) as store:
        return plots.load_study(store, "synthetic")


def test_load_study_reads_every_trial_with_its_figures_labels_and_budgets(db, data):
    with Store(db) as store:
        trials = store.trials(study="synthetic")
        front = {t.number for t in store.pareto(study="synthetic")}
    assert [p.number for p in data.points] == [t.number for t in trials]
    assert {p.number for p in data.points if p.on_front} == front
    states = {p.state for p in data.points}
    assert states == {"complete", "infeasible", "failed", "running"}
    for p in data.points:
        if p.state == "complete":
            assert {"val_bpb", "decode_ms", "prefill_ms", "peak_memory_mb", "model_mb", "params"} <= set(p.figures)
            assert p.label in ("measured:local", "estimated:roofline") and p.spec is not None
            lo, hi = p.spread["decode_ms"]
            assert lo <= p.figures["decode_ms"] <= hi
    # the budget the study ran under, recovered from figure - constraint
    assert data.budgets["decode_ms"] == pytest.approx(DECODE_BUDGET_MS)
    assert "attention" in data.dimensions() and "rope_theta" not in data.dimensions()


def test_hypervolume_2d_matches_a_hand_computed_area():
    pts = [(1, 3), (2, 2), (3, 1), (3.5, 3.5)]  # the last is dominated: adds nothing
    assert plots.hypervolume_2d(pts, (4, 4)) == pytest.approx(3 + 2 + 1)
    assert plots.hypervolume_2d([(5, 5)], (4, 4)) == 0.0  # beyond the reference
    # a maximized second objective: negate and the same area comes out
    assert plots.hypervolume_2d([(1, -3), (2, -2), (3, -1)], (4, -4), ("minimize", "maximize")) == pytest.approx(6)


def test_hypervolume_history_never_decreases_and_ends_at_the_front_area(data):
    rows, ref = plots.hypervolume_history(data)
    hv = [r["hypervolume"] for r in rows]
    assert hv and all(b >= a for a, b in itertools.pairwise(hv)) and hv[-1] > 0
    feasible = np.array([[p.figures["decode_ms"], p.figures["val_bpb"]] for p in data.feasible()])
    assert hv[-1] == pytest.approx(plots.hypervolume_2d(feasible, ref))


def _traces(fig, name_part: str) -> list:
    return [t for t in fig.data if name_part in (t.name or "")]


def test_pareto_figure_marks_front_budget_and_where_each_latency_came_from(data):
    fig = plots.pareto_figure(data)
    complete = {p.number for p in data.points if p.state == "complete"}
    plotted = {n for t in fig.data if t.customdata is not None for n in t.customdata}
    assert complete <= plotted
    front_line = _traces(fig, "Pareto front")[0]
    assert list(front_line.x) == sorted(front_line.x)
    over = _traces(fig, "over a budget")
    rejected = [p.number for p in data.points if p.state == "infeasible" and p.stage == "measure"]
    assert any(list(t.customdata) == rejected for t in over), "the trial rejected when measured is on the strip"
    texts = [s for t in fig.data if t.text is not None for s in t.text]
    assert any("estimated:roofline" in s for s in texts) and any("measured:local" in s for s in texts)
    assert all("trial " in s for s in texts)
    est = _traces(fig, "estimated")[0]
    assert set(est.marker.symbol) == {"diamond"}  # the shape says it too, not only the hover
    assert any(f"budget {DECODE_BUDGET_MS:g}" in (a.text or "") for a in fig.layout.annotations)


def test_pareto_figure_draws_each_tokenizers_baselines_and_flags_trials_above_them(data):
    complete = [p for p in data.points if p.state == "complete"]
    flagged = [p for p in complete if p.beats_bigram is False]
    assert flagged and len(flagged) < len(complete)  # the synthetic study has both kinds
    assert all(p.figures["val_bpb"] >= p.baselines["bigram_bpb"] for p in flagged)
    assert [(v, b) for v, _, b in data.baselines()] == [(1024, 2.75), (512, 3.6)]
    fig = plots.pareto_figure(data)
    lines = {round(s.y0, 4) for s in fig.layout.shapes if s.y0 == s.y1}
    assert {2.75, 3.6} <= lines  # both bigram lines; the unigram ones lie far above the points
    notes = " ".join(a.text for a in fig.layout.annotations)
    assert "bigram V1024 2.750" in notes and "bigram V512 3.600" in notes
    assert f"{len(flagged)} trial(s) not below their bigram baseline" in fig.layout.title.text
    assert "unigram V512 4.900" in fig.layout.title.text
    hovers = {n: t for tr in fig.data if tr.customdata is not None for n, t in zip(tr.customdata, tr.text, strict=True)}
    assert "not below its bigram baseline" in hovers[flagged[0].number]
    fine = next(p for p in complete if p.beats_bigram and p.feasible)
    assert "bigram 3.6000" in hovers[fine.number] or "bigram 2.7500" in hovers[fine.number]
    assert "not below" not in hovers[fine.number]


def test_pareto_figure_colours_by_a_spec_field_as_categories(data):
    fig = plots.pareto_figure(data, color="attention")
    names = {t.name for t in fig.data}
    assert any(n.startswith("attention=gqa") for n in names) and fig.layout.coloraxis.colorbar.title.text is None


def test_other_figures_show_the_study(db, data):
    with Store(db) as store:
        other = plots.load_study(store, "other")
    f3 = plots.pareto3d_figure(data)
    assert sum(len(t.x) for t in f3.data) == sum(1 for p in data.points if p.state == "complete")
    dims = plots.dimensions_figure(data)
    assert {a.text for a in dims.layout.annotations} >= {"attention", "d_model"}
    cmp = plots.compare_figure([data, other])
    assert {t.name for t in cmp.data} >= {"synthetic", "other"}
    assert "common reference point" in cmp.layout.title.text


def test_thinning_keeps_the_front_and_the_unfinished_trials(db):
    with Store(db) as store:
        full = plots.load_study(store, "synthetic", specs=False)
        thin = plots.load_study(store, "synthetic", max_points=3)
        again = plots.thinned(store, full, 3)
    front = {p.number for p in full.points if p.on_front}
    kept = {p.number for p in thin.points}
    assert front <= kept and {p.number for p in again.points} == kept
    assert len(kept) == len(front) + 3 + sum(p.state in ("running", "failed") for p in full.points)
    assert all(p.spec is not None for p in again.points if p.arch_id)
    assert "thinned" in plots.pareto_figure(thin).layout.title.text


def test_the_spec_cache_reads_each_architecture_once_and_stays_bounded(db, monkeypatch):
    with Store(db) as store:
        reads: list[str] = []
        get = store.get_architecture
        monkeypatch.setattr(store, "get_architecture", lambda *, arch_id: reads.append(arch_id) or get(arch_id=arch_id))
        cache = plots.SpecCache()
        first = plots.load_study(store, "synthetic", cache=cache)
        archs = {p.arch_id for p in first.points if p.arch_id}
        assert sorted(reads) == sorted(archs) and len(cache) == len(archs)
        again = plots.load_study(store, "synthetic", cache=cache)
        assert len(reads) == len(archs) and [p.spec for p in again.points] == [p.spec for p in first.points]
        small = plots.SpecCache(size=2)
        bounded = plots.load_study(store, "synthetic", cache=small)
    assert len(small) == 2 and [p.spec for p in bounded.points] == [p.spec for p in first.points]


def test_page_is_self_contained(tmp_path, data):
    from plotly.offline import get_plotlyjs

    page = plots.write_page(tmp_path / "p.html", data).read_text()
    assert get_plotlyjs() in page  # plotly.js itself, embedded once
    rest = page.replace(get_plotlyjs(), "")  # (its own source names a CDN for map data, unused here)
    assert "cdn.plot.ly" not in rest and not re.search(r"<script[^>]+src=", rest) and "https://" not in rest
    assert page.count("Plotly.newPlot") >= 4 and "The front:" in page
    for name in ("fig-pareto", "fig-pareto3d", "fig-hypervolume", "fig-dimensions"):
        assert f'id="{name}"' in page


def nas(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "nas", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=300)  # fmt: skip


def test_nas_plot_writes_the_page_and_refuses_what_it_cannot_do(db, tmp_path):
    out = tmp_path / "synthetic.html"
    r = nas(["plot", "synthetic", "--out", str(out), "--db", db, "--compare", "other", "--color", "n_layers"], ROOT)
    assert r.returncode == 0, r.stderr
    assert out.stat().st_size > 3_000_000 and 'id="fig-compare"' in out.read_text()  # plotly.js inside
    for args, says in (
        (["plot", "nope", "--out", str(out), "--db", db], "no study named 'nope'"),
        (["plot", "synthetic", "--out", str(tmp_path / "x.png"), "--db", db], ".html"),
        (["plot", "synthetic", "--out", str(out), "--db", db, "--color", "bogus"], "--color"),
    ):
        r = nas(args, ROOT)
        assert r.returncode == 2 and says in r.stderr, r.stderr
        assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) <= 2


@pytest.mark.browser
def test_png_is_drawn_by_the_system_chromium(data, tmp_path, monkeypatch):
    monkeypatch.setenv("NAS_CHROMIUM", require_chromium())
    path = plots.write_png(tmp_path / "plots-pareto.png", plots.pareto_figure(data), width=1000)
    raw = path.read_bytes()
    assert raw[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = int.from_bytes(raw[16:20], "big"), int.from_bytes(raw[20:24], "big")
    assert (width, height) == (2000, 1200)  # twice the pixels of 1000 x 600
    assert len(raw) > 40_000  # points, axes and text, not a blank page
    keep_artifact(path)


def test_nas_pareto_gives_each_trials_baselines_and_flags_the_ones_not_below_bigram(db, tmp_path):
    r = nas(["pareto", "synthetic", "--db", db, "--json"], ROOT)
    assert r.returncode == 0, r.stderr
    front = json.loads(r.stdout)["front"]
    assert front and all(row["bigram_bpb"] in (2.75, 3.6) and row["unigram_bpb"] in (4.7, 4.9) for row in front)
    for row in front:
        assert row["beats_bigram"] == (row["val_bpb"] < row["bigram_bpb"])
    r = subprocess.run([sys.executable, "-m", "nas", "pareto", "synthetic", "--db", db], capture_output=True,
                       text=True, cwd=ROOT, timeout=300, env={**os.environ, "COLUMNS": "250"})
    assert r.returncode == 0 and "bigram" in r.stdout and "unigram" in r.stdout
    assert ("≥ bigram" in r.stdout) == any(row["beats_bigram"] is False for row in front)


def test_the_seed_spread_is_each_bpbs_error_bar_and_marks_front_points_within_noise(db, data):
    from tests.browse_helpers import NOISE_BPBS

    assert data.noise is not None and data.noise.std == pytest.approx(0.03)
    assert data.noise.bpbs == NOISE_BPBS and data.noise.seeds == (0, 1, 2) and data.noise.trial_number == 0
    close = data.within_noise()
    front = {p.number: p.figures["val_bpb"] for p in data.points if p.on_front}
    assert set(close) == set(front)
    for n, others in close.items():  # symmetric, and exactly the pairs closer than 2 std
        assert all(n in close[m] for m in others)
        assert set(others) == {m for m in front if m != n and abs(front[m] - front[n]) < 0.06}
    fig = plots.pareto_figure(data)
    bars = [t.error_y for t in fig.data if t.customdata is not None and t.error_y is not None and t.error_y.value]
    assert bars and all(b.value == pytest.approx(0.03) for b in bars)
    assert "BPB bars: ±0.0300, the seed spread (3 seeds at 20,480 tokens)" in fig.layout.title.text
    assert ("BPB seed spread", "±0.0300 (3 seeds of trial 0's architecture at 20,480 tokens)") in \
        plots.study_facts(data)
    r = nas(["pareto", "synthetic", "--db", db, "--json"], ROOT)
    doc = json.loads(r.stdout)
    assert doc["noise"]["std"] == pytest.approx(0.03) and doc["noise"]["tokens"] == 20480
    assert {row["number"]: row["within_noise_of"] for row in doc["front"]} == close


def test_a_study_without_noise_draws_no_error_bars(db):
    with Store(db) as store:
        other = plots.load_study(store, "other")
    assert other.noise is None and all(not v for v in other.within_noise().values())
    fig = plots.pareto_figure(other)
    assert all(t.error_y is None or not t.error_y.value for t in fig.data)
    assert "seed spread" not in fig.layout.title.text
