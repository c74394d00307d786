"""Every ```python block of every docs/*.md page and of the README runs (blocks of one page share
a namespace)."""

import pathlib
import re

import pytest

DOCS = pathlib.Path(__file__).resolve().parent.parent / "docs"
PAGES = sorted(DOCS.glob("*.md")) + [DOCS.parent / "README.md"]
_BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)


def blocks(page: pathlib.Path) -> list[str]:
  return _BLOCK.findall(page.read_text())


@pytest.mark.parametrize("page", [p for p in PAGES if blocks(p)], ids=lambda p: p.name)
def test_docs_page_runs(page, tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)          # pages may write files; keep them out of the repo
  namespace = {"__name__": f"docs_{page.stem}"}
  for i, code in enumerate(blocks(page)):
    try:
      exec(compile(code, f"{page.name}[block {i}]", "exec"), namespace)  # pylint: disable=exec-used
    except Exception as e:
      raise AssertionError(f"{page.name}, code block {i} failed: {type(e).__name__}: {e}") from e


def test_readme_test_command_is_what_ci_runs():
  root = DOCS.parent
  (ci_command,) = [l for l in (root / ".ci" / "run").read_text().splitlines()
                   if l.startswith("python3 ")]
  readme_bash = re.findall(r"^```bash\n(.*?)^```", (root / "README.md").read_text(), re.S | re.M)
  assert ci_command in [b.strip() for b in readme_bash], ci_command
