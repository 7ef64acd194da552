"""Infrastructure every service uses the same way: settings, database, outbox, idempotent
event handling, metrics, JSON logs and request ids."""
