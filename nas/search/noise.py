"""The seed spread of BPB, measured once per study: how far apart two BPBs must be to mean
anything.

At brief budgets a second training seed moves an architecture's BPB about as much as a change of
architecture does, so a front whose neighbours differ by less than that spread is ordered by
chance. Once the study has a complete trial, its architecture (the first complete one: known to
be feasible and trainable) is trained again under ``extra`` more seeds to the study's first rung,
on the whole budget's schedule as every trial is, and scored as a trial is (the deployed model's
BPB in ONNX Runtime). With the trial's own run at that rung, that makes ``extra + 1`` seeds; their
standard deviation is the error bar of every BPB in the study (``Store.noise``).

The spread is measured at the first rung because that is where it is largest (and cheapest):
a later rung's BPB, trained longer, spreads less, so the bar is a conservative one there and the
views say at which budget it was taken. Several workers may measure the same seed at once; the
store keeps the first result of each seed and the others are dropped.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from nas.search.config import SearchEvents
from nas.search.rungs import RungPlan
from nas.spec.settings import TrainConfig
from nas.store import NoiseRow, Store

if TYPE_CHECKING:
    import threading

    from nas.search.trial import Resources


def reference_run(store: Store, study: str, plan: RungPlan) -> tuple[int, str, int, float] | None:
    """(trial number, arch_id, tokens, BPB) of the study's first complete trial at its first rung
    (its whole budget without rungs), or None before there is one."""
    for t in store.trials(study=study, states=["complete"]):
        if t.arch_id is None:
            continue
        if plan.count == 1:
            return t.number, t.arch_id, int(t.train["tokens"]), float(t.val_bpb)  # type: ignore[index,arg-type]
        rungs = store.trial_rungs(study=study, number=t.number)
        if rungs:
            return t.number, t.arch_id, rungs[0].tokens, rungs[0].val_bpb
    return None


def missing_seeds(noise: NoiseRow | None, train: TrainConfig, extra: int) -> list[int]:
    """The seeds still to train: the trial's own (``train.seed``) and ``extra`` after it."""
    have = set(noise.seeds) if noise is not None else set()
    return [s for s in range(train.seed, train.seed + extra + 1) if s not in have]


def measure_noise(store: Store, study: str, train: TrainConfig, plan: RungPlan, extra: int,
                  resources: Resources, events: SearchEvents, stop: threading.Event,
                  torch_device: str = "cpu") -> NoiseRow | None:
    """Train and score the seeds the study's noise still lacks; the study's noise after that (None
    while it has no complete trial, or when ``extra`` is 0)."""
    if extra < 1:
        return None
    ref = reference_run(store, study, plan)
    if ref is None:
        return None
    number, arch_id, tokens, bpb = ref
    seeds = missing_seeds(store.noise(study=study), train, extra)
    if not seeds:
        return store.noise(study=study)
    if train.seed in seeds:  # the trial's own run is the first seed, at no cost
        store.record_noise(study=study, arch_id=arch_id, tokens=tokens, seed=train.seed, val_bpb=bpb,
                           trial_number=number)
    spec = store.get_architecture(arch_id=arch_id).spec
    for seed in (s for s in seeds if s != train.seed):
        events.message(f"seed noise: training trial {number}'s architecture ({spec.summary()}) again under "
                       f"seed {seed}, to {tokens:,} tokens (once per study)")
        value = _seed_bpb(spec, train.updated(seed=seed), tokens if plan.count > 1 else None, resources, stop,
                          torch_device)
        store.record_noise(study=study, arch_id=arch_id, tokens=tokens, seed=seed, val_bpb=value)
    noise = store.noise(study=study)
    if noise is not None and noise.std is not None:
        events.message(f"seed noise of BPB at {noise.tokens:,} tokens: std {noise.std:.4f} over {len(noise.seeds)} "
                       f"seeds ({', '.join(f'{b:.4f}' for b in noise.bpbs)}); BPBs closer than "
                       f"{noise.NOISE_GAP * noise.std:.4f} are within noise of each other")
    return noise


def _seed_bpb(spec, cfg: TrainConfig, until: int | None, resources: Resources, stop: threading.Event,
              torch_device: str) -> float:
    """One seed's BPB, trained and scored exactly as a trial's (``nas.search.trial``)."""
    from nas.search.trial import score_trained
    from nas.stages.train import train_until

    tc = resources.tokenized(spec.vocab_size)
    model, _, _ = train_until(spec, tc, cfg, until_tokens=until, device=torch_device, should_stop=stop.is_set)
    threads = resources.host.profile.runtime.threads if resources.host else 2
    with tempfile.TemporaryDirectory(prefix="nas-noise-") as tmp:
        bpb, _ = score_trained(spec, model, tc, Path(tmp), cfg, threads=threads)
    return bpb.bpb
