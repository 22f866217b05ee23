"""moto's S3 API alone, on one port: the S3 endpoint of the tests, the benchmarks and `make dev`.

`python -m moto.server` serves every AWS service moto has, and to route each request it lists
moto's own package directory (some 200 `isdir` calls, under a global lock): a seventh of its
CPU per request, and more of the latency of a small one. The S3 application is the same either
way; served alone, a HEAD or PUT costs it about 40% less, which matters where moto shares two
cores with the pipeline being measured.

    python -m tests.s3server PORT [HOST]
"""

from __future__ import annotations

import os
import sys

from moto.moto_server.werkzeug_app import MotoRequestHandler, create_backend_app
from werkzeug.serving import run_simple


def main() -> None:
    port = int(sys.argv[1])
    host = sys.argv[2] if len(sys.argv) > 2 else "127.0.0.1"
    os.environ.setdefault("MOTO_PORT", str(port))  # moto builds some URLs from it
    run_simple(host, port, create_backend_app("s3"), threaded=True, request_handler=MotoRequestHandler)


if __name__ == "__main__":
    main()
