"""Several processes opening a new export-records file at once (``serve --workers``, each
worker opens it): each adds the columns that came after the table only if no other did
first, so none fails with "duplicate column name"."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # processes started together, three rounds

SCRIPT = """
import sys, time
from pathlib import Path
from keyload.records.exportlog import SqliteExportLog
start = float(sys.argv[2])
while time.time() < start:
    pass
SqliteExportLog(Path(sys.argv[1])).close()
"""


def test_processes_opening_a_new_file_at_once_all_open_it(tmp_path: Path) -> None:
    for round_ in range(3):
        path = tmp_path / f"exports-{round_}.db"
        start = time.time() + 1.5  # every process is waiting when the moment comes
        procs = [subprocess.Popen([sys.executable, "-c", SCRIPT, str(path), str(start)],
                                  stderr=subprocess.PIPE, text=True) for _ in range(6)]
        errors = [p.communicate(timeout=60)[1] for p in procs]
        assert [p.returncode for p in procs] == [0] * 6, errors
