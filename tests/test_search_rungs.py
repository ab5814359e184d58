"""`nas search` with rungs, and trials that take weights another trial trained: every trial scored
at the first rung and only the best going on, a trial killed between rungs resumed from its last
finished rung, and a drawn architecture trained already taking those weights. A file of its own so
that pytest-xdist runs it beside tests/test_search.py, not after it."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys

import optuna
import pytest

from nas.store import Store
from tests.test_search import _wait_for, nas


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """One cache for the module: tokenizers and the host calibration are made once."""
    return dict(os.environ, NAS_CACHE_DIR=str(tmp_path_factory.mktemp("search-rungs-cache")))


def test_a_drawn_architecture_trained_already_at_any_bitwidth_takes_those_weights(env, fast, tmp_path):
    db = f"sqlite:///{tmp_path / 'nas.db'}"
    r = nas(["search", *fast, "--device", "host", "--trials", "1", "--db", db], env, tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    with Store(db) as store:
        (first,) = store.trials(study="tiny-host", states=["complete"])
    ostudy = optuna.load_study(study_name="tiny-host", storage=db)
    params = ostudy.trials[first.number].params
    other = next(b for b in (32, 16, 8, 4) if b != params["bitwidth"])
    # as a sampler would draw them: the same configuration again, and its bitwidth sibling (no
    # weights_of attribute: nothing but the store says they were trained)
    ostudy.enqueue_trial(params)
    ostudy.enqueue_trial(params | {"bitwidth": other})
    r = nas(["search", *fast, "--device", "host", "--trials", "2", "--db", db], env, tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.count("takes that trial's trained weights") == 2
    with Store(db) as store:
        rows = {t.number: t for t in store.trials(study="tiny-host", states=["complete"])}
    twins = [t for t in rows.values() if t.number > first.number and (t.train or {}).get("weights_of") == first.number]
    assert len(twins) == 2 and {store_bits(db, t.arch_id) for t in twins} == {params["bitwidth"], other}
    same = next(t for t in twins if t.arch_id == first.arch_id)
    assert same.val_bpb == first.val_bpb  # the same weights, the same deployed file: the same score
    assert all(t.train["tokens"] == first.train["tokens"] and t.train["steps"] == first.train["steps"] for t in twins)


def store_bits(db: str, arch_id: str) -> int:
    with Store(db) as store:
        return store.get_architecture(arch_id=arch_id).spec.bitwidth


RUNGS = ["--max-bytes", "300000", "--rungs", "3", "--eta", "3"]


def test_rungs_score_every_trial_at_the_first_rung_and_only_the_best_go_on(env, fast, tmp_path):
    db = f"sqlite:///{tmp_path / 'nas.db'}"
    # --trials counts trials' worth of training: a trial stopped at a rung counts its share.
    # Objectives that no clock measures (the deployed files' size beside BPB): who goes on must not
    # depend on this machine's timing noise. With decode_ms the three trials at the first rung were
    # all on its first front, and which one went on followed their measured latencies (once none).
    r = nas(["search", *fast[:2], *RUNGS, "--tokens", "18432", "--device", "host", "--trials", "1",
             "--objectives", "val_bpb,model_mb", "--db", db], env, tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    assert re.search(r"rung 1 \(2,048 tokens\): BPB [\d.]+, goes on: 1 of 3 at this rung, the top 1 go on", r.stdout)
    # a grace of one cohort: the first two trials at the first rung stop, whatever they score
    assert "stops: 1 of 1 at this rung, none goes on before 3 reach it" in r.stdout
    ostudy = optuna.load_study(study_name="tiny-host", storage=db)
    by_number = {t.number: t for t in ostudy.trials}
    with Store(db) as store:
        complete = [t for t in store.trials(study="tiny-host") if t.state == "complete"]
        assert len(complete) >= 3
        reached = {}
        reused = {t.number: t for t in complete if "weights_of" in t.train}
        for t in complete:
            rungs = store.trial_rungs(study="tiny-host", number=t.number)
            budgets = [2048, 6144, 18432][: t.train["rung"] + 1]
            if t.number in reused:  # scored on another trial's weights, at that trial's rung only
                assert [g.rung for g in rungs] == [t.train["rung"]] and rungs[0].tokens == budgets[-1]
            else:
                assert [g.rung for g in rungs] == list(range(t.train["rung"] + 1))  # in order, none skipped
                assert [g.tokens for g in rungs] == t.train["rung_tokens"][: len(rungs)] == budgets
                reached[t.number] = t.train["rung"]
            assert t.val_bpb == rungs[-1].val_bpb and t.train["tokens"] == rungs[-1].tokens
            # each rung's BPB is an Optuna intermediate value of the trial, at step = tokens
            assert by_number[t.number].intermediate_values == {g.tokens: g.val_bpb for g in rungs}
        by_arch = {t.number: t.arch_id for t in complete}
        specs = {t.number: store.get_architecture(arch_id=t.arch_id).spec for t in complete}
        counted = [t for t in store.trials(study="tiny-host") if not (t.state == "infeasible"
                                                                     and t.failed_stage == "sample")]
        shares = [0.1 if "weights_of" in (t.train or {}) else max(2048, (t.train or {}).get("tokens", 0)) / 18432
                  for t in counted]
        noise = store.noise(study="tiny-host")
        first_rung = store.trial_rungs(study="tiny-host", number=min(reached))[0]
    # the seed spread, once: the first complete trial's architecture under 2 more seeds, to rung 1
    assert (noise.seeds, noise.tokens, noise.trial_number) == ((0, 1, 2), 2048, min(reached))
    assert noise.arch_id == by_arch[min(reached)] and noise.bpbs[0] == first_rung.val_bpb
    assert noise.std is not None and noise.std > 0 and len(set(noise.bpbs)) == 3
    assert r.stdout.count("seed noise: training trial") == 2 and "seed noise of BPB at 2,048 tokens: std" in r.stdout
    first = min(reached)
    assert reached[first] == 0  # the first trial stopped at rung 1: nothing to rank it against
    assert max(reached.values()) >= 1, reached  # a later one went on
    # the first trial landed on the front: its architecture at the space's 3 other bitwidths,
    # scored on its weights (no training), trials of their own
    assert sorted(specs[t].bitwidth for t, row in reused.items() if row.train["weights_of"] == first) == sorted(
        {32, 16, 8, 4} - {specs[first].bitwidth})
    for t, row in reused.items():
        parent = row.train["weights_of"]
        assert specs[t].to_dict() | {"bitwidth": specs[parent].bitwidth} == specs[parent].to_dict()
        assert row.train["tokens"] == next(c.train["tokens"] for c in complete if c.number == parent)
        assert f"on trial {parent}'s weights" in r.stdout
    assert "is on the front: its architecture at" in r.stdout
    # cheaper neighbours (on by default with rungs) come only from trials trained past the first
    # rung: the first trial was on the front at rung 1 and queued none
    said = r"trial (\d+) is on the front: its architecture at (?:d_model|n_layers)"
    neighbours_of = [int(m) for m in re.findall(said, r.stdout)]
    assert first not in neighbours_of
    assert all((reached[n] if n in reached else reused[n].train["rung"]) >= 1 for n in neighbours_of)
    assert sum(shares) >= 1 - 1e-9 and sum(shares[:-1]) < 1  # it ran until 1 trial's worth, not one more
    assert len(counted) > 3  # trials stopped early cost less than one each: more of them ran
    # stdout is not a terminal here: a progress line after every counted trial, for a log file
    progress = [line for line in r.stdout.splitlines() if line.startswith("progress: ")]
    assert len(progress) == len(counted)
    assert progress[-1].startswith(f"progress: {len(counted)} trials, {sum(shares):.2f} of 1 trials' worth")
    assert "trials' worth of training)" in r.stdout  # the closing line says it too
    r = nas(["search", *fast[:2], *RUNGS[:-4], "--rungs", "1", "--tokens", "18432", "--device", "host", "--trials", "1",
             "--objectives", "val_bpb,model_mb", "--db", db], env, tmp_path)
    assert r.returncode == 2 and "rungs" in r.stderr  # a study keeps its rungs


def test_a_trial_killed_between_rungs_resumes_from_its_last_finished_rung(env, fast, tmp_path):
    db = f"sqlite:///{tmp_path / 'nas.db'}"
    args = ["search", *fast[:2], *RUNGS, "--tokens", "110592", "--device", "host", "--db", db, "--artifacts", "art"]
    proc = subprocess.Popen([sys.executable, "-m", "nas", *args, "--trials", "2"], cwd=tmp_path, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    checkpoints = tmp_path / "art" / "tiny-host" / "checkpoints"
    try:
        # a trial that goes on from rung 1 saves its checkpoint there, then trains on
        _wait_for(lambda: any(checkpoints.glob("*.json")) or proc.poll() is not None, 600,
                  "a checkpoint after the first rung")
        assert proc.poll() is None, "the search ended before any trial went on from its first rung"
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    with Store(db) as store:
        (killed,) = [t for t in store.trials(study="tiny-host") if t.state == "running"]
        before = [(g.rung, g.tokens, g.val_bpb) for g in store.trial_rungs(study="tiny-host", number=killed.number)]
    assert before and before[0][0] == 0
    r = nas([*args, "--trials", "1"], env, tmp_path, timeout=900)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "from its rung" in r.stdout and "checkpoint" in r.stdout
    with Store(db) as store:
        retry = next(t for t in store.trials(study="tiny-host")
                     if t.number > killed.number and t.arch_id == killed.arch_id)
        after = [(g.rung, g.tokens, g.val_bpb) for g in store.trial_rungs(study="tiny-host", number=retry.number)]
        assert retry.state == "complete"
    assert after[: len(before)] == before  # the finished rungs were kept, not trained again
    assert not list(checkpoints.glob("*"))  # a finished trial leaves no checkpoint behind
