"""The layout's rules hold (issue 13, docs/architecture.md): checked by import-linter on every run.

The contracts are in pyproject.toml (``[tool.importlinter]``): no import cycles at any depth; the app
on top; the stages (receive, process, outputs, deliver) independent of each other; below them the
store, the config, telemetry, the network floor and the imaging library, each importing only what is
below it. Imports inside functions count as well.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_the_import_contracts_are_kept() -> None:
    linter = Path(sys.executable).with_name("lint-imports")
    result = subprocess.run([str(linter), "--no-cache"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout and "2 kept" in result.stdout, result.stdout
