"""The browser widget's JS codec against the protocol vectors, with node's own test runner."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
NODE = shutil.which("node")


@pytest.mark.skipif(
    NODE is None, reason="node is not installed: the JS codec tests need node >= 20"
)
def test_js_codec_passes_the_conformance_vectors() -> None:
    assert NODE is not None
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
