"""The benchmarks in bench/ run end to end at their smallest settings (``--quick``) and write the
figures they print as JSON with the machine, the date and the command."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def run_bench(script: str, tmp_path: Path, *extra: str) -> dict:
    out = tmp_path / f"{script}.json"
    r = subprocess.run([sys.executable, str(ROOT / "bench" / f"{script}.py"), "--quick", "--out", str(out), *extra],
                       capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    assert f"wrote {out}" in r.stdout
    doc = json.loads(out.read_text())
    assert {"machine", "date", "command"} <= doc.keys()
    assert doc["command"].startswith(f"bench/{script}.py --quick")
    assert doc["machine"]["cpu"]
    return doc


@pytest.fixture(scope="module")
def search_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path]:
    """One quick search-efficiency run, whose databases the trial-cost test analyses too (a real
    search costs most of these tests' time: one is enough)."""
    from tests.search_helpers import fused_tiny_space

    tmp = tmp_path_factory.mktemp("search")
    space = fused_tiny_space(tmp)  # no MLA draw, whose plain graph's trace would cost most of each trial
    return run_bench("search_efficiency", tmp, "--space", str(space), "--work", str(tmp / "work"),
                     "--samplers", "tpe", "random", "tpe+rungs3"), tmp / "work"


def test_search_efficiency_compares_samplers_by_hypervolume(search_run: tuple[dict, Path]) -> None:
    doc, _ = search_run
    assert set(doc["by_sampler"]) == {"tpe", "random", "tpe+rungs3"}
    assert len(doc["setup"]["reference_point"]) == 2 and all(math.isfinite(v) for v in doc["setup"]["reference_point"])
    runs = {r["name"]: r for r in doc["runs"]}
    assert set(runs) == {"tpe-s0", "random-s0", "tpe-rungs3-s0"}
    for r in runs.values():
        assert r["trials"] and all(t["seconds"] > 0 for t in r["trials"])
        assert r["hv_curve"][-1][1] == r["final_hv"] >= 0
    from nas.store import Store

    with Store(f"sqlite:///{search_run[1] / 'tpe-rungs3-s0.db'}") as store:  # the rungs arm ran with rungs
        first = store.trials(study="tpe-rungs3-s0")[0]
        # three rungs planned; the first trial stops at the first (none goes on before 3 reach it)
        assert len(first.train["rung_tokens"]) == 3
        assert [g.rung for g in store.trial_rungs(study="tpe-rungs3-s0", number=first.number)] == [0]
    # --quick sets no tight budget: every tiny draw is feasible, so the fronts have area.
    assert max(r["final_hv"] for r in runs.values()) > 0
    complete = doc["trial_cost_s"]["complete (trained and scored)"]
    assert complete["n"] >= 1 and complete["median"] > 0


def test_trial_cost_splits_a_real_trial_into_its_stages(search_run: tuple[dict, Path], tmp_path: Path) -> None:
    # The search mode is the same code with a Search in front; --from-db analyses the quick
    # search's first run, whose trials are complete (--quick sets no tight budget).
    doc = run_bench("trial_cost", tmp_path, "--from-db", f"sqlite:///{search_run[1] / 'tpe-s0.db'}",
                    "--study", "tpe-s0")
    assert doc["setup"]["space"] == "tiny" and doc["setup"]["device"] == "host"
    assert doc["summary"]["complete_trials"] >= 1
    t = doc["trials"][0]
    assert t["seconds"]["train"] > 0 and t["seconds"]["export"] > 0 and t["seconds"]["score BPB"] > 0
    assert sum(t["share"].values()) == pytest.approx(1.0)
    assert 0 < t["not_training_share"] < 1
    assert sum(t["seconds"].values()) == pytest.approx(t["wall_s"], rel=0.05)


def test_train_throughput_times_ours_and_hf_on_the_same_weights(tmp_path: Path) -> None:
    doc = run_bench("train_throughput", tmp_path)
    (row,) = doc["results"]
    assert row["max_abs_logit_diff"] < 1e-4  # the same function before any timing
    assert row["ours"]["median"] > 0 and row["hf"]["median"] > 0
    assert len(row["ratio_per_round"]) == doc["setup"]["rounds"] == 2


def test_store_scale_times_the_front_through_store_cli_and_web(tmp_path: Path) -> None:
    doc = run_bench("store_scale", tmp_path)
    assert doc["setup"]["backends"] == ["sqlite"]
    assert sum(doc["setup"]["trial_counts"]["sqlite"].values()) == doc["setup"]["trials"]
    assert doc["setup"]["front_size"]["sqlite"] > 0
    ops = doc["summary"]["sqlite"]
    assert {"Store.refresh_pareto", "Store.pareto", "nas pareto (CLI subprocess)"} <= ops.keys()
    assert all(v["median"] > 0 and v["min"] <= v["median"] <= v["max"] for v in ops.values())


def test_fidelity_ranks_rungs_against_a_longer_run_under_each_rule(tmp_path):
    doc = run_bench("fidelity", tmp_path)
    assert set(doc["summary"]) == {"width", "constant"}
    for rule in ("width", "constant"):
        rungs = doc["summary"][rule]["rungs"]
        assert [r["tokens"] for r in rungs] == sorted(r["tokens"] for r in rungs)
        assert all(-1 <= r["kendall_tau_vs_reference"] <= 1 and r["seed_std_median"] >= 0 for r in rungs)
    for arch in doc["archs"]:  # every arch: each rung's BPB under each rule and seed, and its reference
        assert arch["reference"]["tokens"] > arch["runs"]["width"]["0"]["tokens"][-1]
        assert all(len(arch["runs"][rule][seed]["bpb"]) == 3 for rule in ("width", "constant") for seed in ("0", "1"))
    again = run_bench("fidelity", tmp_path)  # a second run with the same settings has nothing left to do
    assert again["archs"] == doc["archs"]
    # Other settings on the same file: refused in one line, the runs already there kept.
    out = tmp_path / "fidelity.json"
    before = out.read_bytes()
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "fidelity.py"), "--quick", "--draw-seed", "1",
                        "--out", str(out)], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert r.returncode != 0
    assert r.stderr.strip() == f"{out}: written with other settings; pass another --out or remove it"
    assert out.read_bytes() == before


def test_estimator_accuracy_scores_each_device_model_leave_one_out_against_the_bytes_baseline(tmp_path: Path) -> None:
    doc = run_bench("estimator_accuracy", tmp_path)
    devices = {d["profile"]: d for d in doc["devices"]}
    assert {"jetson", "rpi5"} <= set(devices)
    for d in devices.values():
        decode = d["phases"]["decode"]
        assert decode["n"] == d["n_points"] >= 5
        assert 0 <= decode["model_loo_mape"] < 1 and 0 <= decode["baseline_loo_mape"] < 1
        assert -1 <= decode["model_loo_kendall_tau"] <= 1
        assert {r["phase"] for r in d["rows"]} <= {"decode", "prefill"}
    assert -1 <= doc["ranking_agreement"]["kendall_tau"]["jetson vs rpi5"] < 1


def test_deploy_graph_measures_plain_and_deployment_graphs_per_bitwidth(tmp_path: Path) -> None:
    doc = run_bench("deploy_graph", tmp_path)
    rows = {(r["bitwidth"], r["graph"]): r for r in doc["rows"]}
    assert set(rows) == {(b, g) for b in (32, 16, 8, 4) for g in ("plain", "deploy")}
    for r in rows.values():
        assert r["decode_ms"] > 0 and r["roofline_ms"] > 0 and r["file_mb"] > 0
        assert isinstance(r["nodes"]["file"], int)
    # What a machine's speed cannot change: the fused graph has fewer nodes than the plain one.
    assert all(rows[b, "deploy"]["nodes"]["file"] < rows[b, "plain"]["nodes"]["file"] for b in (32, 16, 8, 4))
    assert set(doc["summary"]["deploy_over_roofline"]) == {"fp32", "fp16", "int8", "int4"}


def test_measure_noise_sets_each_loop_setting_beside_the_machines_floor(tmp_path: Path) -> None:
    doc = run_bench("measure_noise", tmp_path)
    summary = doc["summary"]
    loops = [k for k in summary if not k.startswith("floor")]
    assert len(loops) == 6 and any(k.startswith("floor") for k in summary)
    for name, s in summary.items():
        assert s["cv"] >= 0 and s["iqr_over_median"] >= 0 and s["max_over_median"] >= 1, name
    for name in loops:  # two rounds: the median's change between them is a figure, not absent
        assert summary[name]["run_to_run"] >= 0 and all(v > 0 for v in summary[name]["median_ms"].values())
    assert all(len(v) == 2 for runs in doc["runs"].values() for v in runs.values())
    assert doc["worker_decode_ms_round1"]["0"] > 0


def test_brief_schedule_trains_each_shape_at_each_batch_and_rate(tmp_path: Path) -> None:
    doc = run_bench("brief_schedule", tmp_path)
    runs = {(r["shape"], r["batch"], r["lr"]): r for r in doc["runs"]}
    assert set(runs) == {(s, b, lr) for s in ("2x64", "4x64") for b in (8, 2) for lr in (3e-3, 1e-3)}
    for (_, batch, _), r in runs.items():  # a smaller batch is more steps over the same tokens
        assert r["steps"] == math.ceil(doc["settings"]["tokens"] / (batch * 256)) and math.isfinite(r["bpb"])
    again = run_bench("brief_schedule", tmp_path)  # the same settings again: nothing left to train
    assert again["runs"] == doc["runs"]


def test_main_job_runs_the_search_and_counts_its_front_by_the_budget_each_point_had(tmp_path: Path) -> None:
    doc = run_bench("main_job", tmp_path, "--work", str(tmp_path / "work"))
    (run,) = doc["runs"]
    assert run["command"].startswith("nas search --space tiny --device host --rungs 3 --time 20s --seed 0")
    assert run["wall_s"] > 0 and run["peak_rss_mb"] > 50 and run["failed"] == 0
    assert run["complete"] == run["trainings"] + run["twins"] and run["trainings"] >= 1
    # the front as the search printed it, and as many points as the budgets it counts
    log = Path(run["log"]).read_text()
    assert f"Pareto front of {run['study']}: {run['front']} of" in log
    assert run["front"] == len(run["front_points"]) == sum(run["front_by_tokens"].values()) >= 1
    assert all(p["tokens"] <= 8192 and p["val_bpb"] > 0 for p in run["front_points"])
    assert doc["front"]["median"] == run["front"]
