"""create routing tables

Revision ID: 0001
Revises: 
Create Date: 2026-11-26 01:05:25.755844
"""
from alembic import op
import sqlalchemy as sa


revision = '0001'
down_revision = None
branch_labels = None
depends_on = None


def upgrade():
    op.create_table('agents',
    sa.Column('id', sa.String(length=200), nullable=False),
    sa.Column('display_name', sa.String(length=200), nullable=False),
    sa.Column('tiers', sa.JSON(), nullable=False),
    sa.Column('skills', sa.JSON(), nullable=False),
    sa.Column('languages', sa.JSON(), nullable=False),
    sa.Column('groups', sa.JSON(), nullable=False),
    sa.Column('capacity', sa.Integer(), nullable=False),
    sa.Column('presence', sa.String(length=10), nullable=False),
    sa.Column('presence_changed_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('last_assigned_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('version', sa.Integer(), nullable=False),
    sa.Column('claim_seq', sa.BigInteger(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('updated_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_agents'))
    )
    op.create_table('handled_events',
    sa.Column('handler', sa.String(length=200), nullable=False),
    sa.Column('event_id', sa.String(length=36), nullable=False),
    sa.Column('handled_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('handler', 'event_id', name=op.f('pk_handled_events'))
    )
    op.create_table('outbox',
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), autoincrement=True, nullable=False),
    sa.Column('event_id', sa.String(length=36), nullable=False),
    sa.Column('source', sa.String(length=50), nullable=False),
    sa.Column('event_type', sa.String(length=100), nullable=False),
    sa.Column('envelope', sa.JSON(), nullable=False),
    sa.Column('request_id', sa.String(length=128), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('published_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('attempts', sa.Integer(), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_outbox')),
    sa.UniqueConstraint('event_id', name=op.f('uq_outbox_event_id'))
    )
    with op.batch_alter_table('outbox', schema=None) as batch_op:
        batch_op.create_index('ix_outbox_unpublished', ['published_at', 'id'], unique=False)

    op.create_table('routed_tickets',
    sa.Column('ticket_id', sa.String(length=36), nullable=False),
    sa.Column('number', sa.Integer(), nullable=False),
    sa.Column('subject', sa.String(length=250), nullable=False),
    sa.Column('status', sa.String(length=10), nullable=False),
    sa.Column('priority', sa.String(length=10), nullable=False),
    sa.Column('category', sa.String(length=100), nullable=True),
    sa.Column('channel', sa.String(length=10), nullable=False),
    sa.Column('organization_id', sa.String(length=200), nullable=True),
    sa.Column('tags', sa.JSON(), nullable=False),
    sa.Column('assignee_id', sa.String(length=200), nullable=True),
    sa.Column('ticket_version', sa.Integer(), nullable=False),
    sa.Column('ticket_created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('tier', sa.String(length=2), nullable=False),
    sa.Column('required_skills', sa.JSON(), nullable=False),
    sa.Column('state', sa.String(length=10), nullable=False),
    sa.Column('queued_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('queue_trigger', sa.String(length=20), nullable=True),
    sa.Column('queue_noted', sa.Boolean(), nullable=False),
    sa.Column('sla_due_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('claim_decision_id', sa.String(length=36), nullable=True),
    sa.Column('claimed_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('updated_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('ticket_id', name=op.f('pk_routed_tickets'))
    )
    with op.batch_alter_table('routed_tickets', schema=None) as batch_op:
        batch_op.create_index('ix_routed_tickets_assignee_status', ['assignee_id', 'status'], unique=False)
        batch_op.create_index('ix_routed_tickets_state_tier', ['state', 'tier'], unique=False)

    op.create_table('routing_decisions',
    sa.Column('id', sa.String(length=36), nullable=False),
    sa.Column('ticket_id', sa.String(length=36), nullable=False),
    sa.Column('decided_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('trigger', sa.String(length=20), nullable=False),
    sa.Column('tier', sa.String(length=2), nullable=False),
    sa.Column('outcome', sa.String(length=10), nullable=False),
    sa.Column('agent_id', sa.String(length=200), nullable=True),
    sa.Column('required_skills', sa.JSON(), nullable=False),
    sa.Column('skills_relaxed', sa.Boolean(), nullable=False),
    sa.Column('candidates', sa.JSON(), nullable=False),
    sa.Column('detail', sa.Text(), nullable=True),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_routing_decisions'))
    )
    with op.batch_alter_table('routing_decisions', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_routing_decisions_ticket_id'), ['ticket_id'], unique=False)

    op.create_table('rules',
    sa.Column('id', sa.String(length=36), nullable=False),
    sa.Column('name', sa.String(length=200), nullable=False),
    sa.Column('position', sa.Integer(), nullable=False),
    sa.Column('enabled', sa.Boolean(), nullable=False),
    sa.Column('match', sa.String(length=3), nullable=False),
    sa.Column('conditions', sa.JSON(), nullable=False),
    sa.Column('actions', sa.JSON(), nullable=False),
    sa.Column('stop', sa.Boolean(), nullable=False),
    sa.Column('version', sa.Integer(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('updated_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_rules'))
    )
    op.create_table('skills',
    sa.Column('name', sa.String(length=50), nullable=False),
    sa.Column('description', sa.Text(), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('name', name=op.f('pk_skills'))
    )


def downgrade():
    op.drop_table('skills')
    op.drop_table('rules')
    with op.batch_alter_table('routing_decisions', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_routing_decisions_ticket_id'))

    op.drop_table('routing_decisions')
    with op.batch_alter_table('routed_tickets', schema=None) as batch_op:
        batch_op.drop_index('ix_routed_tickets_state_tier')
        batch_op.drop_index('ix_routed_tickets_assignee_status')

    op.drop_table('routed_tickets')
    with op.batch_alter_table('outbox', schema=None) as batch_op:
        batch_op.drop_index('ix_outbox_unpublished')

    op.drop_table('outbox')
    op.drop_table('handled_events')
    op.drop_table('agents')
