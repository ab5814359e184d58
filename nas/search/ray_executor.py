"""The search through Ray Tune: trials on several workers and machines, measurement on the device.

``nas search ... --executor ray --workers N [--ray-address ADDR]`` runs each trial as a Ray Tune
trial. The trial itself is the local one: the Tune trainable opens the same study on the same
database and calls ``Search.run_one``, which asks Optuna for parameters inside ``study.optimize``
and runs the stages, the store writes and the tell exactly as a local run does.

Why ask/tell inside the trainable rather than Ray's ``OptunaSearch`` (docs/dependencies.md, "Ray Tune"):
``OptunaSearch`` has no hook for ``trial.set_constraint``, so the budgets would need a subclass
that re-tells them from the reported result; infeasible trials' placeholder objectives, the
store's rows and its failure reasons would then be split between the driver and the workers; and
``Tuner.restore`` leaves orphans in the study. With Optuna inside the trainable a Ray trial is one
local trial: the same sampler (it reads the study from the database), the same constraints, the
same heartbeat (``study.optimize`` sends it) and the same recovery, so a Ray run and a local run
resume each other. Tune brings the scheduling: workers, per-trial resources, nodes, failures.

Measurement on the device: a profile with ``measurement: {where: ray, ray_resource: jetson}`` is
measured by a task that asks ``resources={"jetson": 1}``, so it runs only on a node started with
``ray start --address HEAD --resources '{"jetson": 1}'``, one measurement at a time per device. The
exported files travel with the task; the figures come back labelled ``measured:<node name>``.
Without such a node the search says so once and uses the labelled estimate, or refuses under
``--require-measured``.

A worker that dies mid-trial (killed, out of memory, its node lost) fails its Tune trial
(``max_failures=0``: the Optuna trial is not re-run under the same number); the driver then fails
the trial in the store with the reason and queues its parameters again (``Search.recover``; on
another machine Optuna's heartbeat does it), and the other trials go on.

Ray is imported lazily, inside the functions: ``nas pareto`` and the web page never pay for it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import shutil
import signal
import tempfile
import threading
import time
import zlib
from pathlib import Path
from typing import TYPE_CHECKING, Any

from nas.search.config import SearchEvents
from nas.spec.errors import NasError
from nas.spec.results import ESTIMATED_MODEL, Measurement, measured_on

if TYPE_CHECKING:
    from nas.search.config import SearchConfig
    from nas.search.study import Search
    from nas.spec.arch import ArchSpec
    from nas.spec.profile import HardwareProfile

MEASURE_TIMEOUT_S = 600.0
"""How long a trial waits for its measurement on a device node (queueing behind others included)."""
FORWARDED_ENV = ("NAS_CACHE_DIR",)
"""Environment variables the driver passes to its Ray workers."""


@dataclasses.dataclass(frozen=True)
class RayOptions:
    workers: int = 1
    """Trials running at once."""
    address: str | None = None
    """An existing cluster (``HOST:PORT`` of its head, or ``auto``); None starts a local Ray."""
    cpus_per_trial: float = 1.0
    gpus_per_trial: float | None = None
    """None: a fair share of the cluster's GPUs when training on CUDA, else none."""


class RayUnavailable(NasError):
    """Ray cannot be started or reached."""


# --- the driver ------------------------------------------------------------------------------------
def run_with_ray(cfg: SearchConfig, opts: RayOptions, events: SearchEvents | None = None,
                 stop: threading.Event | None = None, n_trials: int | None = None,
                 timeout_s: float | None = None) -> dict[str, int]:
    """Run the study's trials as Ray Tune trials, ``opts.workers`` at a time. Same counts, same
    store, same Optuna study as ``Search.run``. A set ``stop`` ends the run as Ctrl-C would."""
    from nas.search.study import Search

    if n_trials is None and timeout_s is None:
        raise NasError("give a number of trials or a time budget (or both)")
    if opts.workers < 1:
        raise NasError(f"--workers must be at least 1, not {opts.workers}")
    events = events or SearchEvents()
    stop = stop or threading.Event()
    cfg = portable_config(cfg)
    driver = Search(cfg, events, stop=stop)  # creates or joins the study, checks its settings
    try:
        for number, reason in driver.recover().items():
            events.message(f"trial {number} was left running: failed, {reason}")
        ray = _connect(opts.address)
        resources = _trial_resources(ray, cfg, opts)
        measure_on = _device_node(ray, driver, events)
        machines = {n["NodeManagerAddress"] for n in ray.nodes() if n["Alive"] and n["Resources"].get("CPU")}
        if cfg.db_url.startswith("sqlite") and len(machines) > 1:
            events.message("a SQLite database serves only the workers of this machine: give --db postgresql://... "
                           "when trials run on several machines")
        # Measure the host once here, so that the workers of this machine find it cached.
        driver.resources.calibrated_host()
        return _tune(ray, driver, cfg, opts, resources, measure_on, events, stop, n_trials, timeout_s)
    finally:
        driver.close()


def portable_config(cfg: SearchConfig) -> SearchConfig:
    """The config with every path made absolute: Tune runs trainables in per-trial directories."""
    from sqlalchemy.engine import make_url

    changes: dict[str, Any] = {"artifacts": Path(cfg.artifacts).resolve()}
    if cfg.db_url.startswith("sqlite"):
        url = make_url(cfg.db_url)
        if url.database and url.database != ":memory:":
            changes["db_url"] = url.set(database=str(Path(url.database).resolve())).render_as_string(
                hide_password=False)
        elif url.database == ":memory:":
            raise NasError("an in-memory SQLite database cannot be shared with Ray workers: give --db")
    for key in ("space", "device", "data"):
        value = getattr(cfg, key)
        if value and Path(value).exists():
            changes[key] = str(Path(value).resolve())
    return dataclasses.replace(cfg, **changes)


def _connect(address: str | None) -> Any:
    import logging

    import ray

    if ray.is_initialized():
        return ray
    if address and address != "auto":
        _reachable(address)
    env = {k: os.environ[k] for k in FORWARDED_ENV if k in os.environ}
    # ray.init installs its own SIGTERM handler (log and exit): keep the caller's (the CLI's asks
    # the search to stop cleanly, recording and queueing the running trials again).
    main = threading.current_thread() is threading.main_thread()
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)} if main else {}
    try:
        ray.init(address=address, include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING,
                 runtime_env={"env_vars": env} if env else None, configure_logging=True)
    except Exception as e:  # connection, authentication, version mismatch: Ray raises many kinds
        where = f"the Ray cluster at {address}" if address else "a local Ray"
        raise RayUnavailable(f"cannot start or reach {where}: {str(e).splitlines()[0]}") from None
    finally:
        for sig, handler in saved.items():
            if handler is not None:
                signal.signal(sig, handler)
    return ray


def _reachable(address: str, timeout_s: float = 5.0) -> None:
    """Fail at once on a head nobody listens at (ray.init would retry for minutes)."""
    import socket

    host, _, port = address.removeprefix("ray://").rpartition(":")
    try:
        with socket.create_connection((host or "127.0.0.1", int(port)), timeout=timeout_s):
            pass
    except ValueError:
        raise RayUnavailable(f"--ray-address {address!r}: give HOST:PORT of the Ray head (or auto)") from None
    except OSError as e:
        raise RayUnavailable(f"no Ray head answers at {address}: {e.strerror or e}") from None


def _trial_resources(ray: Any, cfg: SearchConfig, opts: RayOptions) -> dict[str, float]:
    total = ray.cluster_resources()
    cpus, gpus = total.get("CPU", 0.0), total.get("GPU", 0.0)
    if opts.cpus_per_trial > cpus:
        raise NasError(f"--cpus-per-trial {opts.cpus_per_trial:g} but the Ray cluster has {cpus:g} CPUs")
    gpu = opts.gpus_per_trial
    if gpu is None:
        gpu = min(1.0, gpus / opts.workers) if cfg.torch_device.startswith("cuda") and gpus else 0.0
    if cfg.torch_device.startswith("cuda") and gpu <= 0:
        raise NasError("--torch-device cuda, but no node of the Ray cluster has a GPU")
    return {"cpu": opts.cpus_per_trial, "gpu": gpu}


def _device_node(ray: Any, driver: Search, events: SearchEvents) -> str | None:
    """The profile's Ray resource when a node of the cluster advertises it, else None (said once)."""
    from nas.search.pipeline import NotMeasurable

    m = driver.profile.measurement
    if m.where != "ray":
        return None
    if ray.cluster_resources().get(m.ray_resource, 0) > 0:
        names = [n["NodeName"] for n in ray.nodes() if n["Alive"] and n["Resources"].get(m.ray_resource)]
        events.message(f"measurements for {driver.profile.name} run on the Ray node(s) with "
                       f"{m.ray_resource!r}: {', '.join(names)}")
        return m.ray_resource
    unknown = driver.profile.to_be_measured()
    if unknown:
        raise NotMeasurable(f"no Ray node advertises {m.ray_resource!r}, and profile {driver.profile.name!r} "
                            f"cannot be estimated without it: {unknown[0]} is 'measure'")
    if driver.cfg.require_measured:
        raise NotMeasurable(f"profile {driver.profile.name!r} is measured on a Ray node advertising "
                            f"{m.ray_resource!r}, and none is in the cluster (--require-measured)")
    events.message(f"no Ray node advertises {m.ray_resource!r}: figures for {driver.profile.name} are "
                   f"{ESTIMATED_MODEL} (its latency model), not measured (join the device with "
                   f"`ray start --address HEAD --resources '{{\"{m.ray_resource}\": 1}}'`)")
    return None


def _tune(ray: Any, driver: Search, cfg: SearchConfig, opts: RayOptions, resources: dict[str, float],
          measure_on: str | None, events: SearchEvents, stop: threading.Event, n_trials: int | None,
          timeout_s: float | None) -> dict[str, int]:
    from ray import tune

    # Our own SIGINT handler (the CLI's) sets `stop`; Tune's would replace it.
    os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = "1"
    # Tune's console output (its tables, "View detailed results here") would garble the CLI's
    # progress display; the driver reports each trial through `events` instead.
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    import logging

    logging.getLogger("ray.tune").setLevel(logging.ERROR)  # e.g. "no metrics" for trials skipped at the deadline
    deadline = time.time() + timeout_s if timeout_s is not None else None
    relay, stopper = _tune_hooks(driver, events, stop, deadline)
    config = {"cfg": cfg, "measure_on": measure_on, "deadline": deadline, "n_trials_hint": n_trials,
              # with rungs a trial counts its share of the budget (RungPlan.share): workers stop
              # starting trials once the study's trials since this moment add up to n_trials
              # (a reuse of another trial's weights counts its share with one rung too)
              "units": n_trials,
              "run_started": time.time()}
    samples = n_trials if n_trials is not None else 1_000_000
    if n_trials is not None:
        # enough Tune samples for the cheapest trials: those stopped at the first rung, and those
        # that score another trial's weights; workers stop at the trials' worth asked for, and
        # the run ends once one has (the samples left are not started one by one to be skipped)
        samples = math.ceil(n_trials / min(driver.rungs.share(0), driver.rungs.share(0, reused=True)))
    storage = tempfile.mkdtemp(prefix="nas-tune-")
    try:
        tuner = tune.Tuner(
            tune.with_resources(_trainable, resources),
            param_space=config,
            tune_config=tune.TuneConfig(
                # With only a time budget, trials are started until the deadline (each one starting
                # after it returns at once) and the run ends when none is left running.
                num_samples=samples,
                max_concurrent_trials=opts.workers,
                reuse_actors=True,  # a worker keeps its opened study, corpus and tokenizers
            ),
            run_config=tune.RunConfig(
                name=cfg.study, storage_path=storage, verbose=0, callbacks=[relay],
                failure_config=tune.FailureConfig(max_failures=0, fail_fast=False),
                stop=stopper,
            ),
        )
        tuner.fit()
    finally:
        shutil.rmtree(storage, ignore_errors=True)
    # Trials whose workers were stopped with the run (Ctrl-C, SIGTERM): recorded failed, queued again.
    _recover_after(driver, relay, stop.is_set())
    if stop.is_set():
        raise KeyboardInterrupt
    return relay.counts


def _tune_hooks(driver: Search, events: SearchEvents, stop: threading.Event, deadline: float | None) -> tuple[Any, Any]:
    # Made here, against Tune's base classes, so that importing this module does not import Ray.
    from ray.tune import Callback, Stopper

    class Relay(_RelayMixin, Callback):
        pass

    class Stop(_StopMixin, Stopper):
        pass

    relay = Relay(driver, events)
    return relay, Stop(stop, deadline, relay)


def _recover_after(driver: Search, relay: Any, stopped: bool, wait_s: float = 60.0) -> None:
    """Fail the trials of this host's workers that died (queued again within the retry limit);
    after a stop, give the stopped workers time to exit first (up to ``wait_s``: 15 s was too
    short on a loaded 2-core machine). The recovery runs once no stopped worker is left alive, not
    before the check: a worker that exits between a recovery and the check would leave its trial
    "running" in the store."""
    from nas.search.study import worker_alive, worker_id

    host = worker_id().rsplit(":", 1)[0]
    end = time.monotonic() + wait_s
    while stopped and time.monotonic() < end:
        rows = driver.store.trials(study=driver.cfg.study, states=["running"])
        if not any(r.worker and r.worker.rsplit(":", 1)[0] == host and worker_alive(r.worker) for r in rows):
            break
        time.sleep(0.5)
    for number, reason in driver.recover().items():
        relay.note_failed(number, f"its Ray worker stopped mid-trial: {reason}")


class _RelayMixin:
    """A Tune callback on the driver (made one by ``_tune_hooks``): trial results to the search's
    events and counts; a trial whose worker died is failed in the store (queued again within the
    retry limit)."""
    def __init__(self, driver: Search, events: SearchEvents) -> None:
        self.driver = driver
        self.events = events
        self.counts = {"complete": 0, "infeasible": 0, "failed": 0, "invalid": 0}
        self.running = 0
        self.units = 0.0
        self.units_reached = False
        self._numbers: set[int] = set()

    def __getstate__(self) -> dict[str, Any]:
        return {}  # Tune pickles its run config into its experiment state; we never restore from it

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.running += 1

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        state = result.get("state")
        if state not in self.counts:
            # "skipped": started after the deadline, or after the trials' worth asked for had run
            self.units_reached = self.units_reached or result.get("why") == "units"
            return
        self.counts["invalid"] += int(result.get("invalid", 0))
        self.counts[state] += 1
        self.units += self.driver.rungs.share(int(result.get("tokens") or 0), reused=bool(result.get("reused")))
        self.counts["trial_units"] = round(self.units, 3)
        self.events.trials_done(self.units)
        number = result.get("number")
        if number is not None:
            self._numbers.add(int(number))
            self.events.trial_finished(int(number), state, f"{result.get('summary', '')} [{result.get('worker')}]")

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.running -= 1

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.running -= 1
        recovered = self.driver.recover()
        for number, reason in recovered.items():
            self.note_failed(number, f"its Ray worker died mid-trial: {reason}")
        if not recovered:
            # On another machine: Optuna's heartbeat fails it and queues it again; counted here.
            self.counts["failed"] += 1
            self.events.message(f"a Ray trial failed on {trial.last_result.get('worker', 'a worker')}: "
                                f"{_first_line(trial.error_file)}")

    def note_failed(self, number: int, reason: str) -> None:
        if number in self._numbers:
            return
        self._numbers.add(number)
        self.counts["failed"] += 1
        self.events.trial_finished(number, "failed", reason)


def _first_line(path: str | None) -> str:
    with contextlib.suppress(OSError, TypeError):
        lines = [s for s in Path(path).read_text().splitlines() if s.strip()]  # type: ignore[arg-type]
        return lines[-1][:300] if lines else "no reason given"
    return "no reason given"


class _StopMixin:
    """Tune's stopper (made one by ``_tune_hooks``): everything stops when ``stop`` is set; after
    the deadline, or once a worker found the trials' worth asked for run, as soon as no trial is
    running (the running ones finish first, as in a local run)."""
    def __init__(self, stop: threading.Event, deadline: float | None, relay: Any) -> None:
        self.stop, self.deadline, self.relay = stop, deadline, relay

    def __getstate__(self) -> dict[str, Any]:
        return {}  # as _RelayMixin's

    def __call__(self, trial_id: str, result: dict) -> bool:
        return False

    def stop_all(self) -> bool:
        if self.stop.is_set():
            return True
        over = self.relay.units_reached or (self.deadline is not None and time.time() > self.deadline)
        return over and self.relay.running <= 0


# --- the workers -----------------------------------------------------------------------------------
class _ProcessSearch:
    """The Search of this Ray worker process, kept between the Tune trials the process runs
    (opening a study and loading the corpus cost seconds). Keyed by everything that defines it:
    a trial of another study or another device node closes the old one and opens its own."""

    def __init__(self) -> None:
        self.key: str | None = None
        self.search: Search | None = None

    def get(self, cfg: SearchConfig, measure_on: str | None) -> Search:
        from nas.search.study import Search

        key = repr((cfg, measure_on))
        if self.search is None or self.key != key:
            if self.search is not None:
                self.search.close()
            self.search = Search(cfg, _LastSummary())
            if measure_on is not None:
                self.search.ray_measure = measure_on_ray
            self.key = key
        return self.search


# One per Ray worker process: Tune calls the trainable function, which cannot hold state itself.
_PROCESS_SEARCH = _ProcessSearch()


def _trainable(config: dict[str, Any]) -> None:
    """One Tune trial: one counted trial of the study, run by the local trial code."""
    from ray import tune

    from nas.search.study import worker_id

    if config["deadline"] is not None and time.time() > config["deadline"]:
        tune.report({"state": "skipped", "worker": worker_id()})
        return
    search = _PROCESS_SEARCH.get(config["cfg"], config["measure_on"])
    if config["units"] is not None and search.units_since(config["run_started"]) >= config["units"] - 1e-9:
        tune.report({"state": "skipped", "why": "units", "worker": worker_id()})  # the trials' worth asked for has run
        return
    search.deadline = config["deadline"]
    trial_id = tune.get_context().get_trial_id() or ""
    seed = config["cfg"].seed + len(search.study.trials) + zlib.crc32(trial_id.encode()) % 1_000_003
    events = search.events
    state, number, invalid = search.run_one(seed, config["n_trials_hint"])
    tune.report({"state": state, "number": number, "invalid": invalid, "worker": worker_id(),
                 "summary": getattr(events, "last", ""), "tokens": search.last_tokens,
                 "reused": search.last_reused})


class _LastSummary(SearchEvents):
    """A worker's events: only the finished trial's one-line summary goes back to the driver."""

    last = ""

    def trial_finished(self, number: int, state: str, summary: str) -> None:
        self.last = summary


# --- measurement on the device's node -----------------------------------------------------------
def device_nodes(address: str, resource: str) -> list[str]:
    """Connect to the cluster at ``address`` and name its live nodes that advertise ``resource``;
    raises NotMeasurable naming both when none does (for commands that measure on the device
    alone: ``nas devices calibrate``, ``nas remeasure``)."""
    from nas.search.pipeline import NotMeasurable

    ray = _connect(address)
    names = [n["NodeName"] for n in ray.nodes() if n["Alive"] and n["Resources"].get(resource)]
    if not names:
        raise NotMeasurable(f"no node of the Ray cluster at {address} advertises {resource!r} (join the device "
                            f"with `ray start --address {address} --resources '{{\"{resource}\": 1}}'`)")
    return names


def measure_on_ray(spec: ArchSpec, model_dir: Path, profile: HardwareProfile) -> Measurement:
    """Measure ``model_dir`` (an export of ``spec``) on the node advertising the profile's
    resource; figures labelled ``measured:<node>``. Any failure is a MeasurementError."""
    import ray

    from nas.stages.measure import MeasurementError

    resource = profile.measurement.ray_resource
    files = {p.relative_to(model_dir).as_posix(): p.read_bytes() for p in Path(model_dir).rglob("*") if p.is_file()}
    # num_cpus=0 and one unit of the device's resource: the device measures one model at a time,
    # whatever CPUs it reports, and its measurements never wait behind training.
    # placement_group=None: out of the Tune trial's placement group, which holds only the trial's
    # CPUs and GPU on its own node; the device's resource is elsewhere.
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    task = ray.remote(num_cpus=0, resources={resource: 1}, max_retries=0,
                      scheduling_strategy=PlacementGroupSchedulingStrategy(placement_group=None))(_measure_task)
    try:
        ref = task.remote(spec, files, profile)
    except (ValueError, TypeError) as e:
        raise MeasurementError(f"cannot send the measurement to the node with {resource!r}: {e}") from None
    try:
        ok, value = ray.get(ref, timeout=MEASURE_TIMEOUT_S)
    except ray.exceptions.GetTimeoutError:
        ray.cancel(ref, force=True)
        raise MeasurementError(f"measurement on the node with {resource!r} took over {MEASURE_TIMEOUT_S:g} s") from None
    except ray.exceptions.RayError as e:  # the node or its worker died, or the task could not run
        detail = str(e).strip().splitlines()
        raise MeasurementError(f"measurement on the node with {resource!r} failed: "
                               f"{type(e).__name__}: {detail[0][:300] if detail else ''}") from None
    if not ok:
        raise MeasurementError(f"on the node with {resource!r}: {value}")
    return value


def _measure_task(spec: ArchSpec, files: dict[str, bytes], profile: HardwareProfile) -> tuple[bool, Any]:
    """Runs on the device's node: write the files, measure them there with the profile's own
    runtime (its execution provider, its threads), label the figures with the node."""
    import ray

    from nas.stages.measure import MeasurementError, measure_local

    node_id = ray.get_runtime_context().get_node_id()
    node = next((n for n in ray.nodes() if n["NodeID"] == node_id), {})
    name = node.get("NodeName") or node.get("NodeManagerAddress") or node_id[:12]
    with tempfile.TemporaryDirectory(prefix="nas-measure-") as tmp:
        for rel, data in files.items():
            path = Path(tmp) / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
        try:
            m = measure_local(Path(tmp), spec, profile, label=measured_on(name))
        except MeasurementError as e:
            return False, str(e)
    provenance = {**m.provenance, "ray_node_name": name, "ray_node_id": node_id,
                  "ray_node_ip": node.get("NodeManagerAddress")}
    return True, dataclasses.replace(m, provenance=provenance)
