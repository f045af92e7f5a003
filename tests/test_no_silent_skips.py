"""CI cannot pass without testing: a test that needs ../shared/data fails under CI=true when the
data is missing (and only skips, with the reason, elsewhere)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
NEEDS_DATA = "tests/test_data_records.py::test_flat_scanner_matches_biopython"


def _pytest_without_data(tmp_path: Path, **env: str) -> subprocess.CompletedProcess:
    environment = {key: value for key, value in os.environ.items() if key != "CI"}
    environment.update(PROTPERF_SHARED_DATA=str(tmp_path / "no-data"), **env)
    command = [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", NEEDS_DATA]
    return subprocess.run(
        command, cwd=REPO, env=environment, capture_output=True, text=True, timeout=120
    )


def test_missing_data_fails_under_ci_and_skips_elsewhere(tmp_path):
    in_ci = _pytest_without_data(tmp_path, CI="true")
    assert in_ci.returncode != 0, in_ci.stdout
    assert "real protein data not found at" in in_ci.stdout
    assert "under CI=true the tests that need it fail" in in_ci.stdout
    assert "skipped" not in in_ci.stdout.splitlines()[-1]

    outside = _pytest_without_data(tmp_path)
    assert outside.returncode == 0, outside.stdout
    assert "3 skipped" in outside.stdout.splitlines()[-1]
    assert "real protein data not found at" in outside.stdout


def test_ci_script_sets_ci_before_the_tests():
    script = (REPO / ".ci" / "run").read_text().splitlines()
    exported = script.index("export CI=true")
    assert exported < next(i for i, line in enumerate(script) if "pytest" in line)
