"""Every Python example in the README (and in docs/gemms.md) runs as written."""

import functools
import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)


def test_readme_has_examples():
    assert len(BLOCKS) >= 2


@functools.cache
def namespace_after(index: int) -> dict:
    """The namespace after running blocks 0..index: blocks share one, in order, as a reader running
    them top to bottom would. Each block runs once (the tests run in order, on one xdist worker)."""
    namespace = {} if index == 0 else namespace_after(index - 1)
    exec(compile(BLOCKS[index], f"README.md block {index}", "exec"), namespace)
    return namespace


@pytest.mark.xdist_group("readme")
@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_example_runs(index):
    namespace_after(index)


def test_the_gemm_docs_example_runs():
    (block,) = re.findall(r"```python\n(.*?)```", (README.parent / "docs" / "gemms.md").read_text(), re.S)
    exec(compile(block, "docs/gemms.md", "exec"), {})
