"""Measurement fidelity on this host: repeatability, decode against the bandwidth roofline, and
how well an estimate ranks architectures the way measurement does.

    .venv/bin/python bench/measure_fidelity.py [--space gqa_small] [-n 8] [--seed 0] [--out bench/results/...]

For n architectures drawn from the space (bitwidths as drawn), each exported and quantized:
- repeatability: the coefficient of variation of decode latency within a run, and the change of
  the median between two runs of the same model taken in separate processes;
- decode ms/token against the memory-bandwidth roofline: bytes a decode step reads over the
  host's measured read bandwidth, and the ratio measured / roofline (1 = bandwidth-bound);
- ranking: Kendall tau between measured decode latency and (a) the pure roofline, (b) a
  roofline-plus-per-layer-overhead model fitted on the other architectures (leave-one-out),
  i.e. how far an estimate can be trusted to order architectures.
Prints a table and writes the figures as JSON.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import random
import tempfile
import time
from pathlib import Path

import numpy as np
from _common import kendall_tau

from nas.search.pipeline import host_setup
from nas.spec.space import load_space
from nas.stages.export import export_spec
from nas.stages.measure import measure_local


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--space", default="gqa_small")
    ap.add_argument("-n", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "measure_fidelity.json")
    args = ap.parse_args()

    calibrated = host_setup()
    host, cal = calibrated.profile, calibrated.cal
    print(f"host: {cal.provenance['cpu']}, {host.runtime.threads} threads, read bandwidth "
          f"{cal.memory_bandwidth_gbs:.1f} GB/s, fp32 matmul {cal.peak_gflops['fp32']:.0f} GFLOP/s")
    space = load_space(args.space)
    rng = random.Random(args.seed)
    rows = []
    for i in range(args.n):
        spec = space.sample(rng)
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.perf_counter()
            model_dir = export_spec(spec, Path(tmp)).path.parent
            export_s = time.perf_counter() - t0
            runs = [measure_local(model_dir, spec, host, repeats=args.repeats) for _ in range(2)]
        past = runs[0].workload["context_tokens"]
        roofline_ms = spec.decode_bytes(past) / cal.bandwidth_bytes_per_s * 1e3
        medians = [r.decode.median_ms for r in runs]
        row = {
            "arch_id": spec.arch_id, "summary": spec.summary(), "params": spec.params(), "n_layers": spec.n_layers,
            "decode_bytes": spec.decode_bytes(past), "export_s": export_s,
            "decode_ms": medians[0], "decode_cv_within": runs[0].decode.cv,
            "decode_run_to_run": abs(medians[1] - medians[0]) / min(medians),
            "prefill_ms": runs[0].prefill.median_ms, "prefill_cv_within": runs[0].prefill.cv,
            "roofline_ms": roofline_ms, "measured_over_roofline": medians[0] / roofline_ms,
            "peak_memory_mb": runs[0].peak_memory_mb, "model_mb": runs[0].model_mb,
        }
        rows.append(row)
        print(f"[{i + 1}/{args.n}] {spec.summary():60s} decode {medians[0]:7.3f} ms (cv {row['decode_cv_within']:.1%},"
              f" run-to-run {row['decode_run_to_run']:.1%}), roofline {roofline_ms:6.3f} ms, "
              f"x{row['measured_over_roofline']:.2f}")

    measured = [r["decode_ms"] for r in rows]
    roofline = [r["roofline_ms"] for r in rows]
    # Leave-one-out fit of t = a * roofline + b * n_layers + c on the other architectures.
    X = np.array([[r["roofline_ms"], r["n_layers"], 1.0] for r in rows])
    y = np.array(measured)
    loo = []
    for i in range(len(rows)):
        keep = [j for j in range(len(rows)) if j != i]
        coef, *_ = np.linalg.lstsq(X[keep], y[keep], rcond=None)
        loo.append(float(X[i] @ coef))
    loo_err = [abs(p - m) / m for p, m in zip(loo, measured, strict=True)]
    summary = {
        "decode_cv_within_median": float(np.median([r["decode_cv_within"] for r in rows])),
        "decode_cv_within_max": float(max(r["decode_cv_within"] for r in rows)),
        "decode_run_to_run_median": float(np.median([r["decode_run_to_run"] for r in rows])),
        "decode_run_to_run_max": float(max(r["decode_run_to_run"] for r in rows)),
        "measured_over_roofline_median": float(np.median([r["measured_over_roofline"] for r in rows])),
        "measured_over_roofline_range": [float(min(r["measured_over_roofline"] for r in rows)),
                                         float(max(r["measured_over_roofline"] for r in rows))],
        "kendall_tau_roofline_vs_measured": kendall_tau(roofline, measured),
        "kendall_tau_fitted_loo_vs_measured": kendall_tau(loo, measured),
        "fitted_loo_abs_error_median": float(np.median(loo_err)),
    }
    print("\nsummary")
    for k, v in summary.items():
        print(f"  {k:40s} {v if isinstance(v, list) else round(v, 4)}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "machine": {"cpu": cal.provenance["cpu"], "threads": host.runtime.threads, "python": platform.python_version(),
                    "onnxruntime": cal.provenance["onnxruntime"]},
        "date": time.strftime("%Y-%m-%d"), "command": f"bench/measure_fidelity.py --space {args.space} -n {args.n} "
                                                        f"--seed {args.seed}",
        "host_calibration": dataclasses.asdict(cal), "rows": rows, "summary": summary,
    }, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
