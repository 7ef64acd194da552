"""explain a dispatch round's decisions from one snapshot of the agents

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-30

A decision listed every agent of its tier (about 16 KB with 200 agents), written for each
ticket and rewritten when confirmed. A dispatch round now writes the agents of the tiers it
assigns in once (the others only counted), with the agent its plan chose at each step; its
decisions point at that snapshot and their step, and are explained when read. Decisions
recorded before keep their listed candidates.

Downgrading drops the snapshots: the decisions made by dispatch rounds since this revision then
read back with no candidates (their winner, tier, skills and outcome stay).
"""
from alembic import op
import sqlalchemy as sa


revision = '0004'
down_revision = '0003'
branch_labels = None
depends_on = None


def upgrade():
    op.create_table('routing_agent_snapshots',
    sa.Column('id', sa.String(length=36), nullable=False),
    sa.Column('planned_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('agents', sa.JSON(), nullable=False),
    sa.Column('plan', sa.JSON(), nullable=False),
    sa.Column('agents_not_listed', sa.Integer(), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_routing_agent_snapshots'))
    )
    with op.batch_alter_table('routing_decisions', schema=None) as batch_op:
        batch_op.add_column(sa.Column('agent_snapshot_id', sa.String(length=36), nullable=True))
        batch_op.add_column(sa.Column('plan_step', sa.Integer(), nullable=True))


def downgrade():
    with op.batch_alter_table('routing_decisions', schema=None) as batch_op:
        batch_op.drop_column('plan_step')
        batch_op.drop_column('agent_snapshot_id')
    op.drop_table('routing_agent_snapshots')
