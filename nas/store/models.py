"""The ``nas_*`` tables, one class per table (after Optuna's ``storages/_rdb/models.py``).

They live in the same database as Optuna's own tables (``studies``, ``trials``, ...) and link to
them by plain integer ids, never by foreign key: the two schemas are migrated by two independent
alembic histories, and a foreign key across them would tie one history to the other.

Only alembic changes the schema (``alembic/versions``); a test compares these models with the
migrated database so that the two cannot drift. Constraint names come from one naming convention
so that batch migrations on SQLite, which must name every constraint they drop, can refer to them.

JSON columns use SQLAlchemy's generic ``JSON`` type: TEXT holding JSON on SQLite, ``json`` on
PostgreSQL. Nothing filters inside them in SQL; what is filtered on has a column of its own.
Timestamps are UTC; SQLite drops the zone, so the API re-attaches it when reading.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    CheckConstraint,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

TRIAL_STATES = ("running", "complete", "failed", "infeasible")

NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


def utcnow() -> datetime:
    return datetime.now(UTC)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


def _now_column() -> Mapped[datetime]:
    return mapped_column(DateTime(timezone=True), default=utcnow, nullable=False)


class ArchitectureModel(Base):
    """One ArchSpec, stored once however many trials and measurements refer to it."""

    __tablename__ = "nas_architectures"
    __table_args__ = (
        CheckConstraint("bitwidth IN (4, 8, 16, 32)", name="bitwidth"),
        Index(None, "attention", "bitwidth"),
    )

    arch_id: Mapped[str] = mapped_column(String(16), primary_key=True)
    # The canonical JSON text itself, not a JSON column: arch_id is the hash of exactly these
    # bytes, and a JSON type may re-order keys (PostgreSQL's jsonb does).
    spec: Mapped[str] = mapped_column(Text, nullable=False)
    summary: Mapped[str] = mapped_column(String(200), nullable=False)
    # Copies of the spec's fields and figures that lists and plots filter or sort on.
    attention: Mapped[str] = mapped_column(String(8), nullable=False)
    bitwidth: Mapped[int] = mapped_column(Integer, nullable=False)
    vocab_size: Mapped[int] = mapped_column(Integer, nullable=False)
    d_model: Mapped[int] = mapped_column(Integer, nullable=False)
    n_layers: Mapped[int] = mapped_column(Integer, nullable=False)
    params: Mapped[int] = mapped_column(BigInteger, nullable=False)
    non_embedding_params: Mapped[int] = mapped_column(BigInteger, nullable=False)
    created_at: Mapped[datetime] = _now_column()


class MeasurementModel(Base):
    """Latency and memory of one architecture on one hardware profile, with its provenance.

    A failed measurement is a row too (``error`` set, figures null), so that a search can see
    that an architecture was tried and why it could not be measured.
    """

    __tablename__ = "nas_measurements"
    __table_args__ = (
        CheckConstraint("label LIKE 'measured:%' OR label LIKE 'estimated:%'", name="label"),
        CheckConstraint(
            "error IS NOT NULL OR (prefill_ms IS NOT NULL AND decode_ms_per_token IS NOT NULL)",
            name="figures_or_error",
        ),
        # The reuse look-up: the latest successful row for (arch_id, profile, bitwidth).
        Index(None, "arch_id", "profile", "bitwidth", "created_at"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    arch_id: Mapped[str] = mapped_column(ForeignKey("nas_architectures.arch_id"), nullable=False)
    profile: Mapped[str] = mapped_column(String(100), nullable=False)
    bitwidth: Mapped[int] = mapped_column(Integer, nullable=False)
    label: Mapped[str] = mapped_column(String(100), nullable=False)
    # Milliseconds; the median is the figure, p10/p90 its spread, repeats the raw timings.
    prefill_ms: Mapped[float | None] = mapped_column(Float)
    prefill_p10_ms: Mapped[float | None] = mapped_column(Float)
    prefill_p90_ms: Mapped[float | None] = mapped_column(Float)
    prefill_repeats_ms: Mapped[list[float]] = mapped_column(JSON, nullable=False, default=list)
    decode_ms_per_token: Mapped[float | None] = mapped_column(Float)
    decode_p10_ms: Mapped[float | None] = mapped_column(Float)
    decode_p90_ms: Mapped[float | None] = mapped_column(Float)
    decode_repeats_ms: Mapped[list[float]] = mapped_column(JSON, nullable=False, default=list)
    peak_memory_bytes: Mapped[int | None] = mapped_column(BigInteger)
    model_bytes: Mapped[int | None] = mapped_column(BigInteger)
    workload: Mapped[dict[str, Any]] = mapped_column(JSON, nullable=False, default=dict)
    provenance: Mapped[dict[str, Any]] = mapped_column(JSON, nullable=False, default=dict)
    error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = _now_column()


class StudyModel(Base):
    """A named search; ``optuna_study_id`` is Optuna's ``studies.study_id`` (no foreign key)."""

    __tablename__ = "nas_studies"
    __table_args__ = (UniqueConstraint("name"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(200), nullable=False)
    optuna_study_id: Mapped[int | None] = mapped_column(Integer)
    space: Mapped[str] = mapped_column(String(200), nullable=False)
    profile: Mapped[str] = mapped_column(String(100), nullable=False)
    corpus_fingerprint: Mapped[str | None] = mapped_column(String(128))
    train_config: Mapped[dict[str, Any]] = mapped_column(JSON, nullable=False, default=dict)
    # [{"name": "val_bpb", "direction": "minimize"}, ...], in Optuna's order of values.
    objectives: Mapped[list[dict[str, str]]] = mapped_column(JSON, nullable=False)
    seed: Mapped[int | None] = mapped_column(Integer)
    code_version: Mapped[str | None] = mapped_column(String(100))
    created_at: Mapped[datetime] = _now_column()
    extra: Mapped[dict[str, Any]] = mapped_column(JSON, nullable=False, default=dict)


class TrialModel(Base):
    """One trial of a study: its architecture, measurement, training and objectives."""

    __tablename__ = "nas_trials"
    __table_args__ = (
        UniqueConstraint("study_id", "number"),
        CheckConstraint("state IN ('running', 'complete', 'failed', 'infeasible')", name="state"),
        # `nas pareto`, `nas studies` and the web page select a study's trials by state.
        Index(None, "study_id", "state"),
        Index(None, "arch_id"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("nas_studies.id", ondelete="CASCADE"), nullable=False)
    number: Mapped[int] = mapped_column(Integer, nullable=False)
    """Optuna's trial number (0, 1, ... within the study)."""
    optuna_trial_id: Mapped[int | None] = mapped_column(Integer)
    arch_id: Mapped[str | None] = mapped_column(ForeignKey("nas_architectures.arch_id"))
    measurement_id: Mapped[int | None] = mapped_column(ForeignKey("nas_measurements.id", ondelete="SET NULL"))
    state: Mapped[str] = mapped_column(String(16), nullable=False)
    failed_stage: Mapped[str | None] = mapped_column(String(32))
    failure_reason: Mapped[str | None] = mapped_column(Text)
    val_bpb: Mapped[float | None] = mapped_column(Float)
    baselines: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    train: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    curve: Mapped[list[Any] | None] = mapped_column(JSON)
    objectives: Mapped[dict[str, float] | None] = mapped_column(JSON)
    constraints: Mapped[dict[str, float] | None] = mapped_column(JSON)
    artifact_dir: Mapped[str | None] = mapped_column(Text)
    # host:pid of the process running it: on resume, a running trial whose worker is gone is
    # an orphan to fail (Optuna's ask/tell records no heartbeat: docs/dependencies.md).
    worker: Mapped[str | None] = mapped_column(String(200))
    started_at: Mapped[datetime] = _now_column()
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


# The largest finite double, for checks that a float column is finite: PostgreSQL's float8
# takes NaN and +-Infinity (and orders NaN above every number, so "x >= 0" alone lets NaN
# through); SQLite stores NaN as NULL and Infinity as a number. None of them is in
# [-DBL_MAX, DBL_MAX] on either database.
_DBL_MAX = "1.7976931348623157e308"


class RungModel(Base):
    """A trial's result at one rung of multi-fidelity training: scored after ``tokens`` tokens,
    written while the trial still runs, so that the search can rank the study's trials at that
    rung and let only the best go on.

    ``study_id`` repeats the trial's own: "every result of study S at rung k" is then one range
    of ``(study_id, rung)`` however many of the study's trials stopped before rung k, where a join
    through ``nas_trials`` would probe every trial of the study. The store writes it from the
    trial row in the same transaction, and a trial never changes study.
    """

    __tablename__ = "nas_rungs"
    __table_args__ = (
        UniqueConstraint("trial_id", "rung"),
        CheckConstraint("rung >= 0", name="rung"),
        CheckConstraint("tokens > 0", name="tokens"),
        CheckConstraint(f"val_bpb >= -{_DBL_MAX} AND val_bpb <= {_DBL_MAX}", name="val_bpb_finite"),
        CheckConstraint(f"seconds >= 0 AND seconds <= {_DBL_MAX}", name="seconds"),
        Index(None, "study_id", "rung"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    trial_id: Mapped[int] = mapped_column(ForeignKey("nas_trials.id", ondelete="CASCADE"), nullable=False)
    study_id: Mapped[int] = mapped_column(ForeignKey("nas_studies.id", ondelete="CASCADE"), nullable=False)
    rung: Mapped[int] = mapped_column(Integer, nullable=False)
    """0 for the first token budget, 1 for the next, ..."""
    tokens: Mapped[int] = mapped_column(BigInteger, nullable=False)
    """Tokens trained when scored."""
    val_bpb: Mapped[float] = mapped_column(Float, nullable=False)
    seconds: Mapped[float] = mapped_column(Float, nullable=False)
    """Training seconds so far, this rung's included."""
    created_at: Mapped[datetime] = _now_column()


class NoiseModel(Base):
    """One training seed's BPB of a study's reference architecture at one budget: the seed spread
    the study's BPBs are read against. At short budgets a second seed moves BPB as much as a
    change of architecture, so a gap between two trials smaller than this spread says nothing.

    One row per (study, seed): written when that seed's run is scored, never updated; a worker
    that finds the seed recorded already (another one ran it too) leaves the row as it is.
    """

    __tablename__ = "nas_noise"
    __table_args__ = (
        UniqueConstraint("study_id", "seed"),
        CheckConstraint("tokens > 0", name="tokens"),
        CheckConstraint(f"val_bpb >= -{_DBL_MAX} AND val_bpb <= {_DBL_MAX}", name="val_bpb_finite"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("nas_studies.id", ondelete="CASCADE"), nullable=False)
    arch_id: Mapped[str] = mapped_column(ForeignKey("nas_architectures.arch_id"), nullable=False)
    tokens: Mapped[int] = mapped_column(BigInteger, nullable=False)
    """Tokens trained when scored (the study's first rung)."""
    seed: Mapped[int] = mapped_column(Integer, nullable=False)
    val_bpb: Mapped[float] = mapped_column(Float, nullable=False)
    trial_number: Mapped[int | None] = mapped_column(Integer)
    """The trial whose own run this seed is (the study's seed), None for the extra seeds."""
    created_at: Mapped[datetime] = _now_column()


class CalibrationModel(Base):
    """One reference architecture measured on a device by ``nas devices calibrate --device``:
    a calibration point of that device's latency model, keyed by the profile and the device's
    fingerprint (``nas.stages.measure.device_facts``), so that the points of one machine, power
    mode and runtime are never fitted as another's. ``run`` groups the points of one invocation.
    Written once, never updated; a later run adds rows and the newest point per architecture is
    the one used."""

    __tablename__ = "nas_calibration"
    __table_args__ = (
        CheckConstraint("label LIKE 'measured:%'", name="label"),
        CheckConstraint(f"decode_ms > 0 AND decode_ms <= {_DBL_MAX}", name="decode_ms"),
        CheckConstraint(f"prefill_ms > 0 AND prefill_ms <= {_DBL_MAX}", name="prefill_ms"),
        Index(None, "profile", "device_fingerprint", "created_at"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    run: Mapped[str] = mapped_column(String(32), nullable=False)
    profile: Mapped[str] = mapped_column(String(100), nullable=False)
    device_fingerprint: Mapped[str] = mapped_column(String(64), nullable=False)
    arch_id: Mapped[str] = mapped_column(ForeignKey("nas_architectures.arch_id"), nullable=False)
    bitwidth: Mapped[int] = mapped_column(Integer, nullable=False)
    label: Mapped[str] = mapped_column(String(100), nullable=False)
    """``measured:local`` or ``measured:<ray node>``: only measured figures calibrate."""
    node: Mapped[str] = mapped_column(String(200), nullable=False)
    """The machine that measured: the Ray node's name, or this host's name."""
    decode_ms: Mapped[float] = mapped_column(Float, nullable=False)
    prefill_ms: Mapped[float] = mapped_column(Float, nullable=False)
    peak_memory_bytes: Mapped[int | None] = mapped_column(BigInteger)
    model_bytes: Mapped[int | None] = mapped_column(BigInteger)
    workload: Mapped[dict[str, Any]] = mapped_column(JSON, nullable=False, default=dict)
    device_facts: Mapped[dict[str, Any]] = mapped_column(JSON, nullable=False, default=dict)
    """What the fingerprint hashes: CPU/GPU, clocks and power mode where readable, threads,
    provider, library versions."""
    provenance: Mapped[dict[str, Any]] = mapped_column(JSON, nullable=False, default=dict)
    created_at: Mapped[datetime] = _now_column()


class ParetoModel(Base):
    """Membership of a study's current Pareto front; replaced whole on every refresh."""

    __tablename__ = "nas_pareto"

    study_id: Mapped[int] = mapped_column(ForeignKey("nas_studies.id", ondelete="CASCADE"), primary_key=True)
    trial_id: Mapped[int] = mapped_column(ForeignKey("nas_trials.id", ondelete="CASCADE"), primary_key=True)
    computed_at: Mapped[datetime] = _now_column()
