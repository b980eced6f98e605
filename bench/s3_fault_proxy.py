"""A TCP proxy in front of an S3 endpoint that injects the faults of a flaky object store, switched
from outside through a mode file (the chaos soak and the transient-fault tests run it as a process).

    python bench/s3_fault_proxy.py --port P --target http://127.0.0.1:M --mode-file F

Modes (the first word of F, read every 0.1 s; a missing file means ``pass``):

    pass    forward every byte both ways
    down    the listening socket is closed: new connections are refused (ECONNREFUSED); the port stays
            bound (a socket bound to it, not listening), so that no other process on the machine is
            given it meanwhile and the proxy can listen on it again
    reset   connections are accepted and reset at once (ECONNRESET)
    503     every request is answered ``503 SlowDown`` (S3's throttling reply) and the connection closed

Leaving ``pass`` resets every open connection, so a kept-alive connection cannot outlive a fault.
The proxy writes its port to ``--ready FILE`` once it listens (the caller waits for it).
"""
from __future__ import annotations

import argparse
import select
import socket
import struct
import threading
import time
from pathlib import Path
from typing import Optional
from urllib.parse import urlparse

SLOW_DOWN = (b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>SlowDown</Code>'
             b'<Message>Please reduce your request rate.</Message></Error>')
MODES = ("pass", "down", "reset", "503")


def _hard_close(sock: socket.socket) -> None:
    """Close with a TCP reset (SO_LINGER 0), as a crashed peer would."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass
    sock.close()


class FaultProxy:
    def __init__(self, port: int, target: tuple[str, int], mode_file: Path) -> None:
        self.port, self.target, self.mode_file = port, target, mode_file
        self.mode = "pass"
        self.listener: Optional[socket.socket] = None
        self.holder: Optional[socket.socket] = None     # keeps the port while "down"
        self.open: set[socket.socket] = set()
        self.lock = threading.Lock()

    def read_mode(self) -> str:
        try:
            word = self.mode_file.read_text().split()[0]
        except (OSError, IndexError):
            return "pass"
        return word if word in MODES else "pass"

    def listen(self) -> None:
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", self.port))
        s.listen(64)
        self.port = s.getsockname()[1]
        self.listener = s
        threading.Thread(target=self.accept_loop, args=(s,), daemon=True).start()

    def accept_loop(self, listener: socket.socket) -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return  # the listener was closed (mode "down")
            mode = self.mode
            if mode == "reset" or mode == "down":
                _hard_close(conn)
            elif mode == "503":
                threading.Thread(target=self.slow_down, args=(conn,), daemon=True).start()
            else:
                threading.Thread(target=self.forward, args=(conn,), daemon=True).start()

    def slow_down(self, conn: socket.socket) -> None:
        """Read one request's head and answer 503 SlowDown."""
        conn.settimeout(5)
        try:
            data = b""
            while b"\r\n\r\n" not in data and len(data) < 65536:
                chunk = conn.recv(65536)
                if not chunk:
                    break
                data += chunk
            conn.sendall(b"HTTP/1.1 503 Slow Down\r\nContent-Type: application/xml\r\n"
                         b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(SLOW_DOWN) + SLOW_DOWN)
        except OSError:
            pass
        finally:
            conn.close()

    def forward(self, conn: socket.socket) -> None:
        try:
            up = socket.create_connection(self.target, timeout=10)
        except OSError:
            _hard_close(conn)
            return
        with self.lock:
            self.open.update((conn, up))
        try:
            pair = {conn: up, up: conn}
            while True:
                ready, _, _ = select.select(list(pair), [], [], 1.0)
                for s in ready:
                    data = s.recv(65536)
                    if not data:
                        return
                    pair[s].sendall(data)
        except (OSError, ValueError):
            return
        finally:
            with self.lock:
                self.open.discard(conn)
                self.open.discard(up)
            for s in (conn, up):
                try:
                    s.close()
                except OSError:
                    pass

    def switch(self, mode: str) -> None:
        if mode == self.mode:
            return
        old, self.mode = self.mode, mode
        if old == "pass":
            with self.lock:
                victims = list(self.open)
            for s in victims:
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
        if mode == "down" and self.listener is not None:
            try:   # stops the listening and wakes the accept thread (a bare close would not, on Linux)
                self.listener.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            self.listener.close()
            self.listener = None
            self.holder = self._hold()
        if old == "down":
            if self.holder is not None:
                self.holder.close()
                self.holder = None
            self.listen()
        print(f"s3_fault_proxy: {old} -> {mode}", flush=True)

    def _hold(self) -> Optional[socket.socket]:
        """A socket bound to the port, not listening: connections are refused, and the kernel gives
        the port to no other process (its ephemeral choice skips a bound port)."""
        holder = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            holder.bind(("127.0.0.1", self.port))
        except OSError as exc:
            print(f"s3_fault_proxy: cannot hold port {self.port} while down ({exc})", flush=True)
            holder.close()
            return None
        return holder

    def serve(self, ready: Optional[Path]) -> None:
        self.listen()
        if ready is not None:
            ready.write_text(str(self.port))
        while True:
            self.switch(self.read_mode())
            time.sleep(0.1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--target", required=True, help="the S3 endpoint, http://HOST:PORT")
    parser.add_argument("--mode-file", required=True)
    parser.add_argument("--ready", default=None, help="write the listening port here")
    a = parser.parse_args()
    url = urlparse(a.target)
    FaultProxy(a.port, (url.hostname or "127.0.0.1", url.port or 80), Path(a.mode_file)).serve(
        Path(a.ready) if a.ready else None)


if __name__ == "__main__":
    main()
