"""The package's imports go one way: `lint-imports` keeps the contracts of `[tool.importlinter]` in pyproject.toml."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def lint_imports(root: Path) -> subprocess.CompletedProcess:
    """`lint-imports` (the one installed next to this Python) on the package and pyproject.toml in `root`."""
    command = shutil.which("lint-imports", path=str(Path(sys.executable).parent))
    assert command is not None, "lint-imports is missing: `uv sync` installs import-linter with the dev group."
    return subprocess.run([command, "--no-logo", "--no-cache"], cwd=root, capture_output=True, text=True,
                          timeout=300)


def test_the_import_contracts_are_kept():
    result = lint_imports(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


def test_an_upward_import_breaks_the_layers(tmp_path):
    """A copy of the package where the losses import the command line: both contracts are broken."""
    shutil.copytree(ROOT / "ppo_lm", tmp_path / "ppo_lm", ignore=shutil.ignore_patterns("__pycache__", "demo_data"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path)
    losses = tmp_path / "ppo_lm" / "losses.py"
    losses.write_text(losses.read_text() + "\nfrom ppo_lm import cli  # noqa: E402, F401\n")
    result = lint_imports(tmp_path)
    assert result.returncode != 0
    assert "ppo_lm.losses -> ppo_lm.cli" in result.stdout
    assert "2 broken" in result.stdout
