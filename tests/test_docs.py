"""Runs every ```python block of every docs/*.md page, in order, one namespace per page."""

import glob
import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAGES = sorted(glob.glob(os.path.join(ROOT, "docs", "*.md")))
BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)


@pytest.mark.parametrize("page", PAGES, ids=[os.path.basename(p) for p in PAGES])
def test_docs_page_examples_run(page, monkeypatch):
  monkeypatch.chdir(ROOT)
  with open(page) as f:
    blocks = BLOCK.findall(f.read())
  namespace = {"__name__": "__docs__"}
  for i, code in enumerate(blocks):
    exec(compile(code, f"{os.path.basename(page)}[block {i}]", "exec"), namespace)  # pylint: disable=exec-used
