"""The hardware half of a trial, composed from the stages: export, quantize, measure or estimate.

Latency does not depend on trained weights, so a spec is exported with fresh weights, measured
and checked against the profile's budgets before any training (DESIGN.md, "How a trial flows").
Where the figure comes from follows the profile's ``measurement.where``:

- ``local``: measured here, labelled ``measured:local``.
- ``ray``: measured on the Ray node that advertises the profile's resource (the distributed
  executor); without such a node the device's latency model estimates it and says so, or it is
  refused when a measured figure is required.
- ``estimate``: the device's latency model (fitted to the profile's calibration points, or its
  datasheet without them) gives the latency, labelled ``estimated:model``; the host exports and
  measures the same graph for the file size and, on a CPU target, the peak memory
  (``nas.stages.estimate``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from nas.spec.arch import ArchSpec
from nas.spec.errors import NasError
from nas.spec.latency import LatencyModel
from nas.spec.profile import HardwareProfile, load_profile
from nas.spec.results import ESTIMATED_MODEL, Measurement
from nas.stages.estimate import HostCalibration, calibrate_host, calibrated_profile, device_model, estimate
from nas.stages.measure import measure_local

HOST_PROFILE = "host"


class NotMeasurable(NasError):
    """A measured figure was required, but nothing can measure on the profile's device."""


@dataclass
class Host:
    """This machine as a measurer: its profile with the measured facts filled in, and the
    calibration behind them. For an estimated target it measures the deployed graph (file size,
    memory on a CPU target); the latency is the target's own model's."""

    profile: HardwareProfile
    cal: HostCalibration

    def model_for(self, target: HardwareProfile) -> LatencyModel:
        """The target's latency model (fitted to its calibration points; cached per profile value)."""
        return device_model(target)


def host_setup(refresh: bool = False) -> Host:
    """This host, calibrated (cached on disk after the first run; ``refresh`` measures again)."""
    host = load_profile(HOST_PROFILE)
    cal = calibrate_host(host, refresh=refresh)
    return Host(calibrated_profile(host, cal), cal)


def measure_deployed(
    spec: ArchSpec,
    model_dir: Path,
    profile: HardwareProfile,
    *,
    host: Host | None,
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
                   f"figures for {profile.name} are {ESTIMATED_MODEL} (its latency model), not measured")
    elif require_measured:
        raise NotMeasurable(f"profile {profile.name!r} can only be estimated (measurement.where: estimate)")
    if host is None:
        raise ValueError(f"profile {profile.name!r} is estimated from this host: pass the calibrated host")
    here = measure_local(model_dir, spec, profile, runtime=host.profile)
    return estimate(spec, profile, host.model_for(profile), host_measurement=here)
