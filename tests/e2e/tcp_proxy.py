"""A tiny TCP forwarder the e2e tests run as a separate process and kill to simulate an outage.

    python tests/e2e/tcp_proxy.py LISTEN_PORT TARGET_HOST TARGET_PORT

Plain OS threads (no eventlet): killing the process drops every forwarded connection at once,
which is what a broker disappearing looks like to a client. Prints ``ready`` once listening.
"""
import socket
import sys
import threading


def _pump(source: socket.socket, sink: socket.socket) -> None:
    try:
        while True:
            data = source.recv(65536)
            if not data:
                break
            sink.sendall(data)
    except OSError:
        pass
    finally:
        for sock in (source, sink):
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()


def _serve(client: socket.socket, target: tuple[str, int]) -> None:
    try:
        upstream = socket.create_connection(target, timeout=5)
        upstream.settimeout(None)
    except OSError:
        client.close()
        return
    threading.Thread(target=_pump, args=(client, upstream), daemon=True).start()
    threading.Thread(target=_pump, args=(upstream, client), daemon=True).start()


def main(argv: list[str]) -> None:
    listen_port, target_host, target_port = int(argv[0]), argv[1], int(argv[2])
    server = socket.socket()
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind(("127.0.0.1", listen_port))
    server.listen(64)
    print("ready", flush=True)
    while True:
        client, _ = server.accept()
        _serve(client, (target_host, target_port))


if __name__ == "__main__":
    main(sys.argv[1:])
