"""Root conftest: eventlet must patch socket/threading before anything imports them.

nameko's own ``nameko test`` does this; plain pytest does not, and container tests then hang.
"""
import eventlet

eventlet.monkey_patch()

import os  # noqa: E402
import warnings  # noqa: E402

warnings.filterwarnings("ignore", category=DeprecationWarning)
os.environ.setdefault("HELPDESK_LOG_LEVEL", "WARNING")
