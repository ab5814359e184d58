"""The search: a multi-objective Optuna study over a space, on a device profile, cheapest first.

A trial (DESIGN.md, "How a trial flows"):

1. ``sample``   the sampler proposes parameters; the space turns them into an ArchSpec (a draw
                that breaks a rule ends here as infeasible, at no cost);
2. ``budget``   the analytic check against the profile's budgets (lower bounds on model size and
                memory): over budget ends the trial as infeasible, before any export;
3. ``measure``  export with fresh weights, quantize, measure or estimate on the profile (reused
                from the store by arch, profile, bitwidth and workload); over a measured budget
                ends the trial as infeasible, before any training; the fp32 graph is kept for
                step 5;
4. ``train``    brief training with the study's budget;
5. ``score``    the trained model's export (step 3's graph with the trained weights written in,
                ``nas.stages.export.reweight``; traced again when there is none), quantize, BPB of the
                quantized model in ONNX Runtime;
6. report objectives and constraints to Optuna, write the trial to the store, refresh the front.

A failure at any stage marks the trial failed with the stage and the reason; the search goes on.
Infeasible trials are told to Optuna as complete with their constraint values (> 0) so that the
sampler learns where the budgets bind; their objective values are placeholders (BPB 8.0, the
byte-uniform guess, and the worst figures seen) that the store never reports as results.

Crash recovery: Optuna's heartbeat marks a trial whose worker stopped beating as failed and
queues its parameters again; a trial left running by a dead process on this host is caught at
once on start-up (its pid is gone) and queued again the same way.
"""

from __future__ import annotations

import contextlib
import fcntl
import math
import os
import socket
import subprocess
import threading
import time
import traceback
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import optuna
from optuna.exceptions import ExperimentalWarning
from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback
from optuna.trial import TrialState
from sqlalchemy.engine import make_url
from sqlalchemy.exc import SQLAlchemyError

from nas.spec.arch import ArchSpec
from nas.spec.errors import NasError
from nas.spec.profile import (
    HardwareProfile,
    analytic_budget_check,
    load_profile,
    min_model_bytes,
    min_peak_memory_bytes,
)
from nas.spec.results import LatencyStats, Measurement
from nas.spec.settings import TrainConfig
from nas.spec.space import InvalidSample, SearchSpace, load_space
from nas.store import Store, StoreError, harden_foreign_sqlite_engine

# group=True and the retry callback are marked experimental; both are what we want here.
warnings.filterwarnings("ignore", category=ExperimentalWarning)

MIB = 2**20
WORKER = f"{socket.gethostname()}:{os.getpid()}"

# name -> (direction, what it is). Every objective is minimized: lower is better for each.
OBJECTIVES: dict[str, tuple[str, str]] = {
    "val_bpb": ("minimize", "validation bits per byte of the quantized model, in ONNX Runtime"),
    "decode_ms": ("minimize", "decode latency per token at the profile's context (median)"),
    "prefill_ms": ("minimize", "prefill latency of the profile's prompt (median)"),
    "peak_memory_mb": ("minimize", "peak resident memory of the inference process, MiB"),
    "model_mb": ("minimize", "size of the deployed model files, MiB"),
    "params": ("minimize", "unique parameters"),
}
DEFAULT_OBJECTIVES = ("val_bpb", "decode_ms")
SAMPLERS = ("tpe", "nsga2", "gp", "random")
STAGES = ("sample", "budget", "measure", "train", "score")


class TrialFailed(Exception):
    """Raised out of the objective after the failure was recorded, so Optuna marks it FAIL."""


@dataclass(frozen=True)
class SearchConfig:
    study: str
    space: str
    device: str
    db_url: str
    objectives: tuple[str, ...] = DEFAULT_OBJECTIVES
    sampler: str = "tpe"
    seed: int = 0
    train: TrainConfig | None = None
    """The study's brief training; None takes the space's default."""
    data: str | None = None
    max_bytes: int | None = None
    artifacts: Path = Path("nas_artifacts")
    require_measured: bool = False
    torch_device: str = "cpu"
    heartbeat_s: int = 10
    grace_s: int = 60
    max_retry: int = 1
    """How often a trial whose worker died is tried again."""


class Events(Protocol):
    """What the search reports as it goes (the CLI draws a progress display from it)."""

    def message(self, text: str) -> None: ...
    def trial_started(self, number: int) -> None: ...
    def stage(self, number: int, stage: str, detail: str) -> None: ...
    def train_progress(self, number: int, step: int, total: int, loss: float) -> None: ...
    def trial_finished(self, number: int, state: str, summary: str) -> None: ...


class SilentEvents:
    def message(self, text: str) -> None: ...
    def trial_started(self, number: int) -> None: ...
    def stage(self, number: int, stage: str, detail: str) -> None: ...
    def train_progress(self, number: int, step: int, total: int, loss: float) -> None: ...
    def trial_finished(self, number: int, state: str, summary: str) -> None: ...


def code_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        v = version("nas")
    except PackageNotFoundError:
        v = "unknown"
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        rev = ""
    return f"{v}+{rev}" if rev else v


def make_sampler(name: str, seed: int, n_trials_hint: int | None) -> optuna.samplers.BaseSampler:
    """The sampler for a mix of categorical and integer dimensions with conditions.

    Default ``tpe``: multivariate TPE with ``group`` models the dimensions jointly and handles the
    conditional ones (kv heads only for GQA, latent rank only for MLA) by grouping; it learns
    from constraint values; and it starts exploiting after a few random trials, where NSGA-II
    spends its first generation (a population) on random draws -- most of a short search.
    """
    if name == "tpe":
        startup = max(5, min(10, (n_trials_hint or 30) // 4))
        return optuna.samplers.TPESampler(seed=seed, multivariate=True, group=True, n_startup_trials=startup,
                                          constant_liar=True)
    if name == "nsga2":
        pop = max(8, min(50, (n_trials_hint or 100) // 4))
        return optuna.samplers.NSGAIISampler(seed=seed, population_size=pop)
    if name == "gp":
        return optuna.samplers.GPSampler(seed=seed)
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    raise NasError(f"unknown sampler {name!r}; choose one of {', '.join(SAMPLERS)}")


def _optuna_storage(cfg: SearchConfig) -> RDBStorage:
    kwargs: dict[str, Any] = {}
    if cfg.db_url.startswith("sqlite"):
        kwargs["connect_args"] = {"timeout": 60}
    else:
        kwargs["pool_pre_ping"] = True
    # Two workers opening a fresh database at once race in Optuna's table creation ("table
    # alembic_version already exists", "UNIQUE constraint failed: alembic_version"). On one
    # SQLite file a lock file beside it serializes them; elsewhere the loser finds the winner's
    # tables on the next try.
    with _init_lock(cfg.db_url):
        for attempt in range(5):
            try:
                storage = RDBStorage(
                    cfg.db_url, engine_kwargs=dict(kwargs), heartbeat_interval=cfg.heartbeat_s,
                    grace_period=cfg.grace_s,
                    heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry=cfg.max_retry),
                )
                break
            except SQLAlchemyError as e:
                race = ("already exists", "duplicate", "unique", "locked")
                if attempt == 4 or not any(s in str(e).lower() for s in race):
                    raise NasError(f"cannot open Optuna's storage at {cfg.db_url}: {str(e).splitlines()[0]}") from None
                time.sleep(0.2 * (attempt + 1))
    harden_foreign_sqlite_engine(storage.engine)
    return storage


@contextlib.contextmanager
def _init_lock(url: str) -> Iterator[None]:
    database = make_url(url).database if url.startswith("sqlite") else None
    if not database or database == ":memory:":
        yield
        return
    with open(f"{database}.init-lock", "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


@dataclass
class _Context:
    cfg: SearchConfig
    space: SearchSpace
    profile: HardwareProfile
    train: TrainConfig
    store: Store
    study: optuna.Study
    events: Events
    host: HardwareProfile | None = None
    cal: Any = None
    corpus: Any = None
    tokenized: dict[int, Any] = field(default_factory=dict)
    baselines: dict[int, dict[str, float]] = field(default_factory=dict)
    worst: dict[str, float] = field(default_factory=dict)
    """The worst value seen per objective, for infeasible trials' placeholders."""


class Search:
    """One worker of a study. Several may run the same study on one database."""

    def __init__(self, cfg: SearchConfig, events: Events | None = None, stop: threading.Event | None = None) -> None:
        for name in cfg.objectives:
            if name not in OBJECTIVES:
                raise NasError(f"unknown objective {name!r}; choose from {', '.join(OBJECTIVES)}")
        if len(set(cfg.objectives)) != len(cfg.objectives) or not cfg.objectives:
            raise NasError(f"objectives must be distinct and at least one: {', '.join(cfg.objectives)}")
        if cfg.sampler not in SAMPLERS:
            raise NasError(f"unknown sampler {cfg.sampler!r}; choose one of {', '.join(SAMPLERS)}")
        self.cfg = cfg
        self.events = events or SilentEvents()
        # Set from a signal handler or another thread: the run stops at the next safe point (a
        # stage boundary, a training step, between trials) as if interrupted there.
        self.stop = stop or threading.Event()
        # Set by the Ray executor (nas.search.ray_executor) where a node advertises the profile's resource:
        # the measure stage then runs on that node, labelled with it.
        self.ray_measure: Any = None
        # The folder of the running trial's measure-stage export, kept for its score stage.
        self._template: Path | None = None
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        space = load_space(cfg.space)
        profile = load_profile(cfg.device)
        train = cfg.train or space.training
        store = Store(cfg.db_url)
        self._ctx = _Context(cfg=cfg, space=space, profile=profile, train=train, store=store,
                             study=None, events=self.events)  # type: ignore[arg-type]
        self._open_study()

    # --- study metadata ------------------------------------------------------------------------
    def _metadata(self) -> dict[str, Any]:
        from nas.stages.data import load_corpus

        c = self._ctx
        if c.corpus is None:
            c.corpus = load_corpus(self.cfg.data, max_bytes=self.cfg.max_bytes)
        return {"space": c.space.name, "profile": c.profile.name, "corpus_fingerprint": c.corpus.fingerprint,
                "train_config": c.train.model_dump(), "objectives": list(self.cfg.objectives), "seed": self.cfg.seed}

    def _open_study(self) -> None:
        """Create the study, or join it with the same settings (resume, or a second worker)."""
        c, cfg = self._ctx, self.cfg
        meta = self._metadata()
        existing = c.store.find_study(name=cfg.study)
        if existing is not None:
            self._check_same(existing, meta)
        directions = [OBJECTIVES[o][0] for o in cfg.objectives]
        c.study = optuna.create_study(study_name=cfg.study, storage=_optuna_storage(cfg), directions=directions,
                                      sampler=make_sampler(cfg.sampler, cfg.seed, None), load_if_exists=True)
        if existing is not None:
            return
        for key, value in meta.items():
            c.study.set_user_attr(key, value)  # shown by optuna-dashboard
        try:
            c.store.create_study(
                name=cfg.study, space=meta["space"], profile=meta["profile"],
                objectives=[(o, OBJECTIVES[o][0]) for o in cfg.objectives], optuna_study_id=c.study._study_id,
                corpus_fingerprint=meta["corpus_fingerprint"], train_config=meta["train_config"], seed=cfg.seed,
                code_version=code_version(), extra={"sampler": cfg.sampler, "data": cfg.data or "stdlib",
                                                    "max_bytes": cfg.max_bytes},
            )
        except StoreError:
            # Another worker created it a moment ago: join it if it has our settings.
            existing = c.store.find_study(name=cfg.study)
            if existing is None:
                raise
            self._check_same(existing, meta)

    def _check_same(self, existing: Any, meta: dict[str, Any]) -> None:
        mine = {"space": existing.space, "profile": existing.profile, "corpus_fingerprint": existing.corpus_fingerprint,
                "train_config": existing.train_config, "objectives": [o.name for o in existing.objectives],
                "seed": existing.seed}
        for key, value in mine.items():
            if value != meta[key]:
                raise NasError(
                    f"study {self.cfg.study!r} was created with {key} = {value!r}, this run has {meta[key]!r}: "
                    f"resume it with the same settings or choose another --study name"
                )

    # --- recovery -------------------------------------------------------------------------------
    def recover(self) -> list[int]:
        """Fail and queue again the trials that a dead process on this host left running, and
        bring the store in line with trials Optuna's heartbeat already failed. Returns the numbers."""
        c = self._ctx
        host = socket.gethostname()
        by_number = {t.number: t for t in c.study.get_trials(deepcopy=False)}
        recovered = []
        retry = RetryHeartbeatStaleTrialCallback(max_retry=self.cfg.max_retry)
        for row in c.store.trials(study=self.cfg.study, states=["running"]):
            ot = by_number.get(row.number)
            dead_here = bool(row.worker) and row.worker.rsplit(":", 1)[0] == host and not _alive(row.worker)
            if ot is not None and ot.state == TrialState.RUNNING and dead_here:
                c.study._storage.set_trial_state_values(ot._trial_id, TrialState.FAIL)
                retry(c.study, c.study._storage.get_trial(ot._trial_id))
                reason = f"its worker {row.worker} died mid-trial; parameters queued again"
            elif ot is not None and ot.state == TrialState.FAIL:
                reason = "its worker stopped sending heartbeats; parameters queued again"
            else:
                continue
            c.store.fail_trial(study=self.cfg.study, number=row.number, stage="killed", reason=reason)
            recovered.append(row.number)
        return recovered

    # --- running ----------------------------------------------------------------------------------
    def run(self, n_trials: int | None = None, timeout_s: float | None = None) -> dict[str, int]:
        """Run trials until ``n_trials`` have got past sampling, or ``timeout_s`` passed (the
        running trial finishes first). Ctrl-C stops after recording the running trial as failed
        (its parameters queued again for a resume)."""
        if n_trials is None and timeout_s is None:
            raise NasError("give a number of trials or a time budget (or both)")
        c = self._ctx
        c.study.sampler = make_sampler(self.cfg.sampler, self.cfg.seed + len(c.study.trials), n_trials)
        for number in self.recover():
            self.events.message(f"trial {number} was left running by a dead worker: failed, queued again")
        counts = {"complete": 0, "infeasible": 0, "failed": 0, "invalid": 0}
        start = time.monotonic()
        done = 0
        while (n_trials is None or done < n_trials) and (timeout_s is None or time.monotonic() - start < timeout_s):
            self._check_stop()
            state = self._one_trial()
            counts[state] += 1
            if state != "invalid":
                done += 1
            elif counts["invalid"] > 1000 + 10 * done:
                raise NasError(f"space {c.space.name}: the sampler keeps drawing invalid architectures; "
                               "loosen its rules")
        return counts

    def run_one(self, seed: int, n_trials_hint: int | None = None) -> tuple[str, int | None, int]:
        """One counted trial, as ``run`` runs each (draws that break the space's rules are drawn
        again): the unit of work of a Ray Tune trial (nas.search.ray_executor). ``seed`` seeds this
        trial's sampler, so that workers starting at once do not draw alike. Returns the state,
        the trial's number and how many invalid draws came before it."""
        c = self._ctx
        invalid = 0
        while True:
            c.study.sampler = make_sampler(self.cfg.sampler, seed + invalid, n_trials_hint)
            self._check_stop()
            state = self._one_trial()
            if state != "invalid":
                return state, self._last_number, invalid
            invalid += 1
            if invalid > 1000:
                raise NasError(f"space {c.space.name}: the sampler keeps drawing invalid architectures; "
                               "loosen its rules")

    def _one_trial(self) -> str:
        c = self._ctx
        outcome: dict[str, str] = {}
        self._last_number: int | None = None

        def objective(trial: optuna.Trial) -> list[float]:
            return self._objective(trial, outcome)

        try:
            c.study.optimize(objective, n_trials=1, catch=(TrialFailed,), gc_after_trial=False)
        except optuna.TrialPruned:  # pragma: no cover - optimize handles it
            pass
        except KeyboardInterrupt:
            self._interrupted(outcome)
            raise
        finally:
            self._last_number = int(outcome["number"]) if "number" in outcome else None
        return outcome.get("state", "failed")

    def _check_stop(self) -> None:
        if self.stop.is_set():
            raise KeyboardInterrupt

    def _interrupted(self, outcome: dict[str, str]) -> None:
        c = self._ctx
        number = outcome.get("number")
        if number is None:
            return
        n = int(number)
        row = c.store.find_trial(study=self.cfg.study, number=n)
        if row is not None and row.state == "running":
            c.store.fail_trial(study=self.cfg.study, number=n, stage=outcome.get("stage", "?"),
                               reason="interrupted (Ctrl-C or SIGTERM); parameters queued again")
            ot = c.study.trials[n]
            RetryHeartbeatStaleTrialCallback(max_retry=self.cfg.max_retry)(c.study, ot)

    # --- one trial --------------------------------------------------------------------------------
    def _objective(self, trial: optuna.Trial, outcome: dict[str, str]) -> list[float]:
        c, cfg = self._ctx, self.cfg
        n = trial.number
        outcome["number"] = str(n)
        c.store.start_trial(study=cfg.study, number=n, optuna_trial_id=trial._trial_id, worker=WORKER)
        self.events.trial_started(n)

        clock = {"stage": "sample", "t": time.perf_counter()}
        seconds: dict[str, float] = {}

        def stage(name: str, detail: str = "") -> None:
            now = time.perf_counter()
            seconds[clock["stage"]] = seconds.get(clock["stage"], 0.0) + now - clock["t"]
            clock.update(stage=name, t=now)
            outcome["stage"] = name
            if name not in ("score", "report"):  # once trained, finishing the trial costs seconds
                self._check_stop()
            self.events.stage(n, name, detail)

        try:
            stage("sample")
            try:
                spec = c.space.suggest(trial)
            except InvalidSample as e:
                c.store.mark_infeasible(study=cfg.study, number=n, stage="sample", reason=str(e))
                outcome["state"] = "invalid"
                self.events.trial_finished(n, "invalid", str(e))
                raise optuna.TrialPruned(str(e)) from None
            c.store.upsert_architecture(spec=spec)
            c.store.update_trial(study=cfg.study, number=n, arch_id=spec.arch_id)
            trial.set_user_attr("arch_id", spec.arch_id)
            trial.set_user_attr("summary", spec.summary())
            trial.set_user_attr("params", spec.params())

            stage("budget", spec.summary())
            reasons = analytic_budget_check(spec, c.profile)
            if reasons:
                return self._infeasible(trial, spec, "budget", "; ".join(reasons), _analytic_constraints(spec, c),
                                        None, outcome)

            stage("measure", "export, quantize, measure")
            m, measurement_id = self._measure(spec)
            constraints = _budget_constraints(m, c.profile)
            trial.set_user_attr("label", m.label)
            over = [k for k, v in constraints.items() if v > 0]
            if over:
                why = ", ".join(f"{k} over by {constraints[k]:.3g}" for k in over)
                return self._infeasible(trial, spec, "measure", f"{why} ({m.label})", constraints, m, outcome,
                                        measurement_id)

            stage("train", f"{c.train.tokens:,} tokens")
            tc = self._tokenized(spec.vocab_size)
            model, result = self._train(spec, tc, n)

            stage("score", "export, quantize, BPB in ONNX Runtime")
            trial_dir = self._trial_dir(n)
            bpb, made_by = self._score(spec, model, tc, trial_dir)
            stage("report")
            objectives = _objective_values(spec, m, bpb.bpb)
            self._note_worst(objectives)
            for key, value in constraints.items():
                trial.set_constraint(key, value)
            trial.set_user_attr("val_bpb", bpb.bpb)
            c.store.finish_trial(
                study=cfg.study, number=n, objectives=objectives, val_bpb=bpb.bpb, constraints=constraints,
                train={"steps": result.steps, "tokens": result.tokens, "seconds": round(result.seconds, 2),
                       "tokens_per_s": round(result.tokens_per_s, 1), "final_loss": result.final_loss,
                       "stopped_by": result.stopped_by, "val_tokens": bpb.tokens, "val_bytes": bpb.bytes,
                       # the scored file: the measured graph with the trained weights ("reweighted")
                       # or a new trace ("traced": measurement reused from the store, or refused)
                       "score_graph": made_by,
                       # where the trial's time went, per stage (measure includes export and
                       # quantization; score includes the trained model's export)
                       "stage_seconds": {k: round(v, 3) for k, v in seconds.items()}},
                curve=[[p.step, p.tokens, p.loss, p.lr, round(p.seconds, 3)] for p in result.curve],
                baselines=self._baselines(spec.vocab_size, tc), measurement_id=measurement_id,
                artifact_dir=str(trial_dir),
            )
            c.store.refresh_pareto(study=cfg.study)
            outcome["state"] = "complete"
            self.events.trial_finished(n, "complete", f"BPB {bpb.bpb:.3f}, decode {m.decode_ms:.3f} ms ({m.label})")
            return [objectives[o] for o in cfg.objectives]
        except (optuna.TrialPruned, KeyboardInterrupt):
            raise
        except Exception as e:
            where = outcome.get("stage", "?")
            reason = str(e) if isinstance(e, NasError) else _bug_reason(e)
            c.store.fail_trial(study=cfg.study, number=n, stage=where, reason=reason)
            trial.set_user_attr("failure", f"{where}: {reason}")
            outcome["state"] = "failed"
            self.events.trial_finished(n, "failed", f"{where}: {reason}")
            raise TrialFailed(reason) from e
        finally:
            self._drop_template()

    def _infeasible(self, trial: optuna.Trial, spec: ArchSpec, stage: str, reason: str,
                    constraints: dict[str, float], m: Measurement | None, outcome: dict[str, str],
                    measurement_id: int | None = None) -> list[float]:
        """Record the trial as infeasible and tell Optuna its constraint values (> 0) with
        placeholder objectives, so the sampler learns where the budgets bind."""
        c = self._ctx
        c.store.mark_infeasible(study=self.cfg.study, number=trial.number, stage=stage, reason=reason,
                                constraints=constraints, arch_id=spec.arch_id, measurement_id=measurement_id)
        # Optuna sees every budget on every trial; one the check could not judge counts as met
        # here (the trial is infeasible by another already). The store keeps only judged ones.
        for key in _budget_keys(c.profile):
            trial.set_constraint(key, constraints.get(key, 0.0))
        trial.set_user_attr("infeasible", f"{stage}: {reason}")
        trial.set_user_attr("placeholder_objectives", True)
        outcome["state"] = "infeasible"
        self.events.trial_finished(trial.number, "infeasible", f"{stage}: {reason}")
        known = _objective_values(spec, m, None)
        values = []
        for o in self.cfg.objectives:
            v = known.get(o)
            if v is None or not math.isfinite(v):
                v = 8.0 if o == "val_bpb" else c.worst.get(o, 1e6)
            values.append(max(v, c.worst.get(o, v)))
        return values

    def _note_worst(self, objectives: dict[str, float]) -> None:
        for k, v in objectives.items():
            if math.isfinite(v):
                self._ctx.worst[k] = max(v, self._ctx.worst.get(k, v))

    # --- stages -----------------------------------------------------------------------------------
    def _host(self) -> None:
        from nas.search.pipeline import host_setup

        c = self._ctx
        if c.host is None:
            self.events.message("calibrating this host (cached after the first run)")
            c.host, c.cal = host_setup()

    def _measure(self, spec: ArchSpec) -> tuple[Measurement, int]:
        import tempfile

        from nas.search.pipeline import measure_deployed
        from nas.stages.export import export_spec, fresh_distinct_model
        from nas.stages.measure import MeasurementError

        c = self._ctx
        w = c.profile.workload
        workload_key = {"prompt_tokens": w.prefill_tokens(spec), "context_tokens": w.decode_past_tokens(spec),
                        "batch": w.batch}
        # With the device in the cluster, an estimate cached from a run without it is not reused.
        labels = ["measured:*"] if self.cfg.require_measured or self.ray_measure is not None else None
        for row in c.store.measurements(arch_id=spec.arch_id, profile=c.profile.name):
            if not row.ok or row.bitwidth != spec.bitwidth:
                continue
            if labels and not row.measured:
                continue
            if {k: row.workload.get(k) for k in workload_key} == workload_key:
                return _from_row(row), row.id
        self._host()
        # The fresh export stays until the trial ends: its graph takes the trained weights in the
        # score stage instead of a second trace (nas.stages.export.reweight).
        self._drop_template()
        self._template = Path(tempfile.mkdtemp(prefix="nas-measure-"))
        exported = export_spec(spec, self._template, model=fresh_distinct_model(spec))
        try:
            m = measure_deployed(spec, exported.path.parent, c.profile, host=c.host, cal=c.cal,
                                 require_measured=self.cfg.require_measured,
                                 ray_measure=self.ray_measure, notify=self._note_once)
        except MeasurementError as e:
            # A failure on a device node is not one of this host's figures: label it with the resource.
            where = "local" if self.ray_measure is None else c.profile.measurement.ray_resource
            c.store.add_measurement(arch_id=spec.arch_id, profile=c.profile.name, bitwidth=spec.bitwidth,
                                    label=f"measured:{where}", error=str(e), workload=workload_key)
            raise
        row = c.store.add_measurement(
            arch_id=spec.arch_id, profile=c.profile.name, bitwidth=spec.bitwidth, label=m.label,
            prefill_ms=m.prefill.median_ms, prefill_repeats_ms=m.prefill.repeats_ms,
            decode_ms_per_token=m.decode.median_ms, decode_repeats_ms=m.decode.repeats_ms,
            peak_memory_bytes=m.peak_memory_bytes, model_bytes=m.model_bytes,
            workload=m.workload, provenance=m.provenance,
        )
        return m, row.id

    def _note_once(self, text: str) -> None:
        noted = self.__dict__.setdefault("_noted", set())
        if text not in noted:
            noted.add(text)
            self.events.message(text)

    def _tokenized(self, vocab: int) -> Any:
        from nas.stages.data import tokenize_corpus

        c = self._ctx
        if vocab not in c.tokenized:
            self.events.message(f"tokenizer for vocab {vocab} (trained once per corpus and vocab, then cached)")
            c.tokenized[vocab] = tokenize_corpus(c.corpus, vocab)
        return c.tokenized[vocab]

    def _baselines(self, vocab: int, tc: Any) -> dict[str, float]:
        from nas.stages.data import ngram_baseline_bpb

        c = self._ctx
        if vocab not in c.baselines:
            c.baselines[vocab] = {"unigram_bpb": ngram_baseline_bpb(tc, 1), "bigram_bpb": ngram_baseline_bpb(tc, 2)}
        return c.baselines[vocab]

    def _train(self, spec: ArchSpec, tc: Any, n: int) -> tuple[Any, Any]:
        from nas.stages.train import train_brief

        def progress(point: Any, total: int) -> None:
            self.events.train_progress(n, point.step, total, point.loss)

        return train_brief(spec, tc, self._ctx.train, device=self.cfg.torch_device, progress=progress,
                           should_stop=self.stop.is_set)

    def _trial_dir(self, n: int) -> Path:
        d = Path(self.cfg.artifacts).resolve() / self.cfg.study / f"trial-{n:05d}"
        d.mkdir(parents=True, exist_ok=True)
        return d

    def _score(self, spec: ArchSpec, model: Any, tc: Any, trial_dir: Path) -> tuple[Any, str]:
        import torch

        from nas.stages.export import export_spec, load_exported
        from nas.stages.score import score_bpb_onnx

        model = model.to("cpu")
        # The trained weights travel with the spec, so `nas export` and `nas train` can rebuild it.
        torch.save({"spec": spec.to_dict(), "state_dict": model.state_dict(),
                    "train_config": self._ctx.train.model_dump()}, trial_dir / "model.pt")
        like = load_exported(self._template) if self._template else None  # measured in this trial
        exported = export_spec(spec, trial_dir / "onnx", model=model, like=like)
        bpb = score_bpb_onnx(exported, tc, self._ctx.train.eval_tokens,
                             threads=self._ctx.host.runtime.threads if self._ctx.host else 2)
        return bpb, exported.made_by

    def _drop_template(self) -> None:
        """Delete the measure stage's export (kept for the score stage) once its trial is over."""
        import shutil

        template, self._template = self._template, None
        if template is not None:
            shutil.rmtree(template, ignore_errors=True)

    def close(self) -> None:
        self._drop_template()
        self._ctx.store.close()


def _alive(worker: str) -> bool:
    try:
        pid = int(worker.rsplit(":", 1)[1])
    except (IndexError, ValueError):
        return True  # not ours to judge
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _bug_reason(e: Exception) -> str:
    frames = traceback.extract_tb(e.__traceback__)[-2:]
    where = "; ".join(f"{Path(f.filename).name}:{f.lineno} in {f.name}" for f in frames)
    return f"internal error {type(e).__name__}: {e} ({where})"


def _from_row(row: Any) -> Measurement:
    return Measurement(
        arch_id=row.arch_id, profile=row.profile, bitwidth=row.bitwidth, label=row.label,
        prefill=LatencyStats.from_samples(row.prefill_repeats_ms or [row.prefill_ms]),
        decode=LatencyStats.from_samples(row.decode_repeats_ms or [row.decode_ms_per_token]),
        peak_memory_bytes=row.peak_memory_bytes or 0, model_bytes=row.model_bytes or 0,
        workload=row.workload, provenance=row.provenance,
    )


def _budget_constraints(m: Measurement, profile: HardwareProfile) -> dict[str, float]:
    from nas.search.pipeline import budget_constraints

    return budget_constraints(m, profile)


def _budget_keys(profile: HardwareProfile) -> list[str]:
    b = profile.budgets
    limits = {"peak_memory_mb": b.peak_memory_mb, "decode_ms_per_token": b.decode_ms_per_token,
              "prefill_ms": b.prefill_ms, "model_mb": b.model_mb}
    return [k for k, v in limits.items() if v is not None]


def _analytic_constraints(spec: ArchSpec, c: _Context) -> dict[str, float]:
    """Lower-bound constraint values for the budgets the analytic check can judge; the budgets
    it cannot (latency) are left out rather than guessed."""
    b = c.profile.budgets
    out: dict[str, float] = {}
    if b.model_mb is not None:
        out["model_mb"] = min_model_bytes(spec) / MIB - b.model_mb
    if b.peak_memory_mb is not None:
        out["peak_memory_mb"] = min_peak_memory_bytes(spec, c.profile.workload) / MIB - b.peak_memory_mb
    return out


def _objective_values(spec: ArchSpec, m: Measurement | None, bpb: float | None) -> dict[str, float]:
    out: dict[str, float] = {"params": float(spec.params())}
    if bpb is not None:
        out["val_bpb"] = bpb
    if m is not None:
        out.update(decode_ms=m.decode_ms, prefill_ms=m.prefill_ms, peak_memory_mb=m.peak_memory_mb,
                   model_mb=m.model_mb)
    return out

