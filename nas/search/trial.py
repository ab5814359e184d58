"""One trial of a search, top to bottom, cheapest stage first.

1. ``sample``   the sampler proposes parameters; the space turns them into an ArchSpec (a draw
                that breaks a rule ends here as infeasible, at no cost);
2. ``budget``   the analytic check against the profile's budgets (lower bounds on model size and
                memory): over budget ends the trial as infeasible, before any export;
3. ``measure``  export with fresh weights at the spec's bitwidth, as the deployment graph
                (``nas.stages.deploy``: fused ONNX Runtime ops) where the spec allows it, else the
                plain traced graph, quantized (its ``graph_note`` says why); measure or estimate on
                the profile (reused from the store by arch, profile, bitwidth and workload, the
                graph kind included); over a measured budget ends the trial as infeasible, before
                any training; the export is kept for step 5;
4. ``train``    brief training with the study's budget;
5. ``score``    the trained model's export: the deployment graph built again from the trained
                weights, or for a plain-graph spec step 3's graph with them written in
                (``nas.stages.export.reweight``; traced again when there is none) and quantized;
                BPB of that file in ONNX Runtime;
6. ``report``   objectives and constraints to Optuna, the trial to the store, the front refreshed.

A failure at any stage marks the trial failed with the stage and the reason; the search goes on.
An infeasible trial is told to Optuna as pruned, with its constraint values (> 0) set and no
objective values: TPE sorts a trial by its constraint values before it looks at its state, so the
sampler still learns where the budgets bind, and no view (ours, optuna-dashboard's) can show a
made-up figure for it. Its user attribute ``infeasible`` says why; an invalid draw's ``invalid``.

:func:`run_trial` is the whole flow; the functions below it are its stages and its reports.
"""

from __future__ import annotations

import json
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import optuna

from nas.search.config import SearchConfig, SearchEvents, front_neighbours, other_bitwidths
from nas.search.deadline import deadline, stage_deadline_s
from nas.search.pipeline import Host, host_setup, measure_deployed
from nas.search.rungs import RungPlan
from nas.spec.arch import BITWIDTHS, ArchSpec
from nas.spec.errors import ConfigError, NasError
from nas.spec.files import atomic_write
from nas.spec.latency import LatencyModel, deployed_weight_bytes
from nas.spec.profile import (
    HardwareProfile,
    analytic_budget_check,
    load_profile,
    min_model_bytes,
    min_peak_memory_bytes,
)
from nas.spec.results import ESTIMATED_MODEL, MEASURED_LOCAL, Measurement, beats_bigram, is_estimated, measured_on
from nas.spec.settings import TrainConfig
from nas.spec.space import Dimension, InvalidSample, SearchSpace
from nas.store import Store, TrialRow

if TYPE_CHECKING:
    from nas.stages.data import Corpus, TokenizedCorpus
    from nas.stages.model import Decoder
    from nas.stages.train import BpbResult, TrainResult, TrainState

MIB = 2**20
WEIGHTS_OF = "weights_of"
"""The key, in a trial's training record, of trial N whose trained weights it scored instead of
training: the same architecture at another bitwidth or at the same one (``_trained_twin``)."""
RayMeasure = Callable[[ArchSpec, Path, HardwareProfile], Measurement]


class TrialFailed(NasError):
    """Raised out of the objective after the failure was recorded, so Optuna marks it FAIL."""


@dataclass
class TrialRecord:
    """What the study loop knows of the running trial: its number, the stage it reached, how it
    ended (``complete``, ``infeasible``, ``invalid`` or ``failed``) and its seconds per stage."""

    number: int | None = None
    stage: str = "sample"
    state: str = "failed"
    reason: str = ""
    """Why it failed, was infeasible or invalid; empty when it completed."""
    arch_id: str = ""
    seconds: dict[str, float] = field(default_factory=dict)
    tokens: int = 0
    """Tokens trained so far (over every rung): what the trial counts for (``RungPlan.share``)."""
    reused: bool = False
    """It trained nothing: it took another trial's weights (``WEIGHTS_OF``)."""


class Resources:
    """What the trials of one worker compute once and share: the host's calibration, the corpus
    tokenized per vocabulary and its n-gram baselines, and the notes already shown. Keyed by
    vocabulary size because the corpus is fixed for a study (its fingerprint is checked when a
    study resumes)."""

    def __init__(self, corpus: Corpus, events: SearchEvents) -> None:
        self.corpus = corpus
        self.events = events
        self.host: Host | None = None
        self._tokenized: dict[int, TokenizedCorpus] = {}
        self._baselines: dict[int, dict[str, float]] = {}
        self._noted: set[str] = set()

    def calibrated_host(self) -> Host:
        if self.host is None:
            self.events.message("calibrating this host (cached after the first run)")
            self.host = host_setup()
        return self.host

    def tokenized(self, vocab: int) -> TokenizedCorpus:
        from nas.stages.data import tokenize_corpus

        if vocab not in self._tokenized:
            self.events.message(f"tokenizer for vocab {vocab} (trained once per corpus and vocab, then cached)")
            self._tokenized[vocab] = tokenize_corpus(self.corpus, vocab)
        return self._tokenized[vocab]

    def baselines(self, vocab: int) -> dict[str, float]:
        from nas.stages.data import ngram_baseline_bpb

        if vocab not in self._baselines:
            tc = self.tokenized(vocab)
            self._baselines[vocab] = {"unigram_bpb": ngram_baseline_bpb(tc, 1), "bigram_bpb": ngram_baseline_bpb(tc, 2),
                                      "vocab_size": vocab}
        return self._baselines[vocab]

    def note_once(self, text: str) -> None:
        if text not in self._noted:
            self._noted.add(text)
            self.events.message(text)


@dataclass
class TrialEnv:
    """Everything a trial reads besides its Optuna trial: the study's settings and the worker's
    shared parts. ``optuna_trial_id`` maps a trial number to Optuna's id for the store's link."""

    cfg: SearchConfig
    space: SearchSpace
    profile: HardwareProfile
    train: TrainConfig
    store: Store
    events: SearchEvents
    stop: threading.Event
    resources: Resources
    worker: str
    optuna_trial_id: Callable[[int], int]
    rungs: RungPlan | None = None
    """Where training is scored and may stop (None: one rung, the whole budget)."""
    report_rung: Callable[[int, int, float], None] = lambda number, tokens, bpb: None
    """Records a rung's BPB where Optuna keeps intermediate values (trial number, tokens, BPB)."""
    ray_measure: RayMeasure | None = None
    """Set by the Ray executor where a node advertises the profile's resource: the measure stage
    then runs on that node, labelled with it."""
    deadline: float | None = None
    """When ``--time`` runs out (``time.time()``): past it no trial goes on to another rung, so
    that a search overruns its time by one rung of one trial at most, not by a whole budget."""


class _StageClock:
    """Moves a trial from stage to stage: times each, reports it, and stops the run at a stage
    boundary when a stop was asked for (but not once trained: finishing costs seconds)."""

    def __init__(self, env: TrialEnv, record: TrialRecord) -> None:
        self.env, self.record = env, record
        self.started = time.perf_counter()

    def enter(self, stage: str, detail: str = "") -> None:
        now = time.perf_counter()
        r = self.record
        r.seconds[r.stage] = r.seconds.get(r.stage, 0.0) + now - self.started
        self.started, r.stage = now, stage
        if stage not in ("score", "report") and self.env.stop.is_set():
            raise KeyboardInterrupt
        assert r.number is not None
        self.env.events.stage(r.number, stage, detail)


def run_trial(trial: optuna.Trial, env: TrialEnv, record: TrialRecord) -> list[float]:
    """The objective Optuna calls: one trial through every stage. Returns the objective values
    in the study's order; raises TrialPruned for an invalid draw or an infeasible architecture,
    TrialFailed after recording a failure, and KeyboardInterrupt when a stop was asked for."""
    n = record.number = trial.number
    cfg = env.cfg
    env.store.start_trial(study=cfg.study, number=n, optuna_trial_id=env.optuna_trial_id(n), worker=env.worker)
    env.events.trial_started(n)
    clock = _StageClock(env, record)
    # The measure stage's export lives here until the trial ends: its graph takes the trained
    # weights in the score stage instead of a second trace.
    with tempfile.TemporaryDirectory(prefix="nas-measure-") as scratch:
        try:
            clock.enter("sample")
            spec = _sample(trial, env, record)

            clock.enter("budget", spec.summary())
            reasons = analytic_budget_check(spec, env.profile)
            if reasons:
                _infeasible(trial, env, record, spec, "budget", "; ".join(reasons),
                            _analytic_constraints(spec, env.profile))

            clock.enter("measure", "export, quantize, measure")
            m, measurement_id, template = _measure(spec, env, Path(scratch))
            constraints = env.profile.budgets.constraints(m.figures())
            unjudged = [k for k in env.profile.budgets.limits() if k not in constraints]
            if unjudged:  # a figure that was not taken must not pass for one within budget
                raise NasError(f"the {', '.join(unjudged)} budget cannot be judged: the measurement ({m.label}) "
                               "has no such figure")
            trial.set_user_attr("label", m.label)
            over = [k for k, v in constraints.items() if v > 0]
            if over:
                why = ", ".join(f"{k} over by {constraints[k]:.3g}" for k in over)
                _infeasible(trial, env, record, spec, "measure", f"{why} ({m.label})", constraints, measurement_id)

            tc = env.resources.tokenized(spec.vocab_size)
            trial_dir = _trial_dir(cfg, n)
            parent = _trained_twin(spec, env)
            if parent is not None:
                env.events.message(f"trial {n}: {spec.summary()} differs from trial {parent}'s architecture "
                                   "at most in its bitwidth: it takes that trial's trained weights "
                                   "instead of training them again")
                record.reused = True
                trained = _reuse_and_score(spec, int(parent), tc, trial_dir, template, env, clock)
            else:
                trained = _train_and_score(spec, m, tc, trial_dir, template, env, clock)

            clock.enter("report")
            return _complete(trial, env, record, spec, m, measurement_id, constraints, trained, trial_dir)
        except (optuna.TrialPruned, KeyboardInterrupt):
            raise
        except Exception as e:
            _drop_checkpoint(_checkpoint_path(cfg, record.arch_id))  # nothing to resume from a failure
            reason = str(e) if isinstance(e, NasError) else bug_reason(e)
            env.store.fail_trial(study=cfg.study, number=n, stage=record.stage, reason=reason)
            trial.set_user_attr("failure", f"{record.stage}: {reason}")
            record.state, record.reason = "failed", reason
            env.events.trial_finished(n, "failed", f"{record.stage}: {reason}")
            raise TrialFailed(reason) from e


# --- the stages -------------------------------------------------------------------------------------
def _sample(trial: optuna.Trial, env: TrialEnv, record: TrialRecord) -> ArchSpec:
    try:
        spec = env.space.suggest(trial)
    except InvalidSample as e:
        env.store.mark_infeasible(study=env.cfg.study, number=trial.number, stage="sample", reason=str(e))
        record.state, record.reason = "invalid", str(e)
        trial.set_user_attr("invalid", str(e))
        env.events.trial_finished(trial.number, "invalid", str(e))
        raise optuna.TrialPruned(str(e)) from None
    env.store.upsert_architecture(spec=spec)
    env.store.update_trial(study=env.cfg.study, number=trial.number, arch_id=spec.arch_id)
    record.arch_id = spec.arch_id
    trial.set_user_attr("arch_id", spec.arch_id)
    trial.set_user_attr("summary", spec.summary())
    trial.set_user_attr("params", spec.params())
    return spec


def _measure(spec: ArchSpec, env: TrialEnv, scratch: Path) -> tuple[Measurement, int, Path | None]:
    """The labelled figures of the deployed model, their row's id, and the folder of the fresh
    export (None when the figures were reused from the store and nothing was exported)."""
    from nas.stages.export import EXPORT_FORMAT, export_spec, fresh_distinct_model
    from nas.stages.measure import MeasurementError

    cfg, profile, w = env.cfg, env.profile, env.profile.workload
    from nas.stages.deploy import unsupported_reason

    # The graph this trial measures: the deployment graph where the spec allows it (a figure of
    # the plain graph, stored before it or for another reason, is not reused for it).
    graph = "gqa" if unsupported_reason(spec) is None else "plain"
    workload = {"prompt_tokens": w.prefill_tokens(spec), "context_tokens": w.decode_past_tokens(spec),
                "batch": w.batch, "graph": graph, "export_format": EXPORT_FORMAT}
    # With the device in the cluster, an estimate cached from a run without it is not reused.
    labels = ["measured:*"] if cfg.require_measured or env.ray_measure is not None else None
    row = env.store.find_measurement(arch_id=spec.arch_id, profile=profile.name, bitwidth=spec.bitwidth,
                                     labels=labels, workload=workload, fingerprint=_here(env))
    if row is not None and _still_valid(row.to_measurement(), profile):
        return row.to_measurement(), row.id, None
    # Only an estimate needs the host: it measures the deployed graph (file size, CPU memory)
    # beside the target's latency model.
    host = env.resources.calibrated_host() if profile.measurement.where != "local" else None
    with deadline(stage_deadline_s("export", spec, cfg.stage_deadline_factor), "export and quantize"):
        # The deployment graph where the spec allows it, else the plain one (graph_note says why).
        exported = export_spec(spec, scratch, model=fresh_distinct_model(spec), progress=_step(env, "measure"),
                               graph="deploy")
    env.events.stage_step("measure", "measuring" if profile.measurement.where == "local" else "measuring the host")
    try:
        m = measure_deployed(spec, exported.path.parent, profile, host=host, require_measured=cfg.require_measured,
                             ray_measure=env.ray_measure, notify=env.resources.note_once)
    except MeasurementError as e:
        env.store.add_failed_measurement(arch_id=spec.arch_id, profile=profile.name, bitwidth=spec.bitwidth,
                                         label=attempted_label(profile, env.ray_measure is not None),
                                         error=str(e), workload=workload)
        raise
    return m, env.store.add_measurement(m).id, scratch


@dataclass
class Trained:
    """What the train and score stages leave: the result of training so far, the BPB of the
    deployed model at the rung where the trial stopped, how that file was made, and the rung."""

    result: TrainResult
    bpb: BpbResult
    made_by: str
    rung: int
    rung_tokens: list[int]
    weights_of: int | None = None
    """The trial whose trained weights these are, when this trial did not train."""


def _train_and_score(spec: ArchSpec, m: Measurement, tc: TokenizedCorpus, trial_dir: Path, template: Path | None,
                     env: TrialEnv, clock: _StageClock) -> Trained:
    """Train and score rung by rung (one rung: the whole budget, as a plain search). After each
    rung below the top, the trial goes on only if it ranks in the top 1/eta of the study's trials
    at that rung (``nas.search.rungs``). Each finished rung is saved (weights, optimizer, data
    position, its BPB) under the study's checkpoints, so that a trial killed on the way is
    resumed from its last finished rung by the retry of the same architecture."""

    plan = env.rungs or RungPlan(env.train.tokens)
    budgets = plan.tokens()
    n = clock.record.number
    assert n is not None
    ckpt = _checkpoint_path(env.cfg, spec.arch_id)
    state, done = _finished_rungs(ckpt, spec, env)
    for r in done:  # a killed trial's finished rungs, under this trial's number
        env.store.record_rung(study=env.cfg.study, number=n, **r)
        env.report_rung(n, r["tokens"], r["val_bpb"])
    if done and (len(done) == plan.count or not _goes_on(spec, m, env, n, len(done) - 1, done[-1]["val_bpb"],
                                                           done[-1]["tokens"])):
        # resumed at a rung where it now stops: its saved weights are that rung's
        model, result, _ = _train(spec, tc, env, n, until=done[-1]["tokens"], resume=state)
        clock.record.tokens = result.tokens
        clock.enter("score", "export, quantize, BPB in ONNX Runtime")
        bpb, made_by = _score(spec, model, tc, trial_dir, template, env)
        _drop_checkpoint(ckpt)
        return Trained(result, bpb, made_by, len(done) - 1, budgets)
    for k in range(len(done), plan.count):
        clock.enter("train", f"{budgets[k]:,} tokens" if plan.count == 1 else
                    f"rung {k + 1} of {plan.count}: to {budgets[k]:,} tokens")
        model, result, state = _train(spec, tc, env, n, until=budgets[k] if plan.count > 1 else None, resume=state)
        clock.record.tokens = result.tokens
        clock.enter("score", "export, quantize, BPB in ONNX Runtime")
        bpb, made_by = _score(spec, model, tc, trial_dir, template, env)
        if plan.count > 1:
            done.append({"rung": k, "tokens": result.tokens, "val_bpb": bpb.bpb, "seconds": round(result.seconds, 3)})
            env.store.record_rung(study=env.cfg.study, number=n, **done[-1])
            env.report_rung(n, result.tokens, bpb.bpb)
        if k == plan.top or not _goes_on(spec, m, env, n, k, bpb.bpb, result.tokens):
            break
        # saved once it goes on (a trial that stops needs none): a trial killed on its way to
        # the next rung is resumed from here by the retry of its architecture
        state.save(ckpt)
        atomic_write(ckpt.with_suffix(".json"), json.dumps(done))
    _drop_checkpoint(ckpt)
    return Trained(result, bpb, made_by, k, budgets)


def same_weights(spec: ArchSpec) -> frozenset[str]:
    """The architecture ids whose trained weights ``spec``'s would be: ``spec`` at every bitwidth
    (the weights are trained in full precision and quantized after)."""
    return frozenset(ArchSpec.from_dict(spec.to_dict() | {"bitwidth": b}).arch_id for b in BITWIDTHS)


def trained_own(t: TrialRow) -> bool:
    """Whether complete trial ``t`` trained its weights itself (and kept them), so that a twin
    can take them."""
    return bool(t.train and WEIGHTS_OF not in t.train and t.artifact_dir)


def _trained_twin(spec: ArchSpec, env: TrialEnv) -> int | None:
    """The complete trial of this study that trained (not reused) the weights this architecture
    would train: the same architecture at any bitwidth (weights do not depend on it). A front
    trial's bitwidth siblings are queued for this (``_queue_other_bitwidths``), and the sampler
    draws a configuration tried already now and then; training either again would cost a whole
    trial for the same weights. Of several, the one that went furthest up the rungs, then the
    first."""
    ids = same_weights(spec)
    twins = [t for t in env.store.trials(study=env.cfg.study, states=["complete"])
             if t.arch_id in ids and trained_own(t)]
    if not twins:
        return None
    return min(twins, key=lambda t: (-int(t.train.get("rung") or 0), t.number)).number  # type: ignore[union-attr]


def _reuse_and_score(spec: ArchSpec, parent: int, tc: TokenizedCorpus, trial_dir: Path, template: Path | None,
                     env: TrialEnv, clock: _StageClock) -> Trained:
    """The score stage on trial ``parent``'s trained weights, as they were where it stopped: the
    same architecture at another bitwidth needs no training of its own, since the weights do not
    depend on the bitwidth (quantization follows training; same seed, same data order). The
    trial is recorded at the parent's rung only (``Store.record_rung(only=True)``)."""
    import torch

    from nas.stages.model import build_model
    from nas.stages.train import CurvePoint, TrainResult

    cfg, n = env.cfg, clock.record.number
    assert n is not None
    clock.enter("score", f"trial {parent}'s trained weights at {spec.bitwidth} bits (no training)")
    row = env.store.find_trial(study=cfg.study, number=parent)
    if row is None or row.state != "complete" or not row.artifact_dir or not row.train:
        raise NasError(f"trial {parent}'s trained weights cannot be reused: it is not a complete trial of "
                       f"study {cfg.study!r}")
    path = Path(row.artifact_dir) / "model.pt"
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError) as e:
        raise NasError(f"trial {parent}'s trained weights cannot be reused: {path}: {e}") from None
    if ArchSpec.from_dict(saved["spec"]).to_dict() | {"bitwidth": spec.bitwidth} != spec.to_dict():
        raise NasError(f"trial {parent}'s weights ({path}) are another architecture's, not {spec.summary()}'s")
    if saved.get("train_config") != env.train.model_dump():
        raise NasError(f"trial {parent}'s weights ({path}) were trained under another budget than this study's")
    model = build_model(spec)
    model.load_state_dict(saved["state_dict"])
    t = row.train
    result = TrainResult(steps=int(t["steps"]), tokens=int(t["tokens"]), seconds=float(t["seconds"]),
                         tokens_per_s=float(t["tokens_per_s"]), final_loss=float(t["final_loss"]),
                         stopped_by=str(t["stopped_by"]), curve=tuple(CurvePoint(*p) for p in row.curve or []))
    bpb, made_by = _score(spec, model, tc, trial_dir, template, env)
    plan = env.rungs or RungPlan(env.train.tokens)
    rung = int(t.get("rung") or 0)
    if plan.count > 1:
        env.store.record_rung(study=cfg.study, number=n, rung=rung, tokens=result.tokens, val_bpb=bpb.bpb,
                              seconds=round(result.seconds, 3), only=True)
        env.report_rung(n, result.tokens, bpb.bpb)
    return Trained(result, bpb, made_by, rung, plan.tokens(), weights_of=parent)


def _space_bitwidths(env: TrialEnv, spec: ArchSpec) -> list[int]:
    """The space's other bitwidths for ``spec`` (none when the space does not search bitwidth)."""
    dim = next((d for d in env.space.dimensions if d.name == "bitwidth"), None)
    if dim is None or dim.kind != "choices":
        return []
    return [int(b) for b in dim.choices if b != spec.bitwidth]


def _queue_other_bitwidths(trial: optuna.Trial, env: TrialEnv, spec: ArchSpec, only: list[int] | None = None) -> None:
    """Queue the trial's architecture at each other bitwidth of the space (``only``: at these),
    each a trial that takes its weights (``_trained_twin`` finds them); Optuna hands queued trials
    out before drawing new ones, and skips parameters it has tried already."""
    if "bitwidth" not in trial.params:
        return
    others = [b for b in _space_bitwidths(env, spec) if only is None or b in only]
    if not others:
        return
    for b in others:
        trial.study.enqueue_trial(trial.params | {"bitwidth": b}, skip_if_exists=True)
    why = ("is on the front" if only is None else
           "is not on the front, but its BPB at the latency of another bitwidth would be")
    env.events.message(f"trial {trial.number} {why}: its architecture at "
                       f"{', '.join(f'{b} bits' for b in others)} is queued, on its trained weights (no training)")


def _promising_bitwidths(env: TrialEnv, spec: ArchSpec, m: Measurement, n: int, rung: int, bpb: float) -> list[int]:
    """The other bitwidths at which trial ``n``'s trained weights would be on the front: where
    its BPB with that bitwidth's predicted figures (``predicted_twin``) is dominated by no trial
    at its rung, and within the profile's budgets. A trial drawn at a slow bitwidth is often
    dominated where its int4 twin, almost as good and much faster, would not be; without this
    only the front's own trials had their other bitwidths scored, so a fast point of a good
    architecture drawn slow was found only if the sampler drew it again. The BPB a twin would
    score is taken as the trial's (quantization moves it by 0.001-0.02 at these sizes, less than
    the spacing of a front): a guess that costs one twin's measure and score when it is wrong."""
    others = _space_bitwidths(env, spec)
    model = _twin_model(env) if others else None
    if model is None:
        return []
    peers = _peers_at_rung(env, rung, exclude=n)
    out = []
    for b in others:
        point = _predicted_point(env, spec, b, m, bpb, model)
        if point is not None and not any(_dominates(q, point) for q in peers.values()):
            out.append(b)
    return out


def _predicted_point(env: TrialEnv, spec: ArchSpec, bits: int, m: Measurement, bpb: float,
                     model: LatencyModel) -> list[float] | None:
    """The objective point of ``spec``'s trained weights at ``bits``: ``predicted_twin``'s
    figures, the BPB taken as ``bpb``; None where those figures break one of the profile's
    budgets (such a twin would be infeasible)."""
    figures = predicted_twin(spec, bits, m, env.profile, model)
    if any(v > 0 for v in env.profile.budgets.constraints(figures).values()):
        return None
    mine = objective_values(ArchSpec.from_dict(spec.to_dict() | {"bitwidth": bits}), None, bpb) | figures
    return [mine.get(o, float("inf")) for o in env.cfg.objectives]


def _dominates(a: list[float], b: list[float]) -> bool:
    return all(x <= y for x, y in zip(a, b, strict=True)) and any(x < y for x, y in zip(a, b, strict=True))


def _twin_model(env: TrialEnv) -> LatencyModel | None:
    """The latency model that predicts a twin's figures: the profile's; for this host, whose
    profile's rates are measured (``nas devices calibrate``), the calibrated host's if this run or
    an earlier one calibrated it (nothing is measured here, in the middle of a trial); None for a
    profile that has no model (said once)."""
    from nas.search.pipeline import HOST_PROFILE
    from nas.stages.estimate import cached_host_calibration, calibrated_profile, device_model

    try:
        return device_model(env.profile)
    except ConfigError as e:
        why = str(e)
        if env.profile.name == HOST_PROFILE:
            if env.resources.host is not None:
                return device_model(env.resources.host.profile)
            cal = cached_host_calibration(env.profile)
            if cal is not None:
                return device_model(calibrated_profile(env.profile, cal))
            why = "this host is not calibrated yet (`nas devices calibrate`)"
    env.resources.note_once(f"only front trials get their other bitwidths: no latency model for "
                            f"{env.profile.name} predicts them ({why})")
    return None


def predicted_twin(spec: ArchSpec, bits: int, m: Measurement, profile: HardwareProfile,
                   model: LatencyModel | None = None) -> dict[str, float]:
    """What ``m``'s figures for ``spec`` would be at ``bits``: each latency scaled by the ratio
    the latency model (``nas.spec.latency``; default: the profile's) gives the two bitwidths, the
    file by the ratio of their weight bytes, peak memory by the difference the model gives. For a
    profile whose latencies are that model's estimates, the predicted latencies are the estimate's
    (size and memory, taken from the host's export, are scaled); for a measured profile, the
    measurement with the model's view of what the bitwidth changes."""
    from nas.stages.estimate import device_model

    other = ArchSpec.from_dict(spec.to_dict() | {"bitwidth": bits})
    model, w = model or device_model(profile), profile.workload
    past, prompt, cached = w.decode_past_tokens(spec), w.prefill_tokens(spec), w.cached_tokens(spec)
    out = {"decode_ms": m.decode_ms * model.decode_ms(other, past) / model.decode_ms(spec, past),
           "prefill_ms": m.prefill_ms * model.prefill_ms(other, prompt) / model.prefill_ms(spec, prompt),
           "model_mb": m.model_mb * deployed_weight_bytes(other) / deployed_weight_bytes(spec)}
    if m.peak_memory_mb is not None:
        change = (model.peak_memory_bytes(deployed_weight_bytes(other), other, cached, w.batch)
                  - model.peak_memory_bytes(deployed_weight_bytes(spec), spec, cached, w.batch))
        # never below the runtime's own base: a peak of 0 would pass every memory budget
        out["peak_memory_mb"] = max(model.base_memory_mb, m.peak_memory_mb + change / MIB)
    return out


def _finished_rungs(ckpt: Path, spec: ArchSpec, env: TrialEnv) -> tuple[TrainState | None, list[dict]]:
    """The saved state and finished rungs of this architecture in this study, if a trial of it
    was killed after a rung (and the saved training matches this study's budget), else nothing."""
    from nas.stages.train import TrainState

    rungs_file = ckpt.with_suffix(".json")
    if not (ckpt.exists() and rungs_file.exists()):
        return None, []
    try:
        state = TrainState.load(ckpt)
        done = json.loads(rungs_file.read_text())
    except (NasError, OSError, json.JSONDecodeError) as e:
        env.resources.note_once(f"ignoring the checkpoint {ckpt.name}: {e}")
        return None, []
    if state.cfg != env.train.model_dump() or state.spec != spec.to_dict() or not done:
        return None, []
    if state.step * env.train.batch_size * spec.context_length != done[-1]["tokens"]:
        return None, []
    env.events.message(f"resuming {spec.summary()} from its rung {len(done)} checkpoint")
    return state, done


def _goes_on(spec: ArchSpec, m: Measurement, env: TrialEnv, n: int, rung: int, bpb: float, tokens: int) -> bool:
    """The rung rule for trial ``n`` at ``rung`` (``bpb`` after ``tokens``, the rung's budget rounded up
    to whole steps), against every training of the study that reached it (failed ones left out:
    they were killed or broke, and their retries stand for them), each seen at every bitwidth of
    the space (``_families_at_rung``)."""
    from nas.search.rungs import decide

    plan = env.rungs
    assert plan is not None
    if env.deadline is not None and time.time() > env.deadline:
        env.events.message(f"trial {n} rung {rung + 1} ({tokens:,} tokens): BPB {bpb:.4f}, stops: "
                           "the search's time is up, so no trial goes on to another rung")
        return False
    d = decide(n, _families_at_rung(env, rung, n, spec, m, bpb), plan.eta, grace=rung == 0)
    env.events.message(f"trial {n} rung {rung + 1} ({tokens:,} tokens): BPB {bpb:.4f}, {d}")
    return d.goes_on


def weights_id(spec: ArchSpec) -> str:
    """One name for the weights ``spec`` trains, whatever its bitwidth (``same_weights``)."""
    return min(same_weights(spec))


@dataclass(frozen=True)
class _Point:
    spec: ArchSpec
    m: Measurement
    bpb: float


def _families_at_rung(env: TrialEnv, rung: int, n: int, spec: ArchSpec, m: Measurement,
                      bpb: float) -> dict[int, list[list[float]]]:
    """The trainings at ``rung``, trial ``n`` (``spec``, measured ``m``, ``bpb`` there) among
    them, each as the objective points of its weights at every bitwidth of the space: the
    trials at that rung on the same weights (the one that trained them, twins that scored them
    at another bitwidth), and for each bitwidth none of them scored, the point ``predicted_twin``
    gives (the BPB taken as the family's, as ``_promising_bitwidths`` does; left out where it
    breaks a budget). Keyed by the family's first trial number (``n`` for its own)."""
    rows = [r for r in env.store.rung_results(study=env.cfg.study, rung=rung)
            if r.state != "failed" and r.number != n]
    ids = {r.measurement_id for r in rows if r.measurement_id is not None}
    measured = {row.id: row for row in env.store.measurements(ids=ids) if row.ok}
    specs: dict[str, ArchSpec] = {}
    members: dict[str, dict[int, _Point]] = {weights_id(spec): {n: _Point(spec, m, bpb)}}
    for r in rows:
        row = measured.get(r.measurement_id)  # type: ignore[arg-type]
        if row is None:
            continue
        if row.arch_id not in specs:
            specs[row.arch_id] = env.store.get_architecture(arch_id=row.arch_id).spec
        s = specs[row.arch_id]
        members.setdefault(weights_id(s), {})[r.number] = _Point(s, row.to_measurement(), r.val_bpb)
    model = _twin_model(env) if _space_bitwidths(env, spec) else None
    families: dict[int, list[list[float]]] = {}
    for family in members.values():
        key = n if n in family else min(family)
        points = [_objective_point(env, p.spec, p.m, p.bpb) for p in family.values()]
        if model is not None:
            first = family[key]
            scored = {p.spec.bitwidth for p in family.values()}
            for b in _space_bitwidths(env, first.spec):
                if b in scored:
                    continue
                try:
                    point = _predicted_point(env, first.spec, b, first.m, first.bpb, model)
                except Exception as e:  # ranked on its scored points alone: a failed guess must not fail the trial
                    env.resources.note_once(f"the rungs rank trainings on their scored bitwidths only: {bug_reason(e)}")
                    model = None
                    break
                if point is not None:
                    points.append(point)
        families[key] = points
    return families


def _objective_point(env: TrialEnv, spec: ArchSpec, m: Measurement, bpb: float) -> list[float]:
    values = objective_values(spec, m, bpb)
    return [float("inf") if values.get(o) is None else float(values[o]) for o in env.cfg.objectives]


def _peers_at_rung(env: TrialEnv, rung: int, exclude: int) -> dict[int, list[float]]:
    """Every trial of the study that reached ``rung`` but ``exclude`` (failed ones left out: they
    were killed or broke, and their retries stand for them): its objective values there, BPB at
    that rung, all minimized. Without rungs, every complete feasible trial with its objectives."""
    if env.rungs is None or env.rungs.count == 1:
        return {t.number: [float(t.objectives[o]) for o in env.cfg.objectives]
                for t in env.store.trials(study=env.cfg.study, states=["complete"])
                if t.number != exclude and t.feasible and t.objectives
                and all(t.objectives.get(o) is not None for o in env.cfg.objectives)}
    rows = [r for r in env.store.rung_results(study=env.cfg.study, rung=rung)
            if r.state != "failed" and r.number != exclude]
    ids = {r.measurement_id for r in rows if r.measurement_id is not None}
    figures = {row.id: row.to_measurement().figures() | {"arch_id": row.arch_id}
               for row in env.store.measurements(ids=ids) if row.ok}
    peers: dict[int, list[float]] = {}
    for r in rows:
        f = figures.get(r.measurement_id)
        if f is not None:
            peers[r.number] = [r.val_bpb if o == "val_bpb" else _figure(env, f, o) for o in env.cfg.objectives]
    return peers


def _figure(env: TrialEnv, figures: dict, objective: str) -> float:
    if objective == "params":
        return float(env.store.get_architecture(arch_id=figures["arch_id"]).params)
    value = figures.get(objective)
    return float("inf") if value is None else float(value)


def _checkpoint_path(cfg: SearchConfig, arch_id: str) -> Path:
    """Where a trial of ``arch_id`` keeps its training between rungs: by architecture, not trial
    number, so that the retry of a killed trial (same parameters, a new number) finds it."""
    return Path(cfg.artifacts).resolve() / cfg.study / "checkpoints" / f"{arch_id or 'none'}.pt"


def _drop_checkpoint(ckpt: Path) -> None:
    for f in (ckpt, ckpt.with_suffix(".json")):
        f.unlink(missing_ok=True)


def _still_valid(m: Measurement, profile: HardwareProfile) -> bool:
    """Whether a stored figure still says what a new one would: a measurement always; an estimate
    only if the device's latency model is the one it came from (its points may have changed since;
    an ``estimated:roofline`` row, from the constant factor, never)."""
    from nas.stages.estimate import device_model

    if not is_estimated(m.label):
        return True
    return m.provenance.get("model_digest") == device_model(profile).digest()


def _here(env: TrialEnv) -> str | None:
    """The fingerprint a figure for this profile would be taken under now: this machine with the
    profile's runtime (local), or with the host's (an estimate scales a host measurement). None
    on a device node of the cluster, which the driver cannot fingerprint: there the label
    (``measured:<node>``) is what a reused figure must match."""
    from nas.search.pipeline import HOST_PROFILE
    from nas.stages.measure import device_fingerprint

    if env.ray_measure is not None:
        return None
    where = env.profile.measurement.where
    return device_fingerprint(env.profile if where == "local" else load_profile(HOST_PROFILE))


def _train(spec: ArchSpec, tc: TokenizedCorpus, env: TrialEnv, n: int, *, until: int | None = None,
           resume: TrainState | None = None) -> tuple[Decoder, TrainResult, TrainState]:
    from nas.stages.train import train_until

    def progress(point: object, total: int) -> None:
        env.events.train_progress(n, point.step, total, point.loss)  # type: ignore[attr-defined]

    return train_until(spec, tc, env.train, until_tokens=until, resume=resume, device=env.cfg.torch_device,
                       progress=progress, should_stop=env.stop.is_set)


def _trial_dir(cfg: SearchConfig, n: int) -> Path:
    d = Path(cfg.artifacts).resolve() / cfg.study / f"trial-{n:05d}"
    d.mkdir(parents=True, exist_ok=True)
    return d


def _score(spec: ArchSpec, model: Decoder, tc: TokenizedCorpus, trial_dir: Path, template: Path | None,
           env: TrialEnv) -> tuple[BpbResult, str]:
    threads = env.resources.host.profile.runtime.threads if env.resources.host else 2
    with deadline(stage_deadline_s("score", spec, env.cfg.stage_deadline_factor), "export and BPB scoring"):
        return score_trained(spec, model, tc, trial_dir, env.train, template=template, threads=threads,
                             progress=_step(env, "score"))


def _step(env: TrialEnv, stage: str) -> Callable[[str], None]:
    """What a stage's steps report (export, quantize: seconds each), shown beside the stage."""
    return lambda step: env.events.stage_step(stage, step)


def score_trained(spec: ArchSpec, model: Decoder, tc: TokenizedCorpus, out_dir: Path, train: TrainConfig, *,
                  template: Path | None = None, threads: int = 2,
                  progress: Callable[[str], None] | None = None) -> tuple[BpbResult, str]:
    """The score stage: save the trained weights with their spec (``out_dir/model.pt``), export the
    deployed graph at the spec's bitwidth (``out_dir/onnx``: the deployment graph built from these
    weights; for a spec it cannot express, ``template``'s plain graph with these weights written
    in, else a new trace) and its BPB in ONNX Runtime. Returns the BPB and how the file was made.
    `nas trial` scores with this too, so its BPB is the search's."""
    import torch

    from nas.stages.export import export_spec, load_exported
    from nas.stages.score import score_bpb_onnx

    model = model.to("cpu")
    # The trained weights travel with the spec, so `nas export` and `nas train` can rebuild it.
    torch.save({"spec": spec.to_dict(), "state_dict": model.state_dict(), "train_config": train.model_dump()},
               out_dir / "model.pt")
    like = load_exported(template) if template is not None else None  # measured in this trial
    exported = export_spec(spec, out_dir / "onnx", model=model, like=like, progress=progress, graph="deploy")
    if progress is not None:
        progress("BPB in ONNX Runtime")
    return score_bpb_onnx(exported, tc, train.eval_tokens, threads=threads), exported.made_by


# --- the reports ------------------------------------------------------------------------------------
def _complete(trial: optuna.Trial, env: TrialEnv, record: TrialRecord, spec: ArchSpec, m: Measurement,
              measurement_id: int, constraints: dict[str, float], trained: Trained, trial_dir: Path) -> list[float]:
    cfg, n = env.cfg, trial.number
    result, bpb, made_by = trained.result, trained.bpb, trained.made_by
    objectives = objective_values(spec, m, bpb.bpb)
    for key, value in constraints.items():
        trial.set_constraint(key, value)
    trial.set_user_attr("val_bpb", bpb.bpb)
    env.store.finish_trial(
        study=cfg.study, number=n, objectives=objectives, val_bpb=bpb.bpb, constraints=constraints,
        train={"steps": result.steps, "tokens": result.tokens, "seconds": round(result.seconds, 2),
               "tokens_per_s": round(result.tokens_per_s, 1), "final_loss": result.final_loss,
               "stopped_by": result.stopped_by, "val_tokens": bpb.tokens, "val_bytes": bpb.bytes,
               # the scored file: the deployment graph built from the trained weights ("built"),
               # or, for a spec it cannot express, the plain measured graph with the trained
               # weights ("reweighted") or a new trace ("traced": measurement reused or refused)
               "score_graph": made_by,
               # the rung whose BPB this is (0-based; the last is the whole budget) and every rung's budget
               "rung": trained.rung, "rung_tokens": trained.rung_tokens,
               # the trial whose trained weights were scored here (this one trained nothing)
               **({WEIGHTS_OF: trained.weights_of} if trained.weights_of is not None else {}),
               # where the trial's time went, per stage (measure includes export and
               # quantization; score includes the trained model's export)
               "stage_seconds": {k: round(v, 3) for k, v in record.seconds.items()}},
        curve=[[p.step, p.tokens, p.loss, p.lr, round(p.seconds, 3)] for p in result.curve],
        baselines=env.resources.baselines(spec.vocab_size), measurement_id=measurement_id,
        artifact_dir=str(trial_dir),
    )  # fmt: skip
    front = env.store.refresh_pareto(study=cfg.study)
    record.state = "complete"
    at = f" after {result.tokens:,} tokens (rung {trained.rung + 1})" if len(trained.rung_tokens) > 1 else ""
    if trained.weights_of is not None:
        at += f" on trial {trained.weights_of}'s weights"
    baselines = env.resources.baselines(spec.vocab_size)
    flag = "" if beats_bigram(bpb.bpb, baselines) else f" [not below its bigram baseline {baselines['bigram_bpb']:.3f}]"
    env.events.trial_finished(n, "complete", f"BPB {bpb.bpb:.3f}{at}{flag}, decode {m.decode_ms:.3f} ms ({m.label})")
    on_front = any(t.number == n for t in front)
    if other_bitwidths(cfg) and trained.weights_of is None and "bitwidth" in trial.params:
        try:
            others = None if on_front else _promising_bitwidths(env, spec, m, n, trained.rung, bpb.bpb)
        except Exception as e:  # the trial is complete and stored: a failed guess must not undo it
            env.resources.note_once(f"the other bitwidths of trials off the front are not predicted: {bug_reason(e)}")
            others = []
        if on_front or others:
            _queue_other_bitwidths(trial, env, spec, others)
    if front_neighbours(cfg) and on_front and trained.rung >= min(1, len(trained.rung_tokens) - 1):
        _queue_cheaper_neighbours(trial, env)
    return [objectives[o] for o in cfg.objectives]


NEIGHBOUR_AXES = ("d_model", "n_layers")
"""The dimensions along which a front trial's cheaper neighbours are taken, one step down each
(``_queue_cheaper_neighbours``): width and depth, which set a decoder's training cost and its
latency alike."""


def one_step_down(dim: Dimension, value: Any) -> Any | None:
    """The value of a searched dimension one step below ``value`` (the next smaller of numeric
    choices, or ``value - step`` within the range), or None at the bottom or where the
    dimension's values have no order."""
    if dim.kind == "choices":
        numbers = [c for c in dim.choices if isinstance(c, int | float) and not isinstance(c, bool)]
        if len(numbers) != len(dim.choices) or value not in numbers:
            return None  # choices without an order (kinds, flags)
        smaller = [c for c in numbers if c < value]
        return max(smaller) if smaller else None
    if dim.kind == "int":
        down = value - int(dim.step or 1)
        return down if down >= dim.low else None
    return None


def _queue_cheaper_neighbours(trial: optuna.Trial, env: TrialEnv) -> None:
    """Queue the trial's parameters one step down in width and, apart, one step down in depth
    (``SearchConfig.front_neighbours``), each a trial that trains through the rungs. An
    architecture queued or tried already at any bitwidth is not queued again (its weights, or
    the trial training them, stand for it); a neighbour that breaks a rule of the space is an
    invalid draw like any other (not counted)."""
    dims = {d.name: d for d in env.space.dimensions}
    tried = [_without_bitwidth(t.system_attrs.get("fixed_params", t.params))
             for t in trial.study.get_trials(deepcopy=False)]
    queued = []
    for axis in NEIGHBOUR_AXES:
        if axis not in dims or axis not in trial.params:
            continue
        down = one_step_down(dims[axis], trial.params[axis])
        if down is None:
            continue
        params = trial.params | {axis: down}
        if _without_bitwidth(params) in tried:
            continue
        trial.study.enqueue_trial(params)
        queued.append(f"{axis} {down}")
    if queued:
        env.events.message(f"trial {trial.number} is on the front: its architecture at {' and, apart, '.join(queued)} "
                           f"is queued (cheaper to train and to run; trained through the rungs)")


def _without_bitwidth(params: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in params.items() if k != "bitwidth"}


def _infeasible(trial: optuna.Trial, env: TrialEnv, record: TrialRecord, spec: ArchSpec, stage: str, reason: str,
                constraints: dict[str, float], measurement_id: int | None = None) -> NoReturn:
    """Record the trial as infeasible and end it as pruned with its constraint values (> 0): the
    sampler learns where the budgets bind, and no objective value is made up for it."""
    env.store.mark_infeasible(study=env.cfg.study, number=trial.number, stage=stage, reason=reason,
                              constraints=constraints, arch_id=spec.arch_id, measurement_id=measurement_id)
    # Optuna sees every budget on every trial; one the check could not judge counts as met
    # here (the trial is infeasible by another already). The store keeps only judged ones.
    for key in env.profile.budgets.limits():
        trial.set_constraint(key, constraints.get(key, 0.0))
    trial.set_user_attr("infeasible", f"{stage}: {reason}")
    record.state, record.reason = "infeasible", f"{stage}: {reason}"
    env.events.trial_finished(trial.number, "infeasible", f"{stage}: {reason}")
    raise optuna.TrialPruned(f"infeasible at {stage}: {reason}")


def attempted_label(profile: HardwareProfile, on_device_node: bool) -> str:
    """The label of a figure this profile's measurement was trying to take: a failure is filed
    under what was attempted, never relabelled as a measurement of something else."""
    if profile.measurement.where == "local":
        return MEASURED_LOCAL
    if on_device_node:
        return measured_on(str(profile.measurement.ray_resource))
    return ESTIMATED_MODEL  # the target's latency model, beside the host's measurement of the graph


def objective_values(spec: ArchSpec, m: Measurement | None, bpb: float | None) -> dict[str, float]:
    """Every objective a trial has a figure for, by name (``OBJECTIVES``)."""
    out: dict[str, float] = {"params": float(spec.params())}
    if bpb is not None:
        out["val_bpb"] = bpb
    if m is not None:
        out.update(m.figures())
    return out


def _analytic_constraints(spec: ArchSpec, profile: HardwareProfile) -> dict[str, float]:
    """Lower-bound constraint values for the budgets the analytic check can judge; the budgets
    it cannot (latency) are left out rather than guessed."""
    return profile.budgets.constraints({"model_mb": min_model_bytes(spec) / MIB,
                                        "peak_memory_mb": min_peak_memory_bytes(spec, profile.workload) / MIB})


INTERNAL = "internal error"
"""How the reason of a failure that is a bug (not the architecture's, not the user's) begins."""


def bug_reason(e: Exception) -> str:
    frames = traceback.extract_tb(e.__traceback__)[-2:]
    where = "; ".join(f"{Path(f.filename).name}:{f.lineno} in {f.name}" for f in frames)
    return f"{INTERNAL} {type(e).__name__}: {e} ({where})"
