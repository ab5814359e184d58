"""The search's policies, checked in one process on a real study: how often a trial is tried
again, and when a search stops itself because every trial fails the same way."""

from __future__ import annotations

import socket
import subprocess

import optuna
import pytest

from nas.search import trial as trial_module
from nas.search.config import SearchConfig
from nas.search.study import SAME_BUG_LIMIT, Search, SearchBroken, worker_id
from nas.search.trial import TrialRecord
from nas.spec.settings import TrainConfig


@pytest.fixture
def config(tmp_path, monkeypatch) -> SearchConfig:
    monkeypatch.setenv("NAS_CACHE_DIR", str(tmp_path / "cache"))
    return SearchConfig(study="policy", space="tiny", device="host", db_url=f"sqlite:///{tmp_path / 'nas.db'}",
                        max_bytes=300_000, train=TrainConfig(tokens=8192), artifacts=tmp_path / "artifacts")


def _dead_pid() -> int:
    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


def _waiting(s: Search) -> list[optuna.trial.FrozenTrial]:
    return s.study.get_trials(states=[optuna.trial.TrialState.WAITING])


def _start_and_lose(s: Search, worker: str) -> int:
    """A trial that a worker took (a queued one first, as Optuna hands them out) and then lost."""
    t = s.study.ask()
    s.store.start_trial(study=s.cfg.study, number=t.number, optuna_trial_id=None, worker=worker)
    return t.number


@pytest.mark.filterwarnings("ignore:Heartbeat")
def test_a_dead_worker_is_retried_once_and_an_asked_stop_always(config):
    s = Search(config)
    dead = f"{socket.gethostname()}:{_dead_pid()}"
    try:
        first = _start_and_lose(s, dead)
        reason = s.recover()[first]
        assert "died mid-trial" in reason and "parameters queued again (retry 1 of 1)" in reason
        (queued,) = _waiting(s)
        assert queued.system_attrs["retry_history"] == [first]

        again = _start_and_lose(s, dead)  # the retry dies too: the limit (max_retry=1) is reached
        assert again == queued.number
        reason = s.recover()[again]
        assert "not queued again" in reason and "already retried 1 time" in reason
        assert not _waiting(s)
        assert s.store.get_trial(study="policy", number=again).failure_reason.endswith(reason)

        # Ctrl-C / SIGTERM: queued again whatever the history, and not counted as a retry
        stopped = _start_and_lose(s, worker_id())
        s._interrupted(TrialRecord(number=stopped, stage="train"))
        (requeued,) = _waiting(s)
        assert requeued.system_attrs == {"failed_trial": stopped, "retry_history": []}
        assert "queued again" in s.store.get_trial(study="policy", number=stopped).failure_reason
    finally:
        s.close()


def test_a_search_whose_trials_all_fail_with_the_same_bug_stops_with_it(config, monkeypatch):
    def broken(*args, **kwargs):
        raise AttributeError("'Trial' object has no attribute 'set_constraint'")

    monkeypatch.setattr(trial_module, "_measure", broken)
    s = Search(config)
    try:
        with pytest.raises(SearchBroken, match=r"in a row failed the same way.*AttributeError.*set_constraint"):
            s.run(n_trials=10)
        failed = [t for t in s.store.trials(study="policy") if t.state == "failed"]
        assert len(failed) == SAME_BUG_LIMIT
    finally:
        s.close()
    # a run too short to reach the limit, all of whose trials failed so, must not end as a success
    s = Search(SearchConfig(**{**config.__dict__, "study": "policy-short"}))
    try:
        with pytest.raises(SearchBroken):
            s.run(n_trials=2)
    finally:
        s.close()


def test_failures_that_are_the_architectures_do_not_stop_the_search(config, monkeypatch):
    from nas.stages.measure import MeasurementError

    def out_of_memory(*args, **kwargs):
        raise MeasurementError("the measuring process was killed (out of memory?)")

    monkeypatch.setattr(trial_module, "_measure", out_of_memory)
    s = Search(config)
    try:
        counts = s.run(n_trials=SAME_BUG_LIMIT + 1)
    finally:
        s.close()
    assert counts["failed"] == SAME_BUG_LIMIT + 1


def test_a_budget_whose_figure_was_not_taken_fails_the_trial_instead_of_passing(config, monkeypatch):
    from nas.spec.results import LatencyStats, Measurement

    def no_peak(spec, env, scratch):
        m = Measurement(arch_id=spec.arch_id, profile=env.profile.name, bitwidth=spec.bitwidth,
                        label="measured:local", prefill=LatencyStats.of_median(1.0),
                        decode=LatencyStats.of_median(0.1), peak_memory_bytes=None, model_bytes=1000)
        return m, env.store.add_measurement(m).id, None

    monkeypatch.setattr(trial_module, "_measure", no_peak)
    s = Search(config)
    try:
        counts = s.run(n_trials=1)
        (t,) = [t for t in s.store.trials(study="policy") if t.failed_stage != "sample"]
    finally:
        s.close()
    assert counts["failed"] == 1 and t.failed_stage == "measure"
    assert "peak_memory_mb budget cannot be judged" in t.failure_reason and t.val_bpb is None


def test_the_measuring_process_reports_no_peak_memory_without_proc(monkeypatch):
    from pathlib import Path

    from nas.stages import measure_worker

    def no_proc(self, *args, **kwargs):
        raise FileNotFoundError(str(self))

    monkeypatch.setattr(Path, "read_text", no_proc)
    assert measure_worker._status_bytes("VmHWM") is None


def test_a_stage_past_its_deadline_fails_the_trial_and_the_search_goes_on(config, monkeypatch):
    import dataclasses
    import time

    from nas.stages import export

    def hang(*args, **kwargs):
        while True:  # an export that never returns, as one did for 23 minutes on a loaded machine
            time.sleep(0.01)

    monkeypatch.setattr(export, "export_spec", hang)
    # a deadline of a few milliseconds: the hang above is ended by it, whatever the machine's speed
    s = Search(dataclasses.replace(config, stage_deadline_factor=0.001))
    try:
        counts = s.run(n_trials=2)
        trials = [t for t in s.store.trials(study="policy") if t.failed_stage != "sample"]
    finally:
        s.close()
    assert counts["failed"] == 2 and len(trials) == 2
    assert all(t.failed_stage == "measure" and "ran past its deadline" in t.failure_reason for t in trials)


def test_a_deadline_that_is_met_leaves_no_alarm_behind():
    import signal

    from nas.search.deadline import deadline

    before = signal.getsignal(signal.SIGALRM)
    with deadline(60.0, "a quick stage"):
        pass
    assert signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0) and signal.getsignal(signal.SIGALRM) is before


def test_a_measurement_is_reused_on_the_same_machine_and_taken_again_on_another(config, monkeypatch):
    import dataclasses

    from nas.stages import measure

    first = Search(config)
    try:
        first.run(n_trials=1)
        (done,) = [t for t in first.study.trials if "arch_id" in t.user_attrs]
        params = done.params
    finally:
        first.close()

    def again(study: str) -> int:
        s = Search(dataclasses.replace(config, study=study))
        try:
            s.study.enqueue_trial(params)  # the same architecture
            s.run(n_trials=1)
            return len(s.store.measurements(arch_id=done.user_attrs["arch_id"]))
        finally:
            s.close()

    assert again("same-machine") == 1  # reused: same arch, profile, workload and fingerprint
    monkeypatch.setattr(measure, "device_fingerprint", lambda runtime: "another-machine")
    assert again("other-machine") == 2  # not passed off as this machine's: measured again


def test_a_predicted_twin_is_the_profiles_estimate_at_that_bitwidth():
    # For a profile whose figures are its latency model's estimates, a twin's predicted figures
    # are the estimate of the architecture at that bitwidth.
    from nas.spec.arch import ArchSpec
    from nas.spec.profile import load_profile
    from nas.stages.estimate import estimate

    jetson = load_profile("jetson")
    spec = ArchSpec(vocab_size=1024, d_model=64, n_layers=4, n_heads=4, n_kv_heads=2, head_dim=16,
                    attention="gqa", context_length=64, bitwidth=32)
    m = estimate(spec, jetson)
    for bits in (16, 8, 4):
        want = estimate(ArchSpec.from_dict(spec.to_dict() | {"bitwidth": bits}), jetson).figures()
        got = trial_module.predicted_twin(spec, bits, m, jetson)
        assert got.keys() == want.keys()
        for k in want:
            assert got[k] == pytest.approx(want[k], rel=1e-9), k


def _rung_study(tmp_path, monkeypatch, study: str) -> Search:
    """A search of the tiny space for the Jetson with rungs, on its own SQLite file."""
    monkeypatch.setenv("NAS_CACHE_DIR", str(tmp_path / "cache"))
    cfg = SearchConfig(study=study, space="tiny", device="jetson", db_url=f"sqlite:///{tmp_path / 'nas.db'}",
                       max_bytes=300_000, train=TrainConfig(tokens=8192), artifacts=tmp_path / "artifacts", rungs=3)
    return Search(cfg)


def _complete_at_rung_0(s: Search, number: int, spec, bpb: float):
    """Store trial ``number`` of ``spec`` as complete at rung 0 with ``bpb`` and the Jetson's
    estimate as its measurement; returns the measurement."""
    from nas.stages.estimate import estimate

    study = s.cfg.study
    m = estimate(spec, s.profile)
    s.store.upsert_architecture(spec=spec)
    row = s.store.add_measurement(m)
    s.store.start_trial(study=study, number=number, arch_id=spec.arch_id)
    s.store.record_rung(study=study, number=number, rung=0, tokens=1024, val_bpb=bpb, seconds=1.0)
    s.store.finish_trial(study=study, number=number, val_bpb=bpb, measurement_id=row.id,
                         objectives={"val_bpb": bpb, "decode_ms": m.decode_ms})
    return m


def test_a_dominated_trials_faster_bitwidths_are_queued_where_they_would_be_on_the_front(tmp_path, monkeypatch):
    # A (int4) is the better and faster trial at rung 0; B, drawn at fp32, is slower and worse:
    # dominated. B's weights at int4 would be faster than A (B is the smaller model) at B's BPB:
    # on the front, so that twin is worth its score; at fp16 they would still be slower than A.
    from nas.spec.arch import ArchSpec

    s = _rung_study(tmp_path, monkeypatch, "twins")
    # the same depth (the Jetson's model prices kernels alike), B half A's width
    base = dict(vocab_size=8192, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, attention="gqa", context_length=64)
    a = ArchSpec(d_model=512, bitwidth=4, **base)
    b = ArchSpec(d_model=256, bitwidth=32, **base)
    try:
        measured = {n: _complete_at_rung_0(s, n, spec, bpb) for n, spec, bpb in ((0, a, 1.90), (1, b, 1.95))}
        assert measured[1].decode_ms > measured[0].decode_ms  # B as drawn is dominated by A
        twin = {bits: trial_module.predicted_twin(b, bits, measured[1], s.profile)["decode_ms"] for bits in (16, 8, 4)}
        assert twin[4] < measured[0].decode_ms < twin[16]
        promising = trial_module._promising_bitwidths(s, b, measured[1], 1, 0, 1.95)
        assert 4 in promising and 16 not in promising
        assert promising == [bits for bits in (16, 8, 4) if twin[bits] < measured[0].decode_ms]
        # with a BPB worse than every trial's, only a bitwidth faster than all of them would do
        assert trial_module._promising_bitwidths(s, b, measured[1], 1, 0, 3.0) == promising
        # with a better one, every bitwidth would be on the front
        assert trial_module._promising_bitwidths(s, b, measured[1], 1, 0, 1.5) == [16, 8, 4]
    finally:
        s.close()


def test_a_training_is_ranked_at_a_rung_with_its_twins_and_predicted_bitwidths(tmp_path, monkeypatch):
    # At rung 0: A trained at int4 (trial 0) and scored at fp32 by its twin (trial 1), B at fp32
    # (trial 2), and the deciding trial 3, C at fp16. One family per set of weights, each with its
    # scored points and a predicted one for every bitwidth none of its trials scored.
    from nas.spec.arch import ArchSpec
    from nas.stages.estimate import device_model, estimate

    s = _rung_study(tmp_path, monkeypatch, "fam")
    base = dict(vocab_size=8192, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, attention="gqa", context_length=64)
    a4 = ArchSpec(d_model=512, bitwidth=4, **base)
    a32 = ArchSpec.from_dict(a4.to_dict() | {"bitwidth": 32})
    b = ArchSpec(d_model=256, bitwidth=32, **base)
    c = ArchSpec(d_model=384, bitwidth=16, **base)
    try:
        measured = {number: _complete_at_rung_0(s, number, spec, bpb)
                    for number, spec, bpb in ((0, a4, 1.90), (1, a32, 1.89), (2, b, 1.95))}
        mc = estimate(c, s.profile)
        families = trial_module._families_at_rung(s, 0, 3, c, mc, 1.92)
        assert sorted(families) == [0, 2, 3]
        model = device_model(s.profile)

        def point(spec, bits, m, bpb):
            return trial_module._predicted_point(s, spec, bits, m, bpb, model)

        # A: its two scored points as scored (the twin's own BPB), then fp16 and int8 predicted on
        # its first trial's figures and BPB
        assert families[0][:2] == [[1.90, measured[0].decode_ms], [1.89, measured[1].decode_ms]]
        assert families[0][2:] == [point(a4, 16, measured[0], 1.90), point(a4, 8, measured[0], 1.90)]
        assert families[2] == [[1.95, measured[2].decode_ms]] + [point(b, k, measured[2], 1.95) for k in (16, 8, 4)]
        assert families[3] == [[1.92, mc.decode_ms]] + [point(c, k, mc, 1.92) for k in (32, 8, 4)]
        assert families[2][3][1] < families[2][0][1]  # B's int4 point is faster than B as drawn
    finally:
        s.close()


def test_a_front_trial_queues_its_architecture_one_step_narrower_and_one_shallower_which_train(config):
    # Without rungs every trial is trained to its top budget: the first one, alone, is on the
    # front and queues its two cheaper neighbours, each an architecture of its own that trains.
    import dataclasses

    s = Search(dataclasses.replace(config, front_neighbours=True))
    try:
        s.study.enqueue_trial({"d_model": 64, "n_layers": 4, "attention": "gqa"})  # the tiny space's widest, deepest
        s.run(n_trials=1)
        (first,) = [t for t in s.study.trials if t.state == optuna.trial.TrialState.COMPLETE]
        queued = [t.system_attrs["fixed_params"] for t in _waiting(s)]
        assert sorted(queued, key=lambda p: p["d_model"]) == [first.params | {"d_model": 48},
                                                               first.params | {"n_layers": 2}]
        s.run(n_trials=2)
        rows = {t.number: t for t in s.store.trials(study="policy", states=["complete"])}
        trained = [t for t in s.study.trials if t.number in rows and t.number != first.number
                   and t.params in (first.params | {"d_model": 48}, first.params | {"n_layers": 2})]
        assert len(trained) == 2 and all("weights_of" not in rows[t.number].train for t in trained)
        # an architecture is queued once at most, whichever bitwidth asked for it
        params = [t.system_attrs.get("fixed_params", t.params) for t in s.study.trials]
        archs = [tuple(sorted((k, v) for k, v in p.items() if k != "bitwidth")) for p in params]
        assert len(archs) == len(set(archs))
    finally:
        s.close()


def test_one_step_down_is_the_next_smaller_choice_or_the_range_step_below():
    from nas.spec.space import Dimension

    widths = Dimension(name="d_model", kind="choices", choices=(256, 192, 512))
    assert trial_module.one_step_down(widths, 512) == 256 and trial_module.one_step_down(widths, 192) is None
    depth = Dimension(name="n_layers", kind="int", low=4, high=16, step=2)
    assert trial_module.one_step_down(depth, 8) == 6 and trial_module.one_step_down(depth, 4) is None
    kinds = Dimension(name="ffn", kind="choices", choices=("gated", "plain"))
    assert trial_module.one_step_down(kinds, "plain") is None  # no order among kinds
