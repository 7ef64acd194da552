"""A TCP forwarder that simulates a broker outage: ``stop()`` closes the listener and every
connection through it, ``start()`` listens again on the same port.

In-process (``TcpProxy``): its threads are green threads in the test process, because the root
conftest has monkey-patched eventlet. As a process of its own (``TcpProxyProcess``, run as
``python -m tests.support.tcp_proxy LISTEN_PORT TARGET_HOST TARGET_PORT``, plain OS threads,
no eventlet): stopping kills the process, which drops every forwarded connection at once, as a
broker disappearing does. The process prints ``ready`` once it listens.
"""
import socket
import subprocess
import sys
import threading
from pathlib import Path

from tests.support.ports import free_port

REPO_ROOT = Path(__file__).resolve().parents[2]


class TcpProxy:
    """Forwards ``127.0.0.1:<port>`` (a free one unless given) to ``target_host:target_port``.

    Sockets are only shut down from other threads and closed by the thread that owns them:
    an eventlet green thread blocked on a socket another one closes is never woken.
    """

    def __init__(self, target_host: str, target_port: int, port: int | None = None):
        self.target = (target_host, target_port)
        self.port = port or free_port()
        self._lock = threading.Lock()
        self._listener = None
        self._sockets = set()
        self._threads = []  # the acceptor and one a connection

    @property
    def running(self) -> bool:
        return self._listener is not None

    def start(self) -> "TcpProxy":
        assert not self.running, "already running"
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        with self._lock:
            self._listener = listener
            self._start_thread(self._accept, listener)
        return self

    def stop(self) -> None:
        """An outage: the listener and every open connection closed, their threads finished."""
        with self._lock:
            listener, self._listener = self._listener, None
            sockets, threads, self._threads = [*self._sockets], self._threads, []
        if listener is None:
            return
        for sock in (listener, *sockets):
            _shutdown(sock)  # wakes the threads blocked in accept() or recv()
        for thread in threads:
            thread.join(timeout=5)
        for sock in (listener, *sockets):
            sock.close()  # already closed by their threads unless a join timed out

    def _start_thread(self, target, *args) -> None:
        """Start a tracked thread; the caller holds ``_lock``."""
        thread = threading.Thread(target=target, args=args, daemon=True)
        self._threads = [t for t in self._threads if t.is_alive()] + [thread]
        thread.start()

    def _accept(self, listener: socket.socket) -> None:
        try:
            while True:
                try:
                    client, _ = listener.accept()
                except (OSError, EOFError):
                    return  # stop() shut the listener down
                try:
                    upstream = socket.create_connection(self.target, timeout=5)
                    upstream.settimeout(None)
                except OSError:
                    client.close()
                    continue
                with self._lock:
                    stopped = self._listener is not listener
                    if not stopped:
                        self._sockets.update((client, upstream))
                        self._start_thread(self._forward, client, upstream)
                if stopped:
                    client.close()
                    upstream.close()
                    return
        finally:
            listener.close()

    def _forward(self, client: socket.socket, upstream: socket.socket) -> None:
        back = threading.Thread(target=_pump, args=(upstream, client), daemon=True)
        back.start()
        _pump(client, upstream)
        back.join()
        with self._lock:
            self._sockets.difference_update((client, upstream))
        client.close()
        upstream.close()


def _pump(source: socket.socket, sink: socket.socket) -> None:
    """Copy ``source`` to ``sink`` until either end closes; then shut both down, which ends
    the pump running the other way."""
    try:
        while data := source.recv(65536):
            sink.sendall(data)
    except (OSError, EOFError):  # EOFError: eventlet's recv() on a socket closed under it
        pass
    finally:
        _shutdown(source)
        _shutdown(sink)


def _shutdown(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


class TcpProxyProcess:
    """``TcpProxy`` in a child process (output to ``log_path``); ``stop()`` kills it."""

    def __init__(self, target_host: str, target_port: int, log_path: Path):
        self.port = free_port()
        self.target = (target_host, target_port)
        self.log_path = log_path
        self.process = None

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def start(self) -> "TcpProxyProcess":
        assert not self.running
        log = open(self.log_path, "ab")
        self.process = subprocess.Popen(
            [sys.executable, "-m", __spec__.name, str(self.port), self.target[0], str(self.target[1])],
            stdout=subprocess.PIPE, stderr=log, cwd=REPO_ROOT)
        log.close()
        line = self.process.stdout.readline()
        if line.strip() != b"ready":
            self.stop()
            raise RuntimeError(f"tcp proxy did not start on port {self.port}: {line!r}; "
                               f"{self.log_path.read_text(errors='replace')[-2000:]}")
        return self

    def stop(self) -> None:
        process, self.process = self.process, None
        if process is None:
            return
        if process.poll() is None:
            process.kill()
        process.wait(timeout=10)
        process.stdout.close()


def main(argv: list[str]) -> None:
    listen_port, target_host, target_port = int(argv[0]), argv[1], int(argv[2])
    TcpProxy(target_host, target_port, port=listen_port).start()
    print("ready", flush=True)
    threading.Event().wait()  # forward until killed


if __name__ == "__main__":
    main(sys.argv[1:])
