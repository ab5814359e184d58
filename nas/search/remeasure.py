"""Measuring a study's Pareto front again (``nas remeasure STUDY``): what moved, and does it matter.

Each front trial's architecture is exported again (fresh weights: latency does not depend on
them) and measured where the study's profile is measured now: on this machine (``where:
local``), on the Ray node advertising the profile's resource (``where: ray`` with a cluster
address), or, for a device that is not there, estimated by its latency model as it is now (with
the points ``nas devices calibrate`` stored for it).

The new figures are new measurement rows, labelled and fingerprinted as every measurement is,
with ``provenance.remeasure_of`` naming the study, the trial and the row they re-take. The
trials themselves keep their objectives and their link to the measurement Optuna was told:
changing them would change what the sampler learned from after the fact, silently. The views
show a newer measurement of a front trial's architecture beside its own (``nas pareto``, the
plot's hover), so what is newest is visible without rewriting history.

Whether the front changes is judged among the front's own trials with their new figures (a
trial now dominated by another of them drops out) and by their order on decode latency; trials
off the front were not measured again, and a mix of old and new figures would not be a fair
comparison.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from nas.spec.errors import NasError
from nas.spec.profile import HardwareProfile, list_profile_files, load_profile

if TYPE_CHECKING:
    from nas.spec.results import Measurement
    from nas.store import MeasurementRow, Store, StudyRow, TrialRow

LATENCY_OBJECTIVES = ("decode_ms", "prefill_ms", "peak_memory_mb", "model_mb")
"""Objectives a measurement gives (the rest, BPB and params, do not move when re-measured)."""


@dataclass(frozen=True)
class Moved:
    """One front trial: its stored figures and the new ones."""

    trial: TrialRow
    old: MeasurementRow | None
    new: MeasurementRow
    over_budget: list[str] = field(default_factory=list)
    """Budgets the new figures break."""

    def ratio(self, key: str) -> float | None:
        old = None if self.old is None else _figure(self.old, key)
        new = _figure(self.new, key)
        return None if old in (None, 0) or new is None else new / old


@dataclass(frozen=True)
class Remeasured:
    study: str
    profile: HardwareProfile
    where: str
    moved: list[Moved]
    front_before: list[int]
    front_after: list[int]
    """Front trials still non-dominated among themselves with the new figures."""
    order_before: list[int]
    order_after: list[int]
    """Trial numbers by decode latency, old and new figures."""


def _figure(row: MeasurementRow, key: str) -> float | None:
    return row.summary().get(key) if row.ok else None


def study_profile(study: StudyRow, device: str | None) -> HardwareProfile:
    """The study's profile: by its name, or ``device`` (a name or YAML path) of the same name."""
    if device is None and study.profile not in list_profile_files():  # searched with --device FILE.yaml
        raise NasError(f"study {study.name!r} is on profile {study.profile!r}, which is not one of the "
                       f"shipped profiles: give its YAML file with --device PATH")
    profile = load_profile(device or study.profile)
    if profile.name != study.profile:
        raise NasError(f"--device {device}: profile {profile.name!r}, but study {study.name!r} is on {study.profile!r}")
    return profile


def front_to_remeasure(store: Store, study: str, top: int | None) -> list[TrialRow]:
    """The stored front, best BPB first (trial number breaks ties), its first ``top``."""
    front = [t for t in store.pareto(study=study) if t.arch_id is not None]
    if not front:
        raise NasError(f"study {study!r} has no Pareto front yet: nothing to measure again")
    front.sort(key=lambda t: (t.val_bpb if t.val_bpb is not None else float("inf"), t.number))
    return front if top is None else front[:top]


def measuring(profile: HardwareProfile, ray_address: str | None) -> tuple[Callable[..., Measurement], str]:
    """How one exported front model is measured again, and where (said before the first)."""
    from nas.search.pipeline import host_setup, measure_deployed

    where = profile.measurement.where
    if ray_address is not None and where != "ray":
        raise NasError(f"{profile.source or profile.name}: measurement.where is {where!r}, not 'ray': "
                       f"--ray-address has no device node to find")
    ray_measure = None
    if where == "ray" and ray_address is not None:
        from nas.search.ray_executor import device_nodes, measure_on_ray

        place = f"Ray node {', '.join(device_nodes(ray_address, profile.measurement.ray_resource))}"  # type: ignore[arg-type]
        ray_measure = measure_on_ray
    elif where == "local":
        place = "this host"
    else:
        place = f"{profile.name}'s latency model (estimated:model; the host measures the file and memory)"
    host = host_setup() if where != "local" and ray_measure is None else None

    def measure(spec: Any, model_dir: Path, note: Callable[[str], None]) -> Measurement:
        return measure_deployed(spec, model_dir, profile, host=host, ray_measure=ray_measure, notify=note)

    return measure, place


def remeasure_front(store: Store, study: str, *, device: str | None = None, top: int | None = None,
                    ray_address: str | None = None, progress: Callable[[str], None] = lambda s: None) -> Remeasured:
    """Measure the study's front (its first ``top`` by BPB) again and store the new rows."""
    import dataclasses

    from nas.search.calibration import with_stored_calibration
    from nas.stages.export import export_spec, fresh_distinct_model

    row = store.get_study(name=study)
    profile = study_profile(row, device)
    if profile.measurement.where != "local":
        profile = with_stored_calibration(profile, store)
    trials = front_to_remeasure(store, study, top)
    measure, where = measuring(profile, ray_address)
    moved = []
    for i, t in enumerate(trials):
        spec = store.get_architecture(arch_id=t.arch_id).spec  # type: ignore[arg-type]
        progress(f"trial {t.number} ({i + 1}/{len(trials)}): {spec.summary()} on {where}")
        with tempfile.TemporaryDirectory(prefix="nas-remeasure-") as tmp:
            exported = export_spec(spec, Path(tmp), model=fresh_distinct_model(spec),
                                   graph="deploy")  # the graph a trial measures
            m = measure(spec, exported.path.parent, progress)
        old = store.get_measurement(id=t.measurement_id) if t.measurement_id else None
        m = dataclasses.replace(m, provenance={**m.provenance, "remeasure_of": {
            "study": study, "trial": t.number, "measurement": None if old is None else old.id}})
        new = store.add_measurement(m)
        over = [k for k, v in profile.budgets.constraints(m.figures()).items() if v > 0]
        moved.append(Moved(t, old, new, over))
    return compare_front(study, profile, where, moved, [o.name for o in row.objectives],
                    [o.direction for o in row.objectives])


def compare_front(study: str, profile: HardwareProfile, where: str, moved: list[Moved], names: list[str],
                  directions: list[str]) -> Remeasured:
    """Which of the remeasured front trials stay non-dominated among themselves (and within the
    budgets) with their new figures, and their order by decode latency, old and new."""
    from nas.store import non_dominated

    def values(mv: Moved, new: bool) -> list[float]:
        obj = dict(mv.trial.objectives or {})
        if new:
            obj.update({k: v for k, v in mv.new.summary().items() if k in LATENCY_OBJECTIVES and k in obj
                        and v is not None})
        return [float(obj.get(n, float("nan"))) for n in names]

    numbers = [mv.trial.number for mv in moved]
    after = non_dominated(np.asarray([values(mv, True) for mv in moved], dtype=float), directions)
    still = [n for n, keep in zip(numbers, after, strict=True) if keep and not moved[numbers.index(n)].over_budget]

    def by_decode(new: bool) -> list[int]:
        def key(mv: Moved) -> float:
            row = mv.new if new else mv.old
            v = None if row is None else _figure(row, "decode_ms")
            return float("inf") if v is None else v
        return [mv.trial.number for mv in sorted(moved, key=key)]

    return Remeasured(study, profile, where, moved, sorted(numbers), sorted(still), by_decode(False), by_decode(True))
