"""Every ```python block of every docs/*.md page runs, in order, one namespace per page."""

import pathlib
import re

import pytest

DOCS = pathlib.Path(__file__).resolve().parent.parent / "docs"
PAGES = sorted(DOCS.glob("*.md"))
BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)


def blocks(page: pathlib.Path) -> list[str]:
  return BLOCK.findall(page.read_text())


def test_block_extraction():
  text = "a\n```python\nx = 1\n```\nb\n```python\ny = x + 1\n```\n```sh\nls\n```\n"
  assert BLOCK.findall(text) == ["x = 1\n", "y = x + 1\n"]


@pytest.mark.parametrize("page", PAGES, ids=[p.name for p in PAGES])
def test_page_code_runs(page):
  namespace = {"__name__": f"docs_{page.stem}"}
  for i, code in enumerate(blocks(page)):
    try:
      exec(compile(code, f"{page.name}[block {i}]", "exec"), namespace)  # pylint: disable=exec-used
    except Exception as e:  # pragma: no cover - the failure message names the block
      raise AssertionError(f"{page.name}, python block {i} failed: {e!r}\n{code}") from e
