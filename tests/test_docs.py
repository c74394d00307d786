"""Runs every ```python block of every docs/*.md page, in order, one namespace per page."""

import glob
import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAGES = sorted(glob.glob(os.path.join(ROOT, "docs", "*.md")))
BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)


@pytest.mark.parametrize("page", PAGES, ids=[os.path.basename(p) for p in PAGES])
def test_docs_page_examples_run(page, tmp_path, monkeypatch):
  with open(page) as f:
    blocks = BLOCK.findall(f.read())
  monkeypatch.chdir(tmp_path)  # examples that write files write them here
  namespace = {"__name__": "__docs__"}
  for i, code in enumerate(blocks):
    try:
      exec(compile(code, f"{os.path.basename(page)} block {i + 1}", "exec"), namespace)  # pylint: disable=exec-used
    except Exception as e:
      raise AssertionError(f"{os.path.basename(page)}, python block {i + 1} failed: {e!r}\n{code}") from e
