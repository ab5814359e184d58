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

import json
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
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


@dataclass
class Host:
    """This machine as a measurer: its profile with the measured facts filled in, the calibration
    behind them, and the correction factors fitted per target profile. The factors depend on the
    target's calibration points *and* on this calibration, so they are cached here, with it: a
    new calibration is a new ``Host`` and fits them again."""

    profile: HardwareProfile
    cal: HostCalibration
    _corrections: dict[str, tuple[float, float]] = field(default_factory=dict, repr=False)

    def corrections(self, target: HardwareProfile) -> tuple[float, float]:
        """(decode, prefill) correction factors from the target's calibration points: each point's
        arch is exported and measured here on the target's workload, estimated, and compared with
        the figure measured on the device. (1, 1) without points."""
        from nas.stages.export import export_spec

        if not target.calibration:
            return (1.0, 1.0)
        # the fingerprint leaves calibration out (it keys measurements); the points matter here
        points = json.dumps(target.model_dump(mode="json", include={"calibration"}), sort_keys=True)
        key = f"{target.name}-{target.fingerprint}-{points}"
        if key not in self._corrections:
            pairs = []
            for point in target.calibration:
                with tempfile.TemporaryDirectory() as tmp:
                    # the graph a trial measures, so the correction applies to what it corrects
                    exported = export_spec(point.arch, Path(tmp), graph="deploy")
                    here = measure_local(exported.path.parent, point.arch, target, runtime=self.profile)
                pairs.append((estimate(here, point.arch, target, self.cal), point.decode_ms, point.prefill_ms))
            self._corrections[key] = fit_corrections(pairs)
        return self._corrections[key]


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
                   f"figures for {profile.name} are estimated:roofline, not measured")
    elif require_measured:
        raise NotMeasurable(f"profile {profile.name!r} can only be estimated (measurement.where: estimate)")
    if host is None:
        raise ValueError(f"profile {profile.name!r} is estimated from this host: pass the calibrated host")
    here = measure_local(model_dir, spec, profile, runtime=host.profile)
    return estimate(here, spec, profile, host.cal, corrections=host.corrections(profile))
