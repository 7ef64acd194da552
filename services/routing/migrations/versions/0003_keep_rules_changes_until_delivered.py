"""keep the rules' changes to a ticket until the tickets service has them

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-30

Triage and assignment are now separate steps (the dispatcher assigns queued tickets in
batches), so what the rules decided (category, priority, group) waits on the routed ticket
until it is delivered with the assignment, or on its own once the ticket waits in a queue.
"""
from alembic import op
import sqlalchemy as sa


revision = '0003'
down_revision = '0002'
branch_labels = None
depends_on = None


def upgrade():
    with op.batch_alter_table('routed_tickets', schema=None) as batch_op:
        batch_op.add_column(sa.Column('pending_changes', sa.JSON(), nullable=True))
    op.create_index('ix_routed_tickets_pending_changes', 'routed_tickets', ['ticket_id'], unique=False,
                    sqlite_where=sa.text('pending_changes IS NOT NULL'),
                    postgresql_where=sa.text('pending_changes IS NOT NULL'))


def downgrade():
    op.drop_index('ix_routed_tickets_pending_changes', table_name='routed_tickets')
    with op.batch_alter_table('routed_tickets', schema=None) as batch_op:
        batch_op.drop_column('pending_changes')
