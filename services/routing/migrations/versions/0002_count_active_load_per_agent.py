"""count each agent's active tickets in a column

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-26

The chooser read every agent's load with a GROUP BY over all assigned tickets for each
decision; a counter kept in the same transaction as each change is read with the agents
and lets a claim take a slot with one atomic UPDATE.
"""
from alembic import op
import sqlalchemy as sa


revision = '0002'
down_revision = '0001'
branch_labels = None
depends_on = None


def upgrade():
    with op.batch_alter_table('agents', schema=None) as batch_op:
        batch_op.add_column(sa.Column('active_load', sa.Integer(), nullable=False, server_default='0'))
    op.execute(
        "UPDATE agents SET active_load = (SELECT count(*) FROM routed_tickets "
        "WHERE routed_tickets.assignee_id = agents.id AND routed_tickets.status IN ('new', 'open'))")


def downgrade():
    with op.batch_alter_table('agents', schema=None) as batch_op:
        batch_op.drop_column('active_load')
