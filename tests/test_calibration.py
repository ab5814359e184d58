"""Calibration on the device (`nas devices calibrate --device`) and re-measuring a study's front
(`nas remeasure`): real exports, real ONNX Runtime, a real database. The device-node case runs
on the loopback Ray cluster in tests/test_distributed.py.

No assertion depends on how fast this machine is: only on what is stored, labelled and printed.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from nas.faces.plots.data import load_study
from nas.faces.plots.figures import hover_text
from nas.search.calibration import with_stored_calibration
from nas.search.remeasure import Moved, compare_front
from nas.spec.arch import ArchSpec
from nas.spec.calibration import REFERENCE_SET, stored_points
from nas.spec.profile import load_profile, parse_profile
from nas.stages.estimate import estimate
from nas.store import Store
from tests.measurements import measurement
from tests.search_helpers import STUDY, nas, tiny_search

ROOT = Path(__file__).resolve().parents[1]


def test_the_reference_set_spans_attention_kinds_bitwidths_and_sizes():
    specs = [r.spec for r in REFERENCE_SET]
    assert {s.attention for s in specs} == {"mha", "gqa", "mqa", "mla"}
    assert {s.bitwidth for s in specs} == {32, 16, 8, 4}
    assert len({s.arch_id for s in specs}) == len(specs)
    params = [s.params() for s in specs]
    assert params == sorted(params) and params[-1] > 10 * params[0]  # smallest first: `-n 2` is quick


def test_calibrating_host_stores_points_and_exports_yaml_the_profile_loads_back(tmp_path, tmp_path_factory):
    env = dict(os.environ, NAS_CACHE_DIR=str(tmp_path_factory.getbasetemp() / "calibration-cache"))
    db = f"sqlite:///{tmp_path / 'nas.db'}"
    out = tmp_path / "points.yaml"
    r = nas(["devices", "calibrate", "--device", "host", "-n", "2", "--db", db, "--export", str(out)], env, tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "Calibration points of host" in r.stdout and "before" in r.stdout
    with Store(db) as store:
        rows = store.calibration(profile="host")
    assert sorted(r.arch_id for r in rows) == sorted(ref.spec.arch_id for ref in REFERENCE_SET[:2])
    for row in rows:
        assert row.label == "measured:local" and row.decode_ms > 0 and row.prefill_ms > 0
        assert row.device_facts["provider"] == "CPUExecutionProvider" and "onnxruntime" in row.device_facts
        assert row.workload["prompt_tokens"] == 128 and row.peak_memory_bytes
    assert len({r.device_fingerprint for r in rows}) == 1 and len({r.run for r in rows}) == 1
    # The snippet goes under the profile's calibration: and loads back as its points.
    text = (ROOT / "hw_profiles" / "host.yaml").read_text().replace("calibration: []\n", "") + out.read_text()
    profile = parse_profile(text, str(out), "host")
    assert len(profile.calibration) == 2
    p = profile.calibration[0]
    assert p.source.fingerprint == rows[0].device_fingerprint and p.source.node == rows[0].node
    assert p.source.date and "ONNX Runtime" in p.runtime
    assert {q.arch.arch_id for q in profile.calibration} == {r.arch_id for r in rows}


def test_estimates_fit_the_stored_points_of_the_device_and_say_which(tmp_path):
    rpi5 = load_profile("rpi5")
    facts = {"cpu": "Cortex-A76", "threads": 4, "provider": "CPUExecutionProvider", "onnxruntime": "1.32.0"}
    with Store(f"sqlite:///{tmp_path / 'nas.db'}") as store:
        assert with_stored_calibration(rpi5, store) == rpi5  # nothing stored: the profile as shipped
        for ref, decode in zip(REFERENCE_SET[:3], (0.4, 0.9, 1.6), strict=True):
            store.upsert_architecture(spec=ref.spec)
            m = measurement(ref.spec.arch_id, bitwidth=ref.spec.bitwidth, label="measured:pi5-1", decode_ms=decode,
                            prefill_ms=20 * decode, workload={"prompt_tokens": 64, "context_tokens": 256},
                            provenance={"fingerprint": "fp-pi", "device_facts": facts})
            store.add_calibration(run="r1", profile="rpi5", node="pi5-1", measurement=m)
        augmented = with_stored_calibration(rpi5, store)
        # pasted into the profile already (an export): not added a second time
        assert with_stored_calibration(augmented, store) == augmented
    assert len(augmented.calibration) == len(rpi5.calibration) + 3
    assert augmented.fingerprint == rpi5.fingerprint  # points change estimates, not measurements' reuse key
    spec = REFERENCE_SET[0].spec
    shipped, fitted = estimate(spec, rpi5), estimate(spec, augmented)
    assert "stored_calibration" not in shipped.provenance
    used = fitted.provenance["stored_calibration"]
    assert {u["arch_id"] for u in used} == {r.spec.arch_id for r in REFERENCE_SET[:3]}
    assert {(u["node"], u["fingerprint"]) for u in used} == {("pi5-1", "fp-pi")}
    assert fitted.provenance["model_digest"] != shipped.provenance["model_digest"]
    assert fitted.provenance["n_points"] == len(rpi5.calibration) + 3
    assert len(stored_points(augmented)) == 3


def test_calibrating_a_device_nothing_measures_is_a_one_line_error(tmp_path):
    db = f"sqlite:///{tmp_path / 'nas.db'}"
    for args, expect in ((["--device", "laptop"], "measurement.where: estimate"),
                         (["--device", "rpi5"], "give --ray-address"),
                         (["--export", "x.yaml"], "give --device"),
                         (["--device", "host", "--ray-address", "127.0.0.1:1"], "not 'ray'")):
        r = nas(["devices", "calibrate", *args, "--db", db], dict(os.environ), tmp_path)
        assert r.returncode == 2 and expect in r.stderr and "Traceback" not in r.stderr, r.stderr[-2000:]
        assert len(r.stderr.strip().splitlines()) == 1, r.stderr


# --- nas remeasure ---------------------------------------------------------------------------------
def test_new_figures_that_reorder_the_front_say_who_leaves_it(tmp_path):
    host = load_profile("host")
    fast, good = (ArchSpec(vocab_size=512, d_model=d, n_layers=2, n_heads=2, head_dim=16) for d in (32, 64))
    with Store(f"sqlite:///{tmp_path / 'nas.db'}") as store:
        store.create_study(name="s", space="tiny", profile="host",
                           objectives=[("val_bpb", "minimize"), ("decode_ms", "minimize")])
        moved = []
        for number, (spec, bpb, old_ms, new_ms) in enumerate([(fast, 3.0, 1.0, 3.0), (good, 2.0, 2.0, 2.0)]):
            store.upsert_architecture(spec=spec)
            old = store.add_measurement(measurement(spec.arch_id, decode_ms=old_ms, prefill_ms=5.0))
            new = store.add_measurement(measurement(spec.arch_id, decode_ms=new_ms, prefill_ms=5.0))
            store.start_trial(study="s", number=number, arch_id=spec.arch_id)
            trial = store.finish_trial(study="s", number=number, val_bpb=bpb, measurement_id=old.id,
                                       objectives={"val_bpb": bpb, "decode_ms": old_ms})
            moved.append(Moved(trial, old, new))
    result = compare_front("s", host, "here", moved, ["val_bpb", "decode_ms"], ["minimize", "minimize"])
    # trial 0 was on the front for being faster; at 3 ms it is slower and worse than trial 1
    assert (result.front_before, result.front_after) == ([0, 1], [1])
    assert (result.order_before, result.order_after) == ([0, 1], [1, 0])
    assert moved[0].ratio("decode_ms") == 3.0 and moved[1].ratio("prefill_ms") == 1.0


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    return tiny_search(tmp_path_factory)


def test_remeasure_measures_the_front_again_and_keeps_the_trials_figures(finished, tmp_path):
    db_file = tmp_path / "nas.db"
    shutil.copy(finished.root / "nas.db", db_file)  # the shared search's database is only read
    db = f"sqlite:///{db_file}"
    with Store(db) as store:
        front = store.pareto(study=STUDY)
        before = {t.number: (t.measurement_id, dict(t.objectives)) for t in front}
        n_measurements = len(store.measurements())
    assert front
    r = nas(["remeasure", STUDY, "--db", db, "--top", "1"], finished.env, tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "Remeasured" in r.stdout and "ratio" in r.stdout and "measured:local" in r.stdout
    assert "front membership" in r.stdout and "order by decode" in r.stdout
    with Store(db) as store:
        after = {t.number: (t.measurement_id, dict(t.objectives)) for t in store.pareto(study=STUDY)}
        new = store.measurements()[: len(store.measurements()) - n_measurements]
    assert after == before  # the trials' own figures and links stay as they were
    assert len(new) == 1 and new[0].ok and new[0].label == "measured:local"
    assert new[0].provenance["remeasure_of"]["study"] == STUDY and new[0].provenance["fingerprint"]
    assert new[0].provenance["remeasure_of"]["trial"] in before

    # The views show the newer figure beside the trial's own: `nas pareto` and the plot's hover.
    r = nas(["pareto", STUDY, "--db", db], finished.env, tmp_path)
    assert r.returncode == 0 and f"#{new[0].provenance['remeasure_of']['trial']} measured again" in r.stdout
    with Store(db) as store:
        data = load_study(store, STUDY)
    again = [p for p in data.points if p.newer]
    assert [p.number for p in again] == [new[0].provenance["remeasure_of"]["trial"]]
    hover = hover_text(again[0])
    assert "measured again" in hover and f"fingerprint {new[0].fingerprint}" in hover
    assert all(p.fingerprint for p in data.points if p.on_front)

    r = nas(["remeasure", "no-such-study", "--db", db], finished.env, tmp_path)
    assert r.returncode == 2 and "no study named 'no-such-study'" in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
