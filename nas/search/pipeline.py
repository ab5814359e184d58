"""The hardware half of a trial, composed from the stages: export, quantize, measure or estimate.

Latency does not depend on trained weights, so a spec is exported with fresh weights, measured
and checked against the profile's budgets before any training (DESIGN.md, "How a trial flows").
Where the figure comes from follows the profile's ``measurement.where``:

- ``local``: measured here, labelled ``measured:local``.
- ``ray``: measured on the Ray node that advertises the profile's resource (the distributed
  executor); without such a node the roofline estimate is used and said so, or refused when a
  measured figure is required.
- ``estimate``: the host measures the target's workload and the roofline scales it, labelled
  ``estimated:roofline``, corrected by the profile's calibration points when it has some.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path

from nas.spec.arch import ArchSpec
from nas.spec.errors import NasError
from nas.spec.profile import HardwareProfile, load_profile
from nas.spec.results import Measurement
from nas.stages.estimate import HostCalibration, calibrate_host, calibrated_profile, estimate, fit_corrections
from nas.stages.measure import measure_local

HOST_PROFILE = "host"


class NotMeasurable(NasError):
    """A measured figure was required, but nothing can measure on the profile's device."""


def host_setup(refresh: bool = False) -> tuple[HardwareProfile, HostCalibration]:
    """The host profile with its measured facts filled in, and the calibration behind them."""
    host = load_profile(HOST_PROFILE)
    cal = calibrate_host(host, refresh=refresh)
    return calibrated_profile(host, cal), cal


_CORRECTIONS: dict[str, tuple[float, float]] = {}


def device_corrections(profile: HardwareProfile, host: HardwareProfile, cal: HostCalibration,
                       ) -> tuple[float, float]:
    """(decode, prefill) correction factors from the profile's calibration points: each point's
    arch is exported and measured here on the profile's workload, estimated, and compared with the
    figure measured on the device. (1, 1) without points. Memoized per profile fingerprint."""
    from nas.stages.export import export_spec

    if not profile.calibration:
        return (1.0, 1.0)
    key = f"{profile.name}-{profile.fingerprint}-{len(profile.calibration)}"
    if key not in _CORRECTIONS:
        pairs = []
        for point in profile.calibration:
            with tempfile.TemporaryDirectory() as tmp:
                exported = export_spec(point.arch, Path(tmp))
                here = measure_local(exported.path.parent, point.arch, profile, runtime=host)
            pairs.append((estimate(here, point.arch, profile, cal), point.decode_ms, point.prefill_ms))
        _CORRECTIONS[key] = fit_corrections(pairs)
    return _CORRECTIONS[key]


def measure_deployed(
    spec: ArchSpec,
    model_dir: Path,
    profile: HardwareProfile,
    *,
    host: HardwareProfile,
    cal: HostCalibration,
    require_measured: bool = False,
    ray_measure: Callable[[ArchSpec, Path, HardwareProfile], Measurement] | None = None,
    notify: Callable[[str], None] | None = None,
) -> Measurement:
    """The labelled figures of the deployed model in ``model_dir`` (from ``nas.stages.export``) on ``profile``."""
    where = profile.measurement.where
    if where == "local":
        return measure_local(model_dir, spec, profile)
    if where == "ray":
        if ray_measure is not None:
            return ray_measure(spec, model_dir, profile)
        if require_measured:
            raise NotMeasurable(
                f"profile {profile.name!r} is measured on a Ray node advertising "
                f"{profile.measurement.ray_resource!r}, and none is connected (--require-measured)"
            )
        if notify is not None:
            notify(f"no Ray node advertises {profile.measurement.ray_resource!r}: "
                   f"figures for {profile.name} are estimated:roofline, not measured")
    elif require_measured:
        raise NotMeasurable(f"profile {profile.name!r} can only be estimated (measurement.where: estimate)")
    here = measure_local(model_dir, spec, profile, runtime=host)
    return estimate(here, spec, profile, cal, corrections=device_corrections(profile, host, cal))


def budget_constraints(m: Measurement, profile: HardwareProfile) -> dict[str, float]:
    """Constraint values for each budget the profile sets: figure minus budget, in the budget's
    unit (<= 0 is feasible, as Optuna's constraints expect)."""
    b = profile.budgets
    out: dict[str, float] = {}
    if b.peak_memory_mb is not None:
        out["peak_memory_mb"] = m.peak_memory_mb - b.peak_memory_mb
    if b.decode_ms_per_token is not None:
        out["decode_ms_per_token"] = m.decode_ms - b.decode_ms_per_token
    if b.prefill_ms is not None:
        out["prefill_ms"] = m.prefill_ms - b.prefill_ms
    if b.model_mb is not None:
        out["model_mb"] = m.model_mb - b.model_mb
    return out
