"""Polling until something becomes true."""
import time


def wait_for(predicate, timeout=5.0, interval=0.05, message="condition"):
    """Poll ``predicate`` until it returns something truthy (returned); fail after ``timeout`` seconds.

    Sleeps with ``time.sleep``, looked up at each call: the root conftest has monkey-patched
    eventlet, so that is ``eventlet.sleep`` and other green threads run while this waits.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {message}")
        time.sleep(interval)
