"""Static type checking with mypy: typecheck.ini over treenn/ and examples/ is clean, and a
user's own project type-checks against treenn in each way docs/guides/type-checking.md
gives (treenn found, its types used, the user's own error reported)."""

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_mypy_is_clean():
    result = subprocess.run(
        [sys.executable, "-m", "mypy", "--config-file", "typecheck.ini"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Success" in result.stdout


# -- from a user's own project ----------------------------------------------------------

CLEAN = """
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

import treenn
import treenn.nn as nn


def forward(model: nn.Linear, x: Float[Array, "batch 4"]) -> Float[Array, "batch 2"]:
    return model(x)


model = treenn.freeze(nn.Linear(4, 2, key=jax.random.key(0)), "bias")
y = forward(model, jnp.ones((3, 4)))
table: str = treenn.summary(model)
"""

# Only treenn's own annotations tell mypy that this is wrong: with treenn not found (an
# `Any`), mypy would say nothing here.
WRONG = """
import treenn.nn as nn

layer: nn.Linear = nn.Dropout(0.1)
"""
DELIBERATE = (
    'wrong.py:4: error: Incompatible types in assignment (expression has type "Dropout", '
    'variable has type "Linear")  [assignment]'
)
NOT_FOUND = ("Cannot find implementation or library stub", "missing library stubs or py.typed")


def user_mypy(project: Path, *args: str, python: str = sys.executable) -> None:
    """Run mypy in `project` over a clean script and one with a deliberate type error;
    check that it found treenn and reported exactly that error."""
    project.mkdir(exist_ok=True)
    (project / "clean.py").write_text(textwrap.dedent(CLEAN))
    (project / "wrong.py").write_text(textwrap.dedent(WRONG))
    result = subprocess.run(
        [python, "-m", "mypy", "--cache-dir", str(project / ".mypy_cache"), *args]
        + ["clean.py", "wrong.py"],
        cwd=project,
        capture_output=True,
        text=True,
        timeout=600,
    )
    out = result.stdout + result.stderr
    for message in NOT_FOUND:
        assert message not in out, f"mypy did not find treenn:\n{out}"
    errors = [line for line in result.stdout.splitlines() if ": error:" in line]
    assert errors == [DELIBERATE], out
    assert result.returncode == 1, out


@pytest.mark.slow
def test_user_project_with_treenn_typecheck_ini(tmp_path: Path) -> None:
    # typecheck.ini names the checkout as mypy_path: it works whatever the install,
    # setuptools' default editable one (an import hook mypy cannot see) included.
    user_mypy(tmp_path / "project", "--config-file", str(ROOT / "typecheck.ini"))


@pytest.mark.slow
def test_user_project_with_its_own_mypy_path(tmp_path: Path) -> None:
    project = tmp_path / "project"
    project.mkdir()
    config = f"[mypy]\nmypy_path = {ROOT}\n\n[mypy-treenn.*]\nfollow_imports = silent\n"
    (project / "mypy.ini").write_text(config)
    user_mypy(project)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["readme", "strict"])
def test_user_project_with_an_editable_install(tmp_path: Path, mode: str) -> None:
    # The README's `pip install -e .`: pyproject.toml's package-dir makes setuptools
    # write a plain .pth path to the checkout, which mypy reads (its default for this
    # layout is an import hook mypy cannot see). `--config-settings
    # editable_mode=strict`: a tree of links that a .pth puts on sys.path. Installed
    # from a copy of the package (the install writes build/ beside it), into a venv
    # that sees this environment's packages (jax, mypy...), offline.
    pytest.importorskip("setuptools", minversion="68")
    source = tmp_path / "treenn-src"
    source.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(ROOT / name, source / name)
    caches = shutil.ignore_patterns("__pycache__")
    shutil.copytree(ROOT / "treenn", source / "treenn", ignore=caches)
    venv = tmp_path / "venv"
    subprocess.run(
        [sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(venv)],
        check=True,
        timeout=300,
    )
    python = str(venv / ("Scripts/python.exe" if os.name == "nt" else "bin/python"))
    install = subprocess.run(
        [python, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index"]
        + ["-e", str(source)]
        + (["--config-settings", "editable_mode=strict"] if mode == "strict" else []),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert install.returncode == 0, install.stdout + install.stderr
    user_mypy(tmp_path / "project", python=python)
