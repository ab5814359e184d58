"""Estimator accuracy: how far each device's latency model is from the device's own calibration
points when each point is left out of the fit, against the plain baseline "file bytes / one
fitted bandwidth" on the same points.

    .venv/bin/python bench/estimator_accuracy.py [--devices jetson rpi5] [--draws 50] [--quick]
        [--out bench/results/estimator_accuracy.json]

For every profile with at least 4 calibration points (so that 3 remain to fit):

- leave-one-out: for each point, the latency model (``nas.spec.profile.latency_model``) fitted on
  the others predicts the left-out point's decode (and prefill, where it publishes one); the
  baseline is fitted the same way on the others: time = c x file bytes, one c per phase, chosen
  to minimize the relative error (the "roofline with one fitted bandwidth");
- MAPE and Kendall tau-b of those predictions against the published figures, per phase, for the
  model and the baseline, and the model's in-sample error (fitted on all points);
- the goals (MAPE <= 10%, tau >= 0.9) and whether each is met.

Beside it, what the per-device model changes for a search: the Kendall tau between the decode
rankings that two devices' models give to ``--draws`` architectures of ``gqa_small`` (the old
constant-factor estimate gave every target the host's ranking, tau = 1 by construction).

No timing: the figures are arithmetic on published points, the same on any machine.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import subprocess
import time
from itertools import combinations
from pathlib import Path
from typing import Any

from _common import machine  # bench/ is on sys.path: the scripts run as python bench/NAME.py

from nas.spec.latency import MIN_POINTS, kendall_tau, mape
from nas.spec.profile import (
    CalibrationPoint,
    HardwareProfile,
    latency_model,
    list_profile_files,
    load_profile,
    point_observations,
)
from nas.spec.space import load_space

GOAL_MAPE, GOAL_TAU = 0.10, 0.90


def measured(point: CalibrationPoint, phase: str) -> float | None:
    return point.measured_decode_ms() if phase == "decode" else point.measured_prefill_ms()


def file_bytes(point: CalibrationPoint) -> float:
    """What the baseline knows of a point: the size of its model file."""
    return point.arch.params() * point.bits() / 8


def baseline_coefficient(points: list[CalibrationPoint], phase: str) -> float:
    """c minimizing sum((c x bytes - t) / t)^2 over the points: ms per byte."""
    pairs = [(file_bytes(p), measured(p, phase)) for p in points if measured(p, phase) is not None]
    return sum(f / t for f, t in pairs) / sum((f / t) ** 2 for f, t in pairs)


def device_accuracy(profile: HardwareProfile) -> dict[str, Any]:
    points = list(profile.calibration)
    full = latency_model(profile)
    rows, phases = [], {}
    for phase in ("decode", "prefill"):
        idx = [i for i, p in enumerate(points) if measured(p, phase) is not None]
        if len(idx) < 2:
            continue
        truth, model_loo, base_loo, in_sample = [], [], [], []
        for i in idx:
            p = points[i]
            (obs,) = [o for o in point_observations(p, i) if o.step.phase == phase]
            loo = latency_model(profile, leave_out=i)
            others = [q for j, q in enumerate(points) if j != i]
            c = baseline_coefficient(others, phase)
            truth.append(obs.ms)
            model_loo.append(loo.step_ms(obs.step))
            base_loo.append(c * file_bytes(p))
            in_sample.append(full.step_ms(obs.step))
            rows.append({"phase": phase, "point": i, "model": p.model, "runtime": p.runtime,
                         "quantization": p.quantization, "params_b": p.arch.params() / 1e9,
                         "measured_ms": obs.ms, "model_loo_ms": model_loo[-1], "baseline_loo_ms": base_loo[-1],
                         "model_fitted_ms": in_sample[-1], "loo_fitted_with": loo.method})
        m_mape, b_mape = mape(model_loo, truth), mape(base_loo, truth)
        m_tau, b_tau = kendall_tau(model_loo, truth), kendall_tau(base_loo, truth)
        phases[phase] = {
            "n": len(idx),
            "model_loo_mape": m_mape, "baseline_loo_mape": b_mape,
            "model_loo_kendall_tau": m_tau, "baseline_loo_kendall_tau": b_tau,
            "model_in_sample_mape": mape(in_sample, truth),
            "model_beats_baseline_mape": m_mape < b_mape,
            "goal_mape_met": m_mape <= GOAL_MAPE, "goal_tau_met": m_tau >= GOAL_TAU,
        }
    return {"profile": profile.name, "device": profile.device.name, "n_points": len(points),
            "fitted": full.describe(), "phases": phases, "rows": rows}


def without(profile: HardwareProfile, models: list[str]) -> HardwareProfile:
    """The profile with the points of ``models`` left out."""
    if not models:
        return profile
    kept = tuple(p for p in profile.calibration if p.model not in models)
    return profile.model_copy(update={"calibration": kept})


def ranking_agreement(names: list[str], draws: int, seed: int) -> dict[str, Any]:
    """Kendall tau between the decode rankings the devices' models give to the same draws."""
    space, rng = load_space("gqa_small"), random.Random(seed)
    specs = [space.sample(rng) for _ in range(draws)]
    decode = {}
    for name in names:
        profile = load_profile(name)
        model = latency_model(profile)
        decode[name] = [model.decode_ms(s, profile.workload.decode_past_tokens(s)) for s in specs]
    return {"space": "gqa_small", "draws": draws, "seed": seed,
            "kendall_tau": {f"{a} vs {b}": kendall_tau(decode[a], decode[b]) for a, b in combinations(names, 2)},
            "decode_ms_median": {n: statistics.median(v) for n, v in decode.items()}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--devices", nargs="*", default=None, help="profiles (default: every one with enough points)")
    ap.add_argument("--draws", type=int, default=50)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--without", nargs="*", default=[], metavar="MODEL",
                    help="leave out the points of these models (a sensitivity check; the profiles keep them)")
    ap.add_argument("--quick", action="store_true", help="fewer draws (the accuracy part is the same)")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "estimator_accuracy.json")
    args = ap.parse_args()
    draws = 10 if args.quick else args.draws

    names = args.devices or [n for n in sorted(list_profile_files())
                             if len(load_profile(n).calibration) > MIN_POINTS]
    devices = [device_accuracy(without(load_profile(n), args.without)) for n in names]
    for d in devices:
        f = d["fitted"]
        print(f"\n{d['profile']}: {d['n_points']} points; fitted bandwidth {f['bandwidth_gbs']} GB/s, "
              f"compute {f['compute_efficiency']:.3f} of peak, {f['kernel_us']:.2f} us/kernel")
        print(f"  {'phase':8s} {'n':>3s} {'model LOO MAPE':>15s} {'baseline':>9s} {'model tau':>10s} {'baseline':>9s}"
              f" {'in-sample':>10s}")
        for phase, p in d["phases"].items():
            print(f"  {phase:8s} {p['n']:3d} {p['model_loo_mape']:15.1%} {p['baseline_loo_mape']:9.1%} "
                  f"{p['model_loo_kendall_tau']:10.3f} {p['baseline_loo_kendall_tau']:9.3f} "
                  f"{p['model_in_sample_mape']:10.1%}")
        for r in d["rows"]:
            print(f"    {r['phase']:7s} {r['model'][:16]:16s} {r['runtime'][:26]:26s} "
                  f"measured {r['measured_ms']:9.2f} ms  model {r['model_loo_ms']:9.2f}  "
                  f"baseline {r['baseline_loo_ms']:9.2f}")
    agreement = ranking_agreement(names, draws, args.seed) if len(names) > 1 else {}
    if agreement:
        print(f"\nranking of {draws} gqa_small draws by decode ms, Kendall tau between devices: "
              f"{agreement['kendall_tau']}")
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).parent, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    command = (f"bench/estimator_accuracy.py{' --quick' if args.quick else ''} --draws {draws} --seed {args.seed}"
               + (f" --without {' '.join(args.without)}" if args.without else ""))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "machine": machine(), "date": time.strftime("%Y-%m-%d"), "command": command, "commit": commit,
        "goals": {"mape": GOAL_MAPE, "kendall_tau": GOAL_TAU}, "left_out_models": args.without,
        "devices": devices, "ranking_agreement": agreement,
    }, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
