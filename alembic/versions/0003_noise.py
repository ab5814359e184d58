"""noise: the seed spread of BPB per study

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-02

Written after ``alembic revision --autogenerate`` from nas/store/models.py, reviewed by hand as
0002 was: constraint names written out, the check constraints' SQL as text. Only a table is
added; the tables of 0001 and 0002 and their rows stay as they are. tests/test_store.py upgrades
a 0002 database holding a study to this revision.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | Sequence[str] | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# The largest finite double (see 0002).
_DBL_MAX = "1.7976931348623157e308"


def upgrade() -> None:
    op.create_table(
        "nas_noise",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("study_id", sa.Integer(), nullable=False),
        sa.Column("arch_id", sa.String(length=16), nullable=False),
        sa.Column("tokens", sa.BigInteger(), nullable=False),
        sa.Column("seed", sa.Integer(), nullable=False),
        sa.Column("val_bpb", sa.Float(), nullable=False),
        sa.Column("trial_number", sa.Integer(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.CheckConstraint("tokens > 0", name=op.f("ck_nas_noise_tokens")),
        sa.CheckConstraint(
            f"val_bpb >= -{_DBL_MAX} AND val_bpb <= {_DBL_MAX}", name=op.f("ck_nas_noise_val_bpb_finite")
        ),
        sa.ForeignKeyConstraint(
            ["arch_id"], ["nas_architectures.arch_id"], name=op.f("fk_nas_noise_arch_id_nas_architectures")
        ),
        sa.ForeignKeyConstraint(
            ["study_id"], ["nas_studies.id"], name=op.f("fk_nas_noise_study_id_nas_studies"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_nas_noise")),
        sa.UniqueConstraint("study_id", "seed", name=op.f("uq_nas_noise_study_id_seed")),
    )


def downgrade() -> None:
    op.drop_table("nas_noise")
