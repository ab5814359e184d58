"""A worker of a study: the Optuna study over a space and a device profile, its recovery after a
crash, and the loop that runs trials (each one is :func:`nas.search.trial.run_trial`).

Several workers may run the same study on one database (a SQLite file on one host, PostgreSQL
across machines); a second run of the same command resumes it.

Retries. A trial stopped because you asked (Ctrl-C, SIGTERM) is always queued again: the stop
was not the trial's fault, and it does not count as a retry. A trial whose worker died (killed,
out of memory, a lost machine) is queued again at most ``max_retry`` times (default 1), so that
an architecture that kills its worker cannot loop forever; what happened is said in the trial's
failure reason either way. Optuna's heartbeat catches a dead worker on another machine; one on
this host is caught at once on start-up (its pid is gone).

A search whose trials all fail the same way with an internal error (a bug or a broken install,
not the architectures) stops after ``SAME_BUG_LIMIT`` such trials in a row, with that reason and
a non-zero exit, instead of burning its budget.
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
import warnings
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import optuna
from optuna.exceptions import ExperimentalWarning
from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback
from optuna.trial import TrialState
from sqlalchemy.engine import make_url
from sqlalchemy.exc import SQLAlchemyError

from nas.search.config import OBJECTIVES, SAMPLERS, SearchConfig, SearchEvents, noise_seeds
from nas.search.rungs import RungPlan
from nas.search.trial import (
    INTERNAL,
    WEIGHTS_OF,
    RayMeasure,
    Resources,
    TrialEnv,
    TrialFailed,
    TrialRecord,
    bug_reason,
    run_trial,
    same_weights,
    trained_own,
)
from nas.spec.errors import NasError
from nas.spec.profile import HardwareProfile, load_profile
from nas.spec.settings import check_study_name
from nas.spec.space import SearchSpace, load_space
from nas.store import Store, StoreError, StudyRow, harden_foreign_sqlite_engine

SAME_BUG_LIMIT = 3


class SearchBroken(NasError):
    """Every trial fails the same way with an internal error: stop and say why."""


def _naive_utc(when: datetime) -> datetime:
    """A stored time as naive UTC (SQLite gives naive times, PostgreSQL aware ones)."""
    return when.astimezone(UTC).replace(tzinfo=None) if when.tzinfo is not None else when


def worker_id() -> str:
    """``host:pid`` of this process, as the store records who runs a trial. Asked for each time,
    not frozen at import: a forked or spawned worker is another process."""
    return f"{socket.gethostname()}:{os.getpid()}"


def worker_alive(worker: str) -> bool:
    """Whether the process behind a ``host:pid`` of this host is alive (True where it cannot tell)."""
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


@contextlib.contextmanager
def _experimental_ok() -> Iterator[None]:
    """TPE's ``group=True``, the heartbeat and its retry callback are marked experimental; they
    are what we want, so their warnings are silenced where they are made, and only there."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ExperimentalWarning)
        yield


def make_sampler(name: str, seed: int, n_trials_hint: int | None) -> optuna.samplers.BaseSampler:
    """The sampler for a mix of categorical and integer dimensions with conditions.

    Default ``tpe``: multivariate TPE with ``group`` models the dimensions jointly and handles the
    conditional ones (kv heads only for GQA, latent rank only for MLA) by grouping; it learns
    from constraint values; and it starts exploiting after a few random trials, where NSGA-II
    spends its first generation (a population) on random draws -- most of a short search.
    """
    with _experimental_ok():
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
    with _init_lock(cfg.db_url), _experimental_ok():
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


class Search:
    """One worker of a study. Several may run the same study on one database."""

    def __init__(self, cfg: SearchConfig, events: SearchEvents | None = None,
                 stop: threading.Event | None = None) -> None:
        for name in cfg.objectives:
            if name not in OBJECTIVES:
                raise NasError(f"unknown objective {name!r}; choose from {', '.join(OBJECTIVES)}")
        if len(set(cfg.objectives)) != len(cfg.objectives) or not cfg.objectives:
            raise NasError(f"objectives must be distinct and at least one: {', '.join(cfg.objectives)}")
        if cfg.sampler not in SAMPLERS:
            raise NasError(f"unknown sampler {cfg.sampler!r}; choose one of {', '.join(SAMPLERS)}")
        check_study_name(cfg.study)  # it names the artifacts folder: never a path out of it
        if not cfg.stage_deadline_factor > 0:
            raise NasError(f"stage_deadline_factor must be > 0, got {cfg.stage_deadline_factor}")
        from nas.stages.data import load_corpus

        self.cfg = cfg
        self.events = events or SearchEvents()
        # Set from a signal handler or another thread: the run stops at the next safe point (a
        # stage boundary, a training step, between trials) as if interrupted there.
        self.stop = stop or threading.Event()
        # Optuna logs every failed trial with its traceback at WARNING; the search reports each
        # failure itself in one line (and stores it), so only Optuna's errors are let through.
        optuna.logging.set_verbosity(optuna.logging.ERROR)
        self.space: SearchSpace = load_space(cfg.space)
        self.profile: HardwareProfile = load_profile(cfg.device)
        self.train = cfg.train or self.space.training
        if cfg.rungs > 1 and self.train.seconds is not None:
            raise NasError("rungs need a token budget: the space's training sets seconds, which a rung cannot split")
        self.rungs = RungPlan(self.train.tokens, count=cfg.rungs, eta=cfg.eta)  # checked before the study opens
        self.store = Store(cfg.db_url)
        if self.profile.measurement.where != "local":
            self.profile = self._with_stored_calibration(self.profile)
        self.resources = Resources(load_corpus(cfg.data, max_bytes=cfg.max_bytes), self.events)
        self._storage = _optuna_storage(cfg)
        self.study = self._open_study()
        self._study_id = self._storage.get_study_id_from_name(cfg.study)
        self.ray_measure: RayMeasure | None = None
        """Set by the Ray executor (nas.search.ray_executor) where a node advertises the
        profile's resource: the measure stage then runs on that node, labelled with it."""
        self.last_number: int | None = None
        """The number of the last trial run (None when none got a number)."""
        self._last_record: TrialRecord | None = None
        self._bugs: list[str] = []  # the same internal error, trial after trial
        self._counted = 0
        self._weights_memo: dict[str, frozenset[str]] = {}  # arch_id -> the ids that share its weights
        self._noise_done = False
        self.deadline: float | None = None
        """When the run's time budget ends (``time.time()``); set by ``run`` and the Ray
        executor. Past it no trial goes on to another rung."""

    def _with_stored_calibration(self, profile: HardwareProfile) -> HardwareProfile:
        """The profile with the points ``nas devices calibrate`` stored for its device, for the
        estimates made when the device is not there (said once)."""
        from nas.search.calibration import describe_stored, with_stored_calibration
        from nas.spec.calibration import stored_points

        augmented = with_stored_calibration(profile, self.store)
        added = stored_points(augmented)[len(stored_points(profile)):]
        if added:
            d = describe_stored(added)
            self.events.message(f"estimates for {profile.name} also fit {d['points']} point(s) measured on "
                                f"{', '.join(d['nodes'])} by `nas devices calibrate` (fingerprint "
                                f"{', '.join(d['fingerprints'])})")
        return augmented

    # --- the study ------------------------------------------------------------------------------
    def _settings(self) -> dict[str, Any]:
        """What a study is defined by: a resume or a second worker must bring the same."""
        return {"space": self.space.name, "profile": self.profile.name,
                "corpus_fingerprint": self.resources.corpus.fingerprint, "train_config": self.train.model_dump(),
                "objectives": list(self.cfg.objectives), "seed": self.cfg.seed,
                "rungs": {"count": self.cfg.rungs, "eta": self.cfg.eta}}

    def _open_study(self) -> optuna.Study:
        """Create the study, or join it with the same settings (resume, or a second worker)."""
        cfg, settings = self.cfg, self._settings()
        existing = self.store.find_study(name=cfg.study)
        if existing is not None:
            self._check_same(existing, settings)
        directions = [OBJECTIVES[o][0] for o in cfg.objectives]
        study = optuna.create_study(study_name=cfg.study, storage=self._storage, directions=directions,
                                    sampler=make_sampler(cfg.sampler, cfg.seed, None), load_if_exists=True)
        if existing is not None:
            return study
        for key, value in settings.items():
            study.set_user_attr(key, value)  # shown by optuna-dashboard
        try:
            self.store.create_study(
                name=cfg.study, space=settings["space"], profile=settings["profile"],
                objectives=[(o, OBJECTIVES[o][0]) for o in cfg.objectives],
                optuna_study_id=self._storage.get_study_id_from_name(cfg.study),
                corpus_fingerprint=settings["corpus_fingerprint"], train_config=settings["train_config"],
                seed=cfg.seed, code_version=code_version(),
                extra={"sampler": cfg.sampler, "data": cfg.data or "stdlib", "max_bytes": cfg.max_bytes,
                       "rungs": settings["rungs"]},
            )  # fmt: skip
        except StoreError:
            # Another worker created it a moment ago: join it if it has our settings.
            existing = self.store.find_study(name=cfg.study)
            if existing is None:
                raise
            self._check_same(existing, settings)
        return study

    def _check_same(self, existing: StudyRow, settings: dict[str, Any]) -> None:
        theirs = {"space": existing.space, "profile": existing.profile,
                  "corpus_fingerprint": existing.corpus_fingerprint, "train_config": existing.train_config,
                  "objectives": [o.name for o in existing.objectives], "seed": existing.seed,
                  # a study made before rungs existed trained every trial on the whole budget
                  "rungs": existing.extra.get("rungs", {"count": 1, "eta": 3})}
        for key, value in theirs.items():
            if value != settings[key]:
                raise NasError(
                    f"study {self.cfg.study!r} was created with {key} = {value!r}, this run has {settings[key]!r}: "
                    f"resume it with the same settings or choose another --study name"
                )

    def _report_rung(self, number: int, tokens: int, bpb: float) -> None:
        """A rung's BPB as an intermediate value of the running Optuna trial, at step = tokens
        (``Trial.report`` refuses multi-objective studies; the storage takes the value)."""
        self._storage.set_trial_intermediate_value(self._trial_id(number), tokens, bpb)

    def _trial_id(self, number: int) -> int:
        return self._storage.get_trial_id_from_study_id_trial_number(self._study_id, number)

    # --- recovery -------------------------------------------------------------------------------
    def recover(self) -> dict[int, str]:
        """Fail the trials that a dead process on this host left running (queued again within
        the retry limit), and bring the store in line with trials Optuna's heartbeat already
        failed. Returns each one's number and what happened to it."""
        host = socket.gethostname()
        by_number = {t.number: t for t in self.study.get_trials(deepcopy=False)}
        recovered: dict[int, str] = {}
        for row in self.store.trials(study=self.cfg.study, states=["running"]):
            ot = by_number.get(row.number)
            dead_here = bool(row.worker) and row.worker.rsplit(":", 1)[0] == host and not worker_alive(row.worker)
            if ot is not None and ot.state == TrialState.RUNNING and dead_here:
                trial_id = self._trial_id(row.number)
                self._storage.set_trial_state_values(trial_id, TrialState.FAIL)
                failed = self._storage.get_trial(trial_id)
                with _experimental_ok():
                    RetryHeartbeatStaleTrialCallback(max_retry=self.cfg.max_retry)(self.study, failed)
                reason = f"its worker {row.worker} died mid-trial; {self._retry_note(failed)}"
            elif ot is not None and ot.state == TrialState.FAIL:
                reason = f"its worker stopped sending heartbeats; {self._retry_note(ot)}"
            else:
                continue
            self.store.fail_trial(study=self.cfg.study, number=row.number, stage="killed", reason=reason)
            recovered[row.number] = reason
        return recovered

    def _retry_note(self, failed: optuna.trial.FrozenTrial) -> str:
        """What Optuna's retry callback did with a trial whose worker died, in words. It queues
        the parameters again while the trial's retry history is within ``max_retry``."""
        tries = len(failed.system_attrs.get("retry_history", [])) + 1
        limit = self.cfg.max_retry
        if limit is None or tries <= limit:
            return f"parameters queued again (retry {tries} of {limit})"
        return f"not queued again: its parameters were already retried {limit} time(s) after a dead worker"

    def _queue_again(self, trial: optuna.trial.FrozenTrial) -> None:
        """Queue a stopped trial's parameters again, carrying its retry history unchanged: a stop
        that was asked for is not a retry."""
        # Optuna's own keys, as its retry callback writes them: the first trial of the series, and
        # the retries so far (not extended here).
        history = {"failed_trial": trial.system_attrs.get("failed_trial", trial.number),
                   "retry_history": list(trial.system_attrs.get("retry_history", []))}
        self.study.add_trial(optuna.trial.create_trial(
            state=TrialState.WAITING, params=trial.params, distributions=trial.distributions, system_attrs=history,
        ))

    # --- running ----------------------------------------------------------------------------------
    def run(self, n_trials: float | None = None, timeout_s: float | None = None) -> dict[str, int]:
        """Run trials until ``n_trials`` trials' worth have run (each counts its share of the
        training budget, ``RungPlan.share``: 1 without rungs; draws that break the space's rules
        count nothing), or ``timeout_s`` passed (the running trial finishes its rung first).
        Ctrl-C stops after recording the running trial as failed (its parameters queued again for
        a resume). The counts by state, and ``trial_units``: how many trials' worth ran."""
        if n_trials is None and timeout_s is None:
            raise NasError("give a number of trials or a time budget (or both)")
        self.study.sampler = make_sampler(self.cfg.sampler, self.cfg.seed + len(self.study.trials),
                                          None if n_trials is None else math.ceil(n_trials))
        for number, reason in self.recover().items():
            self.events.message(f"trial {number} was left running: failed, {reason}")
        counts = {"complete": 0, "infeasible": 0, "failed": 0, "invalid": 0}
        start = time.monotonic()
        self.deadline = time.time() + timeout_s if timeout_s is not None else None
        done = 0.0
        counted = 0
        def more() -> bool:
            return ((n_trials is None or done < n_trials - 1e-9)
                    and (timeout_s is None or time.monotonic() - start < timeout_s))

        while more():
            self._check_stop()
            state = self._one_trial()
            counts[state] += 1
            if state != "invalid":
                counted += 1
                done += self.rungs.share(self.last_tokens, reused=self.last_reused)
                self.events.trials_done(done)
            self._stop_on_a_repeated_bug(last=n_trials is not None and done >= n_trials - 1e-9)
            if state == "invalid" and counts["invalid"] > 1000 + 10 * counted:
                raise NasError(f"space {self.space.name}: the sampler keeps drawing invalid architectures; "
                               "loosen its rules")
        return counts | {"trial_units": round(done, 3)}

    def run_one(self, seed: int, n_trials_hint: int | None = None) -> tuple[str, int | None, int]:
        """One counted trial, as ``run`` runs each (draws that break the space's rules are drawn
        again): the unit of work of a Ray Tune trial (nas.search.ray_executor). ``seed`` seeds
        this trial's sampler, so that workers starting at once do not draw alike. Returns the
        state, the trial's number and how many invalid draws came before it."""
        invalid = 0
        while True:
            self.study.sampler = make_sampler(self.cfg.sampler, seed + invalid, n_trials_hint)
            self._check_stop()
            state = self._one_trial()
            if state != "invalid":
                self._stop_on_a_repeated_bug(False)
                return state, self.last_number, invalid
            invalid += 1
            if invalid > 1000:
                raise NasError(f"space {self.space.name}: the sampler keeps drawing invalid architectures; "
                               "loosen its rules")

    @property
    def last_tokens(self) -> int:
        """Tokens the last trial run trained (0 when it trained none)."""
        return self._last_record.tokens if self._last_record is not None else 0

    @property
    def last_reused(self) -> bool:
        """Whether the last trial run took another trial's weights instead of training."""
        return self._last_record is not None and self._last_record.reused

    def units_since(self, started: float) -> float:
        """How many trials' worth (``RungPlan.share``) the study's trials started since ``started``
        (``time.time()``) have run, by every worker: finished ones by the tokens they trained,
        the running ones by their first rung, or as a reuse where a complete trial trained their
        architecture's weights already (it will take them: ``_trained_twin``; counted at its first
        rung, it would stop the workers short of the trials' worth once it has). Invalid draws
        count nothing."""
        since = datetime.fromtimestamp(started, tz=UTC).replace(tzinfo=None)
        trials = self.store.trials(study=self.cfg.study)
        trained = {t.arch_id for t in trials if t.state == "complete" and trained_own(t)}
        total = 0.0
        for t in trials:
            if _naive_utc(t.started_at) < since or (t.state == "infeasible" and t.failed_stage == "sample"):
                continue
            train = t.train or {}
            reused = WEIGHTS_OF in train
            if t.state == "running" and t.arch_id:
                reused = bool(self._same_weights(t.arch_id) & trained)
            total += self.rungs.share(int(train.get("tokens") or 0), reused=reused)
        return total

    def _same_weights(self, arch_id: str) -> frozenset[str]:
        """``same_weights`` of a stored architecture, remembered (an architecture never changes)."""
        if arch_id not in self._weights_memo:
            self._weights_memo[arch_id] = same_weights(self.store.get_architecture(arch_id=arch_id).spec)
        return self._weights_memo[arch_id]

    def _stop_on_a_repeated_bug(self, last: bool) -> None:
        """Raise SearchBroken once ``SAME_BUG_LIMIT`` counted trials in a row failed with the same
        internal error, or when ``last`` ends a run in which every counted trial failed so (a
        short run never reaches the limit, yet must not exit 0)."""
        record = self._last_record
        if record is None or record.state == "invalid":
            return
        self._counted += 1
        bug = record.reason if record.state == "failed" and record.reason.startswith(INTERNAL) else None
        if bug is None:
            self._bugs = []
        elif self._bugs and self._bugs[-1] != bug:
            self._bugs = [bug]
        else:
            self._bugs.append(bug)
        if self._bugs and (len(self._bugs) >= SAME_BUG_LIMIT or (last and len(self._bugs) == self._counted)):
            raise SearchBroken(f"stopping: {len(self._bugs)} trial(s) in a row failed the same way, which is a "
                               f"bug or a broken install, not the architectures: {self._bugs[-1]}")

    def _one_trial(self) -> str:
        record = TrialRecord()
        env = TrialEnv(cfg=self.cfg, space=self.space, profile=self.profile, train=self.train, store=self.store,
                       events=self.events, stop=self.stop, resources=self.resources, worker=worker_id(),
                       optuna_trial_id=self._trial_id, rungs=self.rungs, report_rung=self._report_rung,
                       ray_measure=self.ray_measure, deadline=self.deadline)
        try:
            self.study.optimize(lambda trial: run_trial(trial, env, record), n_trials=1, catch=(TrialFailed,),
                                gc_after_trial=False)
        except optuna.TrialPruned:  # pragma: no cover - optimize handles it
            pass
        except KeyboardInterrupt:
            self._interrupted(record)
            raise
        finally:
            self.last_number = record.number
            self._last_record = record
        if record.state == "complete":
            self._measure_noise()
        return record.state

    def _measure_noise(self) -> None:
        """The study's seed spread, once it has a complete trial (``nas.search.noise``); a
        failure to measure it is said and the search goes on without it."""
        from nas.search.noise import measure_noise

        extra = noise_seeds(self.cfg)
        if self._noise_done or extra < 1:
            return
        try:
            noise = measure_noise(self.store, self.cfg.study, self.train, self.rungs, extra, self.resources,
                                  self.events, self.stop, torch_device=self.cfg.torch_device)
        except KeyboardInterrupt:
            raise
        except Exception as e:  # a bug here must not stop the search: the trials do not depend on it
            self.events.message(f"seed noise not measured: {e if isinstance(e, NasError) else bug_reason(e)}")
            noise = None
            self._noise_done = True
        if noise is not None and len(noise.seeds) >= extra + 1:
            self._noise_done = True

    def _check_stop(self) -> None:
        if self.stop.is_set():
            raise KeyboardInterrupt

    def _interrupted(self, record: TrialRecord) -> None:
        if record.number is None:
            return
        n = record.number
        row = self.store.find_trial(study=self.cfg.study, number=n)
        if row is not None and row.state == "running":
            self.store.fail_trial(study=self.cfg.study, number=n, stage=record.stage,
                                  reason="interrupted (Ctrl-C or SIGTERM); parameters queued again")
            self._queue_again(self.study.trials[n])

    def close(self) -> None:
        self.store.close()
