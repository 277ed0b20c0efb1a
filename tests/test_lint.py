"""The habits of a maintained library: `ruff check` and `ruff format --check` pass on the
repository (configured in pyproject.toml; .pre-commit-config.yaml runs the same two on
commit), the version is set in one place, and the LICENSE is the one pyproject names."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("command", [["check"], ["format", "--check"]], ids=["check", "format"])
def test_ruff(command: list[str]) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "ruff", *command, "."],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout[-5000:] + result.stderr[-2000:]


def test_version_is_set_in_one_place() -> None:
    import tomllib

    import treenn

    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert treenn.__version__ == version
    assert version not in (ROOT / "treenn" / "__init__.py").read_text()  # read, not repeated


def test_license_is_the_one_pyproject_names() -> None:
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["license"] == {"text": "Apache-2.0"}
    text = (ROOT / "LICENSE").read_text()
    assert "Apache License" in text and "Version 2.0, January 2004" in text
    assert "END OF TERMS AND CONDITIONS" in text  # the full text, not a stub
