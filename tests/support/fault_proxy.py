"""A TCP proxy on loopback in front of a real server, to cut the network to it and restore it at once.

Restarting a real `mlflow server` takes about 16 s on two cores, so an outage made by stopping it lasts at least that
long and the run under test had to train long enough to outlast it. Cutting the proxy (its listener closed, every
open connection reset) looks the same to the client as the server's death: connections refused, requests in flight
broken; restoring it takes milliseconds, and the server behind it keeps everything it stored.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import threading


class FaultProxy:
    """Forwards 127.0.0.1:port to 127.0.0.1:target_port until cut(); restore() listens on the same port again."""

    def __init__(self, target_port: int):
        self.target_port = target_port
        self._lock = threading.Lock()
        self._connections: list[socket.socket] = []
        self._listener = self._listen(0)
        self.port = self._listener.getsockname()[1]

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def cut(self) -> None:
        """Refuse new connections and reset every open one (RST, as a dead server's kernel would answer)."""
        with self._lock:
            listener, self._listener = self._listener, None
            connections, self._connections = self._connections, []
        if listener is not None:
            listener.close()
        for connection in connections:
            with contextlib.suppress(OSError):  # the peer may have closed it already
                connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                connection.close()

    def restore(self) -> None:
        with self._lock:
            if self._listener is None:
                self._listener = self._listen(self.port)

    close = cut

    def _listen(self, port: int) -> socket.socket:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", port))
        listener.listen(64)
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()
        return listener

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:  # closed by cut()
                return
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target_port), timeout=10)
            except OSError:  # the server itself is down: refuse this client as it would
                client.close()
                continue
            upstream.settimeout(None)  # the timeout was for connecting: an idle keep-alive connection may wait long
            with self._lock:
                if self._listener is not listener:  # cut while this one connected
                    client.close()
                    upstream.close()
                    return
                self._connections += [client, upstream]
            for source, sink in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(source, sink), daemon=True).start()

    @staticmethod
    def _pipe(source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
            sink.shutdown(socket.SHUT_WR)
        except OSError:  # the other direction, or cut(), closed a socket: this copy is over
            return
