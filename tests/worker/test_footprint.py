"""The worker's resident memory counts against its 300 MB budget: it does not load what it never uses.

pyjwt with `cryptography` is 9-14 MB of resident memory; the worker reaches `imgpipe.auth` through
`imgpipe.web` but never checks a token, so it must not import them.
"""

from __future__ import annotations

import subprocess
import sys


def test_the_worker_does_not_import_the_token_libraries() -> None:
    probe = (
        "import sys, imgpipe_worker.app, imgpipe_worker.__main__\n"
        "print(sorted(m for m in sys.modules if m == 'jwt' or m.startswith('cryptography.hazmat')))"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
