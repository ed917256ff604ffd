"""The test runner itself: scripts/test.sh relies on pytest-xdist's ``xdist_group`` to keep the tests that share one
expensive session fixture (the run_concept.sh run, the two-process run) on one worker. With pytest 9 and xdist 3.8
the mark silently did nothing and those fixtures were built once per worker; this catches that."""

from __future__ import annotations

import subprocess
import sys

GROUPED = '''
import os, pytest
pytestmark = pytest.mark.xdist_group("shared")

@pytest.mark.parametrize("i", range(4))
def test_grouped(i):
    with open(os.environ["RUNNER_LOG"], "a") as log:
        log.write(f"grouped {os.environ['PYTEST_XDIST_WORKER']}\\n")
'''
UNGROUPED = '''
import os, pytest

@pytest.mark.parametrize("i", range(4))
def test_free(i):
    with open(os.environ["RUNNER_LOG"], "a") as log:
        log.write(f"free {os.environ['PYTEST_XDIST_WORKER']}\\n")
'''


def test_xdist_group_keeps_a_group_on_one_worker(tmp_path):
    (tmp_path / "test_grouped.py").write_text(GROUPED)
    (tmp_path / "test_free.py").write_text(UNGROUPED)
    log = tmp_path / "log.txt"
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-n", "2", "--dist", "loadgroup", "-p",
                             "no:cacheprovider", str(tmp_path)], cwd=tmp_path, capture_output=True, text=True,
                            env={"RUNNER_LOG": str(log), "PATH": "/usr/bin:/bin"})
    assert result.returncode == 0, result.stdout + result.stderr
    lines = [line.split() for line in log.read_text().splitlines()]
    assert sum(kind == "grouped" for kind, _ in lines) == 4
    assert len({worker for kind, worker in lines if kind == "grouped"}) == 1, lines
