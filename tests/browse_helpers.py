"""Helpers of the browsing tests (plots, web page, optuna-dashboard): synthetic studies written
through the store's API, and what a real-browser test needs (Chromium, a free port, artefacts).

A real search takes minutes; these take a fraction of a second and hold every case a page must
show: complete trials on and off the front, measured and estimated latency, a trial over a budget
after training, one rejected when measured (never trained), one rejected by the analytic check,
a failed one and a running one. The figures follow a plausible shape (bigger models: lower BPB,
slower decode) with a fixed seed, so a front exists and is stable.
"""

from __future__ import annotations

import os
import random
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from nas.spec.arch import ArchSpec
from nas.store import Store
from tests.measurements import measurement

DECODE_BUDGET_MS = 2.0
MEMORY_BUDGET_MB = 512.0


def peak_mb(spec: ArchSpec) -> float:
    return 40 + spec.params() * 4 / 2**20


def _spec(rng: random.Random) -> ArchSpec:
    attention = rng.choice(["mha", "gqa", "mqa", "mla"])
    n_heads = rng.choice([2, 4])
    fields: dict[str, Any] = {
        "vocab_size": rng.choice([512, 1024]), "d_model": rng.choice([32, 48, 64]), "n_layers": rng.choice([2, 4]),
        "n_heads": n_heads, "head_dim": rng.choice([8, 16]), "attention": attention,
        "ffn": rng.choice(["gated", "plain"]), "ffn_ratio": rng.choice([2.0, 3.0, 4.0]),
        "bitwidth": rng.choice([32, 8, 4]), "context_length": 64,
    }  # fmt: skip
    if attention == "gqa":
        fields.update(n_heads=4, n_kv_heads=2)
    if attention == "mla":
        fields.update(mla_latent_rank=rng.choice([16, 32]), mla_rope_dim=8)
    return ArchSpec(**fields)


# Each vocabulary's n-gram baselines; V1024's bigram sits among the trials' BPBs, so that some
# trials are not below it (flagged) and others are.
BASELINES = {512: {"bigram_bpb": 3.6, "unigram_bpb": 4.9, "vocab_size": 512},
             1024: {"bigram_bpb": 2.75, "unigram_bpb": 4.7, "vocab_size": 1024}}


NOISE_BPBS = (2.50, 2.56, 2.53)


def make_study(
    store: Store,
    name: str = "synthetic",
    *,
    n_complete: int = 14,
    seed: int = 0,
    label: str = "measured:local",
    extras: bool = True,
    rungs: int = 1,
) -> list[int]:
    """Write study ``name`` with ``n_complete`` complete trials (plus, with ``extras``, one of each
    other kind); returns the numbers of the complete trials."""
    rng = random.Random(seed)
    store.create_study(
        name=name,
        space="tiny",
        profile="host",
        objectives=[("val_bpb", "minimize"), ("decode_ms", "minimize")],
        train_config={"tokens": 20000},
        seed=seed,
        extra={"sampler": "tpe", **({"rungs": {"count": rungs, "eta": 3}} if rungs > 1 else {})},
    )
    number = 0
    complete = []

    def measure(spec: ArchSpec, decode: float, lab: str = label) -> int:
        m = store.add_measurement(measurement(
            spec.arch_id, bitwidth=spec.bitwidth, label=lab,
            prefill_repeats_ms=[decode * 6 * f for f in (0.95, 1.0, 1.08)],
            decode_repeats_ms=[decode * f for f in (0.96, 1.0, 1.0, 1.07)],
            peak_memory_bytes=int(peak_mb(spec) * 2**20), model_bytes=spec.weight_bytes(),
            workload={"prompt": 32, "context": 64}, provenance={"cpu": "synthetic", "threads": 2},
        ))  # fmt: skip
        return m.id

    for i in range(n_complete):
        spec = _spec(rng)
        store.upsert_architecture(spec=spec)
        size = spec.params() / 1e5
        decode = 0.3 + 0.25 * size * rng.uniform(0.8, 1.25)
        bpb = 2.2 + 1.6 / (1 + size) + rng.uniform(-0.08, 0.08)
        lab = "estimated:roofline" if i % 5 == 4 else label
        mid = measure(spec, decode, lab)
        store.start_trial(study=name, number=number, arch_id=spec.arch_id)
        curve = [
            [s, s * 512, 7.0 - 3.5 * (s / 40) ** 0.5 + rng.uniform(-0.1, 0.1), 3e-3, s * 0.1] for s in range(0, 41, 5)
        ]
        store.finish_trial(
            study=name, number=number, objectives={"val_bpb": bpb, "decode_ms": decode, "params": spec.params()},
            val_bpb=bpb, constraints={"decode_ms_per_token": decode - DECODE_BUDGET_MS,
                         "peak_memory_mb": peak_mb(spec) - MEMORY_BUDGET_MB},
            train={"tokens": 20480, "steps": 40, "seconds": 4.2, "tokens_per_s": 4876.0, "final_loss": curve[-1][2]},
            curve=curve, baselines=BASELINES[spec.vocab_size], measurement_id=mid,
        )  # fmt: skip
        complete.append(number)
        number += 1
    if extras:
        spec = ArchSpec(vocab_size=1024, d_model=64, n_layers=4, n_heads=4, head_dim=16, context_length=64)
        store.upsert_architecture(spec=spec)
        mid = measure(spec, DECODE_BUDGET_MS + 0.6)
        store.start_trial(study=name, number=number, arch_id=spec.arch_id)
        store.mark_infeasible(
            study=name,
            number=number,
            stage="measure",
            reason="decode_ms_per_token over by 0.6",
            constraints={"decode_ms_per_token": 0.6, "peak_memory_mb": peak_mb(spec) - MEMORY_BUDGET_MB},
            arch_id=spec.arch_id,
            measurement_id=mid,
        )
        number += 1
        store.start_trial(study=name, number=number, arch_id=spec.arch_id)
        store.mark_infeasible(
            study=name, number=number, stage="budget", reason="model_mb over budget", constraints={"model_mb": 3.0}
        )
        number += 1
        store.start_trial(study=name, number=number, arch_id=spec.arch_id)
        store.fail_trial(study=name, number=number, stage="train", reason="loss became NaN at step 12")
        number += 1
        store.start_trial(study=name, number=number)
        number += 1
        # the study's seed spread: trial 0's architecture under three seeds (std 0.03)
        arch = store.get_trial(study=name, number=0).arch_id
        for seed, bpb in enumerate(NOISE_BPBS):
            store.record_noise(study=name, arch_id=arch, tokens=20480, seed=seed, val_bpb=bpb,
                               trial_number=0 if seed == 0 else None)
    store.refresh_pareto(study=name)
    return complete


# --- a real browser -----------------------------------------------------------------------------------------
ROOT = Path(__file__).resolve().parents[1]
# Debian's chromium, which .ci/setup installs; Playwright's own browser download cannot work here
# (docs/dependencies.md).
CHROMIUM = os.environ.get("NAS_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run", "--disable-dev-shm-usage"]  # fmt: skip


def require_chromium() -> str:
    """The Chromium binary, or a failed test: CI installs it, so a missing one is a broken set-up,
    not a reason to skip. ``NAS_SKIP_BROWSER=1`` skips instead, for a machine without it."""
    if os.environ.get("NAS_SKIP_BROWSER") == "1":
        pytest.skip("NAS_SKIP_BROWSER=1: the real-browser tests are skipped")
    if not (Path(CHROMIUM).is_file() and os.access(CHROMIUM, os.X_OK)):
        pytest.fail(f"no Chromium at {CHROMIUM}: run `bash .ci/setup` (it installs Debian's chromium), set "
                    "NAS_CHROMIUM to another binary, or NAS_SKIP_BROWSER=1 to skip these tests")  # fmt: skip
    return CHROMIUM


def keep_artifact(path: Path) -> Path:
    """Copy a test's screenshot to ``test-artifacts/`` at the repository root when
    ``NAS_TEST_ARTIFACTS`` is set (CI keeps that folder); it stays in the test's tmp_path anyway."""
    if os.environ.get("NAS_TEST_ARTIFACTS"):
        out = ROOT / "test-artifacts"
        out.mkdir(exist_ok=True)
        shutil.copy2(path, out / path.name)
    return path


DEADLINE_S = 60.0
"""How long a test waits for something it expects (a server up, a page drawn, a row that appears):
generous, since a CI machine may be loaded, and the wait ends as soon as the thing happens."""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_http(url: str, timeout_s: float, proc: subprocess.Popen | None = None) -> None:
    """Poll ``url`` until it answers (any status), at most ``timeout_s``; fail with the server's output.

    Each try may take what is left of ``timeout_s``: a refused connection (the server not up yet)
    comes back at once, and a slow first answer (a loaded machine) is waited for, not cut short."""
    deadline = time.monotonic() + timeout_s
    last: Exception | None = None
    while (left := deadline - time.monotonic()) > 0:
        if proc is not None and proc.poll() is not None:
            out = proc.stdout.read() if proc.stdout else ""
            pytest.fail(f"the server exited with {proc.returncode} before answering: {out[-2000:]}")
        try:
            with urllib.request.urlopen(url, timeout=left):
                return
        except urllib.error.HTTPError:
            return
        except OSError as e:
            last = e
            time.sleep(0.2)
    pytest.fail(f"{url} did not answer within {timeout_s:g} s: {last}")
