"""Every Python example in the README (and in docs/gemms.md) runs as written."""

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)


def test_readme_has_examples():
    assert len(BLOCKS) >= 2


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_example_runs(index):
    # Blocks share one namespace, in order, as a reader running them top to bottom would.
    namespace: dict = {}
    for block in BLOCKS[: index + 1]:
        exec(compile(block, f"README.md block {index}", "exec"), namespace)


def test_the_gemm_docs_example_runs():
    (block,) = re.findall(r"```python\n(.*?)```", (README.parent / "docs" / "gemms.md").read_text(), re.S)
    exec(compile(block, "docs/gemms.md", "exec"), {})
