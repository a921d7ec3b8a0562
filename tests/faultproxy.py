"""A fault-injecting HTTP proxy in front of the real S3 server, so fault tests see real S3 semantics.

Requests and responses pass through byte for byte (the Host header too, so SigV4 signatures made for the
proxy's address verify upstream). A rule changes the response of the next `times` matching requests:

- ``truncate``: the upstream status and headers (Content-Length kept), half of the body, then close;
- ``corrupt``: the body with some bytes flipped (same length: only a checksum can tell);
- ``reset``: the connection is closed without any response (a TCP RST);
- ``status:NNN``: an S3-style XML error with that status instead of the upstream response;
- ``slow``: the upstream response after `delay` seconds.

`down()` makes every request fail with a reset until `up()` (an outage).
"""

from __future__ import annotations

import http.client
import socket
import struct
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

MODES = ("truncate", "corrupt", "reset", "slow")


@dataclass
class Rule:
    mode: str
    method: str | None
    path_contains: str | None
    times: int
    delay: float
    hits: int = 0

    def matches(self, method: str, path: str) -> bool:
        return (self.hits < self.times and (self.method is None or self.method == method)
                and (self.path_contains is None or self.path_contains in path))


class FaultProxy:
    """`with FaultProxy(upstream) as proxy:` point AWS_ENDPOINT_URL at `proxy.url`."""

    def __init__(self, upstream: str) -> None:
        parts = urlsplit(upstream)
        self.upstream = (parts.hostname, parts.port)
        self.rules: list[Rule] = []
        self.requests: list[tuple[str, str]] = []  # (method, path) of every request seen
        self.outage = False
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def add(self, mode: str, method: str | None = "GET", path_contains: str | None = None, times: int = 1,
            delay: float = 2.0) -> Rule:
        if mode not in MODES and not (mode.startswith("status:") and mode[7:].isdigit()):
            raise ValueError(f"unknown fault mode {mode!r}")
        rule = Rule(mode, method, path_contains, times, delay)
        with self._lock:
            self.rules.append(rule)
        return rule

    def down(self) -> None:
        self.outage = True

    def up(self) -> None:
        self.outage = False

    def _take(self, method: str, path: str) -> Rule | None:
        with self._lock:
            self.requests.append((method, path))
            for rule in self.rules:
                if rule.matches(method, path):
                    rule.hits += 1
                    return rule
        return None

    def start(self) -> FaultProxy:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=10)

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:  # quiet
                pass

            def _reset(self) -> None:
                self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                self.close_connection = True
                self.connection.close()

            def _body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    chunks = []
                    while True:
                        size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                        chunks.append(self.rfile.read(size))
                        self.rfile.readline()
                        if size == 0:
                            while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                                pass  # trailers
                            break
                    return b"".join(chunks)
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def _forward(self) -> None:
                body = self._body()
                rule = proxy._take(self.command, self.path)
                if proxy.outage or (rule and rule.mode == "reset"):
                    self._reset()
                    return
                if rule and rule.mode.startswith("status:"):
                    status = int(rule.mode[7:])
                    xml = (b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>ServiceUnavailable</Code>'
                           b"<Message>injected fault</Message></Error>")
                    self.send_response(status)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(xml)))
                    self.end_headers()
                    self.wfile.write(xml)
                    return
                headers = {k: v for k, v in self.headers.items() if k.lower() not in ("transfer-encoding",)}
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    headers["Content-Length"] = str(len(body))
                conn = http.client.HTTPConnection(*proxy.upstream, timeout=60)
                try:
                    conn.putrequest(self.command, self.path, skip_host=True, skip_accept_encoding=True)
                    for k, v in headers.items():
                        conn.putheader(k, v)
                    conn.endheaders(body if body or "Content-Length" in headers else None)
                    resp = conn.getresponse()
                    data = resp.read()
                    status, reason, resp_headers = resp.status, resp.reason, resp.getheaders()
                finally:
                    conn.close()
                if rule and rule.mode == "slow":
                    time.sleep(rule.delay)
                if rule and rule.mode == "corrupt" and data:
                    data = bytes(b ^ 0xFF if i % 97 == 0 else b for i, b in enumerate(data))
                self.send_response_only(status, reason)
                for k, v in resp_headers:
                    if k.lower() not in ("transfer-encoding", "connection"):
                        self.send_header(k, v)
                if not any(k.lower() == "content-length" for k, _ in resp_headers):
                    self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if rule and rule.mode == "truncate":
                    self.wfile.write(data[: len(data) // 2])
                    self.wfile.flush()
                    self._reset()
                    return
                if self.command != "HEAD":
                    self.wfile.write(data)

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _forward

        return Handler
