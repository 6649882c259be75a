"""The browser widget's JS codec against the protocol vectors, with node's own test runner."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
NODE = shutil.which("node")


def test_js_codec_passes_the_conformance_vectors() -> None:
    if NODE is None:  # a missing tool fails the run: a skip would pass it untested
        pytest.fail(
            "node (>= 20) is required for the JS codec tests: Debian's nodejs (make test)",
            pytrace=False,
        )
    proc = subprocess.run(
        [NODE, "--test", "clients/widget/test/"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    report = proc.stdout + proc.stderr
    assert proc.returncode == 0, report
    assert "# fail 0" in report, report
    passed = [line for line in report.splitlines() if line.startswith("# pass ")]
    assert passed and int(passed[0].split()[-1]) >= 40, report
