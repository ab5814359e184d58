"""`optuna-dashboard <db url>` on a database that `nas search` made: the study is an ordinary Optuna
study, so Optuna's own dashboard opens it beside our `nas_*` tables and shows its trials and front.

One real (tiny) search makes the database; the dashboard runs as a subprocess on a free loopback
port; every wait is bounded, and the server is killed afterwards whatever happens."""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from nas.store import Store
from tests.browse_helpers import ROOT, free_port, wait_for_http
from tests.search_helpers import STUDY, tiny_search


@pytest.fixture(scope="module")
def db(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The database of the session's shared real tiny search (tests/search_helpers.py)."""
    return tiny_search(tmp_path_factory).db


@pytest.fixture(scope="module")
def dashboard(db: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    exe = Path(sys.executable).with_name("optuna-dashboard")
    assert exe.exists(), f"{exe} is missing: optuna-dashboard is a dependency of nas (pip install -e .)"
    port = free_port()
    log = tmp_path_factory.mktemp("dashboard-log") / "server.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([str(exe), db, "--host", "127.0.0.1", "--port", str(port)], stdout=out,
                                stderr=subprocess.STDOUT, cwd=ROOT)  # fmt: skip
    try:
        base = f"http://127.0.0.1:{port}"
        try:
            wait_for_http(f"{base}/api/meta", timeout_s=60, proc=proc)
        except BaseException:
            print(log.read_text()[-2000:])
            raise
        yield base
    finally:
        proc.kill()
        proc.wait(timeout=10)


def get_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=30) as r:
        assert r.status == 200
        return json.load(r)


def test_dashboard_lists_the_study_that_nas_search_made(dashboard):
    studies = get_json(f"{dashboard}/api/studies")["study_summaries"]
    ours = [s for s in studies if s["study_name"] == STUDY]
    assert len(ours) == 1 and ours[0]["directions"] == ["minimize", "minimize"]
    attrs = {a["key"]: a["value"] for a in ours[0]["user_attrs"]}
    assert attrs["space"] == "tiny" and attrs["profile"] == "host"


def test_dashboard_returns_the_trials_and_front_the_store_has(dashboard, db):
    study_id = next(s["study_id"] for s in get_json(f"{dashboard}/api/studies")["study_summaries"]
                    if s["study_name"] == STUDY)  # fmt: skip
    detail = get_json(f"{dashboard}/api/studies/{study_id}")
    with Store(db) as store:
        trials = {t.number: t for t in store.trials(study=STUDY)}
        front = {t.number for t in store.pareto(study=STUDY)}
    shown = {t["number"]: t for t in detail["trials"]}
    assert set(shown) == set(trials)
    complete = {n for n, t in trials.items() if t.state == "complete"}
    assert complete, "the tiny search finished no trial"
    for n in complete:
        assert shown[n]["state"] == "Complete"
        assert shown[n]["values"][0] == pytest.approx(trials[n].val_bpb)
        attrs = {a["key"]: a["value"] for a in shown[n]["user_attrs"]}
        assert attrs["arch_id"] == trials[n].arch_id and attrs["label"].startswith(("measured:", "estimated:"))
        # (optuna-dashboard 0.21 leaves "constraints" empty: it does not read Optuna 5's set_constraint)
    best = {t["number"] for t in detail["best_trials"]}
    assert best and best <= complete
    if all(trials[n].feasible for n in complete):  # the dashboard's front ignores constraints
        assert best == front
    with urllib.request.urlopen(f"{dashboard}/dashboard", timeout=30) as r:  # the page itself
        assert r.status == 200 and b"<html" in r.read().lower()
