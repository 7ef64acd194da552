#!/usr/bin/env bash
# Make sure a RabbitMQ broker answers at $AMQP_URI (default amqp://guest:guest@localhost:5672/).
#
#   deploy/local/ensure-rabbitmq.sh
#
# - A broker already answers: done (on a local broker, also enable the management plugin).
# - Something listens but refuses the login: fail (fix AMQP_URI); nothing is started.
# - Nothing answers and the URI host is not this machine: fail with a message (we never start
#   anything remote).
# - Nothing answers on a local host: start rabbitmq-server if installed; install it first with
#   apt-get when root; otherwise print the command to run. Then wait for it to answer.
#
# Environment: AMQP_URI, PYTHON (interpreter for the check; default .venv/bin/python, else python3),
# RABBITMQ_WAIT_SECONDS (default 60).
set -euo pipefail

AMQP_URI="${AMQP_URI:-amqp://guest:guest@localhost:5672/}"
WAIT_SECONDS="${RABBITMQ_WAIT_SECONDS:-60}"
here="$(cd "$(dirname "$0")" && pwd)"
repo_root="$(cd "$here/../.." && pwd)"

if [ -z "${PYTHON:-}" ]; then
    if [ -x "$repo_root/.venv/bin/python" ]; then
        PYTHON="$repo_root/.venv/bin/python"
    else
        PYTHON="python3"
    fi
fi

say() { printf 'broker: %s\n' "$*"; }
die() { printf 'broker: ERROR: %s\n' "$*" >&2; exit 1; }

# the URI with the password masked, for messages
shown_uri="$(printf '%s' "$AMQP_URI" | sed -E 's#(://[^:/@]*):[^@/]*@#\1:***@#')"

uri_host() {
    "$PYTHON" -c 'import sys, urllib.parse; print(urllib.parse.urlsplit(sys.argv[1]).hostname or "localhost")' "$AMQP_URI"
}

# Exit 0 when an AMQP broker accepts a connection (with the URI's credentials and vhost when
# kombu is importable, else a bare AMQP 0-9-1 protocol handshake); exit 3 when something listens
# on the port but refuses us (wrong credentials or vhost, not AMQP); exit 1 when nothing answers.
# Bounded by timeouts; never hangs. The reason goes to $last_error_file.
broker_answers() {
    local check
    check='
import socket, sys, urllib.parse
uri = sys.argv[1]
parts = urllib.parse.urlsplit(uri)
address = (parts.hostname or "localhost", parts.port or 5672)
socket.setdefaulttimeout(3)
try:
    import kombu
except ImportError:
    kombu = None
try:
    if kombu is not None:
        with kombu.Connection(uri, connect_timeout=3) as conn:
            conn.ensure_connection(max_retries=1, interval_start=0, timeout=3)
    else:
        with socket.create_connection(address, timeout=3) as s:
            s.sendall(b"AMQP\x00\x00\x09\x01")
            if s.recv(1)[:1] != b"\x01":  # a method frame (Connection.Start)
                raise OSError("not an AMQP 0-9-1 broker")
except Exception as exc:
    print(f"{type(exc).__name__}: {exc}", file=sys.stderr)
    try:
        socket.create_connection(address, timeout=3).close()
    except OSError:
        sys.exit(1)
    sys.exit(3)
'
    if command -v timeout >/dev/null 2>&1; then
        timeout 15 "$PYTHON" -c "$check" "$AMQP_URI" 2>"$last_error_file"
    else
        "$PYTHON" -c "$check" "$AMQP_URI" 2>"$last_error_file"
    fi
}

is_local_host() {
    case "$1" in
        localhost|localhost.localdomain|127.*|::1|0.0.0.0|"") return 0 ;;
    esac
    [ "$1" = "$(hostname 2>/dev/null || true)" ] && return 0
    [ "$1" = "$(hostname -f 2>/dev/null || true)" ] && return 0
    return 1
}

enable_management() {
    # the tests create a vhost per test with rabbitmqctl or the management HTTP API
    if ! command -v rabbitmq-plugins >/dev/null 2>&1; then
        say "note: rabbitmq-plugins not found here; management plugin not checked"
        return 0
    fi
    if rabbitmq-plugins enable rabbitmq_management >/dev/null 2>&1; then
        say "management plugin enabled (http://localhost:15672)"
    else
        say "note: could not enable the management plugin (not root?); if tests need it run:"
        say "      sudo rabbitmq-plugins enable rabbitmq_management"
    fi
}

wait_for_broker() {
    local waited=0
    say "waiting up to ${WAIT_SECONDS}s for the broker to answer..."
    while ! broker_answers; do
        waited=$((waited + 2))
        if [ "$waited" -ge "$WAIT_SECONDS" ]; then
            die "RabbitMQ did not answer at $shown_uri within ${WAIT_SECONDS}s ($(cat "$last_error_file" 2>/dev/null | tail -n 1)). Look at /var/log/rabbitmq/."
        fi
        sleep 2
    done
    say "RabbitMQ answers at $shown_uri (after ~${waited}s)"
}

last_error_file="$(mktemp)"
trap 'rm -f "$last_error_file"' EXIT

host="$(uri_host)"
say "checking for a broker at $shown_uri ..."
status=0
broker_answers || status=$?
reason="$(tail -n 1 "$last_error_file" 2>/dev/null || true)"
if [ "$status" -eq 0 ]; then
    say "RabbitMQ answers at $shown_uri"
    if is_local_host "$host"; then
        enable_management
    fi
    exit 0
fi
if [ "$status" -eq 3 ]; then
    die "something listens at $shown_uri but the AMQP login failed (${reason:-no detail}). Check the user, password and vhost in AMQP_URI; nothing was started."
fi

if ! is_local_host "$host"; then
    die "no broker answers at $shown_uri (${reason:-no answer}). The host '$host' is not this machine, so nothing is started here: start that broker or point AMQP_URI at one that runs."
fi
port="$("$PYTHON" -c 'import sys, urllib.parse; print(urllib.parse.urlsplit(sys.argv[1]).port or 5672)' "$AMQP_URI")"
if [ "$port" != "5672" ]; then
    die "no broker answers at $shown_uri (${reason:-no answer}). A local rabbitmq-server would listen on 5672, not $port: start your broker on $port or fix AMQP_URI."
fi
say "no broker answers at $shown_uri (${reason:-no answer}); the host is local, so trying to start one"

if ! command -v rabbitmq-server >/dev/null 2>&1 && [ ! -x /usr/sbin/rabbitmq-server ]; then
    if [ "$(id -u)" -eq 0 ]; then
        say "rabbitmq-server is not installed; installing it with apt-get (root)"
        export DEBIAN_FRONTEND=noninteractive
        apt-get update
        apt-get install -y rabbitmq-server
    else
        die "rabbitmq-server is not installed. Install it, then rerun this command:
    sudo apt-get install -y rabbitmq-server"
    fi
fi
PATH="$PATH:/usr/sbin:/sbin"

# installing may already have started it (systemd)
if broker_answers; then
    say "RabbitMQ answers at $shown_uri"
    enable_management
    exit 0
fi

if [ "$(id -u)" -ne 0 ]; then
    # Debian's rabbitmq-server wrapper, run by another user, boots a node in the foreground
    # (dropping -detached) and blocks, so we do not try.
    die "rabbitmq-server is installed but not running, and starting it needs root. Run one of:
    sudo systemctl start rabbitmq-server
    sudo rabbitmq-server -detached"
fi
say "starting rabbitmq-server -detached"
rabbitmq-server -detached || die "rabbitmq-server -detached failed; look at /var/log/rabbitmq/."
wait_for_broker
enable_management
