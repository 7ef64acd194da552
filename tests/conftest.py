"""Root conftest: eventlet must patch socket/threading before anything imports them.

nameko's own ``nameko test`` does this; plain pytest does not, and container tests then hang.
"""
import warnings

# eventlet announces its own deprecation on import; it is our chosen runtime (nameko 2.x)
warnings.filterwarnings("ignore", message=r"\s*Eventlet is deprecated")

import eventlet  # noqa: E402

eventlet.monkey_patch()

import os  # noqa: E402
import warnings  # noqa: E402

warnings.filterwarnings("ignore", category=DeprecationWarning)
os.environ.setdefault("HELPDESK_LOG_LEVEL", "WARNING")
