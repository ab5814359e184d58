"""`nas search` end to end: trials through every stage into the store and Optuna, failures and
infeasible trials recorded, kill-and-resume, and two workers on one study (SQLite, PostgreSQL)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest

from nas.stages.deploy import unsupported_reason
from nas.store import Store
from tests.conftest import fresh_pg_database

ROOT = Path(__file__).resolve().parents[1]
# Small and quick: a 300 kB slice of the stdlib corpus, 8k training tokens per trial.
# The shipped tiny space, MLA's plain graph included: the first test's search. The others run on
# the fused tiny space (the `fast` fixture, search_helpers.fused_tiny_space), a trace cheaper a trial.
FAST = ["--space", "tiny", "--max-bytes", "300000", "--tokens", "8192"]


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """One cache for the module: tokenizers and the host calibration are made once."""
    return dict(os.environ, NAS_CACHE_DIR=str(tmp_path_factory.mktemp("search-cache")))


def nas(args: list[str], env: dict[str, str], cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "nas", *args], capture_output=True, text=True, env=env,
                          cwd=cwd, timeout=timeout)


def write_profile(path: Path, budgets: str = "", runtime: str = "", device: str = "") -> Path:
    """A copy of the host profile with other budgets, runtime or device lines."""
    text = (ROOT / "hw_profiles" / "host.yaml").read_text()
    if budgets:
        start = text.index("budgets:")
        end = text.index("measurement:")
        text = text[:start] + "budgets:\n" + budgets + "\n\n" + text[end:]
    if runtime:
        start = text.index("runtime:")
        end = text.index("workload:")
        text = text[:start] + "runtime:\n" + runtime + "\n\n" + text[end:]
    if device:
        text = text.replace("  kind: cpu", device)
    path.write_text(text)
    return path


def test_search_fills_the_store_and_the_optuna_study(env, tmp_path):
    db = f"sqlite:///{tmp_path / 'nas.db'}"
    scratch = tmp_path / "tmp"  # where the measure stage's exports wait for the score stage
    scratch.mkdir()
    r = nas(["search", *FAST, "--device", "host", "--trials", "3", "--db", db], dict(env, TMPDIR=str(scratch)),
            tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "Pareto front of tiny-host" in r.stdout
    with Store(db) as store:
        study = store.get_study(name="tiny-host")
        trials = store.trials(study="tiny-host", curves=True)
        done = [t for t in trials if t.state != "infeasible" or t.failed_stage != "sample"]
        assert len(done) == 3
        complete = [t for t in trials if t.state == "complete"]
        assert complete, [(t.state, t.failed_stage, t.failure_reason) for t in trials]
        for t in complete:
            assert 0 < t.val_bpb < 8 and t.objectives["val_bpb"] == t.val_bpb
            assert t.objectives["decode_ms"] > 0 and t.curve and t.train["tokens"] >= 8192
            assert t.baselines["bigram_bpb"] < t.baselines["unigram_bpb"]
            stages = t.train["stage_seconds"]
            assert set(stages) == {"sample", "budget", "measure", "train", "score"}
            assert all(v >= 0 for v in stages.values()) and stages["train"] > 0
            m = store.get_measurement(id=t.measurement_id)
            assert m.label == "measured:local" and m.profile == "host"
            artifacts = Path(t.artifact_dir)
            assert (artifacts / "model.pt").exists() and (artifacts / "onnx" / "model.onnx").exists()
            # The deployment graph where the spec allows it, built again from the trained weights;
            # else the plain graph, and as each architecture is drawn once here, its score stage
            # reuses its measured graph. The measurement says which graph it timed.
            scored = json.loads((artifacts / "onnx" / "model.json").read_text())
            deployable = unsupported_reason(store.get_architecture(arch_id=t.arch_id).spec) is None
            assert scored["graph"] == ("gqa" if deployable else "plain")
            assert t.train["score_graph"] == scored["made_by"] == ("built" if deployable else "reweighted")
            assert m.provenance["graph"] == scored["graph"] and m.workload["graph"] == scored["graph"]
            assert m.provenance["graph_note"].startswith("plain graph") == (not deployable)
        assert not list(scratch.glob("nas-measure-*")), "a trial's measured export was left behind"
        front = store.pareto(study="tiny-host")
        assert front and {t.number for t in front} <= {t.number for t in complete}
        assert study.corpus_fingerprint and study.train_config["tokens"] == 8192 and study.code_version
    ostudy = optuna.load_study(study_name="tiny-host", storage=db)
    assert ostudy.user_attrs["space"] == "tiny" and ostudy.user_attrs["profile"] == "host"
    by_number = {t.number: t for t in ostudy.trials}
    for t in complete:
        ot = by_number[t.number]
        assert ot.state == optuna.trial.TrialState.COMPLETE and ot.values[0] == pytest.approx(t.val_bpb)
        assert ot.constraints and ot.user_attrs["arch_id"] == t.arch_id

    # the read commands, for people and for scripts
    r = nas(["pareto", "tiny-host", "--db", db, "--json"], env, tmp_path)
    assert r.returncode == 0 and {row["number"] for row in json.loads(r.stdout)["front"]} == {t.number for t in front}
    r = nas(["studies", "--db", db, "--json"], env, tmp_path)
    assert json.loads(r.stdout)[0]["trials"]["complete"] == len(complete)
    r = nas(["show", "tiny-host", str(complete[0].number), "--db", db, "--json"], env, tmp_path)
    shown = json.loads(r.stdout)
    assert shown["spec"]["vocab_size"] in (512, 1024) and shown["measurement"]["provenance"]["threads"] == 2
    r = nas(["show", "tiny-host", "999", "--db", db], env, tmp_path)
    assert r.returncode == 2 and "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_over_budget_architectures_are_rejected_before_training(env, fast, tmp_path):
    # decode under 1 microsecond is impossible: every measured trial is infeasible, none is trained
    profile = write_profile(tmp_path / "strict.yaml", budgets="  decode_ms_per_token: 0.001")
    db = f"sqlite:///{tmp_path / 'nas.db'}"
    r = nas(["search", *fast, "--device", str(profile), "--trials", "2", "--db", db], env, tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    with Store(db) as store:
        trials = [t for t in store.trials(study="tiny-strict") if t.failed_stage != "sample"]
    assert len(trials) == 2
    for t in trials:
        assert t.state == "infeasible" and t.failed_stage == "measure"
        assert "decode_ms_per_token over" in t.failure_reason
        assert t.train is None and t.val_bpb is None and t.constraints["decode_ms_per_token"] > 0
    # Optuna holds them as pruned with their constraint values and no made-up objective values,
    # so optuna-dashboard cannot draw them as results; TPE still files them as infeasible.
    from optuna.samplers._tpe.sampler import _split_trials

    ostudy = optuna.load_study(study_name="tiny-strict", storage=db)
    measured = [ot for ot in ostudy.trials if ot.number in {t.number for t in trials}]
    for ot in measured:
        assert ot.state == optuna.trial.TrialState.PRUNED and ot.values is None
        assert max(ot.constraints.values()) > 0 and "decode_ms_per_token" in ot.user_attrs["infeasible"]
    below, above = _split_trials(ostudy, measured, 1)
    assert {t.number for t in below + above} == {t.number for t in measured}  # none dropped as unknown


def test_failed_measurements_are_recorded_and_the_search_goes_on(env, fast, tmp_path):
    # a GPU profile measured locally: this machine's onnxruntime has no CUDA provider
    profile = write_profile(tmp_path / "nogpu.yaml", device="  kind: gpu",
                            runtime="  execution_provider: CUDAExecutionProvider\n  threads: 2")
    db = f"sqlite:///{tmp_path / 'nas.db'}"
    r = nas(["search", *fast, "--device", str(profile), "--trials", "2", "--db", db], env, tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    with Store(db) as store:
        trials = [t for t in store.trials(study="tiny-nogpu") if t.failed_stage != "sample"]
        assert len(trials) == 2
        for t in trials:
            assert t.state == "failed" and t.failed_stage == "measure"
            assert "CUDAExecutionProvider is not available" in t.failure_reason
        failed_rows = [m for m in store.measurements(profile="nogpu") if not m.ok]
        assert failed_rows and "CUDAExecutionProvider" in failed_rows[0].error
    r = nas(["show", "tiny-nogpu", str(trials[0].number), "--db", db], env, tmp_path)
    assert "CUDAExecutionProvider is not available" in r.stdout


def test_diverged_training_fails_the_trial_with_its_reason(env, tmp_path):
    space = (ROOT / "search_spaces" / "tiny.yaml").read_text().replace("lr: 3.0e-3", "lr: 1.0e+6\n  grad_clip: 1.0e+9")
    (tmp_path / "hot.yaml").write_text(space)
    db = f"sqlite:///{tmp_path / 'nas.db'}"
    r = nas(["search", "--space", str(tmp_path / "hot.yaml"), "--max-bytes", "300000", "--device", "host",
             "--trials", "2", "--db", db], env, tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    with Store(db) as store:
        trials = [t for t in store.trials(study="hot-host") if t.failed_stage not in ("sample", None)]
    assert trials and all(t.failed_stage == "train" and "diverged" in t.failure_reason for t in trials)


def test_resuming_with_other_settings_is_refused(env, fast, tmp_path):
    db = f"sqlite:///{tmp_path / 'nas.db'}"
    r = nas(["search", *fast, "--device", "host", "--trials", "1", "--db", db], env, tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    r = nas(["search", "--space", "tiny", "--max-bytes", "300000", "--tokens", "4096", "--device", "host",
             "--trials", "1", "--db", db], env, tmp_path)
    assert r.returncode == 2 and "train_config" in r.stderr and "Traceback" not in r.stderr


def _wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.5)
    pytest.fail(f"timed out waiting for {what}")


def test_a_search_killed_mid_trial_resumes_without_losing_finished_trials(env, fast, tmp_path):
    db = f"sqlite:///{tmp_path / 'nas.db'}"
    cmd = [sys.executable, "-m", "nas", "search", *fast, "--tokens", "40000", "--device", "host",
           "--trials", "6", "--db", db]
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    store = Store(db)

    def mid_trial() -> bool:
        if store.find_study(name="tiny-host") is None:
            return False
        trials = store.trials(study="tiny-host")
        return any(t.state == "complete" for t in trials) and any(t.state == "running" and t.arch_id for t in trials)

    try:
        _wait_for(mid_trial, 300, "a finished trial and a running one")
        time.sleep(1.0)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    before = {t.number: t for t in store.trials(study="tiny-host")}
    killed = [n for n, t in before.items() if t.state == "running"]
    finished = {n: t.val_bpb for n, t in before.items() if t.state == "complete"}
    assert len(killed) == 1 and finished

    r = nas(["search", *fast, "--tokens", "40000", "--device", "host", "--trials", "3", "--db", db], env, tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    assert f"trial {killed[0]} was left running: failed, its worker" in r.stdout
    assert "parameters queued again (retry 1 of 1)" in r.stdout
    after = {t.number: t for t in store.trials(study="tiny-host")}
    store.close()
    assert after[killed[0]].state == "failed" and after[killed[0]].failed_stage == "killed"
    assert {n: after[n].val_bpb for n in finished} == finished  # nothing finished was lost
    assert not [t for t in after.values() if t.state == "running"]
    ostudy = optuna.load_study(study_name="tiny-host", storage=db)
    retried = [t for t in ostudy.trials if t.system_attrs.get("failed_trial") == killed[0]]
    assert len(retried) == 1 and retried[0].params == ostudy.trials[killed[0]].params
    assert after[retried[0].number].state in ("complete", "infeasible", "failed")


def _two_workers(db: str, env: dict[str, str], cwd: Path, fast: list[str]) -> None:
    cmd = [sys.executable, "-m", "nas", "search", *fast, "--device", "host", "--trials", "2", "--study", "shared",
           "--db", db]
    procs = [subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (out, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err[-2000:]
        assert "locked" not in out + err
    with Store(db) as store:
        trials = [t for t in store.trials(study="shared") if t.failed_stage != "sample"]
        # 2 trials' worth each: 4 trials of their own, and any that took the weights of another
        # trial's architecture (0.1 of a trial each) on top
        own = [t for t in trials if "weights_of" not in (t.train or {})]
        assert len(own) == 4 and not [t for t in trials if t.state == "running"]
        assert len({t.number for t in trials}) == len(trials)
        assert {t.worker for t in trials} and len({t.worker for t in trials}) == 2
    ostudy = optuna.load_study(study_name="shared", storage=db)
    assert len([t for t in ostudy.trials if "invalid" not in t.user_attrs]) == len(trials)


def test_two_workers_share_a_study_on_one_sqlite_file(env, fast, tmp_path):
    _two_workers(f"sqlite:///{tmp_path / 'nas.db'}", env, tmp_path, fast)


def test_two_workers_share_a_study_on_postgresql(env, fast, tmp_path, pg_admin):
    for url in fresh_pg_database(pg_admin):
        _two_workers(url, env, tmp_path, fast)


def test_sigterm_stops_cleanly_and_queues_the_running_trial_again(env, fast, tmp_path):
    db = f"sqlite:///{tmp_path / 'nas.db'}"
    cmd = [sys.executable, "-m", "nas", "search", *fast, "--tokens", "200000", "--device", "host",
           "--trials", "3", "--db", db]
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    store = Store(db)
    try:
        _wait_for(lambda: store.find_study(name="tiny-host") is not None
                  and any(t.state == "running" and t.arch_id for t in store.trials(study="tiny-host")), 300,
                  "a running trial")
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err[-3000:]
    assert "resume with the same command" in err
    assert "Traceback" not in err, err[-3000:]  # a stop that was asked for is no bug
    trials = store.trials(study="tiny-host")
    store.close()
    stopped = [t for t in trials if t.state == "failed"]
    assert len(stopped) == 1 and "interrupted" in stopped[0].failure_reason
    assert not [t for t in trials if t.state == "running"]
    ostudy = optuna.load_study(study_name="tiny-host", storage=db)
    waiting = [t for t in ostudy.trials if t.state == optuna.trial.TrialState.WAITING]
    assert len(waiting) == 1 and waiting[0].system_attrs.get("failed_trial") == stopped[0].number
