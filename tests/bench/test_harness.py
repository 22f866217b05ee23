"""The benchmark's profiles: `--profile DIR` records py-spy speedscope files of the measured process."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from bench.harness import profiled, py_spy_path


def test_a_profile_holds_the_samples_of_the_process_it_watched(tmp_path: Path) -> None:
    assert py_spy_path(), "py-spy is in the dev group"
    # Spinning for 4 s: py-spy takes up to 1.5 s to attach (`PySpy`), then samples the rest.
    spin = (
        "import time\n"
        "def spinning():\n"
        "    end = time.time() + 4\n"
        "    while time.time() < end: pass\n"
        "spinning()"
    )
    child = subprocess.Popen([sys.executable, "-c", spin])
    out = tmp_path / "profiles" / "spin.speedscope.json"
    said: list[str] = []
    try:
        with profiled(child.pid, out, said.append):
            child.wait(timeout=30)
    finally:
        child.kill()
    frames = [frame["name"] for frame in json.loads(out.read_text())["shared"]["frames"]]
    assert "spinning" in frames, frames
    assert said == [f"  profile: {out}"]


def test_without_a_directory_nothing_is_recorded(tmp_path: Path) -> None:
    said: list[str] = []
    with profiled(1, None, said.append):
        pass
    assert said == []
    assert list(tmp_path.iterdir()) == []
