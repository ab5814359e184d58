"""The SQL store, on SQLite and on PostgreSQL: round trips, measurement reuse, the trial
lifecycle, rungs, Pareto fronts, schema checks and upgrades, Optuna's tables beside ours, and two
processes writing at once.

Every test gets its own database: a fresh SQLite file, or a fresh PostgreSQL database created
through the server's ``postgres`` database and dropped afterwards. PostgreSQL is found at
``NAS_TEST_PG_URL`` (default: the local server, user postgres); where it cannot be reached its
cases are skipped, except under CI (``CI`` set), where that is a failure.
"""

from __future__ import annotations

import dataclasses
import math
import multiprocessing
import random
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import numpy as np
import pytest
from sqlalchemy import MetaData, Table, create_engine, inspect, text
from sqlalchemy.engine import make_url

from nas.spec.arch import ArchSpec
from nas.store import (
    Objective,
    Store,
    StoreError,
    _migrate,
    check_schema,
    current_revision,
    default_db_url,
    head_revision,
    make_engine,
    non_dominated,
    schema_diff,
    session_scope,
    upgrade,
)
from nas.store.models import Base, RungModel, StudyModel, TrialModel
from tests.conftest import fresh_pg_database
from tests.measurements import measurement

OBJECTIVES = [("val_bpb", "minimize"), ("decode_ms", "minimize")]


# --- databases -------------------------------------------------------------------------------------
@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Any) -> Iterator[str]:
    """An empty database of each kind, this test's alone."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'nas.db'}"
    else:
        yield from fresh_pg_database(request.getfixturevalue("pg_admin"))


@pytest.fixture
def store(db_url: str) -> Iterator[Store]:
    with Store(db_url) as s:
        yield s


def spec(d_model: int = 128, n_layers: int = 2, bitwidth: int = 32, **kw: Any) -> ArchSpec:
    return ArchSpec(vocab_size=512, d_model=d_model, n_layers=n_layers, n_heads=4, head_dim=32, bitwidth=bitwidth, **kw)


def new_study(store: Store, name: str = "s", objectives: Any = OBJECTIVES) -> None:
    store.create_study(name=name, space="tiny", profile="host", objectives=objectives)


# --- engine and schema -----------------------------------------------------------------------------
def test_sqlite_connections_use_wal_and_wait_for_the_lock(tmp_path):
    engine = make_engine(f"sqlite:///{tmp_path / 'x.db'}")
    with engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() == 60_000
        assert conn.exec_driver_sql("PRAGMA synchronous").scalar() == 1  # NORMAL
        assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
    engine.dispose()


def test_default_db_url_is_nas_db_in_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert default_db_url() == f"sqlite:///{tmp_path / 'nas.db'}"


def test_bad_urls_say_what_is_wrong(tmp_path):
    with pytest.raises(StoreError, match="not a database URL"):
        make_engine("no-such-scheme")
    with pytest.raises(StoreError, match="does not exist"):
        make_engine(f"sqlite:///{tmp_path / 'missing_dir' / 'nas.db'}")


def test_the_store_imports_no_torch_onnxruntime_or_optuna():
    code = "import sys, nas.store; print(sorted({'torch', 'onnxruntime', 'optuna'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_opening_an_upgraded_store_does_not_import_alembic(db_url):
    upgrade(db_url)  # alembic is for migrating; reading (nas pareto, the web page) starts without it
    code = ("import sys; from nas.store import Store; s = Store(sys.argv[1], upgrade=False); s.list_studies(); "
            "s.close(); print('alembic' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code, db_url], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_upgrade_is_idempotent_and_matches_the_models(db_url):
    assert current_revision(db_url) is None
    assert upgrade(db_url) == (None, head_revision())
    assert upgrade(db_url) == (head_revision(), head_revision())
    check_schema(db_url)
    assert schema_diff(db_url) == []
    assert _migrate.SCHEMA_HEAD == head_revision()  # a new migration moves both


def test_a_database_in_a_missing_folder_does_not_suggest_an_upgrade_that_cannot_work(tmp_path):
    url = f"sqlite:///{tmp_path / 'no' / 'such' / 'nas.db'}"
    with pytest.raises(StoreError, match=r"its folder .*/no/such does not exist") as e:
        Store(url, upgrade=False)
    assert "nas db upgrade" not in str(e.value)


def test_an_empty_database_without_upgrade_names_the_command(db_url):
    if db_url.startswith("sqlite"):
        with pytest.raises(StoreError, match="no such database file; run `nas db upgrade --db sqlite:///"):
            Store(db_url, upgrade=False)
        create_engine(db_url).connect().close()  # an empty file: now the schema check speaks
    with pytest.raises(StoreError, match=r"no nas tables yet; run `nas db upgrade --db .+`") as e:
        Store(db_url, upgrade=False)
    assert make_url(db_url).database in str(e.value)
    with pytest.raises(StoreError, match="nas db upgrade"):
        check_schema(db_url)
    with Store(db_url) as s:  # upgrade=True creates the schema
        assert s.list_studies() == []
    Store(db_url, upgrade=False).close()


def test_a_schema_behind_the_code_names_the_command(db_url, monkeypatch):
    upgrade(db_url)
    head, known = head_revision(), _migrate.known_revisions()
    # Pretend this code carries a newer revision than the database's.
    monkeypatch.setattr(_migrate, "head_revision", lambda: "0099")
    monkeypatch.setattr(_migrate, "SCHEMA_HEAD", "0099")
    monkeypatch.setattr(_migrate, "known_revisions", lambda: known | {"0099"})
    with pytest.raises(StoreError, match=rf"revision {head}, behind this nas \(0099\); run `nas db upgrade --db .+`"):
        Store(db_url, upgrade=False)


def test_a_schema_newer_than_the_code_asks_for_a_newer_nas(db_url):
    upgrade(db_url)
    engine = make_engine(db_url)
    with engine.begin() as conn:
        conn.execute(text("UPDATE nas_alembic_version SET version_num = 'ffff'"))
    engine.dispose()
    for flag in (True, False):
        with pytest.raises(StoreError, match=r"newer than this nas knows .* upgrade the nas package"):
            Store(db_url, upgrade=flag)


def test_a_0001_database_with_trials_upgrades_to_0002_and_0003_keeping_them(db_url):
    assert upgrade(db_url, "0001") == (None, "0001")
    engine = make_engine(db_url)
    assert "nas_rungs" not in inspect(engine).get_table_names()
    # Rows written through the 0001 tables as they are in the database, not through today's models.
    now = datetime.now(UTC)
    with engine.begin() as conn:
        tables = MetaData()
        studies = Table("nas_studies", tables, autoload_with=conn)
        trials = Table("nas_trials", tables, autoload_with=conn)
        objectives = [{"name": "val_bpb", "direction": "minimize"}, {"name": "decode_ms", "direction": "minimize"}]
        study_id = conn.execute(
            studies.insert().returning(studies.c.id),
            {"name": "old", "space": "tiny", "profile": "host", "train_config": {"tokens": 8192},
             "objectives": objectives, "extra": {}, "created_at": now},
        ).scalar_one()  # fmt: skip
        conn.execute(
            trials.insert(),
            {"study_id": study_id, "number": 0, "state": "complete", "val_bpb": 2.0, "started_at": now,
             "finished_at": now, "objectives": {"val_bpb": 2.0, "decode_ms": 1.5}},
        )  # fmt: skip
        unfinished = {"study_id": study_id, "number": 1, "state": "running", "started_at": now, "worker": "host:1"}
        conn.execute(trials.insert(), unfinished)
    engine.dispose()
    with pytest.raises(StoreError, match="revision 0001, behind this nas"):
        Store(db_url, upgrade=False)

    assert upgrade(db_url, "0002") == ("0001", "0002")
    assert "nas_noise" not in inspect(make_engine(db_url)).get_table_names()
    assert upgrade(db_url) == ("0002", head_revision())  # 0003 and 0004 add tables beside the rows
    with Store(db_url) as s:  # at head from here on, whatever later revisions add
        assert schema_diff(db_url) == []
        assert s.get_study(name="old").trial_counts == {"running": 1, "complete": 1, "failed": 0, "infeasible": 0}
        done, running = s.trials(study="old")
        assert (done.state, done.val_bpb, done.objectives) == ("complete", 2.0, {"val_bpb": 2.0, "decode_ms": 1.5})
        assert (running.state, running.worker, running.started_at) == ("running", "host:1", now)
        assert s.trial_rungs(study="old", number=1) == []
        s.record_rung(study="old", number=1, rung=0, tokens=4096, val_bpb=2.4, seconds=1.0)
        assert [(r.number, r.val_bpb) for r in s.rung_results(study="old", rung=0)] == [(1, 2.4)]
        assert s.noise(study="old") is None


@pytest.mark.parametrize("order", ["optuna_first", "nas_first"])
def test_optuna_tables_and_ours_share_one_database(db_url, order):
    import optuna
    from alembic.autogenerate import compare_metadata
    from alembic.runtime.migration import MigrationContext

    optuna.logging.set_verbosity(optuna.logging.WARNING)

    def optuna_side() -> None:
        storage = optuna.storages.RDBStorage(db_url)
        study = optuna.create_study(storage=storage, study_name=f"o_{order}", directions=["minimize", "minimize"])
        study.optimize(lambda t: (t.suggest_float("x", 0, 1), 1.0), n_trials=2)
        storage.engine.dispose()

    if order == "optuna_first":
        optuna_side()
        upgrade(db_url)
        upgrade(db_url)
    else:
        upgrade(db_url)
        upgrade(db_url)
        optuna_side()

    engine = make_engine(db_url)
    tables = set(inspect(engine).get_table_names())
    assert {"studies", "trials", "trial_values", "alembic_version"} <= tables
    assert set(Base.metadata.tables) | {"nas_alembic_version"} <= tables
    with engine.connect() as conn:
        assert conn.execute(text("SELECT version_num FROM nas_alembic_version")).scalar() == head_revision()
        assert conn.execute(text("SELECT version_num FROM alembic_version")).scalar() != head_revision()
        # Our comparison sees only nas_* tables and finds the migrations equal to the models ...
        assert schema_diff(db_url) == []
        # ... while an unfiltered one would propose dropping Optuna's tables: the filter matters.
        unfiltered = compare_metadata(MigrationContext.configure(conn), Base.metadata)
        assert any(d[0] == "remove_table" and d[1].name == "studies" for d in unfiltered)
    engine.dispose()

    with Store(db_url) as s:
        storage = optuna.storages.RDBStorage(db_url)
        optuna_id = storage.get_study_id_from_name(f"o_{order}")
        storage.engine.dispose()
        s.create_study(name="linked", space="tiny", profile="host", objectives=OBJECTIVES, optuna_study_id=optuna_id)
        assert s.get_study(name="linked").optuna_study_id == optuna_id
    assert len(optuna.load_study(study_name=f"o_{order}", storage=db_url).trials) == 2


# --- sessions --------------------------------------------------------------------------------------
def test_the_session_helper_commits_rolls_back_and_wraps_driver_errors(store, db_url):
    engine = make_engine(db_url)
    row = {"space": "tiny", "profile": "host", "objectives": [], "train_config": {}, "extra": {}}
    with session_scope(engine) as s:
        s.add(StudyModel(name="kept", **row))
    with pytest.raises(ValueError), session_scope(engine) as s:
        s.add(StudyModel(name="dropped", **row))
        s.flush()
        raise ValueError("boom")
    with pytest.raises(StoreError, match="a constraint was broken"), session_scope(engine) as s:
        s.add(StudyModel(name="kept", **row))
    with session_scope(engine) as s:
        assert sorted(s.scalars(text("SELECT name FROM nas_studies"))) == ["kept"]
    engine.dispose()


# --- architectures and measurements ----------------------------------------------------------------
def test_architecture_round_trip_and_upsert_is_idempotent(store):
    s1 = spec(attention="gqa", n_kv_heads=2, tied_embeddings=True, bitwidth=8)
    row = store.upsert_architecture(spec=s1)
    assert row.arch_id == s1.arch_id and len(row.arch_id) == 16
    assert row.spec == s1 and row.summary == s1.summary()
    assert (row.params, row.non_embedding_params) == (s1.params(), s1.non_embedding_params())
    assert row.created_at.tzinfo is not None
    assert store.upsert_architecture(spec=s1) == row
    assert store.get_architecture(arch_id=s1.arch_id) == row
    assert store.find_architecture(arch_id="0" * 16) is None
    with pytest.raises(StoreError, match="no architecture"):
        store.get_architecture(arch_id="0" * 16)


def test_measurement_round_trip_keeps_spread_repeats_and_provenance(store):
    a = store.upsert_architecture(spec=spec()).arch_id
    workload = {"prompt_tokens": 128, "context_tokens": 256, "batch": 1, "warmup": 3, "repeats": 5}
    provenance = {"cpu": "AMD EPYC", "threads": 2, "provider": "CPUExecutionProvider", "versions": {"ort": "1.32"}}
    m = store.add_measurement(measurement(
        a, prefill_repeats_ms=[10.0, 12.0, 11.0, 30.0, 10.5], decode_repeats_ms=np.array([1.0, 1.1, 0.9, 1.2, 1.0]),
        peak_memory_bytes=3 * 2**30, model_bytes=12_345_678, workload=workload, provenance=provenance,
    ))  # fmt: skip
    assert m.ok and m.measured and m.error is None
    assert m.prefill_ms == 11.0 and m.decode_ms_per_token == 1.0
    assert m.prefill_p10_ms == pytest.approx(np.percentile([10, 12, 11, 30, 10.5], 10))
    assert m.decode_p90_ms == pytest.approx(np.percentile([1.0, 1.1, 0.9, 1.2, 1.0], 90))
    assert m.prefill_repeats_ms == (10.0, 12.0, 11.0, 30.0, 10.5)
    assert m.peak_memory_bytes == 3 * 2**30  # above 2**31: a BIGINT
    assert store.get_measurement(id=m.id) == m
    assert store.measurements(arch_id=a) == [m]

    explicit = store.add_measurement(measurement(a, profile="jetson", label="estimated:roofline", prefill_ms=5.0,
                                                 decode_ms=0.5))
    assert explicit.prefill_repeats_ms == () and explicit.prefill_p10_ms == 5.0 and not explicit.measured
    # A row without repeats gives back the measurement it was written from.
    assert explicit.to_measurement() == measurement(a, profile="jetson", label="estimated:roofline", prefill_ms=5.0,
                                                    decode_ms=0.5)


def test_measurement_values_are_checked(store):
    a = store.upsert_architecture(spec=spec()).arch_id
    with pytest.raises(StoreError, match="prefill_ms must be a finite number"):
        store.add_measurement(measurement(a, prefill_ms=math.nan, decode_ms=1))
    with pytest.raises(StoreError, match="label 'local'"):
        store.add_failed_measurement(arch_id=a, profile="host", bitwidth=32, label="local", error="x")
    with pytest.raises(StoreError, match="upsert_architecture"):
        store.add_failed_measurement(arch_id="f" * 16, profile="host", bitwidth=32, label="measured:local", error="x")


def test_reuse_picks_the_latest_successful_measurement(store):
    a = store.upsert_architecture(spec=spec()).arch_id
    key = {"arch_id": a, "profile": "host", "bitwidth": 32}
    assert store.find_measurement(**key) is None
    old = store.add_measurement(measurement(a, label="measured:local", prefill_ms=2.0, decode_ms=0.2))
    node = store.add_measurement(measurement(a, label="measured:node-7", prefill_ms=3.0, decode_ms=0.3))
    est = store.add_measurement(measurement(a, label="estimated:roofline", prefill_ms=4.0, decode_ms=0.4))
    failed = store.add_failed_measurement(**key, label="measured:local", error="onnxruntime: out of memory")
    assert not failed.ok and failed.prefill_ms is None
    assert store.find_measurement(**key) == est  # the newest that succeeded; the failure never counts
    assert store.find_measurement(**key, labels=["measured:*"]) == node
    assert store.find_measurement(**key, labels=["measured:local"]) == old
    assert store.find_measurement(**key, labels=["measured:local", "estimated:roofline"]) == est
    assert store.find_measurement(**key, labels=[]) is None
    # Other keys miss.
    assert store.find_measurement(arch_id=a, profile="jetson", bitwidth=32) is None
    assert store.find_measurement(arch_id=a, profile="host", bitwidth=8) is None
    # A workload filter skips rows taken with another workload.
    # A row also records how it was run (warm-up, repeats): the filter names the keys that matter.
    w = {"prompt_tokens": 64}
    taken = store.add_measurement(measurement(a, prefill_ms=9.0, decode_ms=0.9, workload={**w, "repeats": 20}))
    assert store.find_measurement(**key, workload=w) == taken
    assert store.find_measurement(**key, workload={"prompt_tokens": 32}) is None
    assert store.find_measurement(**key, workload={**w, "batch": 1}) is None
    assert store.find_measurement(**key, workload={**w, "export_format": 2}) is None  # files of an older exporter
    assert len(store.measurements(arch_id=a)) == 5
    # By id, newest first, past the 500-id chunk a long IN list is cut into; unknown ids are skipped.
    assert [m.id for m in store.measurements(ids=[old.id, taken.id, 10**9])] == [taken.id, old.id]
    assert store.measurements(ids=[]) == []
    many = [store.add_measurement(measurement(a, label="estimated:roofline", prefill_ms=1.0, decode_ms=0.1)).id
            for _ in range(501)]
    assert {m.id for m in store.measurements(ids=[*many, node.id])} == {*many, node.id}


# --- studies ---------------------------------------------------------------------------------------
def test_study_round_trip_and_finders(store):
    assert store.list_studies() == []
    assert store.find_study(name="s1") is None
    with pytest.raises(StoreError, match=r"no study named 's1' .*; known: none"):
        store.get_study(name="s1")

    class Cfg:  # stands in for the pydantic TrainConfig
        def model_dump(self, mode: str) -> dict[str, Any]:
            return {"tokens": 300_000, "lr": 3e-3}

    created = store.create_study(
        name="s1", space="gqa_small", profile="jetson", objectives=[Objective("val_bpb", "minimize"),
        {"name": "tokens_per_s", "direction": "maximize"}], optuna_study_id=7, corpus_fingerprint="abc123",
        train_config=Cfg(), seed=3, code_version="0.1.0+g1234", extra={"note": "first"},
    )  # fmt: skip
    assert created.objectives == (Objective("val_bpb", "minimize"), Objective("tokens_per_s", "maximize"))
    assert created.train_config == {"tokens": 300_000, "lr": 3e-3}
    assert created.trial_counts == {"running": 0, "complete": 0, "failed": 0, "infeasible": 0}
    assert store.get_study(name="s1") == created == store.find_study(name="s1")
    with pytest.raises(StoreError, match="already exists"):
        new_study(store, "s1")
    with pytest.raises(StoreError, match="direction must be minimize or maximize"):
        store.create_study(name="s2", space="tiny", profile="host", objectives=[("x", "lower")])
    new_study(store, "s2")
    with pytest.raises(StoreError, match=r"no study named 'nope' .*; known: s1, s2"):
        store.get_study(name="nope")
    for n in range(3):
        store.start_trial(study="s2", number=n)
    store.fail_trial(study="s2", number=0, stage="train", reason="loss became NaN")
    listed = store.list_studies()
    assert [x.name for x in listed] == ["s1", "s2"]
    assert listed[1].trial_counts == {"running": 2, "complete": 0, "failed": 1, "infeasible": 0}
    assert listed[1].n_trials == 3 and listed[0].n_trials == 0

    store.delete_study(name="s2")
    assert [x.name for x in store.list_studies()] == ["s1"]


# --- trials ----------------------------------------------------------------------------------------
def test_trial_lifecycle(store):
    new_study(store)
    arch = store.upsert_architecture(spec=spec())
    m = store.add_measurement(measurement(arch.arch_id, prefill_ms=1, decode_ms=2))

    t = store.start_trial(study="s", number=0, optuna_trial_id=100, worker="host:123")
    assert (t.state, t.arch_id, t.finished_at, t.seconds, t.worker) == ("running", None, None, None, "host:123")
    t = store.update_trial(study="s", number=0, arch_id=arch.arch_id, measurement_id=m.id)
    assert t.arch_summary == arch.summary and t.measurement_id == m.id and t.optuna_trial_id == 100
    curve = [{"step": i, "tokens": 4096 * i, "loss": 5.0 - i / 10} for i in range(5)]
    done = store.finish_trial(
        study="s", number=0, val_bpb=1.9, objectives={"val_bpb": 1.9, "decode_ms": 2.0}, constraints={"mem": -1.0},
        train={"steps": 5, "tokens": 20480, "seconds": 3.5, "tokens_per_s": 5851.4, "final_loss": 4.6},
        curve=curve, baselines={"unigram_bpb": 3.1, "bigram_bpb": 2.4}, artifact_dir="/tmp/runs/s/0",
    )  # fmt: skip
    assert done.state == "complete" and done.feasible and done.seconds is not None and done.seconds >= 0
    assert done.curve == curve and done.train["tokens_per_s"] == 5851.4
    assert store.get_trial(study="s", number=0) == done
    assert store.trials(study="s")[0].curve is None  # lists leave curves out unless asked
    assert store.trials(study="s", curves=True)[0] == done

    store.start_trial(study="s", number=1)
    failed = store.fail_trial(study="s", number=1, stage="export", reason="dynamo export failed: x")
    assert (failed.state, failed.failed_stage, failed.failure_reason) == ("failed", "export", "dynamo export failed: x")

    store.start_trial(study="s", number=2)
    inf = store.mark_infeasible(
        study="s", number=2, stage="analytic", reason="weight bytes 90 MB > budget 64 MB", constraints={"weights": 26e6}
    )
    assert inf.state == "infeasible" and not inf.feasible and inf.failed_stage == "analytic"

    store.start_trial(study="s", number=3)
    assert [t.number for t in store.trials(study="s")] == [0, 1, 2, 3]
    assert [t.number for t in store.trials(study="s", states=["failed", "infeasible"])] == [1, 2]
    assert [t.number for t in store.trials(study="s", states=["running"])] == [3]
    assert store.find_trial(study="s", number=9) is None

    # Transitions only out of "running", and each one says why not.
    with pytest.raises(StoreError, match="it is complete, not running"):
        store.fail_trial(study="s", number=0, stage="x", reason="y")
    with pytest.raises(StoreError, match="no such trial"):
        store.finish_trial(study="s", number=9, objectives={"val_bpb": 1, "decode_ms": 1})
    with pytest.raises(StoreError, match="already exists"):
        store.start_trial(study="s", number=3)
    with pytest.raises(StoreError, match="objective 'decode_ms' has no value"):
        store.finish_trial(study="s", number=3, objectives={"val_bpb": 1.0})
    with pytest.raises(StoreError, match="objective 'val_bpb' is nan"):
        store.finish_trial(study="s", number=3, objectives={"val_bpb": math.nan, "decode_ms": 1.0})
    with pytest.raises(StoreError, match="upsert_architecture"):
        store.update_trial(study="s", number=3, arch_id="0" * 16)
    with pytest.raises(StoreError, match="no study named 'other'"):
        store.start_trial(study="other", number=0)
    with pytest.raises(StoreError, match="unknown trial state 'done'"):
        store.trials(study="s", states=["done"])
    assert store.get_trial(study="s", number=3).state == "running"  # the refused calls changed nothing


# --- rungs -----------------------------------------------------------------------------------------
def test_rungs_are_recorded_as_trials_run_and_read_by_rung(store):
    new_study(store)
    new_study(store, "other")
    arch = store.upsert_architecture(spec=spec())
    m = store.add_measurement(measurement(arch.arch_id, prefill_ms=1, decode_ms=2))
    for number in range(4):
        store.start_trial(study="s", number=number)
    store.start_trial(study="other", number=0)
    store.update_trial(study="s", number=0, arch_id=arch.arch_id, measurement_id=m.id)

    r00 = store.record_rung(study="s", number=0, rung=0, tokens=1 << 20, val_bpb=2.5, seconds=10.0)
    assert (r00.study, r00.number, r00.rung, r00.tokens, r00.val_bpb, r00.seconds) == ("s", 0, 0, 1 << 20, 2.5, 10.0)
    assert (r00.state, r00.measurement_id, r00.created_at.utcoffset()) == ("running", m.id, timedelta(0))
    with pytest.raises(dataclasses.FrozenInstanceError):
        r00.val_bpb = 1.0  # type: ignore[misc]
    r01 = store.record_rung(study="s", number=0, rung=1, tokens=3 << 20, val_bpb=2.2, seconds=31.5)
    store.record_rung(study="s", number=1, rung=0, tokens=1 << 20, val_bpb=2.7, seconds=9.0)
    # numpy scalars, as training code hands them over, come back as plain numbers
    r20 = store.record_rung(study="s", number=2, rung=0, tokens=np.int64(1 << 20), val_bpb=np.float32(2.25),
                            seconds=np.float64(11.0))  # fmt: skip
    assert type(r20.tokens) is int and type(r20.val_bpb) is float and r20.val_bpb == 2.25
    store.record_rung(study="other", number=0, rung=0, tokens=1 << 20, val_bpb=1.0, seconds=1.0)
    store.record_rung(study="other", number=0, rung=1, tokens=2 << 20, val_bpb=0.9, seconds=2.0)
    store.fail_trial(study="s", number=1, stage="train", reason="diverged after rung 0")
    store.finish_trial(study="s", number=2, objectives={"val_bpb": 2.0, "decode_ms": 1.0})

    # Every trial of the study that reached the rung, in any state, by number; not other studies'.
    at0 = store.rung_results(study="s", rung=0)
    assert [(r.number, r.state, r.val_bpb) for r in at0] == [(0, "running", 2.5), (1, "failed", 2.7),
                                                              (2, "complete", 2.25)]  # fmt: skip
    assert at0[0] == r00 and at0[2] == dataclasses.replace(r20, state="complete")
    assert [r.study_id for r in at0] == [store.get_study(name="s").id] * 3
    assert store.rung_results(study="s", rung=1) == [r01]
    assert store.rung_results(study="s", rung=2) == []
    assert [(r.study, r.number, r.val_bpb) for r in store.rung_results(study="other", rung=1)] == [("other", 0, 0.9)]

    assert store.trial_rungs(study="s", number=0) == [r00, r01]
    assert store.trial_rungs(study="s", number=3) == []
    with pytest.raises(StoreError, match="no trial 9 in study 's'"):
        store.trial_rungs(study="s", number=9)
    with pytest.raises(StoreError, match="no study named 'nope'"):
        store.rung_results(study="nope", rung=0)


def test_a_studys_noise_keeps_the_first_result_of_each_seed_of_one_run(store):
    new_study(store)
    new_study(store, "other")
    a, b = (store.upsert_architecture(spec=spec(d_model=d)).arch_id for d in (64, 96))
    assert store.noise(study="s") is None
    assert store.record_noise(study="s", arch_id=a, tokens=4096, seed=0, val_bpb=2.5, trial_number=3)
    assert store.noise(study="s").std is None  # one seed: no spread yet
    assert store.record_noise(study="s", arch_id=a, tokens=4096, seed=2, val_bpb=np.float64(2.6))
    assert not store.record_noise(study="s", arch_id=a, tokens=4096, seed=2, val_bpb=9.9)  # a second worker's
    store.record_noise(study="other", arch_id=b, tokens=8192, seed=0, val_bpb=1.0)
    n = store.noise(study="s")
    assert (n.arch_id, n.tokens, n.seeds, n.bpbs, n.trial_number) == (a, 4096, (0, 2), (2.5, 2.6), 3)
    assert n.std == pytest.approx(0.0707107, rel=1e-5)
    for bad, says in (({"arch_id": b}, "noise is of"), ({"tokens": 8192}, "noise is of"),
                      ({"val_bpb": float("nan")}, "finite"), ({"tokens": 0}, "positive")):
        with pytest.raises(StoreError, match=says):
            store.record_noise(study="s", **{"arch_id": a, "tokens": 4096, "seed": 5, "val_bpb": 2.4, **bad})
    with pytest.raises(StoreError, match="no study"):
        store.noise(study="nope")
    assert n.within({1: 2.0, 2: 2.1, 3: 2.2, 4: 2.5}) == {1: [2], 2: [1, 3], 3: [2], 4: []}  # closer than 2 std


def test_a_rung_is_refused_unless_it_is_the_running_trials_next_with_a_finite_score(store, db_url):
    new_study(store)
    store.start_trial(study="s", number=0)
    store.start_trial(study="s", number=1)
    store.fail_trial(study="s", number=1, stage="train", reason="x")
    ok = {"tokens": 1000, "val_bpb": 2.0, "seconds": 1.0}

    with pytest.raises(StoreError, match="cannot record rung 0 of trial 1 of study 's': it is failed, not running"):
        store.record_rung(study="s", number=1, rung=0, **ok)
    with pytest.raises(StoreError, match="trial 7 of study 's': no such trial"):
        store.record_rung(study="s", number=7, rung=0, **ok)
    with pytest.raises(StoreError, match="no study named 'other'"):
        store.record_rung(study="other", number=0, rung=0, **ok)
    with pytest.raises(StoreError, match="rung 1 of trial 0 of study 's': its next rung is 0"):
        store.record_rung(study="s", number=0, rung=1, **ok)
    store.record_rung(study="s", number=0, rung=0, **ok)
    with pytest.raises(StoreError, match=r"rung 0 of trial 0 of study 's' is recorded already \(val_bpb 2.0\)"):
        store.record_rung(study="s", number=0, rung=0, **{**ok, "val_bpb": 1.9})
    with pytest.raises(StoreError, match="rung 2 of trial 0 of study 's': its next rung is 1"):
        store.record_rung(study="s", number=0, rung=2, tokens=3000, val_bpb=1.8, seconds=3.0)
    with pytest.raises(StoreError, match="at 1000 tokens: rung 0 was at 1000 already"):
        store.record_rung(study="s", number=0, rung=1, **ok)
    for bad in (math.nan, math.inf, -math.inf, None, "2.0"):
        with pytest.raises(StoreError, match=r"val_bpb is .*; a trial without a finite score has failed"):
            store.record_rung(study="s", number=0, rung=1, tokens=2000, val_bpb=bad, seconds=2.0)  # type: ignore[arg-type]
    for field, bad in [("rung", -1), ("rung", True), ("rung", 1.0), ("tokens", 0), ("tokens", 2000.0),
                       ("seconds", -0.5), ("seconds", math.nan)]:  # fmt: skip
        with pytest.raises(StoreError, match=f"{field}.* got {bad!r}"):
            store.record_rung(study="s", number=0, **{"rung": 1, "tokens": 2000, "val_bpb": 1.8, "seconds": 2.0,
                                                       field: bad})  # fmt: skip
    # The refused calls changed nothing.
    assert [(r.rung, r.val_bpb) for r in store.trial_rungs(study="s", number=0)] == [(0, 2.0)]

    # Behind the API the table refuses them too: a second row for (trial, rung), a non-finite score.
    engine = make_engine(db_url)
    trial_id = store.get_trial(study="s", number=0).id
    study_id = store.get_study(name="s").id
    for rung, val_bpb in [(0, 1.5), (1, math.nan), (1, math.inf), (1, -math.inf)]:
        with pytest.raises(StoreError, match="a constraint was broken"), session_scope(engine) as s:
            s.add(RungModel(trial_id=trial_id, study_id=study_id, rung=rung, tokens=5000, val_bpb=val_bpb, seconds=1.0))
    engine.dispose()
    assert len(store.trial_rungs(study="s", number=0)) == 1


def test_deleting_a_trial_or_a_study_deletes_its_rungs(store, db_url):
    for name in ("s", "other"):
        new_study(store, name)
        for number in range(2):
            store.start_trial(study=name, number=number)
            store.record_rung(study=name, number=number, rung=0, tokens=100, val_bpb=2.0, seconds=1.0)
            store.record_rung(study=name, number=number, rung=1, tokens=200, val_bpb=1.9, seconds=2.0)
    engine = make_engine(db_url)
    with engine.begin() as conn:  # no API deletes a trial; the foreign key cascades
        conn.execute(text("DELETE FROM nas_trials WHERE id = :id"), {"id": store.get_trial(study="s", number=0).id})
    assert [r.number for r in store.rung_results(study="s", rung=1)] == [1]
    store.delete_study(name="s")
    with engine.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM nas_rungs")).scalar() == 4  # the other study's
    engine.dispose()
    assert [r.number for r in store.rung_results(study="other", rung=1)] == [0, 1]


# --- Pareto fronts ---------------------------------------------------------------------------------
def _brute_force_front(points: np.ndarray) -> np.ndarray:
    le = np.all(points[:, None, :] <= points[None, :, :], axis=2)
    lt = np.any(points[:, None, :] < points[None, :, :], axis=2)
    return ~np.any(le & lt, axis=0)  # j is dominated if some i is <= everywhere and < somewhere


def test_non_dominated_on_a_hand_example_with_ties():
    pts = [
        (1.0, 5.0),  # front
        (2.0, 3.0),  # front
        (2.0, 3.0),  # front: equal points do not dominate each other
        (2.0, 4.0),  # dominated by (2, 3): same first value, worse second
        (3.0, 3.0),  # dominated by (2, 3): worse first value, same second
        (4.0, 1.0),  # front
        (5.0, 1.0),  # dominated by (4, 1)
        (0.5, 9.0),  # front
    ]
    assert non_dominated(pts, ["minimize", "minimize"]).tolist() == [1, 1, 1, 0, 0, 1, 0, 1]
    # Maximizing the second objective turns the picture over.
    assert non_dominated(pts, ["minimize", "maximize"]).tolist() == [0, 0, 0, 0, 0, 0, 0, 1]
    assert non_dominated([(3.0,), (1.0,), (1.0,)], ["minimize"]).tolist() == [0, 1, 1]
    assert non_dominated(np.zeros((0, 2)), ["minimize", "minimize"]).tolist() == []


@pytest.mark.parametrize("ties", [True, False])
@pytest.mark.parametrize("k", [2, 3, 4])
def test_non_dominated_matches_brute_force(k, ties):
    rng = np.random.default_rng(k)
    pts = rng.integers(0, 6, size=(300, k)).astype(float) if ties else rng.normal(size=(400, k))
    assert (non_dominated(pts, ["minimize"] * k) == _brute_force_front(pts)).all()
    flipped = non_dominated(pts, ["maximize"] + ["minimize"] * (k - 1))
    assert (flipped == _brute_force_front(pts * np.array([-1.0] + [1.0] * (k - 1)))).all()


@pytest.mark.parametrize("k", [2, 3])
def test_non_dominated_keeps_every_point_of_a_full_front(k):
    # Its speed on 10,000 trials is a benchmark's business (timed tests are noisy here).
    rng = np.random.default_rng(0)
    pts = rng.random((10_000, k))
    pts[:, -1] = 1 - pts[:, :-1].sum(axis=1)  # on a plane sloping down: nothing dominates anything
    assert non_dominated(pts, ["minimize"] * k).all()


def test_pareto_counts_only_complete_feasible_trials(store):
    new_study(store)
    # number: (state, val_bpb, decode_ms, constraints)
    plan = {
        0: ("complete", 1.0, 5.0, None),  # front
        1: ("complete", 2.0, 3.0, {"mem": 0.0}),  # front (0 satisfies a constraint)
        2: ("complete", 2.0, 3.0, {"mem": -5.0}),  # front: tie with 1
        3: ("complete", 2.0, 4.0, None),  # dominated by 1 and 2
        4: ("complete", 4.0, 1.0, None),  # front
        5: ("complete", 0.1, 0.1, {"mem": 1.0}),  # would dominate all, but infeasible
        6: ("infeasible", 0.1, 0.1, None),
        7: ("failed", 0.1, 0.1, None),
        8: ("running", 0.1, 0.1, None),
        9: ("complete", 5.0, 1.0, None),  # dominated by 4
        11: ("complete", np.float32(0.2), 0.2, {"mem": math.nan}),  # a NaN constraint is not satisfied
    }
    for n, (state, bpb, ms, cons) in plan.items():
        store.start_trial(study="s", number=n)
        if state == "complete":
            store.finish_trial(study="s", number=n, objectives={"val_bpb": bpb, "decode_ms": ms}, constraints=cons)
        elif state == "infeasible":
            store.mark_infeasible(study="s", number=n, stage="analytic", reason="over budget", constraints={"m": 1})
        elif state == "failed":
            store.fail_trial(study="s", number=n, stage="train", reason="x")
    assert store.pareto(study="s") == []  # nothing stored before the first refresh
    front = store.refresh_pareto(study="s")
    assert [t.number for t in front] == [0, 1, 2, 4]
    assert store.pareto(study="s") == front
    # Objectives given explicitly override the study's: one, maximized, leaves the largest alone.
    assert [t.number for t in store.refresh_pareto(study="s", objectives=[("decode_ms", "maximize")])] == [0]
    # A refresh replaces the stored front.
    assert [t.number for t in store.refresh_pareto(study="s")] == [0, 1, 2, 4]
    store.start_trial(study="s", number=10)
    store.finish_trial(study="s", number=10, objectives={"val_bpb": 0.5, "decode_ms": 0.5})
    assert [t.number for t in store.refresh_pareto(study="s")] == [10]
    assert [t.number for t in store.pareto(study="s")] == [10]


def test_pareto_of_10k_trials_is_the_front_of_the_feasible_ones(store, db_url):
    new_study(store)
    rng = random.Random(0)
    rows = []
    for n in range(10_000):
        bpb, ms = rng.uniform(1, 3), rng.lognormvariate(0, 1)
        feasible = rng.random() > 0.1
        rows.append({
            "number": n, "state": "complete", "objectives": {"val_bpb": bpb, "decode_ms": ms},
            "constraints": {"mem": -1.0 if feasible else 1.0}, "curve": [[i, 5 - i / 10] for i in range(20)],
        })  # fmt: skip
    engine = make_engine(db_url)
    with session_scope(engine) as s:  # bulk insert: 10k start/finish calls would take far longer
        study_id = s.scalar(text("SELECT id FROM nas_studies WHERE name = 's'"))
        s.execute(TrialModel.__table__.insert(), [{"study_id": study_id, **r} for r in rows])
    engine.dispose()

    # Correctness at scale; the time it takes is measured by the store-scale benchmark, not here.
    points = np.array([[r["objectives"]["val_bpb"], r["objectives"]["decode_ms"]] for r in rows])
    front = store.refresh_pareto(study="s")
    listed = store.trials(study="s", states=["complete"])
    feasible = np.array([r["constraints"]["mem"] <= 0 for r in rows])
    expected = np.flatnonzero(non_dominated(points[feasible], ["minimize", "minimize"]))
    assert [t.number for t in front] == np.flatnonzero(feasible)[expected].tolist()
    assert len(listed) == 10_000


# --- two processes -------------------------------------------------------------------------------
N_PER_WORKER = 50


def _worker(url: str, index: int, n_workers: int, barrier: Any, results: Any) -> None:
    """One search worker: open the store (upgrading a fresh database at the same moment as the
    other), then start and finish N_PER_WORKER trials of one shared study, each call its own
    short transaction, refreshing the front now and then."""
    try:
        barrier.wait(timeout=60)
        t0 = time.perf_counter()
        store = Store(url)  # both upgrade the fresh database at once: one creates, one finds it done
        barrier.wait(timeout=60)
        if index == 0:
            new_study(store)
        barrier.wait(timeout=60)
        arch = store.upsert_architecture(spec=spec()).arch_id  # the same spec from both: no conflict
        t1 = time.perf_counter()
        for i in range(N_PER_WORKER):
            number = i * n_workers + index
            store.start_trial(study="s", number=number, arch_id=arch, worker=f"w{index}")
            store.finish_trial(study="s", number=number, objectives={"val_bpb": random.random(), "decode_ms": i})
            if i % 10 == 9:
                store.refresh_pareto(study="s")
        results.put((index, "ok", t1 - t0, time.perf_counter() - t1))
        store.close()
    except BaseException as e:
        barrier.abort()  # the other worker stops waiting and reports too
        results.put((index, "error", repr(e), 0.0))
        raise


def test_two_processes_write_one_database_at_once(db_url):
    ctx = multiprocessing.get_context("spawn")
    n = 2
    barrier, results = ctx.Barrier(n), ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(db_url, i, n, barrier, results)) for i in range(n)]
    t0 = time.perf_counter()
    for p in procs:
        p.start()
    outcomes = [results.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(timeout=60)
    wall = time.perf_counter() - t0
    errors = [o for o in outcomes if o[1] != "ok"]
    assert not errors, errors
    assert [p.exitcode for p in procs] == [0] * n
    writes = n * N_PER_WORKER * 2
    slowest = max(o[3] for o in outcomes)
    print(f"\n{make_url(db_url).get_backend_name()}: {n} processes x {N_PER_WORKER} trials "
          f"({writes} write transactions + {n * N_PER_WORKER // 10} refreshes) in {slowest:.2f} s of writing "
          f"({writes / slowest:.0f} writes/s), open+upgrade {max(o[2] for o in outcomes):.2f} s, "
          f"wall {wall:.1f} s")  # fmt: skip
    with Store(db_url) as s:
        trials = s.trials(study="s")
        assert sorted(t.number for t in trials) == list(range(n * N_PER_WORKER))
        assert {t.state for t in trials} == {"complete"}
        assert {t.worker for t in trials} == {f"w{i}" for i in range(n)}
        assert s.get_study(name="s").trial_counts["complete"] == n * N_PER_WORKER
        assert len(s.refresh_pareto(study="s")) >= 1


def test_timestamps_are_utc(store):
    new_study(store)
    t = store.start_trial(study="s", number=0)
    assert t.started_at.utcoffset() == timedelta(0)


def test_a_trial_stopped_at_an_early_rung_never_hides_one_trained_longer(store):
    # A trained to the top rung (BPB 2.5 -> 2.2 -> 2.0); F stopped at the first rung with 1.95.
    # F's 1.95 beats A's final 2.0 only because F was scored early: at the rung both reached,
    # F (1.95) beat A (2.5) there, so F is on the front, and so is A, judged at its own rung.
    new_study(store)
    rows = {"A": (1, [2.5, 2.2, 2.0], 2.0), "F": (2, [1.95], 1.9), "G": (3, [2.6], 2.5)}
    for n, bpbs, decode in rows.values():
        arch = store.upsert_architecture(spec=spec(d_model=64 * n))
        store.start_trial(study="s", number=n, arch_id=arch.arch_id)
        for k, bpb in enumerate(bpbs):
            store.record_rung(study="s", number=n, rung=k, tokens=4096 * 3**k, val_bpb=bpb, seconds=1.0 + k)
        store.finish_trial(study="s", number=n, val_bpb=bpbs[-1], objectives={"val_bpb": bpbs[-1], "decode_ms": decode})
    assert {t.number for t in store.refresh_pareto(study="s")} == {1, 2}  # G is dominated by F at rung 0
    # the plain non-dominated set of the final values would have dropped A for F
    plain = non_dominated([[2.0, 2.0], [1.95, 1.9], [2.6, 2.5]], ["minimize", "minimize"])
    assert plain.tolist() == [False, True, False]


def test_a_trial_scored_at_one_rung_only_is_compared_there_only(store):
    # A trained to rung 1 (2.5 -> 2.2); B is A's architecture at another bitwidth, scored on A's
    # rung-1 weights (2.25, faster) and recorded at rung 1 alone; C stopped at rung 0 with 2.4.
    new_study(store)
    rows = {"A": (1, {0: 2.5, 1: 2.2}, 2.0), "B": (2, {1: 2.25}, 1.0), "C": (3, {0: 2.4}, 1.5)}
    for n, bpbs, decode in rows.values():
        arch = store.upsert_architecture(spec=spec(d_model=64 * n))
        store.start_trial(study="s", number=n, arch_id=arch.arch_id)
        for k, bpb in bpbs.items():
            store.record_rung(study="s", number=n, rung=k, tokens=4096 * 3**k, val_bpb=bpb, seconds=1.0 + k,
                              only=n == 2)
        last = bpbs[max(bpbs)]
        store.finish_trial(study="s", number=n, val_bpb=last, objectives={"val_bpb": last, "decode_ms": decode})
    assert [g.rung for g in store.trial_rungs(study="s", number=2)] == [1]
    assert [r.number for r in store.rung_results(study="s", rung=0)] == [1, 3]  # B has no rung-0 score
    # at rung 0 C (2.4, 1.5 ms) beats A (2.5, 2.0 ms) and is not compared with B, which has no
    # rung-0 score (its 2.25 at rung 1 would have hidden C); at rung 1 A and B trade off
    assert {t.number for t in store.refresh_pareto(study="s")} == {1, 2, 3}
    with pytest.raises(StoreError, match="in order"):  # only a trial's first rung may skip the ones below
        store.start_trial(study="s", number=4, arch_id=store.upsert_architecture(spec=spec(d_model=320)).arch_id)
        store.record_rung(study="s", number=4, rung=0, tokens=4096, val_bpb=2.0, seconds=1.0)
        store.record_rung(study="s", number=4, rung=2, tokens=4096 * 9, val_bpb=1.9, seconds=2.0, only=True)


def test_a_measurement_is_reused_only_under_the_fingerprint_it_was_taken_with(store):
    a = store.upsert_architecture(spec=spec()).arch_id
    key = {"arch_id": a, "profile": "host", "bitwidth": 32}
    here = store.add_measurement(measurement(a, prefill_ms=1.0, decode_ms=0.1, provenance={"fingerprint": "aaaa"}))
    store.add_measurement(measurement(a, prefill_ms=2.0, decode_ms=0.2, provenance={"fingerprint": "bbbb"}))
    estimate = store.add_measurement(measurement(a, label="estimated:roofline", prefill_ms=3.0, decode_ms=0.3,
                                                 provenance={"host": {"fingerprint": "cccc"}}))
    assert store.find_measurement(**key, fingerprint="aaaa") == here
    assert store.find_measurement(**key, fingerprint="cccc") == estimate  # an estimate rests on its host's
    assert store.find_measurement(**key, fingerprint="dddd") is None  # another machine: measure again
    assert store.find_measurement(**key) == estimate  # no filter: the newest


# --- calibration on a device (schema 0004) -----------------------------------------------------------
def test_a_0003_database_upgrades_to_0004_keeping_its_rows(db_url):
    assert upgrade(db_url, "0003") == (None, "0003")
    assert "nas_calibration" not in inspect(make_engine(db_url)).get_table_names()
    arch = spec()
    _write_at_0003(db_url, arch)
    assert upgrade(db_url) == ("0003", head_revision())
    with Store(db_url) as s:
        assert schema_diff(db_url) == []
        assert s.get_study(name="old").profile == "host"
        assert s.find_measurement(arch_id=arch.arch_id, profile="host", bitwidth=32).decode_ms_per_token == 1.5
        assert s.calibration(profile="host") == []


def _write_at_0003(db_url: str, arch: ArchSpec) -> None:
    """A study, an architecture and its measurement, written through the 0003 tables as they are
    in the database, not through today's models."""
    now = datetime.now(UTC)
    engine = make_engine(db_url)
    with engine.begin() as conn:
        tables = MetaData()
        studies = Table("nas_studies", tables, autoload_with=conn)
        archs = Table("nas_architectures", tables, autoload_with=conn)
        meas = Table("nas_measurements", tables, autoload_with=conn)
        conn.execute(studies.insert(), {"name": "old", "space": "tiny", "profile": "host", "train_config": {},
                                        "objectives": [{"name": "val_bpb", "direction": "minimize"}], "extra": {},
                                        "created_at": now})
        conn.execute(archs.insert(), {"arch_id": arch.arch_id, "spec": arch.canonical_json(), "summary": "s",
                                      "attention": arch.attention, "bitwidth": 32, "vocab_size": arch.vocab_size,
                                      "d_model": arch.d_model, "n_layers": arch.n_layers, "params": arch.params(),
                                      "non_embedding_params": arch.non_embedding_params(), "created_at": now})
        conn.execute(meas.insert(), {"arch_id": arch.arch_id, "profile": "host", "bitwidth": 32,
                                     "label": "measured:local", "prefill_ms": 3.0, "decode_ms_per_token": 1.5,
                                     "prefill_repeats_ms": [], "decode_repeats_ms": [], "workload": {},
                                     "provenance": {}, "created_at": now})
    engine.dispose()


def test_calibration_points_are_kept_per_fingerprint_and_the_newest_device_is_used(store):
    first = spec()
    store.upsert_architecture(spec=first)
    other = spec(d_model=256)
    store.upsert_architecture(spec=other)
    facts = {"cpu": "x", "threads": 2, "provider": "CPUExecutionProvider", "onnxruntime": "1.32.0"}

    def point(spec: ArchSpec, fp: str, decode: float) -> Any:
        return measurement(spec.arch_id, label="measured:pi5-1", prefill_ms=10.0, decode_ms=decode,
                           workload={"prompt_tokens": 64, "context_tokens": 256, "batch": 1},
                           provenance={"fingerprint": fp, "device_facts": facts}, peak_memory_bytes=2**26)

    store.add_calibration(run="r1", profile="rpi5", node="pi5-1", measurement=point(first, "fp-old", 1.0))
    store.add_calibration(run="r2", profile="rpi5", node="pi5-1", measurement=point(first, "fp-new", 2.0))
    store.add_calibration(run="r2", profile="rpi5", node="pi5-1", measurement=point(other, "fp-new", 3.0))
    store.add_calibration(run="r3", profile="rpi5", node="pi5-1", measurement=point(first, "fp-new", 2.5))
    assert [r.decode_ms for r in store.calibration(profile="rpi5", device_fingerprint="fp-old")] == [1.0]
    latest = store.latest_calibration(profile="rpi5")
    assert {(r.arch_id, r.decode_ms) for r in latest} == {(other.arch_id, 3.0), (first.arch_id, 2.5)}
    assert all(r.device_fingerprint == "fp-new" and r.node == "pi5-1" for r in latest)
    row = latest[0]
    assert row.spec == other and row.device_facts == facts and row.workload["context_tokens"] == 256
    p = row.to_point(board="Raspberry Pi 5")
    assert (p.source.fingerprint, p.source.node, p.measured_decode_ms(), p.workload.threads) == ("fp-new", "pi5-1",
                                                                                                3.0, 2)
    assert store.latest_calibration(profile="jetson") == []
    with pytest.raises(StoreError, match="must be measured on the device"):
        store.add_calibration(run="r4", profile="rpi5", node="n",
                              measurement=dataclasses.replace(point(first, "f", 1.0), label="estimated:model"))
    with pytest.raises(StoreError, match=r"no provenance\.fingerprint"):
        store.add_calibration(run="r4", profile="rpi5", node="n",
                              measurement=dataclasses.replace(point(first, "f", 1.0), provenance={}))
