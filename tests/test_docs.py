"""Runs every ```python block of every docs/*.md page, in order (blocks of a page share one
namespace), so the documentation's code cannot rot."""

import glob
import os
import re

import pytest

DOCS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs")
PAGES = sorted(glob.glob(os.path.join(DOCS, "*.md")))
BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)


def blocks(path):
  with open(path) as f:
    return BLOCK.findall(f.read())


@pytest.mark.parametrize("page", PAGES, ids=[os.path.basename(p) for p in PAGES])
def test_page_code_runs(page, tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)  # pages that write files write them here
  namespace = {"__name__": "__docs__"}
  found = blocks(page)
  for i, code in enumerate(found):
    try:
      exec(compile(code, f"{os.path.basename(page)}[block {i + 1}]", "exec"), namespace)
    except Exception as e:
      raise AssertionError(f"{os.path.basename(page)}, code block {i + 1} failed: {e!r}\n"
                           f"{code}") from e
