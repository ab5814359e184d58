"""calibration: reference architectures measured on a device, keyed by its fingerprint

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-02

Written after ``alembic revision --autogenerate`` from nas/store/models.py, reviewed by hand as
0002 and 0003 were: constraint names written out, the check constraints' SQL as text. Only a
table is added; the tables of 0001-0003 and their rows stay as they are. tests/test_store.py
upgrades a 0003 database holding a study and a measurement to this revision.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | Sequence[str] | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# The largest finite double (see 0002).
_DBL_MAX = "1.7976931348623157e308"


def upgrade() -> None:
    op.create_table(
        "nas_calibration",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("run", sa.String(length=32), nullable=False),
        sa.Column("profile", sa.String(length=100), nullable=False),
        sa.Column("device_fingerprint", sa.String(length=64), nullable=False),
        sa.Column("arch_id", sa.String(length=16), nullable=False),
        sa.Column("bitwidth", sa.Integer(), nullable=False),
        sa.Column("label", sa.String(length=100), nullable=False),
        sa.Column("node", sa.String(length=200), nullable=False),
        sa.Column("decode_ms", sa.Float(), nullable=False),
        sa.Column("prefill_ms", sa.Float(), nullable=False),
        sa.Column("peak_memory_bytes", sa.BigInteger(), nullable=True),
        sa.Column("model_bytes", sa.BigInteger(), nullable=True),
        sa.Column("workload", sa.JSON(), nullable=False),
        sa.Column("device_facts", sa.JSON(), nullable=False),
        sa.Column("provenance", sa.JSON(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.CheckConstraint("label LIKE 'measured:%'", name=op.f("ck_nas_calibration_label")),
        sa.CheckConstraint(f"decode_ms > 0 AND decode_ms <= {_DBL_MAX}", name=op.f("ck_nas_calibration_decode_ms")),
        sa.CheckConstraint(f"prefill_ms > 0 AND prefill_ms <= {_DBL_MAX}", name=op.f("ck_nas_calibration_prefill_ms")),
        sa.ForeignKeyConstraint(
            ["arch_id"], ["nas_architectures.arch_id"], name=op.f("fk_nas_calibration_arch_id_nas_architectures")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_nas_calibration")),
    )
    op.create_index(
        op.f("ix_nas_calibration_profile_device_fingerprint_created_at"),
        "nas_calibration",
        ["profile", "device_fingerprint", "created_at"],
        unique=False,
    )


def downgrade() -> None:
    op.drop_index(op.f("ix_nas_calibration_profile_device_fingerprint_created_at"), table_name="nas_calibration")
    op.drop_table("nas_calibration")
