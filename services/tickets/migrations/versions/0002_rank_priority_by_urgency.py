"""rank priority by urgency (low=0 .. critical=3)

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-25
"""
from alembic import op

revision = '0002'
down_revision = '0001'
branch_labels = None
depends_on = None

# recomputed from the priority itself, so running it on any data is safe
RANK = "CASE priority WHEN 'critical' THEN 3 WHEN 'high' THEN 2 WHEN 'normal' THEN 1 ELSE 0 END"
OLD_RANK = "CASE priority WHEN 'critical' THEN 0 WHEN 'high' THEN 1 WHEN 'normal' THEN 2 ELSE 3 END"


def upgrade():
    op.execute(f"UPDATE tickets SET priority_rank = {RANK}")


def downgrade():
    op.execute(f"UPDATE tickets SET priority_rank = {OLD_RANK}")
