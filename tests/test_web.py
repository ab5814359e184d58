"""`nas ui`'s web page: its answers through FastAPI's TestClient (404, 400, JSON), then the page in a
real headless Chromium (Debian's, driven by Playwright): it loads, the Pareto plot draws a point
for every complete trial, a click on a point or a row opens that trial, the table sorts and
filters, and the page picks up a trial that finishes while it is open. Screenshots are kept as
test artefacts (tmp_path, and test-artifacts/ when NAS_TEST_ARTIFACTS is set)."""

from __future__ import annotations

import http.client
import http.server
import re
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from nas.faces.web.app import create_app
from nas.faces.web.errors import BadRequest, NotFound
from nas.faces.web.routes.compare import MAX_COMPARED
from nas.faces.web.views import DEFAULT_LIMIT
from nas.spec.errors import NasError, SpecError
from nas.store import Store, StoreError
from tests.browse_helpers import (
    CHROMIUM_ARGS,
    DEADLINE_S,
    free_port,
    keep_artifact,
    make_study,
    require_chromium,
    wait_for_http,
)

SLOW_ANSWER_S = 2.5
"""A server's first answer on a loaded machine, for the test of wait_for_http."""


@pytest.fixture(scope="module")
def db(tmp_path_factory: pytest.TempPathFactory) -> str:
    url = f"sqlite:///{tmp_path_factory.mktemp('web') / 'nas.db'}"
    with Store(url) as store:
        make_study(store, "synthetic", n_complete=16)
        make_study(store, "other", n_complete=8, seed=3, extras=False)
        make_study(store, "live", n_complete=3, seed=5, extras=False)
        make_study(store, "rungs", n_complete=3, seed=7, extras=False, rungs=3)
    return url


@pytest.fixture(scope="module")
def client(db: str) -> Iterator[TestClient]:
    # TestClient names itself "testserver", a host the page does not answer to unless told
    with TestClient(create_app(db, allowed_hosts=["testserver"]), raise_server_exceptions=False) as c:
        yield c


def test_index_lists_the_studies(client):
    r = client.get("/")
    assert r.status_code == 200
    for name in ("synthetic", "other", "live", "rungs"):
        assert f'href="/study/{name}"' in r.text
    assert [s["name"] for s in client.get("/api/studies").json()] == ["synthetic", "other", "live", "rungs"]


def test_study_page_has_the_table_and_loads_plotly_from_this_server(client, db):
    r = client.get("/study/synthetic")
    assert r.status_code == 200
    with Store(db) as store:
        n = len(store.trials(study="synthetic"))
    assert len(re.findall(r'<tr class="clickable[^"]*" data-number=', r.text)) == n
    scripts = re.findall(r'<script[^>]+src="([^"]+)"', r.text)
    assert scripts == ["/static/plotly.min.js"] and "cdn.plot.ly" not in r.text
    js = client.get("/static/plotly.min.js")
    assert js.status_code == 200 and len(js.content) > 1_000_000


def test_trial_table_shows_each_trials_bigram_baseline_and_flags_the_ones_not_below_it(client, db):
    r = client.get("/study/synthetic")
    rows = re.findall(r'<tr class="clickable[^"]*" data-number="(\d+)".*?</tr>', r.text, flags=re.S)
    assert rows and "<th class=\"num\">bigram</th>" in r.text
    with Store(db) as store:
        trials = {t.number: t for t in store.trials(study="synthetic")}
    flagged = {n for n, t in trials.items() if t.val_bpb is not None and t.val_bpb >= t.baselines["bigram_bpb"]}
    assert flagged
    for row in re.findall(r'(<tr class="clickable[^"]*" data-number="(\d+)".*?</tr>)', r.text, flags=re.S):
        assert ("≥ bigram" in row[0]) == (int(row[1]) in flagged)


def test_trial_table_says_after_how_many_tokens_a_bpb_was_taken_when_the_study_has_rungs(client):
    with_rungs = client.get("/study/rungs").text
    assert with_rungs.count('title="tokens trained when scored (rungs)">@20.5k') == 3  # each complete trial
    assert "tokens trained when scored" not in client.get("/study/other").text  # one budget: nothing to say


def test_trial_table_marks_front_trials_within_noise_of_each_other(client, db):
    with Store(db) as store:
        from nas.faces import plots

        close = plots.load_study(store, "synthetic").within_noise()
    assert any(close.values())  # the synthetic study has some
    r = client.get("/study/synthetic")
    assert "BPB seed spread" in r.text
    for row, number in re.findall(r'(<tr class="clickable[^"]*" data-number="(\d+)".*?</tr>)', r.text, flags=re.S):
        others = close.get(int(number), [])
        marked = re.search(r"≈ ((?:#\d+ )+)", row)
        assert (marked.group(1).split() if marked else []) == [f"#{n}" for n in others]


def test_json_api_returns_the_trials_the_front_and_the_figures(client, db):
    with Store(db) as store:
        trials = store.trials(study="synthetic")
        front = sorted(t.number for t in store.pareto(study="synthetic"))
    body = client.get("/api/study/synthetic/trials").json()
    assert [t["number"] for t in body["trials"]] == [t.number for t in trials]
    on_front = client.get("/api/study/synthetic/trials", params={"feasibility": "front"}).json()["trials"]
    assert sorted(t["number"] for t in on_front) == front
    by_bpb = client.get("/api/study/synthetic/trials", params={"feasibility": "feasible", "sort": "val_bpb"}).json()
    bpbs = [t["figures"]["val_bpb"] for t in by_bpb["trials"]]
    assert bpbs == sorted(bpbs) and bpbs
    est = client.get("/api/study/synthetic/trials", params={"label": "estimated:roofline"}).json()["trials"]
    assert est and all(t["label"] == "estimated:roofline" for t in est)
    figs = client.get("/api/study/synthetic/figures").json()
    assert set(figs) == {"pareto", "pareto3d", "hypervolume", "dimensions"}
    plotted = {n for t in figs["pareto"]["data"] for n in (t.get("customdata") or [])}
    assert {t.number for t in trials if t.state == "complete"} <= plotted
    status = client.get("/api/study/synthetic").json()
    assert status["n_trials"] == len(trials) and status["stamp"]
    one = client.get("/api/study/synthetic/trial/0").json()
    assert one["number"] == 0 and one["curve"] and one["val_bpb"] > 0


def test_trial_page_shows_spec_measurement_curve_and_export_command(client, db):
    r = client.get("/study/synthetic/trial/0")
    assert r.status_code == 200
    assert f"nas export synthetic --trial 0 --out synthetic-trial0 --db {db}" in r.text
    assert 'id="spec"' in r.text and "measured:local" in r.text and "fig-curve" in r.text
    failed = client.get("/study/synthetic/trial/18")  # the failed one: its reason, no curve
    assert failed.status_code == 200 and "loss became NaN" in failed.text


@pytest.mark.parametrize(
    ("url", "status", "says"),
    [
        ("/study/nope", 404, "no study &#39;nope&#39;"),
        ("/study/synthetic/trial/999", 404, "has no trial 999"),
        ("/api/study/nope/trials", 404, "no study 'nope'"),
        ("/study/synthetic?x=bogus", 400, "x=&#39;bogus&#39;"),
        ("/study/synthetic?feasibility=maybe", 400, "feasibility"),
        ("/study/synthetic?label=%3Cscript%3E", 400, "label="),
        ("/study/synthetic?limit=0", 400, "limit"),
        ("/study/synthetic?desc=sideways", 400, "desc"),
        ("/study/synthetic/trial/abc", 400, "number"),
        # past what the database's integer holds: asking it would overflow its driver (a 500)
        (f"/study/synthetic/trial/{2**63}", 404, f"has no trial {2**63}"),
        (f"/study/synthetic/trial/{2**31}", 404, f"has no trial {2**31}"),  # past PostgreSQL's INTEGER
        (f"/api/study/synthetic/trial/{10**30}", 404, f"has no trial {10**30}"),
        ("/api/study/synthetic/trial/-1", 404, "has no trial -1"),
        ("/api/study/synthetic/figures?color=bogus", 400, "color"),
        ("/compare?study=synthetic", 400, "two studies"),
    ],
)
def test_bad_requests_get_a_clear_page_never_a_traceback(client, url, status, says):
    r = client.get(url)
    assert r.status_code == status
    assert says in r.text and "Traceback" not in r.text
    if url.startswith("/api/"):
        assert r.json()["status"] == status
    else:
        assert r.headers["content-type"].startswith("text/html") and 'id="error-message"' in r.text


@pytest.mark.parametrize(
    ("error", "status", "says"),
    [
        (StoreError("sqlite:///nas.db: database is locked by another process"), 503, "the database cannot be read"),
        (SpecError("n_heads: 3 does not divide d_model 64"), 500, "n_heads: 3 does not divide d_model 64"),
    ],
)
def test_only_a_database_that_cannot_be_read_is_a_503(db, monkeypatch, error, status, says):
    # a NasError that is not the database's (here a stored spec this code rejects) keeps its own
    # message and is not blamed on the database
    app = create_app(db, allowed_hosts=["testserver"])

    def fail(*_: Any, **__: Any) -> None:
        raise error

    monkeypatch.setattr(app.state.store, "list_studies", fail)
    with TestClient(app, raise_server_exceptions=False) as c:
        for url in ("/", "/api/studies"):
            r = c.get(url)
            assert r.status_code == status and says in r.text, (url, r.status_code, r.text[-300:])
            assert ("cannot be read" in r.text) == (status == 503) and "Traceback" not in r.text
    assert issubclass(BadRequest, NasError) and issubclass(NotFound, NasError)


def test_points_can_be_coloured_by_a_spec_field(client):
    assert client.get("/study/synthetic", params={"color": "attention"}).status_code == 200
    figs = client.get("/api/study/synthetic/figures", params={"color": "n_layers"})
    assert figs.status_code == 200
    assert figs.json()["pareto"]["layout"]["coloraxis"]["colorbar"]["title"]["text"] == "n_layers"


def test_compare_page_draws_studies_on_the_same_axes(client):
    r = client.get("/compare", params=[("study", "synthetic"), ("study", "other")])
    assert r.status_code == 200 and "common reference point" in r.text


def test_compare_reads_each_study_once_and_names_a_bounded_number(client, monkeypatch):
    # a study named 3000 times is read once, not 3000 times; more than MAX_COMPARED studies is refused
    # before any is read
    reader = client.app.state.reader
    reads: list[str] = []
    load = reader.load
    monkeypatch.setattr(reader, "load", lambda name, **kw: reads.append(name) or load(name, **kw))
    r = client.get("/compare", params=[("study", "synthetic"), ("study", "other")] * 1500)
    assert r.status_code == 200 and sorted(reads) == ["other", "synthetic"]
    assert "<h1>Compared: synthetic, other</h1>" in r.text
    reads.clear()
    r = client.get("/compare", params=[("study", "synthetic")] * 3000)
    assert r.status_code == 400 and "two studies" in r.text and not reads
    r = client.get("/compare", params=[("study", f"s{i}") for i in range(MAX_COMPARED + 1)] * 2)
    assert r.status_code == 400 and f"at most {MAX_COMPARED} studies" in r.text and not reads


def _status(c: TestClient, path: str, host: str) -> int:
    return c.get(path, headers={"host": host}).status_code


def test_only_the_hosts_the_page_is_served_under_are_answered(db):
    # DNS rebinding: another site's page, its domain pointed at 127.0.0.1, is read by the browser as
    # that domain's; the browser still names the domain in Host:, which the page refuses
    with TestClient(create_app(db, port=8123), base_url="http://127.0.0.1:8123") as c:
        for host in ("127.0.0.1:8123", "localhost:8123", "[::1]:8123", "LocalHost:8123"):
            assert _status(c, "/api/studies", host) == 200, host
        for host in ("evil.example:8123", "evil.example", "127.0.0.1.evil.example:8123", "127.0.0.1:8124",
                     "localhost", "testserver", "[::1", "localhost:8123:1", ""):  # fmt: skip
            r = c.get("/api/studies", headers={"host": host})
            assert r.status_code == 400 and "--allow-host" in r.json()["error"], host
        page = c.get("/study/synthetic", headers={"host": "<b>evil</b>:8123"})
        assert page.status_code == 400 and 'id="error-message"' in page.text and "<b>evil" not in page.text
    with TestClient(create_app(db, host="::1", port=80, allowed_hosts=None)) as c:
        assert [_status(c, "/", h) for h in ("[::1]", "[::1]:80", "localhost", "[::1]:8000")] == [200, 200, 200, 400]
    allowed = ["nas.example", "box.lan:9000", "::2"]  # a name without a port: any port (a proxy's)
    with TestClient(create_app(db, allowed_hosts=allowed)) as c:
        answered = ["nas.example", "nas.example:1234", "box.lan:9000", "[::2]:5"]
        refused = ["box.lan:9001", "box.lan", "127.0.0.1:8000", "testserver"]  # the list replaces the defaults
        assert [_status(c, "/", h) for h in answered + refused] == [200] * 4 + [400] * 4
    with pytest.raises(NasError, match="allowed host 'two words'"):
        create_app(db, allowed_hosts=["two words"])


def test_the_page_only_reads(db, tmp_path):
    missing = f"sqlite:///{tmp_path / 'absent.db'}"
    with pytest.raises(NasError, match="nas db upgrade"):
        create_app(missing)
    assert not (tmp_path / "absent.db").exists()


def _listening_addresses(port: int) -> set[str]:
    """Local addresses with a socket listening on ``port`` (Linux's /proc/net/tcp, hex little-endian)."""
    out = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        local, state = line.split()[1], line.split()[3]
        addr, hex_port = local.split(":")
        if int(hex_port, 16) == port and state == "0A":  # 0A: LISTEN
            out.add(".".join(str(int(addr[i : i + 2], 16)) for i in (6, 4, 2, 0)))
    return out


def _host_status(port: int, host: str) -> int:
    """The status of GET / from the server at 127.0.0.1:``port`` for a request naming ``host``."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=DEADLINE_S)
    try:
        conn.request("GET", "/", headers={"Host": host})
        return conn.getresponse().status
    finally:
        conn.close()


def test_nas_ui_serves_on_loopback_only_and_answers_only_its_hosts(db, tmp_path):
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "nas", "ui", "--db", db, "--port", str(port),
                             "--allow-host", "nas.example"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
    try:
        wait_for_http(f"http://127.0.0.1:{port}/api/studies", timeout_s=DEADLINE_S, proc=proc)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=DEADLINE_S) as r:
            assert r.status == 200 and b"synthetic" in r.read()
        assert _listening_addresses(port) == {"127.0.0.1"}
        answered = [f"localhost:{port}", f"[::1]:{port}", "nas.example", f"nas.example:{port}"]
        refused = ["evil.example", f"evil.example:{port}", "localhost:1"]
        assert [_host_status(port, h) for h in answered + refused] == [200] * 4 + [400] * 3
    finally:
        proc.kill()
        proc.wait(timeout=DEADLINE_S)
    r = subprocess.run([sys.executable, "-m", "nas", "ui", "--db", f"sqlite:///{tmp_path / 'absent.db'}"],
                       capture_output=True, text=True, timeout=120)  # fmt: skip
    assert r.returncode == 2 and "nas db upgrade" in r.stderr and "Traceback" not in r.stderr


def test_waiting_for_a_server_waits_for_a_slow_first_answer():
    # a loaded machine may take seconds over a server's first answer: wait_for_http waits for it
    # until its deadline, rather than giving up on each try after a fixed time
    class Slow(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            time.sleep(SLOW_ANSWER_S)
            self.send_response(204)
            self.end_headers()

        def log_message(self, *_: Any) -> None:
            pass

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Slow)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        wait_for_http(f"http://127.0.0.1:{srv.server_port}/", timeout_s=DEADLINE_S)
    finally:
        srv.shutdown()
        srv.server_close()


def test_a_large_study_is_read_once_and_drawn_thinned(tmp_path, monkeypatch):
    """What keeps a large study's page light, 600 trials here: the study is read from the database
    once for its page, its figures, its table and the page's next visit; the figures draw at most
    max_points trials besides the front, and read the specs of those only; the table shows a
    screenful. (bench/store_scale.py times the page on 10,000 trials: a test here does not time,
    since a loaded machine is slow at anything.)"""
    url = f"sqlite:///{tmp_path / 'big.db'}"
    with Store(url) as store:
        make_study(store, "big", n_complete=600, extras=False)
        front = {t.number for t in store.pareto(study="big")}
    app = create_app(url, max_points=200, allowed_hosts=["testserver"])
    store = app.state.store
    reads: list[str] = []
    specs: list[str] = []
    trials, get_architecture = store.trials, store.get_architecture
    monkeypatch.setattr(store, "trials", lambda **kw: reads.append(kw["study"]) or trials(**kw))
    monkeypatch.setattr(
        store, "get_architecture", lambda *, arch_id: specs.append(arch_id) or get_architecture(arch_id=arch_id)
    )
    with TestClient(app) as c:
        page = c.get("/study/big")
        figs = c.get("/api/study/big/figures")
        rows = c.get("/api/study/big/rows", params={"sort": "val_bpb"})
        again = c.get("/study/big")
    assert [r.status_code for r in (page, figs, rows, again)] == [200] * 4
    assert reads == ["big"], "the study is read once while it does not change"
    pareto = figs.json()["pareto"]
    drawn = {n for t in pareto["data"] for n in (t.get("customdata") or [])}
    assert front <= drawn and len(drawn) <= 200 + len(front)
    assert "thinned" in pareto["layout"]["title"]["text"]
    assert len(specs) <= 200 + len(front), "specs are read for the drawn trials only"
    shown = len(re.findall(r'<tr class="clickable[^"]*" data-number=', page.text))
    assert shown == DEFAULT_LIMIT < 600 and rows.json()["shown"] == DEFAULT_LIMIT


# --- in a real browser ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def server(db: str) -> Iterator[str]:
    import uvicorn

    port = free_port()
    srv = uvicorn.Server(uvicorn.Config(create_app(db, refresh_s=1.0, port=port), host="127.0.0.1", port=port,
                                        log_level="warning"))  # fmt: skip
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + DEADLINE_S
    while not srv.started and time.monotonic() < deadline:
        time.sleep(0.05)
    assert srv.started, f"the web app did not start within {DEADLINE_S:g} s"
    yield f"http://127.0.0.1:{port}"
    srv.should_exit = True
    thread.join(10)


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    chromium = require_chromium()
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS, headless=True, timeout=DEADLINE_S * 1000)
        yield b
        b.close()


@pytest.fixture
def page(browser: Any, server: str) -> Iterator[Any]:
    ctx = browser.new_context(viewport={"width": 1280, "height": 900})
    pg = ctx.new_page()
    pg.set_default_timeout(DEADLINE_S * 1000)
    outside: list[str] = []
    pg.on("request", lambda req: outside.append(req.url) if not req.url.startswith(server) else None)
    yield pg
    ctx.close()
    assert not outside, f"the page fetched from outside its server: {outside}"


def _wait_figures(page: Any) -> None:
    page.wait_for_selector("body[data-figures=drawn]", timeout=DEADLINE_S * 1000)


@pytest.mark.browser
def test_study_page_renders_a_point_per_trial_in_the_browser(page, server, db, tmp_path):
    with Store(db) as store:
        complete = [t for t in store.trials(study="synthetic") if t.state == "complete"]
        rejected = [t for t in store.trials(study="synthetic") if t.state == "infeasible" and t.measurement_id]
    page.goto(f"{server}/study/synthetic")
    _wait_figures(page)
    points = page.locator("#fig-pareto .scatterlayer .trace .points path.point")
    assert points.count() == len(complete) + len(rejected)
    assert page.locator("#fig-dimensions .subplot").count() >= 1 or page.locator("#fig-dimensions .boxlayer").count()
    assert "synthetic: BPB against decode ms/token" in page.locator("#fig-pareto .gtitle").text_content()
    keep_artifact(_shot(page, tmp_path / "web-study.png", full_page=True))


@pytest.mark.browser
def test_clicking_a_point_opens_its_trial(page, server):
    page.goto(f"{server}/study/synthetic")
    _wait_figures(page)
    # The front's first point: a complete trial, unobstructed by the other markers.
    numbers = page.evaluate("""() => {
        const d = document.getElementById('fig-pareto');
        const out = [];
        d._fullData.forEach((t, i) => { if (t.customdata && t.visible !== false) t.customdata.forEach(
            (n, j) => out.push({trace: i, index: j, n: n})); });
        return out; }""")
    assert numbers
    box = page.locator("#fig-pareto .scatterlayer .trace").first.locator("path.point").first.bounding_box()
    assert box is not None
    page.mouse.move(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
    page.wait_for_selector("#fig-pareto .hoverlayer .hovertext")
    hover = page.locator("#fig-pareto .hoverlayer .hovertext").first.text_content()
    n = int(re.search(r"trial (\d+)", hover).group(1))
    assert "measured:local" in hover or "estimated:roofline" in hover  # where the latency came from
    page.mouse.click(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
    page.wait_for_url(re.compile(rf"/study/synthetic/trial/{n}$"))
    assert page.locator("#trial-title").inner_text().startswith(f"Trial {n}")


@pytest.mark.browser
def test_clicking_a_row_opens_its_trial_with_its_curve(page, server, tmp_path):
    page.goto(f"{server}/study/synthetic")
    row = page.locator('#trial-rows tr[data-number="3"] td').nth(2)
    row.click()
    page.wait_for_url(re.compile(r"/study/synthetic/trial/3$"))
    page.wait_for_selector("#fig-curve .scatterlayer .trace")
    assert "nas export synthetic --trial 3" in page.locator("#export-command").inner_text()
    assert page.locator("#spec tr").count() >= 15
    keep_artifact(_shot(page, tmp_path / "web-trial.png", full_page=True))


@pytest.mark.browser
def test_table_sorts_and_filters_in_place(page, server, db):
    with Store(db) as store:
        front = {t.number for t in store.pareto(study="synthetic")}
    page.goto(f"{server}/study/synthetic")
    page.select_option("#filters select[name=feasibility]", "front")
    page.wait_for_selector('#trial-rows[data-view*="feasibility=front"]', state="attached")
    shown = {int(n) for n in page.locator("#trial-rows tr").evaluate_all("rs => rs.map(r => r.dataset.number)")}
    assert shown == front
    assert "feasibility=front" in page.url  # a link to this view keeps it
    page.click("th a[data-sort=val_bpb]")
    page.wait_for_selector('#trial-rows[data-view*="sort=val_bpb"]', state="attached")
    bpb = page.locator("#trial-rows tr td:nth-child(5)").all_inner_texts()
    values = [float(v.split()[0]) for v in bpb]  # a BPB not below its bigram baseline carries a flag
    assert values == sorted(values)


@pytest.mark.browser
def test_page_refreshes_while_a_search_runs(page, server, db, tmp_path):
    page.goto(f"{server}/study/live")
    _wait_figures(page)
    before = page.locator("#trial-rows tr").count()
    with Store(db) as store:  # a trial finishes while the page is open
        trial = store.get_trial(study="live", number=0)
        store.start_trial(study="live", number=99, arch_id=trial.arch_id)
        store.finish_trial(study="live", number=99, objectives={"val_bpb": 2.0, "decode_ms": 0.01, "params": 1.0},
                           val_bpb=2.0, constraints={"decode_ms_per_token": -1.0},
                           measurement_id=trial.measurement_id)  # fmt: skip
        store.refresh_pareto(study="live")
    page.wait_for_selector('#trial-rows tr[data-number="99"]', timeout=DEADLINE_S * 1000)
    assert page.locator("#trial-rows tr").count() == before + 1
    page.wait_for_function(
        "document.getElementById('fig-pareto').data.some(t => (t.customdata || []).includes(99))",
        timeout=DEADLINE_S * 1000,
    )
    keep_artifact(_shot(page, tmp_path / "web-live.png"))


@pytest.mark.browser
def test_missing_study_is_a_404_page_in_the_browser(page, server):
    response = page.goto(f"{server}/study/nope")
    assert response is not None and response.status == 404
    assert "no study 'nope'" in page.locator("#error-message").inner_text()


def _shot(page: Any, path: Path, *, full_page: bool = False) -> Path:
    page.screenshot(path=str(path), full_page=full_page)
    assert path.stat().st_size > 20_000
    return path
