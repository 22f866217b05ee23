"""moto's S3 API alone, on one port: the S3 endpoint of the tests, the benchmarks and `make dev`.

`python -m moto.server` serves every AWS service moto has, and to route each request it lists
moto's own package directory (some 200 `isdir` calls, under a global lock): a seventh of its
CPU per request, and more of the latency of a small one. The S3 application is the same either
way; served alone, a HEAD or PUT costs it about 40% less, which matters where moto shares two
cores with the pipeline being measured.

Connections are also kept open between requests, as S3 and MinIO keep them: werkzeug's server
closes each one after its answer (it cannot tell where an unread request body ends), so every call
paid a TCP connect and a new server thread, on both sides, and that was a sixth of the worker's
event loop in the benchmarks. Here the body is read whole before the application runs, so the
next request always starts where this one ended.

    python -m tests.s3server PORT [HOST]
"""

from __future__ import annotations

import io
import os
import sys
from typing import Any

from moto.moto_server.werkzeug_app import MotoRequestHandler, create_backend_app
from werkzeug.serving import run_simple


class KeepAliveHandler(MotoRequestHandler):
    """moto's handler, but an HTTP/1.1 connection stays open unless the client asks to close it."""

    # werkzeug writes an answer in two parts (headers, then body): on a kept connection, Nagle's
    # algorithm could hold the second back until the client's delayed ACK of the first.
    disable_nagle_algorithm = True
    reusable = False
    _socket_rfile: Any = None

    def make_environ(self) -> dict[str, Any]:
        environ = super().make_environ()
        # A chunked body has no length to read up front: such a connection closes, as before.
        self.reusable = "chunked" not in self.headers.get("Transfer-Encoding", "").lower()
        if self.reusable:
            length = int(self.headers.get("Content-Length") or 0)
            environ["wsgi.input"] = io.BytesIO(self.rfile.read(length))
            # After answering, werkzeug reads and drops whatever else has come in on the socket,
            # which on a kept connection is the next request: it gets an empty stream instead.
            self._socket_rfile, self.rfile = self.rfile, io.BytesIO()
        return environ

    def run_wsgi(self) -> None:
        try:
            super().run_wsgi()
        finally:
            if self._socket_rfile is not None:
                self.rfile, self._socket_rfile = self._socket_rfile, None

    def send_header(self, keyword: str, value: str) -> None:
        # werkzeug always answers "Connection: close"; http.server then ends the connection.
        if keyword.lower() == "connection" and value.lower() == "close" and self.reusable:
            return
        super().send_header(keyword, value)


def main() -> None:
    port = int(sys.argv[1])
    host = sys.argv[2] if len(sys.argv) > 2 else "127.0.0.1"
    os.environ.setdefault("MOTO_PORT", str(port))  # moto builds some URLs from it
    run_simple(host, port, create_backend_app("s3"), threaded=True, request_handler=KeepAliveHandler)


if __name__ == "__main__":
    main()
