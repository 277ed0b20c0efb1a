"""The docs: every Python block of README.md and docs/ runs as written (in page order, one
namespace per page), the site builds with `mkdocs build --strict` offline, the API
reference lists every public name, and no Markdown file has an unbalanced HTML comment.

A block that cannot run here is marked in its page, on the line before it, with
`<!-- skip: REASON -->`, and listed in `SKIPPED` below (so a new skip is a visible change).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import types
from pathlib import Path
from typing import Any

import jax
import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"

# page -> reasons of its skipped blocks, in page order.
SKIPPED: dict[str, list[str]] = {
    "docs/guides/pytorch-checkpoints.md": ["downloads weights from a model hub"],
    "docs/guides/sharding.md": ["several processes (one per host)"],
}
# Pages run in a fresh process, with the environment given (JAX fixes its device count
# when it starts).
SUBPROCESS = {"docs/guides/sharding.md": {"XLA_FLAGS": "--xla_force_host_platform_device_count=8"}}


def markdown_files() -> list[Path]:
    files = [ROOT / "README.md", ROOT / "CHANGELOG.md", ROOT / "CONTRIBUTING.md"]
    files += sorted(DOCS.rglob("*.md"))
    files += sorted((ROOT / "tests").rglob("*.md")) + sorted((ROOT / "examples").rglob("*.md"))
    return [f for f in files if f.exists()]


def pages() -> list[str]:
    return ["README.md"] + [str(p.relative_to(ROOT)) for p in sorted(DOCS.rglob("*.md"))]


# Every page's blocks compile and train models: slow (the quick loop keeps the structural
# tests below: skip markers, HTML comments, the API reference's names).
SLOW = set(pages())


SKIP_MARK = re.compile(r"^<!-- skip: (.+?) -->$")


def blocks(page: str) -> list[tuple[int, str, str | None]]:
    """`(line, code, skip reason or None)` of every ```python block of `page`."""
    lines = (ROOT / page).read_text().splitlines()
    out = []
    i = 0
    while i < len(lines):
        if lines[i].strip() == "```python":
            indent = lines[i][: len(lines[i]) - len(lines[i].lstrip())]
            start = i + 1  # index of the code's first line; its line number is start + 1
            j = start
            while lines[j].strip() != "```":
                j += 1
            code = "\n".join(line[len(indent) :] for line in lines[start:j])
            before = [line.strip() for line in lines[:i] if line.strip()]
            mark = SKIP_MARK.match(before[-1]) if before else None
            out.append((start + 1, code + "\n", mark[1] if mark else None))
            i = j
        i += 1
    return out


def run_page(page: str) -> None:
    """Run the page's blocks in order, in one namespace, under JAX's default promotion
    rules (the ones users have; the suite's are stricter)."""
    module = types.ModuleType("__docs__")  # classes defined in a block need a module
    namespace: dict[str, Any] = module.__dict__
    sys.modules["__docs__"] = module
    with jax.numpy_dtype_promotion("standard"), jax.numpy_rank_promotion("allow"):
        for line, code, skip in blocks(page):
            if skip is None:
                exec(compile("\n" * (line - 1) + code, str(ROOT / page), "exec"), namespace)


def _param(page: str) -> Any:
    marks = [pytest.mark.slow] if page in SLOW or page in SUBPROCESS else []
    return pytest.param(page, marks=marks, id=page)


@pytest.mark.parametrize("page", [_param(p) for p in pages()])
def test_python_blocks_run(page: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    found = [reason for _, _, reason in blocks(page) if reason is not None]
    assert found == SKIPPED.get(page, []), f"{page}: skipped blocks differ from SKIPPED"
    monkeypatch.chdir(tmp_path)
    if page in SUBPROCESS:
        env = {
            **os.environ,
            **SUBPROCESS[page],
            "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'tests'}",
        }
        code = f"import test_docs; test_docs.run_page({page!r})"
        result = subprocess.run(
            [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600
        )
        assert result.returncode == 0, result.stderr[-3000:]
    else:
        run_page(page)


def test_every_page_has_python_blocks_that_run() -> None:
    # Not a vacuous pass: the runner finds the blocks (README and the concept pages).
    assert len([b for b in blocks("README.md") if b[2] is None]) >= 2
    for page in pages():
        if page.startswith("docs/concepts/"):
            assert blocks(page), page


def test_skip_markers_need_a_reason(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    page.write_text("text\n\n<!-- skip: several processes -->\n```python\nx = 1\n```\n")
    rel = os.path.relpath(page, ROOT)
    assert blocks(rel) == [(5, "x = 1\n", "several processes")]
    page.write_text("<!-- skip -->\n```python\nx = 1\n```\n")
    assert blocks(rel)[0][2] is None  # no reason: not a skip, the block runs


# -- HTML comments ------------------------------------------------------------------------


def unbalanced_comments(text: str) -> list[str]:
    """Problems with `<!--`/`-->` pairs: a comment opened inside another, a `-->` that
    closes nothing (an editing note's tail), a comment never closed."""
    problems = []
    depth = 0
    for m in re.finditer(r"<!--|-->", text):
        line = text.count("\n", 0, m.start()) + 1
        if m[0] == "<!--":
            if depth:
                problems.append(f"line {line}: '<!--' inside a comment")
            depth = 1
        elif depth:
            depth = 0
        else:
            problems.append(f"line {line}: '-->' closes no comment")
    if depth:
        problems.append("a comment is never closed")
    return problems


@pytest.mark.parametrize("path", markdown_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_html_comments_are_balanced(path: Path) -> None:
    assert unbalanced_comments(path.read_text()) == []


def test_unbalanced_comments_are_found() -> None:
    # The README's old editing notes: the tail of a comment whose start was deleted.
    note = "**Checkpoints.** paragraph; (2) a new section. -->\n\ntext <!-- ok -->\n"
    assert unbalanced_comments(note) == ["line 1: '-->' closes no comment"]
    assert unbalanced_comments("<!-- a <!-- b -->") == ["line 1: '<!--' inside a comment"]
    assert unbalanced_comments("<!-- open\n") == ["a comment is never closed"]
    assert unbalanced_comments("<!-- a -->\n<!-- b\n-->") == []


# -- the site and the API reference -------------------------------------------------------


def documented() -> set[str]:
    names = set()
    for page in (DOCS / "api").glob("*.md"):
        names |= set(re.findall(r"^::: ([\w.]+)$", page.read_text(), re.M))
    return names


def public(module: types.ModuleType) -> set[str]:
    return {
        f"{module.__name__}.{name}"
        for name, value in vars(module).items()
        if not name.startswith("_") and not isinstance(value, types.ModuleType)
    }


def test_api_reference_lists_every_public_name() -> None:
    import treenn
    import treenn.models
    import treenn.nn

    missing = (public(treenn) | public(treenn.nn) | public(treenn.models)) - documented()
    assert missing == set(), "add these to docs/api/*.md"


@pytest.mark.slow
def test_mkdocs_build_strict(tmp_path: Path) -> None:
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-5000:]
    assert (tmp_path / "api" / "treenn" / "index.html").exists()


def test_readme_is_short() -> None:
    assert len((ROOT / "README.md").read_text().splitlines()) <= 150
