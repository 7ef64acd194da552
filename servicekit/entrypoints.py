"""Entrypoint decorators with our defaults."""
from functools import partial

from nameko.rpc import rpc as _nameko_rpc

from contracts.errors import TYPED_ERRORS

# typed domain errors are answers, not crashes: nameko logs them as expected, not as errors
rpc = partial(_nameko_rpc, expected_exceptions=TYPED_ERRORS)
