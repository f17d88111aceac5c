"""The package and its tests pass ruff's checks as configured in pyproject.toml (line length 120; E, F, W, I)."""
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_ruff_check_is_clean():
    result = subprocess.run([sys.executable, "-m", "ruff", "check", "llmopt", "tests"], cwd=ROOT,
                            capture_output=True, text=True)
    assert result.returncode == 0, f"ruff check llmopt tests failed:\n{result.stdout}{result.stderr}"
