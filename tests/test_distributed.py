"""`nas search --executor ray` on a real Ray cluster on loopback: a head (the trial workers) and a
second node that advertises a custom resource standing in for a device (its measurement tasks).

One cluster for the module, started with `ray start --block` in sessions of their own and ended
by signalling exactly those processes (never `ray stop`, which ends every Ray on the machine).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from nas.spec.calibration import REFERENCE_SET
from nas.store import Store
from tests.measurements import measurement
from tests.test_search import ROOT, _wait_for, nas

pytestmark = pytest.mark.slow

RAY = str(Path(sys.executable).with_name("ray"))
DEVICE_NODE = "stand-in-device"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _session_pids(sid: int) -> list[int]:
    """Processes in the session that `ray start` opened: everything it and its raylet started."""
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, IndexError, ValueError):
            fields = stat.read_text().rsplit(")", 1)[1].split()  # after "(comm)": state ppid pgrp session
            if int(fields[3]) == sid:
                pids.append(int(stat.parent.name))
    return pids


def _end_sessions(procs: list[subprocess.Popen], timeout: float = 15.0) -> None:
    """SIGTERM to each `ray start --block` (it stops what it started), all at once, then SIGKILL to
    what is left of their sessions after ``timeout``."""
    for proc in procs:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGTERM)
    end = time.monotonic() + timeout
    while any(_session_pids(p.pid) for p in procs) and time.monotonic() < end:
        time.sleep(0.3)
    for proc in procs:
        for pid in _session_pids(proc.pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=5)


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    # Token authentication on, with a token of the test's own: the cluster, the search's driver
    # and its workers all take it from the environment, whatever ~/.ray holds on this machine.
    return dict(os.environ, NAS_CACHE_DIR=str(tmp_path_factory.mktemp("ray-cache")), RAY_USAGE_STATS_ENABLED="0",
                RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(32))


@pytest.fixture(scope="module")
def cluster(env: dict[str, str]) -> Iterator[str]:
    # A short temp dir: Ray's Unix sockets live under it, and their paths have a length limit.
    temp = tempfile.mkdtemp(prefix="nasray-", dir="/tmp")
    port = _free_port()
    address = f"127.0.0.1:{port}"
    common = ["--temp-dir", temp, "--node-ip-address", "127.0.0.1", "--object-store-memory", str(100 * 2**20),
              "--block", "--disable-usage-stats"]
    procs: list[subprocess.Popen] = []
    try:
        procs.append(subprocess.Popen([RAY, "start", "--head", "--port", str(port), "--num-cpus", "2",
                                       "--include-dashboard", "false", *common], env=env, start_new_session=True,
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        _wait_for(lambda: subprocess.run([RAY, "status", "--address", address], capture_output=True,
                                         env=env).returncode == 0, 60, "the Ray head")
        procs.append(subprocess.Popen([RAY, "start", "--address", address, "--num-cpus", "0", "--resources",
                                       '{"stand_in_device": 1}', "--node-name", DEVICE_NODE, *common], env=env,
                                      start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        _wait_for(lambda: "stand_in_device" in subprocess.run([RAY, "status", "--address", address],
                                                              capture_output=True, text=True, env=env).stdout,
                  60, "the device node")
        yield address
    finally:
        _end_sessions(list(reversed(procs)))
        shutil.rmtree(temp, ignore_errors=True)


def test_ray_options_without_the_ray_executor_or_with_no_head_are_one_line_errors(env, fast, tmp_path):
    db = f"sqlite:///{tmp_path / 'nas.db'}"
    r = nas(["search", *fast, "--device", "host", "--trials", "1", "--db", db, "--workers", "2"], env, tmp_path)
    assert r.returncode == 2 and "need --executor ray" in r.stderr and "Traceback" not in r.stderr, r.stderr
    r = nas(["search", *fast, "--device", "host", "--trials", "1", "--db", db, "--executor", "ray",
             "--ray-address", f"127.0.0.1:{_free_port()}"], env, tmp_path, timeout=120)
    assert r.returncode == 2 and "no Ray head answers" in r.stderr and "Traceback" not in r.stderr, r.stderr


def device_profile(path: Path, resource: str) -> Path:
    """The host profile, measured on the Ray node that advertises ``resource``."""
    text = (ROOT / "hw_profiles" / "host.yaml").read_text()
    text = text.replace("measurement:\n  where: local", f"measurement:\n  where: ray\n  ray_resource: {resource}")
    assert f"ray_resource: {resource}" in text
    path.write_text(text)
    return path


def test_two_workers_measure_on_the_device_node(env, fast, cluster, tmp_path):
    profile = device_profile(tmp_path / "standin.yaml", "stand_in_device")
    db = f"sqlite:///{tmp_path / 'nas.db'}"
    r = nas(["search", *fast, "--device", str(profile), "--trials", "3", "--db", db, "--executor", "ray",
             "--workers", "2", "--ray-address", cluster], env, tmp_path)
    assert r.returncode == 0, (r.stdout[-3000:], r.stderr[-3000:])
    assert "Pareto front of tiny-standin" in r.stdout
    with Store(db) as store:
        trials = [t for t in store.trials(study="tiny-standin") if t.failed_stage != "sample"]
        # 3 trials' worth: 3 of their own (one more where a worker looked while the other's
        # trial was between an invalid draw and the next: one per other worker at most), and any
        # that took another trial's weights (0.1 of a trial each) on top, as in a local run
        own = [t for t in trials if "weights_of" not in (t.train or {})]
        assert 3 <= len(own) <= 4, [(t.number, t.state, t.failure_reason, t.train) for t in trials]
        assert all(t.state in ("complete", "infeasible") for t in trials), [t.failure_reason for t in trials]
        assert len({t.worker for t in trials}) >= 1
        measured = [store.get_measurement(id=t.measurement_id) for t in trials if t.measurement_id]
        assert measured
        for m in measured:
            assert m.label == f"measured:{DEVICE_NODE}"
            assert m.provenance["ray_node_name"] == DEVICE_NODE
        assert store.pareto(study="tiny-standin")
    # The same study resumes locally: a Ray run and a local run share it.
    r = nas(["search", *fast, "--device", str(profile), "--trials", "1", "--db", db], env, tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    # Its front measured again on the device node: a new row labelled with the node, the trials'
    # own figures untouched.
    with Store(db) as store:
        before = {t.number: t.measurement_id for t in store.pareto(study="tiny-standin")}
        known = {m.id for m in store.measurements()}
    r = nas(["remeasure", "tiny-standin", "--db", db, "--top", "1", "--ray-address", cluster], env, tmp_path)
    assert r.returncode == 2 and "give its YAML file with --device PATH" in r.stderr, r.stderr  # not shipped
    r = nas(["remeasure", "tiny-standin", "--device", str(profile), "--db", db, "--top", "1", "--ray-address",
             cluster], env, tmp_path)
    assert r.returncode == 0, (r.stdout[-3000:], r.stderr[-3000:])
    assert f"Ray node {DEVICE_NODE}" in r.stdout and "Remeasured" in r.stdout
    with Store(db) as store:
        (new,) = [m for m in store.measurements() if m.id not in known]
        assert {t.number: t.measurement_id for t in store.pareto(study="tiny-standin")} == before
    assert new.ok and new.label == f"measured:{DEVICE_NODE}" and new.provenance["ray_node_name"] == DEVICE_NODE
    assert new.provenance["remeasure_of"]["trial"] in before


def test_calibrating_through_the_device_node_stores_points_labelled_with_it(env, cluster, tmp_path):
    profile = device_profile(tmp_path / "standin.yaml", "stand_in_device")
    db = f"sqlite:///{tmp_path / 'nas.db'}"
    r = nas(["devices", "calibrate", "--device", str(profile), "-n", "1", "--db", db, "--ray-address", cluster],
            env, tmp_path)
    assert r.returncode == 0, (r.stdout[-3000:], r.stderr[-3000:])
    assert f"Ray node {DEVICE_NODE}" in r.stdout and "Calibration points of standin" in r.stdout
    with Store(db) as store:
        rows = store.calibration(profile="standin")
    assert len(rows) == 1
    row = rows[0]
    assert (row.label, row.node, row.provenance["ray_node_name"]) == (f"measured:{DEVICE_NODE}", DEVICE_NODE,
                                                                       DEVICE_NODE)
    assert row.device_fingerprint == row.provenance["fingerprint"] and row.device_facts["threads"] == 2
    # A profile whose device no node of the cluster advertises: one line, exit 2, nothing stored.
    absent = device_profile(tmp_path / "absent.yaml", "absent_device")
    r = nas(["devices", "calibrate", "--device", str(absent), "--db", db, "--ray-address", cluster], env, tmp_path)
    assert r.returncode == 2 and "advertises 'absent_device'" in r.stderr and "Traceback" not in r.stderr, r.stderr
    with Store(db) as store:
        assert store.calibration(profile="absent") == []


def test_without_the_device_node_the_search_says_so_once_and_estimates(env, fast, cluster, tmp_path):
    # The Pi 5 profile (datasheet facts, so it can be estimated) waiting for a device nobody joined.
    profile = tmp_path / "absent.yaml"
    profile.write_text((ROOT / "hw_profiles" / "rpi5.yaml").read_text().replace("ray_resource: rpi5",
                                                                                "ray_resource: absent_device"))
    r = nas(["search", *fast, "--device", str(device_profile(tmp_path / "hostlike.yaml", "absent_device")),
             "--trials", "1", "--db", f"sqlite:///{tmp_path / 'other.db'}", "--executor", "ray",
             "--ray-address", cluster], env, tmp_path)
    assert r.returncode == 2 and "cannot be estimated" in r.stderr, r.stderr[-2000:]
    db = f"sqlite:///{tmp_path / 'nas.db'}"
    r = nas(["search", *fast, "--device", str(profile), "--trials", "1", "--db", db, "--executor", "ray",
             "--ray-address", cluster, "--require-measured"], env, tmp_path)
    assert r.returncode == 2 and "absent_device" in r.stderr and "Traceback" not in r.stderr, r.stderr[-2000:]
    # Points `nas devices calibrate` stored for this device earlier: the estimates fit them too.
    with Store(db) as store:
        for ref in REFERENCE_SET[:3]:
            store.upsert_architecture(spec=ref.spec)
            m = measurement(ref.spec.arch_id, bitwidth=ref.spec.bitwidth, label="measured:pi5-1", decode_ms=1.0,
                            prefill_ms=20.0, workload={"prompt_tokens": 64, "context_tokens": 256},
                            provenance={"fingerprint": "fp-pi", "device_facts": {"threads": 4}})
            store.add_calibration(run="r1", profile="absent", node="pi5-1", measurement=m)
    r = nas(["search", *fast, "--device", str(profile), "--trials", "2", "--db", db, "--executor", "ray",
             "--ray-address", cluster], env, tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (r.stdout + r.stderr).count("no Ray node advertises 'absent_device'") == 1
    assert "also fit 3 point(s) measured on pi5-1" in r.stdout + r.stderr
    with Store(db) as store:
        trials = store.trials(study="tiny-absent")
        rows = [store.get_measurement(id=t.measurement_id) for t in trials if t.measurement_id]
    assert {m.label for m in rows} == {"estimated:model"}, [(t.state, t.failure_reason) for t in trials]
    for m in rows:
        assert {(u["node"], u["fingerprint"]) for u in m.provenance["stored_calibration"]} == {("pi5-1", "fp-pi")}


def test_a_worker_killed_mid_trial_fails_that_trial_and_the_search_goes_on(env, fast, cluster, tmp_path):
    db = f"sqlite:///{tmp_path / 'nas.db'}"
    cmd = [sys.executable, "-m", "nas", "search", *fast, "--tokens", "60000", "--device", "host", "--trials",
           "3", "--db", db, "--executor", "ray", "--workers", "2", "--ray-address", cluster]
    proc = subprocess.Popen(cmd, env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    killed: dict[str, int] = {}
    try:
        def training() -> bool:
            with Store(db, upgrade=False) as store:
                for t in store.trials(study="tiny-host", states=["running"]):
                    if t.arch_id and t.worker:
                        killed[t.worker] = t.number
                        return True
            return False

        _wait_for(lambda: _safe(training), 300, "a trial running on a Ray worker")
        worker = next(iter(killed))
        os.kill(int(worker.rsplit(":", 1)[1]), signal.SIGKILL)
        out, err = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, (out[-2000:], err[-3000:])
    number = killed[worker]
    with Store(db) as store:
        trials = {t.number: t for t in store.trials(study="tiny-host")}
    dead = trials[number]
    assert dead.state == "failed" and "died" in dead.failure_reason, (dead.state, dead.failure_reason)
    others = [t for t in trials.values() if t.number != number and t.failed_stage != "sample"]
    assert any(t.state == "complete" for t in others), [(t.number, t.state, t.failure_reason) for t in others]


def _safe(predicate) -> bool:
    """False while the store does not exist yet or is being created."""
    try:
        return predicate()
    except Exception:
        return False


def test_sigterm_stops_a_ray_search_and_queues_its_running_trials_again(env, fast, cluster, tmp_path):
    # Fast trials on purpose: a stop soon after a trial starts once left it "running" (its worker
    # exited between the driver's recovery and its check that no worker was left)
    import optuna

    db = f"sqlite:///{tmp_path / 'nas.db'}"
    cmd = [sys.executable, "-m", "nas", "search", *fast[:4], "--tokens", "400000", "--device", "host", "--trials",
           "4", "--db", db, "--executor", "ray", "--workers", "2", "--ray-address", cluster]
    proc = subprocess.Popen(cmd, env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        def training() -> bool:
            with Store(db, upgrade=False) as store:
                return any(t.arch_id for t in store.trials(study="tiny-host", states=["running"]))

        _wait_for(lambda: _safe(training), 300, "a trial running on a Ray worker")
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 130, err[-3000:]
    with Store(db) as store:
        trials = store.trials(study="tiny-host")
    assert not [t for t in trials if t.state == "running"], [(t.number, t.state) for t in trials]
    stopped = [t for t in trials if t.state == "failed"]
    assert stopped and all("queued again" in t.failure_reason for t in stopped)
    waiting = optuna.load_study(study_name="tiny-host", storage=db).get_trials(states=[optuna.trial.TrialState.WAITING])
    assert len(waiting) >= len(stopped)


def test_rungs_run_through_ray_workers_sharing_the_rung_results(env, fast, cluster, tmp_path):
    db = f"sqlite:///{tmp_path / 'nas.db'}"
    r = nas(["search", *fast[:2], "--max-bytes", "300000", "--rungs", "3", "--eta", "3", "--tokens", "18432",
             "--device", "host", "--trials", "2", "--db", db, "--executor", "ray", "--workers", "2",
             "--ray-address", cluster], env, tmp_path)
    assert r.returncode == 0, (r.stdout[-3000:], r.stderr[-3000:])
    with Store(db) as store:
        counted = [t for t in store.trials(study="tiny-host") if t.failed_stage != "sample"]
        assert all(t.state in ("complete", "infeasible") for t in counted), [t.failure_reason for t in counted]
        complete = [t for t in counted if t.state == "complete"]
        rungs = {t.number: [g.tokens for g in store.trial_rungs(study="tiny-host", number=t.number)] for t in complete}
        noise = store.noise(study="tiny-host")
    reused = {t.number for t in complete if "weights_of" in (t.train or {})}
    # a trial scored on another's weights has that trial's rung only; every other one has its
    # rungs in order, none skipped
    assert all(v == [2048, 6144, 18432][: len(v)] and v for n, v in rungs.items() if n not in reused), rungs
    assert all(len(rungs[n]) == 1 for n in reused), rungs
    assert max(len(v) for v in rungs.values()) >= 2  # once 3 reached a rung, the best went on
    # 2 trials' worth of training: a worker starts no trial once the study has run that much; the
    # trials already running when it got there finish (at most one per other worker)
    def share(t):
        return 0.1 if "weights_of" in (t.train or {}) else max(2048, (t.train or {}).get("tokens", 0)) / 18432
    shares = [share(t) for t in counted]
    finished_order = [share(t) for t in sorted(counted, key=lambda t: t.finished_at)]
    assert sum(shares) >= 2 - 1e-9 and sum(finished_order[:-2]) < 2
    # the seed spread was measured once, whichever worker got there first
    assert noise is not None and noise.seeds == (0, 1, 2) and noise.tokens == 2048
