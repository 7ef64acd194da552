"""What crosses a service boundary: event envelope, event payload schemas, typed errors.

No logic lives here; producers and consumers import the same definitions.
"""
