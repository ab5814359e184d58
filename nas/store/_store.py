"""The Store: a narrow, keyword-only API over the ``nas_*`` tables.

Every method is one short transaction (writes take the write lock up front: see ``_engine``) and
returns frozen rows (``_rows``), never ORM objects. Finders say what a miss does: ``find_*``
returns None, ``get_*`` raises :class:`StoreError` naming what exists.

Studies and trials are named as the user and Optuna name them: a study by its unique name, a
trial by the study's name and Optuna's trial number.
"""

from __future__ import annotations

import json
import math
import numbers
import re
from collections.abc import Iterable, Mapping, Sequence
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import numpy as np
from sqlalchemy import delete, func, or_, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import make_url
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from nas.spec.arch import BITWIDTHS, ArchSpec
from nas.spec.results import Measurement
from nas.store._engine import (
    StoreError,
    default_db_url,
    describe_error,
    json_dumps,
    make_engine,
    safe_url,
    session_scope,
    writer,
)
from nas.store._migrate import known_revisions, revision_of, schema_problem, upgrade_engine
from nas.store._pareto import DIRECTIONS, non_dominated
from nas.store._rows import (
    ArchitectureRow,
    CalibrationRow,
    MeasurementRow,
    NoiseRow,
    Objective,
    RungRow,
    StudyRow,
    TrialRow,
    as_utc,
)
from nas.store.models import (
    TRIAL_STATES,
    ArchitectureModel,
    CalibrationModel,
    MeasurementModel,
    NoiseModel,
    ParetoModel,
    RungModel,
    StudyModel,
    TrialModel,
    utcnow,
)

_LABEL = re.compile(r"^(measured|estimated):\S+$")
ObjectiveLike = Objective | Mapping[str, str] | tuple[str, str]


class Store:
    """The project's tables in the database at ``url`` (default: ``nas.db`` here).

    ``upgrade=True`` brings an older schema (or an empty database) to this code's revision on
    open; with ``upgrade=False`` an out-of-date schema raises :class:`StoreError` with the
    ``nas db upgrade`` command to run. Use as a context manager, or call :meth:`close`.
    """

    def __init__(self, url: str | None = None, *, upgrade: bool = True) -> None:
        self._url = url or default_db_url()
        if not upgrade:
            _refuse_missing_sqlite_file(self._url)
        self._engine = make_engine(self._url)
        self._writer = writer(self._engine)
        try:
            self._ensure_schema(upgrade)
        except BaseException:
            self._engine.dispose()
            raise

    def _ensure_schema(self, upgrade: bool) -> None:
        try:
            with self._engine.connect() as conn:
                current = revision_of(conn)
        except SQLAlchemyError as e:
            raise StoreError(describe_error(e, self._url)) from e
        problem = schema_problem(current, self._url)
        if problem is None:
            return
        if not upgrade or (current is not None and current not in known_revisions()):
            raise StoreError(problem)
        upgrade_engine(self._engine, self._url)

    @property
    def url(self) -> str:
        """The database URL, password masked."""
        return safe_url(self._url)

    def close(self) -> None:
        self._engine.dispose()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Store({self.url!r})"

    def _read(self) -> AbstractContextManager[Session]:
        return session_scope(self._engine)

    def _write(self) -> AbstractContextManager[Session]:
        """A write transaction: on SQLite it holds the write lock from its first statement."""
        return session_scope(self._writer)

    # --- architectures -------------------------------------------------------------------------
    def upsert_architecture(self, *, spec: ArchSpec) -> ArchitectureRow:
        """Store ``spec`` under its arch_id unless it is there already (then nothing changes)."""
        values = {
            "arch_id": spec.arch_id,
            "spec": spec.canonical_json(),
            "summary": spec.summary(),
            "attention": spec.attention,
            "bitwidth": spec.bitwidth,
            "vocab_size": spec.vocab_size,
            "d_model": spec.d_model,
            "n_layers": spec.n_layers,
            "params": spec.params(),
            "non_embedding_params": spec.non_embedding_params(),
            "created_at": utcnow(),
        }
        with self._write() as s:
            # INSERT .. ON CONFLICT DO NOTHING: two workers drawing the same spec at once must
            # not fail one of them on the primary key.
            dialect = s.get_bind().dialect.name
            if dialect in ("sqlite", "postgresql"):
                insert = sqlite.insert if dialect == "sqlite" else postgresql.insert
                s.execute(insert(ArchitectureModel).values(**values).on_conflict_do_nothing())
            elif s.get(ArchitectureModel, spec.arch_id) is None:
                s.add(ArchitectureModel(**values))
                s.flush()
            return _architecture_row(s.get_one(ArchitectureModel, spec.arch_id))

    def find_architecture(self, *, arch_id: str) -> ArchitectureRow | None:
        with self._read() as s:
            row = s.get(ArchitectureModel, arch_id)
            return None if row is None else _architecture_row(row)

    def get_architecture(self, *, arch_id: str) -> ArchitectureRow:
        found = self.find_architecture(arch_id=arch_id)
        if found is None:
            raise StoreError(f"no architecture {arch_id!r} in {self.url}")
        return found

    # --- measurements --------------------------------------------------------------------------
    def add_measurement(self, m: Measurement) -> MeasurementRow:
        """Record one measurement as a stage made it: its medians, p10/p90 and raw repeats, the
        label and the provenance (what it was taken on)."""
        self._check_measurement_key(m.bitwidth, m.label)
        bad = [k for k, v in m.figures().items() if not _is_finite_number(v)]
        if bad:
            raise StoreError(f"{bad[0]} must be a finite number, got {m.figures()[bad[0]]!r}")
        return self._insert_measurement(
            arch_id=m.arch_id, profile=m.profile, bitwidth=m.bitwidth, label=m.label,
            prefill_ms=m.prefill.median_ms, prefill_p10_ms=m.prefill.p10_ms, prefill_p90_ms=m.prefill.p90_ms,
            prefill_repeats_ms=[float(x) for x in m.prefill.repeats_ms],
            decode_ms_per_token=m.decode.median_ms, decode_p10_ms=m.decode.p10_ms, decode_p90_ms=m.decode.p90_ms,
            decode_repeats_ms=[float(x) for x in m.decode.repeats_ms],
            peak_memory_bytes=m.peak_memory_bytes, model_bytes=m.model_bytes, workload=m.workload,
            provenance=m.provenance,
        )  # fmt: skip

    def add_failed_measurement(self, *, arch_id: str, profile: str, bitwidth: int, label: str, error: str,
                               workload: Mapping[str, Any] | None = None) -> MeasurementRow:
        """Record a failed attempt: no figures, the reason, and where it was tried (``label``)."""
        self._check_measurement_key(bitwidth, label)
        return self._insert_measurement(arch_id=arch_id, profile=profile, bitwidth=bitwidth, label=label,
                                        error=error, workload=workload)

    @staticmethod
    def _check_measurement_key(bitwidth: int, label: str) -> None:
        if not _LABEL.match(label):
            raise StoreError(f"measurement label {label!r} must be measured:<where> or estimated:<how>")
        if bitwidth not in BITWIDTHS:
            raise StoreError(f"bitwidth must be one of {list(BITWIDTHS)}, got {bitwidth!r}")

    def _insert_measurement(self, *, workload: Mapping[str, Any] | None = None,
                            provenance: Mapping[str, Any] | None = None, **columns: Any) -> MeasurementRow:
        with self._write() as s:
            _require_architecture(s, columns["arch_id"])
            row = MeasurementModel(**columns, workload=_jsonable(workload or {}),
                                   provenance=_jsonable(provenance or {}), created_at=utcnow())
            s.add(row)
            s.flush()
            return _measurement_row(row)

    def find_measurement(
        self,
        *,
        arch_id: str,
        profile: str,
        bitwidth: int,
        labels: Iterable[str] | None = None,
        workload: Mapping[str, Any] | None = None,
        fingerprint: str | None = None,
    ) -> MeasurementRow | None:
        """The latest successful measurement for (arch_id, profile, bitwidth), or None.

        Failed attempts never count. ``labels`` keeps only those labels (``measured:*`` matches
        any node); ``workload`` keeps only rows whose workload has those values (a row
        also records how it was run: warm-up, repeats), so that a profile whose prompt or context
        length changed is measured again. ``fingerprint`` keeps only rows taken on a machine with that
        fingerprint (``provenance.fingerprint``, or an estimate's ``provenance.host.fingerprint``):
        a figure is reused only where it was taken.
        """
        query = (
            select(MeasurementModel)
            .where(
                MeasurementModel.arch_id == arch_id,
                MeasurementModel.profile == profile,
                MeasurementModel.bitwidth == bitwidth,
                MeasurementModel.error.is_(None),
            )
            .order_by(MeasurementModel.created_at.desc(), MeasurementModel.id.desc())
        )
        if labels is not None:
            query = query.where(_label_filter(list(labels)))
        with self._read() as s:
            for row in s.scalars(query):
                if workload is not None and not all((row.workload or {}).get(k) == v for k, v in workload.items()):
                    continue
                if fingerprint is not None and fingerprint not in _fingerprints(row.provenance or {}):
                    continue
                return _measurement_row(row)
        return None

    def newer_measurement(self, *, id: int) -> MeasurementRow | None:
        """The newest successful measurement of the same architecture, profile and bitwidth as
        row ``id`` taken after it (``nas remeasure``, or another study's), or None: what the views
        show beside a trial's own figures, which stay as the trial was scored."""
        old = self.get_measurement(id=id)
        new = self.find_measurement(arch_id=old.arch_id, profile=old.profile, bitwidth=old.bitwidth)
        if new is None or (new.created_at, new.id) <= (old.created_at, old.id):
            return None
        return new

    def get_measurement(self, *, id: int) -> MeasurementRow:
        with self._read() as s:
            row = s.get(MeasurementModel, id)
            if row is None:
                raise StoreError(f"no measurement {id} in {self.url}")
            return _measurement_row(row)

    def measurements(
        self, *, arch_id: str | None = None, profile: str | None = None, ids: Iterable[int] | None = None
    ) -> list[MeasurementRow]:
        """Every measurement (failed ones too), newest first, optionally of one arch or profile,
        or only those with the given ``ids`` (the ones a study's trials link to)."""
        query = select(*MeasurementModel.__table__.columns).order_by(
            MeasurementModel.created_at.desc(), MeasurementModel.id.desc()
        )
        if arch_id is not None:
            query = query.where(MeasurementModel.arch_id == arch_id)
        if profile is not None:
            query = query.where(MeasurementModel.profile == profile)
        with self._read() as s:
            if ids is None:
                return [_measurement_row(r) for r in s.execute(query)]
            wanted = sorted(set(ids))
            out: list[MeasurementRow] = []
            for i in range(0, len(wanted), 500):  # bounded IN lists, within every driver's limits
                chunk = query.where(MeasurementModel.id.in_(wanted[i : i + 500]))
                out += [_measurement_row(r) for r in s.execute(chunk)]
            return sorted(out, key=lambda m: (m.created_at, m.id), reverse=True)

    # --- calibration on a device ----------------------------------------------------------------
    def add_calibration(self, *, run: str, profile: str, node: str, measurement: Measurement) -> CalibrationRow:
        """Record one reference architecture measured on the device as a calibration point of
        ``profile``, under the fingerprint the measurement was taken with (its provenance's
        ``fingerprint`` and ``device_facts``, written where it ran). Its architecture must be
        stored (``upsert_architecture``)."""
        m = measurement
        fingerprint = m.provenance.get("fingerprint")
        if not m.label.startswith("measured:"):
            raise StoreError(f"a calibration point must be measured on the device, not {m.label!r}")
        if not isinstance(fingerprint, str) or not fingerprint:
            raise StoreError(f"measurement of {m.arch_id} has no provenance.fingerprint: it cannot calibrate a device")
        bad = [k for k in ("decode_ms", "prefill_ms") if not (_is_finite_number(getattr(m, k)) and getattr(m, k) > 0)]
        if bad:
            raise StoreError(f"calibration point of {m.arch_id}: {bad[0]} must be a positive number")
        with self._write() as s:
            _require_architecture(s, m.arch_id)
            row = CalibrationModel(
                run=run, profile=profile, device_fingerprint=fingerprint, arch_id=m.arch_id, bitwidth=m.bitwidth,
                label=m.label, node=node, decode_ms=float(m.decode_ms), prefill_ms=float(m.prefill_ms),
                peak_memory_bytes=m.peak_memory_bytes, model_bytes=m.model_bytes, workload=_jsonable(m.workload),
                device_facts=_jsonable(m.provenance.get("device_facts") or {}), provenance=_jsonable(m.provenance),
                created_at=utcnow(),
            )  # fmt: skip
            s.add(row)
            s.flush()
            return _calibration_row(s, row)

    def calibration(self, *, profile: str, device_fingerprint: str | None = None,
                    run: str | None = None) -> list[CalibrationRow]:
        """The profile's calibration points, newest first; only one fingerprint's, or one run's."""
        query = select(CalibrationModel).where(CalibrationModel.profile == profile)
        if device_fingerprint is not None:
            query = query.where(CalibrationModel.device_fingerprint == device_fingerprint)
        if run is not None:
            query = query.where(CalibrationModel.run == run)
        query = query.order_by(CalibrationModel.created_at.desc(), CalibrationModel.id.desc())
        with self._read() as s:
            return [_calibration_row(s, r) for r in s.scalars(query)]

    def latest_calibration(self, *, profile: str) -> list[CalibrationRow]:
        """The points an estimate for ``profile`` uses: those of the fingerprint calibrated last
        (the device as it was last seen), the newest per architecture; empty without any."""
        rows = self.calibration(profile=profile)
        if not rows:
            return []
        newest: dict[str, CalibrationRow] = {}
        for r in rows:
            if r.device_fingerprint == rows[0].device_fingerprint:
                newest.setdefault(r.arch_id, r)
        return sorted(newest.values(), key=lambda r: r.id)

    # --- studies -------------------------------------------------------------------------------
    def create_study(
        self,
        *,
        name: str,
        space: str,
        profile: str,
        objectives: Sequence[ObjectiveLike],
        optuna_study_id: int | None = None,
        corpus_fingerprint: str | None = None,
        train_config: Mapping[str, Any] | Any = None,
        seed: int | None = None,
        code_version: str | None = None,
        extra: Mapping[str, Any] | None = None,
    ) -> StudyRow:
        """A new study; raises if the name is taken (use :meth:`find_study` to resume one).

        ``objectives`` in Optuna's order of values, e.g. ``[("val_bpb", "minimize"),
        ("decode_ms", "minimize")]``; ``train_config`` a mapping or a pydantic model.
        """
        objs = _objectives(objectives)
        if not name or not name.strip():
            raise StoreError("a study needs a non-empty name")
        if hasattr(train_config, "model_dump"):
            train_config = train_config.model_dump(mode="json")
        with self._write() as s:
            if s.scalar(select(StudyModel.id).where(StudyModel.name == name)) is not None:
                raise StoreError(f"a study named {name!r} already exists in {self.url}")
            row = StudyModel(
                name=name, optuna_study_id=optuna_study_id, space=space, profile=profile,
                corpus_fingerprint=corpus_fingerprint, train_config=_jsonable(train_config or {}),
                objectives=[o.to_dict() for o in objs], seed=seed, code_version=code_version,
                created_at=utcnow(), extra=_jsonable(extra or {}),
            )  # fmt: skip
            s.add(row)
            s.flush()
            return _study_row(row, {})

    def find_study(self, *, name: str) -> StudyRow | None:
        with self._read() as s:
            row = s.scalar(select(StudyModel).where(StudyModel.name == name))
            return None if row is None else _study_row(row, _counts(s, [row.id]).get(row.id, {}))

    def get_study(self, *, name: str) -> StudyRow:
        with self._read() as s:
            row = s.scalar(select(StudyModel).where(StudyModel.name == name))
            if row is None:
                raise StoreError(_no_study(s, name, self.url))
            return _study_row(row, _counts(s, [row.id]).get(row.id, {}))

    def list_studies(self) -> list[StudyRow]:
        """Every study, oldest first, with its trial counts by state."""
        with self._read() as s:
            rows = list(s.scalars(select(StudyModel).order_by(StudyModel.created_at, StudyModel.id)))
            counts = _counts(s, [r.id for r in rows])
            return [_study_row(r, counts.get(r.id, {})) for r in rows]

    def delete_study(self, *, name: str) -> None:
        """Remove the study and its trials, their rungs and its front from our tables (Optuna's
        study stays: delete it with Optuna). Architectures and measurements stay, being shared."""
        with self._write() as s:
            study_id = _study_id(s, name, self.url)
            # Explicit deletes rather than ON DELETE CASCADE alone: SQLite enforces foreign keys
            # only on connections that enable them, and another tool's may not.
            s.execute(delete(ParetoModel).where(ParetoModel.study_id == study_id))
            s.execute(delete(RungModel).where(RungModel.study_id == study_id))
            s.execute(delete(TrialModel).where(TrialModel.study_id == study_id))
            s.execute(delete(StudyModel).where(StudyModel.id == study_id))

    # --- trials --------------------------------------------------------------------------------
    def start_trial(
        self,
        *,
        study: str,
        number: int,
        optuna_trial_id: int | None = None,
        arch_id: str | None = None,
        worker: str | None = None,
    ) -> TrialRow:
        """Record trial ``number`` of ``study`` as running (the spec may come later, through
        :meth:`update_trial`)."""
        with self._write() as s:
            study_id = _study_id(s, study, self.url)
            if s.scalar(select(TrialModel.id).where(TrialModel.study_id == study_id, TrialModel.number == number)):
                raise StoreError(f"trial {number} of study {study!r} already exists")
            if arch_id is not None:
                _require_architecture(s, arch_id)
            row = TrialModel(
                study_id=study_id, number=number, optuna_trial_id=optuna_trial_id, arch_id=arch_id,
                state="running", worker=worker, started_at=utcnow(),
            )  # fmt: skip
            s.add(row)
            s.flush()
            return _trial_row(s, row, study)

    def update_trial(
        self,
        *,
        study: str,
        number: int,
        arch_id: str | None = None,
        measurement_id: int | None = None,
        artifact_dir: str | None = None,
        optuna_trial_id: int | None = None,
    ) -> TrialRow:
        """Fill in what a running trial learned so far; arguments left as None stay unchanged."""
        with self._write() as s:
            row = _running_trial(s, study, number, self.url, "update")
            _link(s, row, arch_id=arch_id, measurement_id=measurement_id, artifact_dir=artifact_dir)
            if optuna_trial_id is not None:
                row.optuna_trial_id = optuna_trial_id
            s.flush()
            return _trial_row(s, row, study)

    def finish_trial(
        self,
        *,
        study: str,
        number: int,
        objectives: Mapping[str, float],
        val_bpb: float | None = None,
        constraints: Mapping[str, float] | None = None,
        train: Mapping[str, Any] | None = None,
        curve: Sequence[Any] | None = None,
        baselines: Mapping[str, Any] | None = None,
        arch_id: str | None = None,
        measurement_id: int | None = None,
        artifact_dir: str | None = None,
    ) -> TrialRow:
        """Mark a running trial complete with its objective values (every one of the study's
        objectives, finite) and constraint values (<= 0 means satisfied)."""
        with self._write() as s:
            row = _running_trial(s, study, number, self.url, "finish")
            wanted = [o["name"] for o in s.get_one(StudyModel, row.study_id).objectives]
            missing = [n for n in wanted if n not in objectives]
            if missing:
                raise StoreError(
                    f"trial {number} of study {study!r}: objective {missing[0]!r} has no value "
                    f"(the study's objectives: {', '.join(wanted)})"
                )
            bad = {k: v for k, v in objectives.items() if not _is_finite_number(v)}
            if val_bpb is not None and not _is_finite_number(val_bpb):
                bad["val_bpb"] = val_bpb
            if bad:
                name = next(iter(bad))
                raise StoreError(
                    f"trial {number} of study {study!r}: objective {name!r} is {bad[name]!r}; "
                    f"a trial without finite objectives is failed, not complete (fail_trial)"
                )
            _link(s, row, arch_id=arch_id, measurement_id=measurement_id, artifact_dir=artifact_dir)
            row.state = "complete"
            row.objectives = {k: float(v) for k, v in objectives.items()}
            row.constraints = _constraints(constraints)
            row.val_bpb = val_bpb
            row.train = _jsonable(train)
            row.curve = _jsonable(curve)
            row.baselines = _jsonable(baselines)
            row.finished_at = utcnow()
            s.flush()
            return _trial_row(s, row, study)

    def fail_trial(self, *, study: str, number: int, stage: str, reason: str) -> TrialRow:
        """Mark a running trial failed at ``stage`` (e.g. "export", "measure", "train") for
        ``reason`` (one line a user can act on)."""
        with self._write() as s:
            row = _running_trial(s, study, number, self.url, "fail")
            row.state, row.failed_stage, row.failure_reason = "failed", stage, reason
            row.finished_at = utcnow()
            s.flush()
            return _trial_row(s, row, study)

    def mark_infeasible(
        self,
        *,
        study: str,
        number: int,
        stage: str,
        reason: str,
        constraints: Mapping[str, float] | None = None,
        arch_id: str | None = None,
        measurement_id: int | None = None,
    ) -> TrialRow:
        """Mark a running trial infeasible: over a budget of the profile, found at ``stage``
        ("analytic" before any cost, "measure" after measuring); ``reason`` names the budget."""
        with self._write() as s:
            row = _running_trial(s, study, number, self.url, "mark infeasible")
            _link(s, row, arch_id=arch_id, measurement_id=measurement_id, artifact_dir=None)
            row.state, row.failed_stage, row.failure_reason = "infeasible", stage, reason
            row.constraints = _constraints(constraints)
            row.finished_at = utcnow()
            s.flush()
            return _trial_row(s, row, study)

    def find_trial(self, *, study: str, number: int) -> TrialRow | None:
        with self._read() as s:
            study_id = _study_id(s, study, self.url)
            row = s.scalar(select(TrialModel).where(TrialModel.study_id == study_id, TrialModel.number == number))
            return None if row is None else _trial_row(s, row, study)

    def get_trial(self, *, study: str, number: int) -> TrialRow:
        found = self.find_trial(study=study, number=number)
        if found is None:
            raise StoreError(f"no trial {number} in study {study!r}")
        return found

    def trials(self, *, study: str, states: Iterable[str] | None = None, curves: bool = False) -> list[TrialRow]:
        """The study's trials by number, optionally only those in ``states``.

        Learning curves are left out (``curve`` is None) unless ``curves=True``: decoding them is
        most of the cost of listing a large study, and a table or a front does not show them.
        """
        # Plain column rows, not ORM objects: building 10,000 ORM instances cost as much as the
        # query itself, and a listing never writes back.
        columns = [c for c in TrialModel.__table__.columns if curves or c.name != "curve"]
        query = select(*columns, ArchitectureModel.summary.label("arch_summary")).outerjoin(
            ArchitectureModel, TrialModel.arch_id == ArchitectureModel.arch_id
        )
        if states is not None:
            query = query.where(TrialModel.state.in_(_states(states)))
        with self._read() as s:
            study_id = _study_id(s, study, self.url)
            query = query.where(TrialModel.study_id == study_id).order_by(TrialModel.number)
            return [_to_trial_row(row, study, row.arch_summary, curve=curves) for row in s.execute(query)]

    # --- rungs ---------------------------------------------------------------------------------
    def record_rung(
        self, *, study: str, number: int, rung: int, tokens: int, val_bpb: float, seconds: float,
        only: bool = False,
    ) -> RungRow:
        """Record running trial ``number``'s score at ``rung``: validation bits per byte after
        ``tokens`` tokens and ``seconds`` of training so far.

        ``only``: the trial was scored at this one rung and no other, because it did not train
        but took another trial's weights as they were at that rung (another bitwidth of the same
        architecture); it has no lower rungs, and is compared with other trials at this rung only.

        Written as it happens, while the trial runs, so that the search can rank it among the
        study's trials at that rung (:meth:`rung_results`). A trial's rungs arrive in order
        (rung k+1 after rung k, on more tokens) and once each: a resumed trial reads
        :meth:`trial_rungs` for the rungs it already has instead of recording them again.
        """
        where = f"rung {rung} of trial {number} of study {study!r}"
        _check_rung_values(where, rung=rung, tokens=tokens, val_bpb=val_bpb, seconds=seconds)
        with self._write() as s:
            # Locks the trial row (PostgreSQL; SQLite's write lock covers it): two processes
            # recording the same trial's rungs take turns, and the order check below holds.
            trial = _running_trial(s, study, number, self.url, f"record rung {rung} of")
            last = s.execute(
                select(RungModel.rung, RungModel.tokens)
                .where(RungModel.trial_id == trial.id)
                .order_by(RungModel.rung.desc())
                .limit(1)
            ).first()
            if last is not None and rung <= last.rung:
                same = s.scalar(select(RungModel.val_bpb).where(RungModel.trial_id == trial.id, RungModel.rung == rung))
                raise StoreError(
                    f"{where} is recorded already (val_bpb {same}); a resumed trial reads trial_rungs() "
                    f"for the rungs it has"
                )
            expected = 0 if last is None else last.rung + 1
            if rung != expected and not (only and last is None):
                raise StoreError(
                    f"cannot record {where}: its next rung is {expected} (a trial's rungs are recorded in order)"
                )
            if last is not None and tokens <= last.tokens:
                raise StoreError(
                    f"cannot record {where} at {tokens} tokens: rung {last.rung} was at {last.tokens} already "
                    f"(each rung trains on more tokens)"
                )
            row = RungModel(
                trial_id=trial.id, study_id=trial.study_id, rung=int(rung), tokens=int(tokens),
                val_bpb=float(val_bpb), seconds=float(seconds), created_at=utcnow(),
            )  # fmt: skip
            s.add(row)
            s.flush()
            return _rung_row(s.execute(_rungs_query().where(RungModel.id == row.id)).one(), study)

    def rung_results(self, *, study: str, rung: int) -> list[RungRow]:
        """Every trial of ``study`` that reached ``rung``, by trial number, whatever its state
        now: running ones included (they are the ones waiting to be ranked), and those that
        finished, failed or were found infeasible after the rung."""
        with self._read() as s:
            study_id = _study_id(s, study, self.url)
            query = _rungs_query().where(RungModel.study_id == study_id, RungModel.rung == rung)
            return [_rung_row(r, study) for r in s.execute(query.order_by(TrialModel.number))]

    def trial_rungs(self, *, study: str, number: int) -> list[RungRow]:
        """Trial ``number``'s rungs in order (empty before its first); raises for a trial that
        does not exist."""
        with self._read() as s:
            study_id = _study_id(s, study, self.url)
            trial_id = s.scalar(
                select(TrialModel.id).where(TrialModel.study_id == study_id, TrialModel.number == number)
            )
            if trial_id is None:
                raise StoreError(f"no trial {number} in study {study!r}")
            query = _rungs_query().where(RungModel.trial_id == trial_id).order_by(RungModel.rung)
            return [_rung_row(r, study) for r in s.execute(query)]

    # --- seed noise ------------------------------------------------------------------------------
    def record_noise(self, *, study: str, arch_id: str, tokens: int, seed: int, val_bpb: float,
                     trial_number: int | None = None) -> bool:
        """Record seed ``seed``'s BPB of the study's reference architecture after ``tokens``
        tokens. Every seed of a study must be of the same architecture and budget (the spread is
        of one run, trained again). Returns False, changing nothing, when the seed is recorded
        already (another worker ran it too)."""
        where = f"seed {seed} of the noise of study {study!r}"
        if not (isinstance(tokens, int) and tokens > 0):
            raise StoreError(f"{where}: tokens must be a positive integer, got {tokens!r}")
        if not (isinstance(val_bpb, numbers.Real) and math.isfinite(val_bpb)):
            raise StoreError(f"{where}: val_bpb must be a finite number, got {val_bpb!r}")
        with self._write() as s:
            study_row = s.scalar(select(StudyModel).where(StudyModel.name == study).with_for_update())
            if study_row is None:
                raise StoreError(_no_study(s, study, self.url))
            rows = s.scalars(select(NoiseModel).where(NoiseModel.study_id == study_row.id)).all()
            if any(r.seed == seed for r in rows):
                return False
            other = next((r for r in rows if (r.arch_id, r.tokens) != (arch_id, tokens)), None)
            if other is not None:
                raise StoreError(f"{where}: the study's noise is of {other.arch_id} at {other.tokens} tokens, "
                                 f"not {arch_id} at {tokens}")
            s.add(NoiseModel(study_id=study_row.id, arch_id=arch_id, tokens=tokens, seed=int(seed),
                             val_bpb=float(val_bpb), trial_number=trial_number, created_at=utcnow()))
            s.flush()
            return True

    def noise(self, *, study: str) -> NoiseRow | None:
        """The study's seed spread (None before its first seed is recorded)."""
        with self._read() as s:
            study_id = _study_id(s, study, self.url)
            rows = s.scalars(select(NoiseModel).where(NoiseModel.study_id == study_id).order_by(NoiseModel.seed)).all()
            if not rows:
                return None
            number = next((r.trial_number for r in rows if r.trial_number is not None), None)
            return NoiseRow(study=study, arch_id=rows[0].arch_id, tokens=rows[0].tokens,
                            seeds=tuple(r.seed for r in rows), bpbs=tuple(r.val_bpb for r in rows),
                            trial_number=number)

    # --- Pareto front --------------------------------------------------------------------------
    def refresh_pareto(self, *, study: str, objectives: Sequence[ObjectiveLike] | None = None) -> list[TrialRow]:
        """Recompute the study's front and store it in place of the old one; returns it.

        Only complete, feasible trials with a finite value for every objective take part.
        ``objectives`` defaults to the study's own (name and direction each).
        """
        with self._write() as s:
            study_row = s.scalar(select(StudyModel).where(StudyModel.name == study).with_for_update())
            if study_row is None:
                raise StoreError(_no_study(s, study, self.url))
            objs = _objectives(objectives if objectives is not None else study_row.objectives)
            rows = s.execute(
                select(TrialModel.id, TrialModel.objectives, TrialModel.constraints).where(
                    TrialModel.study_id == study_row.id, TrialModel.state == "complete"
                )
            ).all()
            ids, points = _candidates(rows, [o.name for o in objs])
            rungs: dict[int, dict[int, float]] = {}
            for trial_id, rung, bpb in s.execute(
                select(RungModel.trial_id, RungModel.rung, RungModel.val_bpb).where(RungModel.study_id == study_row.id)
            ):
                rungs.setdefault(trial_id, {})[rung] = bpb
            front_ids = _front_at_common_rungs(ids, points, objs, rungs)
            s.execute(delete(ParetoModel).where(ParetoModel.study_id == study_row.id))
            now = utcnow()
            if front_ids.size:
                s.execute(
                    ParetoModel.__table__.insert(),
                    [{"study_id": study_row.id, "trial_id": int(t), "computed_at": now} for t in front_ids],
                )
            return _stored_front(s, study_row.id, study)  # in the same transaction: this refresh's

    def pareto(self, *, study: str) -> list[TrialRow]:
        """The front as last stored by :meth:`refresh_pareto`, by trial number."""
        with self._read() as s:
            return _stored_front(s, _study_id(s, study, self.url), study)


# --- helpers ---------------------------------------------------------------------------------------
def _refuse_missing_sqlite_file(url: str) -> None:
    """Opening a missing SQLite file would create an empty one; without upgrade, say so instead."""
    try:
        parsed = make_url(url)
    except Exception:
        return  # make_engine reports it
    db = parsed.database or ""
    if parsed.get_backend_name() == "sqlite" and db and db != ":memory:" and not db.startswith("file:"):
        path = Path(db).expanduser()
        if not path.exists():
            where = safe_url(url)
            if not path.parent.is_dir():  # `nas db upgrade` cannot make it there either
                raise StoreError(f"{where}: no such database file, and its folder {path.parent} does not exist")
            raise StoreError(f"{where}: no such database file; run `nas db upgrade --db {where}` to create it")


def _jsonable(value: Any) -> Any:
    """The value as a reader will get it back: through the JSON columns' own serializer (numpy
    made plain, NaN made null, tuples made lists), so the row a write returns equals a read."""
    return None if value is None else json.loads(json_dumps(value))


def _fingerprints(provenance: Mapping[str, Any]) -> set[str]:
    """The machine fingerprints a measurement's figures rest on: its own, and for an estimate
    the host measurement's it was scaled from."""
    host = provenance.get("host")
    found = {provenance.get("fingerprint"), host.get("fingerprint") if isinstance(host, Mapping) else None}
    return {f for f in found if isinstance(f, str)}


def _label_filter(labels: list[str]) -> Any:
    exact = [x for x in labels if not x.endswith("*")]
    prefixes = [x[:-1] for x in labels if x.endswith("*")]
    clauses = [MeasurementModel.label.in_(exact)] if exact else []
    clauses += [MeasurementModel.label.startswith(p, autoescape=True) for p in prefixes]
    if not clauses:
        return MeasurementModel.id.is_(None)  # no labels: nothing matches
    return or_(*clauses)


def _objectives(objectives: Sequence[ObjectiveLike]) -> list[Objective]:
    out: list[Objective] = []
    for o in objectives:
        if isinstance(o, Objective):
            obj = o
        elif isinstance(o, Mapping):
            obj = Objective(str(o.get("name", "")), str(o.get("direction", "")))
        else:
            name, direction = o
            obj = Objective(str(name), str(direction))
        if not obj.name:
            raise StoreError(f"an objective needs a name, got {o!r}")
        if obj.direction not in DIRECTIONS:
            raise StoreError(f"objective {obj.name!r}: direction must be minimize or maximize, got {obj.direction!r}")
        out.append(obj)
    if not out:
        raise StoreError("at least one objective is needed")
    names = [o.name for o in out]
    if len(set(names)) != len(names):
        raise StoreError(f"objective names repeat: {names}")
    return out


def _states(states: Iterable[str]) -> list[str]:
    wanted = list(states)
    unknown = [x for x in wanted if x not in TRIAL_STATES]
    if unknown:
        raise StoreError(f"unknown trial state {unknown[0]!r}; states: {', '.join(TRIAL_STATES)}")
    return wanted


def _is_finite_number(value: Any) -> bool:
    """A finite int or float, numpy scalars included (they register as numbers.Real)."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def _is_whole_number(value: Any) -> bool:
    """An int, numpy integers included; not a bool, not a float however whole."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _check_rung_values(where: str, *, rung: Any, tokens: Any, val_bpb: Any, seconds: Any) -> None:
    """What the table's constraints would refuse, refused first with a message that says why."""
    if not _is_whole_number(rung) or rung < 0:
        raise StoreError(f"{where}: the rung must be a whole number >= 0, got {rung!r}")
    if not _is_whole_number(tokens) or tokens <= 0:
        raise StoreError(f"{where}: tokens must be a whole number > 0, got {tokens!r}")
    if not _is_finite_number(val_bpb):
        raise StoreError(
            f"{where}: val_bpb is {val_bpb!r}; a trial without a finite score has failed (fail_trial), "
            f"it reached no rung"
        )
    if not _is_finite_number(seconds) or seconds < 0:
        raise StoreError(f"{where}: seconds must be a finite number >= 0, got {seconds!r}")


def _constraints(constraints: Mapping[str, float] | None) -> dict[str, float | None] | None:
    """Constraint values as floats; a non-finite one becomes None, which counts as violated
    (JSON has no NaN or infinity)."""
    if constraints is None:
        return None
    return {k: float(v) if _is_finite_number(v) else None for k, v in constraints.items()}


def _candidates(rows: Sequence[Any], names: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Trial ids and their objective values, for the feasible trials with every value finite."""
    ids: list[int] = []
    points: list[list[float]] = []
    for trial_id, objectives, constraints in rows:
        if constraints and any(v is None or v > 0 for v in constraints.values()):
            continue
        objectives = objectives or {}
        values = [objectives.get(n) for n in names]
        if all(_is_finite_number(v) for v in values):
            ids.append(trial_id)
            points.append(values)  # type: ignore[arg-type]
    return np.asarray(ids, dtype=np.int64), np.asarray(points, dtype=float).reshape(len(ids), len(names))


def _front_at_common_rungs(ids: np.ndarray, points: np.ndarray, objs: Sequence[Objective],
                           rungs: Mapping[int, Mapping[int, float]]) -> np.ndarray:
    """The front when trials stopped at different rungs of training (``nas.search.rungs``).

    A trial's BPB falls as it trains, so a trial stopped at rung k is compared with every trial
    that reached rung k, on their BPB *at rung k* (the rung both reached): a trial trained longer
    is never beaten by one that only looks better because it was scored earlier. A trial that
    stopped at rung k is on the front when nothing dominates it there; the front is every rung's
    such trials. Without rungs (one score per trial) this is the plain non-dominated set. A trial
    scored at one rung only (another trial's weights at another bitwidth: ``record_rung(only=
    True)``) has no BPB at the rungs below and is compared at its own rung only.
    """
    directions = [o.direction for o in objs]
    if not ids.size:
        return ids
    bpb = [i for i, o in enumerate(objs) if o.name == "val_bpb"]
    if not rungs or not bpb:
        return ids[non_dominated(points, directions)]
    # rungs are recorded in order from 0, so a trial that reached rung k has a BPB for every
    # rung up to k (but one scored at its rung only); a trial without rungs counts as stopped at
    # rung 0 with its own BPB
    top = {int(t): max(rungs[int(t)]) if int(t) in rungs else 0 for t in ids}
    front: list[int] = []
    for k in sorted(set(top.values())):
        reached = [i for i, t in enumerate(ids) if top[int(t)] >= k and (int(t) not in rungs or k in rungs[int(t)])]
        at_k = points[reached].copy()
        for row, i in enumerate(reached):
            at_k[row, bpb[0]] = rungs.get(int(ids[i]), {}).get(k, at_k[row, bpb[0]])
        mask = non_dominated(at_k, directions)
        front += [int(ids[i]) for row, i in enumerate(reached) if mask[row] and top[int(ids[i])] == k]
    return np.asarray(sorted(front), dtype=np.int64)


def _no_study(s: Session, name: str, url: str) -> str:
    known = list(s.scalars(select(StudyModel.name).order_by(StudyModel.name).limit(20)))
    return f"no study named {name!r} in {safe_url(url)}; known: {', '.join(known) or 'none'}"


def _study_id(s: Session, name: str, url: str) -> int:
    study_id = s.scalar(select(StudyModel.id).where(StudyModel.name == name))
    if study_id is None:
        raise StoreError(_no_study(s, name, url))
    return study_id


def _require_architecture(s: Session, arch_id: str) -> None:
    if s.get(ArchitectureModel, arch_id) is None:
        raise StoreError(f"unknown architecture {arch_id!r}: store it with upsert_architecture(spec=...) first")


def _running_trial(s: Session, study: str, number: int, url: str, verb: str) -> TrialModel:
    study_id = _study_id(s, study, url)
    row = s.scalar(
        select(TrialModel).where(TrialModel.study_id == study_id, TrialModel.number == number).with_for_update()
    )
    if row is None:
        raise StoreError(f"cannot {verb} trial {number} of study {study!r}: no such trial (start_trial first)")
    if row.state != "running":
        raise StoreError(f"cannot {verb} trial {number} of study {study!r}: it is {row.state}, not running")
    return row


def _link(
    s: Session, row: TrialModel, *, arch_id: str | None, measurement_id: int | None, artifact_dir: str | None
) -> None:
    if arch_id is not None:
        _require_architecture(s, arch_id)
        row.arch_id = arch_id
    if measurement_id is not None:
        if s.get(MeasurementModel, measurement_id) is None:
            raise StoreError(f"unknown measurement {measurement_id}")
        row.measurement_id = measurement_id
    if artifact_dir is not None:
        row.artifact_dir = artifact_dir


def _counts(s: Session, study_ids: list[int]) -> dict[int, dict[str, int]]:
    counts: dict[int, dict[str, int]] = {i: dict.fromkeys(TRIAL_STATES, 0) for i in study_ids}
    if not study_ids:
        return counts
    query = (
        select(TrialModel.study_id, TrialModel.state, func.count())
        .where(TrialModel.study_id.in_(study_ids))
        .group_by(TrialModel.study_id, TrialModel.state)
    )
    for study_id, state, n in s.execute(query):
        counts[study_id][state] = n
    return counts


def _architecture_row(row: ArchitectureModel) -> ArchitectureRow:
    return ArchitectureRow(
        arch_id=row.arch_id, spec=ArchSpec.from_json(row.spec), summary=row.summary, params=row.params,
        non_embedding_params=row.non_embedding_params, created_at=as_utc(row.created_at),  # type: ignore[arg-type]
    )  # fmt: skip


def _measurement_row(row: MeasurementModel) -> MeasurementRow:
    return MeasurementRow(
        id=row.id, arch_id=row.arch_id, profile=row.profile, bitwidth=row.bitwidth, label=row.label,
        prefill_ms=row.prefill_ms, prefill_p10_ms=row.prefill_p10_ms, prefill_p90_ms=row.prefill_p90_ms,
        prefill_repeats_ms=tuple(row.prefill_repeats_ms or ()),
        decode_ms_per_token=row.decode_ms_per_token, decode_p10_ms=row.decode_p10_ms, decode_p90_ms=row.decode_p90_ms,
        decode_repeats_ms=tuple(row.decode_repeats_ms or ()),
        peak_memory_bytes=row.peak_memory_bytes, model_bytes=row.model_bytes,
        workload=dict(row.workload or {}), provenance=dict(row.provenance or {}),
        error=row.error, created_at=as_utc(row.created_at),  # type: ignore[arg-type]
    )  # fmt: skip


def _calibration_row(s: Session, row: CalibrationModel) -> CalibrationRow:
    spec = s.scalar(select(ArchitectureModel.spec).where(ArchitectureModel.arch_id == row.arch_id))
    return CalibrationRow(
        id=row.id, run=row.run, profile=row.profile, device_fingerprint=row.device_fingerprint, arch_id=row.arch_id,
        spec=ArchSpec.from_json(spec), label=row.label, node=row.node, decode_ms=row.decode_ms,
        prefill_ms=row.prefill_ms, peak_memory_bytes=row.peak_memory_bytes, model_bytes=row.model_bytes,
        workload=dict(row.workload or {}), device_facts=dict(row.device_facts or {}),
        provenance=dict(row.provenance or {}), created_at=as_utc(row.created_at),  # type: ignore[arg-type]
    )  # fmt: skip


def _study_row(row: StudyModel, counts: dict[str, int]) -> StudyRow:
    return StudyRow(
        id=row.id, name=row.name, optuna_study_id=row.optuna_study_id, space=row.space, profile=row.profile,
        corpus_fingerprint=row.corpus_fingerprint, train_config=dict(row.train_config or {}),
        objectives=tuple(Objective(o["name"], o["direction"]) for o in row.objectives), seed=row.seed,
        code_version=row.code_version, created_at=as_utc(row.created_at),  # type: ignore[arg-type]
        extra=dict(row.extra or {}), trial_counts=dict(counts) or dict.fromkeys(TRIAL_STATES, 0),
    )  # fmt: skip


def _stored_front(s: Session, study_id: int, study: str) -> list[TrialRow]:
    query = (
        select(TrialModel, ArchitectureModel.summary)
        .join(ParetoModel, ParetoModel.trial_id == TrialModel.id)
        .outerjoin(ArchitectureModel, TrialModel.arch_id == ArchitectureModel.arch_id)
        .where(ParetoModel.study_id == study_id)
        .order_by(TrialModel.number)
    )
    return [_to_trial_row(row, study, summary) for row, summary in s.execute(query)]


def _rungs_query() -> Any:
    """Rung rows with their trial's number, state and measurement (plain columns: a read of
    every trial's result at a rung builds no ORM objects)."""
    columns = (*RungModel.__table__.columns, TrialModel.number, TrialModel.state, TrialModel.measurement_id)
    return select(*columns).join(TrialModel, TrialModel.id == RungModel.trial_id)


def _rung_row(row: Any, study: str) -> RungRow:
    return RungRow(
        id=row.id, trial_id=row.trial_id, study_id=row.study_id, study=study, number=row.number, rung=row.rung,
        tokens=row.tokens, val_bpb=row.val_bpb, seconds=row.seconds, state=row.state,
        measurement_id=row.measurement_id, created_at=as_utc(row.created_at),  # type: ignore[arg-type]
    )  # fmt: skip


def _trial_row(s: Session, row: TrialModel, study: str) -> TrialRow:
    summary = None if row.arch_id is None else s.scalar(
        select(ArchitectureModel.summary).where(ArchitectureModel.arch_id == row.arch_id)
    )
    return _to_trial_row(row, study, summary)


def _to_trial_row(row: TrialModel, study: str, summary: str | None, *, curve: bool = True) -> TrialRow:
    return TrialRow(
        id=row.id, study_id=row.study_id, study=study, number=row.number, optuna_trial_id=row.optuna_trial_id,
        arch_id=row.arch_id, arch_summary=summary, measurement_id=row.measurement_id, state=row.state,
        failed_stage=row.failed_stage, failure_reason=row.failure_reason, val_bpb=row.val_bpb,
        baselines=row.baselines, train=row.train, curve=row.curve if curve else None, objectives=row.objectives,
        constraints=row.constraints, artifact_dir=row.artifact_dir, worker=row.worker,
        started_at=as_utc(row.started_at),  # type: ignore[arg-type]
        finished_at=as_utc(row.finished_at),
    )  # fmt: skip
