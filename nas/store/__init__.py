"""The project's SQL store: architectures, measurements, studies, trials, their rungs and
Pareto fronts.

The whole public surface is here (after Optuna's ``storages/__init__.py``); the modules behind it
are private. It imports values only (no torch, no ONNX Runtime, no Optuna), so the CLI's read
commands and the web page start fast.

    from nas.store import Store
    with Store("sqlite:///nas.db") as store:        # creates or upgrades the schema
        study = store.create_study(name="s1", space="gqa_small", profile="jetson",
                                   objectives=[("val_bpb", "minimize"), ("decode_ms", "minimize")])
        store.start_trial(study="s1", number=0)
        store.record_rung(study="s1", number=0, rung=0, tokens=2**20, val_bpb=2.1, seconds=40.0)
        ...
        front = store.refresh_pareto(study="s1")

Optuna's own tables may live in the same database (``optuna.storages.RDBStorage(url)``); ours
are the ``nas_*`` tables under their own alembic history (``nas_alembic_version``).

May import: ``nas.spec`` and ``nas.store`` (SQLAlchemy; alembic only to migrate); never torch,
ONNX Runtime, Optuna, the stages or the search.
"""

from nas.store._engine import StoreError, default_db_url, harden_foreign_sqlite_engine, make_engine, session_scope
from nas.store._migrate import check_schema, current_revision, head_revision, schema_diff, upgrade
from nas.store._pareto import non_dominated
from nas.store._rows import (
    ArchitectureRow,
    CalibrationRow,
    MeasurementRow,
    NoiseRow,
    Objective,
    RungRow,
    StudyRow,
    TrialRow,
)
from nas.store._store import Store
from nas.store.models import TRIAL_STATES

__all__ = [
    "TRIAL_STATES",
    "ArchitectureRow",
    "CalibrationRow",
    "MeasurementRow",
    "NoiseRow",
    "Objective",
    "RungRow",
    "Store",
    "StoreError",
    "StudyRow",
    "TrialRow",
    "check_schema",
    "current_revision",
    "default_db_url",
    "harden_foreign_sqlite_engine",
    "head_revision",
    "make_engine",
    "non_dominated",
    "schema_diff",
    "session_scope",
    "upgrade",
]
