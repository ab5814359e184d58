"""Calibration on the device (``nas devices calibrate --device NAME``) and its use by estimates.

The reference set (``nas.spec.calibration.REFERENCE_SET``) is exported here and measured where
the profile says a figure for it comes from: on the Ray node advertising its ``ray_resource``
(``where: ray``, through ``measure_on_ray``, the search's own path), or on this machine
(``where: local``). Each figure is stored in ``nas_calibration`` under the device fingerprint the
measurement was taken with (computed where it ran), and becomes a calibration point of the
device's latency model.

An estimate for the profile (``where: ray`` without its node, or ``where: estimate``) then fits
the model to the profile's own points plus the stored points of the fingerprint calibrated last
(:func:`with_stored_calibration`); the estimate's provenance names them (``stored_calibration``).
A profile measured for real never needs them: its figures are measurements.
"""

from __future__ import annotations

import socket
import tempfile
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from nas.spec.calibration import Reference, reference_set, with_points
from nas.spec.errors import NasError
from nas.spec.latency import LatencyModel
from nas.spec.profile import CalibrationPoint, HardwareProfile, latency_model, point_observations

if TYPE_CHECKING:
    from nas.spec.arch import ArchSpec
    from nas.spec.results import Measurement
    from nas.store import CalibrationRow, Store

Measure = Callable[["ArchSpec", Path], "Measurement"]


class CannotCalibrate(NasError):
    """Nothing can measure on the profile's device from here."""


# --- where the reference set is measured ---------------------------------------------------------
def measurer(profile: HardwareProfile, ray_address: str | None) -> tuple[Measure, str]:
    """How to measure one exported reference on the profile's device, and where that is (said
    before anything is exported). Raises :class:`CannotCalibrate` when nothing can."""
    from nas.stages.measure import measure_local

    where = profile.measurement.where
    if ray_address is not None and where != "ray":
        raise CannotCalibrate(f"{profile.source or profile.name}: measurement.where is {where!r}, not 'ray': "
                              f"--ray-address has no device node to find")
    if where == "local":
        return (lambda spec, d: measure_local(d, spec, profile)), f"this host ({socket.gethostname()})"
    if where == "estimate":
        raise CannotCalibrate(f"{profile.source or profile.name}: measurement.where: estimate: nothing measures on "
                              f"this device; calibrate it where it runs (where: local or ray)")
    resource = profile.measurement.ray_resource
    if ray_address is None:
        raise CannotCalibrate(f"{profile.source or profile.name}: measurement.where: ray: give --ray-address HEAD:PORT "
                              f"of the cluster whose node advertises {resource!r}")
    from nas.search.ray_executor import device_nodes, measure_on_ray

    nodes = device_nodes(ray_address, resource)  # type: ignore[arg-type]
    return (lambda spec, d: measure_on_ray(spec, d, profile)), f"Ray node {', '.join(nodes)}"


def node_of(m: Measurement) -> str:
    """The machine a measurement ran on: its Ray node's name, or this host's."""
    return str(m.provenance.get("ray_node_name") or socket.gethostname())


def measure_references(references: Sequence[Reference], measure: Measure,
                       progress: Callable[[str], None] = lambda s: None) -> list[Measurement]:
    """Export each reference here (fresh weights: latency does not depend on them) and measure it."""
    from nas.stages.export import export_spec, fresh_distinct_model

    out = []
    for i, ref in enumerate(references):
        progress(f"reference {i + 1}/{len(references)} ({ref.name}): {ref.spec.summary()}")
        with tempfile.TemporaryDirectory(prefix="nas-calibrate-") as tmp:
            exported = export_spec(ref.spec, Path(tmp), model=fresh_distinct_model(ref.spec),
                                   graph="deploy")  # the graph a trial measures
            out.append(measure(ref.spec, exported.path.parent))
    return out


# --- the run and its fit -------------------------------------------------------------------------
@dataclass(frozen=True)
class PointFit:
    """One stored point against the latency model before and after it was added."""

    row: CalibrationRow
    measured: dict[str, float]
    """decode and prefill, ms, as measured."""
    before: dict[str, float] = field(default_factory=dict)
    """What the model fitted to the profile's own points predicted (empty: no model)."""
    after: dict[str, float] = field(default_factory=dict)
    """What the model refitted with this run's points predicts."""


@dataclass(frozen=True)
class CalibrationRun:
    profile: HardwareProfile
    run: str
    where: str
    rows: list[CalibrationRow]
    fits: list[PointFit]
    before: LatencyModel | None
    after: LatencyModel | None
    no_fit: str | None = None
    """Why no model was fitted (the profile's device facts are ``measure``)."""


def calibrate_device(profile: HardwareProfile, store: Store, *, ray_address: str | None = None,
                     n: int | None = None, progress: Callable[[str], None] = lambda s: None) -> CalibrationRun:
    """Measure the reference set on the profile's device, store each point, and fit the device's
    latency model with them."""
    measure, where = measurer(profile, ray_address)
    progress(f"measuring the reference set on {where}")
    refs = reference_set(n)
    run = datetime.now(UTC).strftime("%Y%m%dT%H%M%S") + "-" + uuid.uuid4().hex[:6]
    rows = []
    for ref, m in zip(refs, measure_references(refs, measure, progress), strict=True):
        store.upsert_architecture(spec=ref.spec)
        rows.append(store.add_calibration(run=run, profile=profile.name, node=node_of(m), measurement=m))
    fit_on, no_fit = fit_profile(profile)
    if fit_on is None:
        fits = [_fit(r, profile, None, None) for r in rows]
        return CalibrationRun(profile, run, where, rows, fits, None, None, no_fit)
    points = [r.to_point(profile.device.name) for r in rows]
    before, after = latency_model(fit_on), latency_model(with_points(fit_on, points))
    return CalibrationRun(profile, run, where, rows, [_fit(r, profile, before, after) for r in rows], before, after)


def fit_profile(profile: HardwareProfile) -> tuple[HardwareProfile | None, str | None]:
    """The profile a latency model can be fitted on (device facts known), or None and why. A
    ``where: local`` profile with ``measure`` facts is this host: its calibration fills them."""
    unknown = profile.to_be_measured()
    if not unknown:
        return profile, None
    if profile.measurement.where == "local":
        from nas.stages.estimate import calibrate_host, calibrated_profile

        return calibrated_profile(profile, calibrate_host(profile)), None
    return None, (f"{unknown[0]} is 'measure' in {profile.source or profile.name}: no latency model to fit "
                  f"(give the device's datasheet figures)")


def _fit(row: CalibrationRow, profile: HardwareProfile, before: LatencyModel | None,
         after: LatencyModel | None) -> PointFit:
    point = row.to_point(profile.device.name)
    measured = {"decode": row.decode_ms, "prefill": row.prefill_ms}
    predicted: list[dict[str, float]] = []
    for model in (before, after):
        predicted.append({} if model is None else
                         {o.step.phase: model.step_ms(o.step) for o in point_observations(point, 0)})
    return PointFit(row, measured, predicted[0], predicted[1])


def relative_error(predicted: float | None, measured: float) -> float | None:
    return None if predicted is None else (predicted - measured) / measured


# --- export to the profile's YAML ----------------------------------------------------------------
def points_yaml(profile: HardwareProfile, rows: Sequence[CalibrationRow]) -> str:
    """A ``calibration:`` snippet of the rows as points of the profile's YAML, each with its run
    as its source (date, node, fingerprint, runtime)."""
    import yaml

    points = [r.to_point(profile.device.name).model_dump(mode="json", exclude_none=True) for r in rows]
    fingerprints = sorted({r.device_fingerprint for r in rows})
    header = (f"# {len(rows)} point(s) of {profile.name} measured by `nas devices calibrate --device {profile.name}` "
              f"(fingerprint {', '.join(fingerprints)}).\n"
              f"# Paste them under the `calibration:` of {profile.source or profile.name}: the profile then "
              f"carries them without the database.\n")
    return header + yaml.safe_dump({"calibration": points}, sort_keys=False, allow_unicode=True)


# --- estimates from the stored points ------------------------------------------------------------
def with_stored_calibration(profile: HardwareProfile, store: Store) -> HardwareProfile:
    """The profile with the stored points of its fingerprint calibrated last added to its own
    (those it carries already, pasted from an export, are not added twice)."""
    rows = store.latest_calibration(profile=profile.name)
    have = {(p.arch.arch_id, p.source.fingerprint) for p in profile.calibration}
    points = [r.to_point(profile.device.name) for r in rows if (r.arch_id, r.device_fingerprint) not in have]
    return with_points(profile, points)


def describe_stored(points: Sequence[CalibrationPoint]) -> dict[str, Any]:
    """Which stored points an estimate used, and from where (for a message)."""
    return {"points": len(points), "nodes": sorted({p.source.node or "?" for p in points}),
            "fingerprints": sorted({p.source.fingerprint or "?" for p in points})}
