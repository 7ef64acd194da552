"""Entrypoint decorators with our defaults."""
from nameko.rpc import rpc as _nameko_rpc

from contracts.errors import TYPED_ERRORS


def rpc(fn=None, **options):
    """nameko ``@rpc`` whose typed domain errors are answers, not crashes.

    nameko logs exceptions listed in ``expected_exceptions`` as expected instead of as
    worker errors. Usable as ``@rpc`` or ``@rpc(...)``.
    """
    options.setdefault("expected_exceptions", TYPED_ERRORS)
    if fn is None:
        return _nameko_rpc(**options)
    return _nameko_rpc(**options)(fn)
