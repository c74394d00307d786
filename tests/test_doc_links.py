"""Every relative link of the docs and the README leads somewhere: the file exists and, for a
link to a heading (``page.md#anchor``), the page has a heading whose GitHub anchor is that."""

import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
PAGES = sorted((ROOT / "docs").glob("*.md")) + [ROOT / "README.md"]
_LINK = re.compile(r"\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")     # [text](target "title")
_REF = re.compile(r"^ {0,3}\[[^\]]+\]:\s*(\S+)", re.M)        # [label]: target
_FENCE = re.compile(r"^```.*?^```", re.S | re.M)


def anchor(heading: str) -> str:
  """GitHub's anchor of a Markdown heading: lower case, code ticks and punctuation other than
  hyphens and underscores dropped, spaces to hyphens."""
  text = re.sub(r"[^\w\- ]", "", heading.strip().lower().replace("`", ""))
  return text.replace(" ", "-")


def anchors(page: pathlib.Path) -> set:
  """The page's heading anchors; a repeated one gets -1, -2, ... as on GitHub."""
  text = _FENCE.sub("", page.read_text())
  seen: dict = {}
  out = set()
  for h in re.findall(r"^#+ (.*)$", text, re.M):
    a = anchor(h)
    out.add(f"{a}-{seen[a]}" if a in seen else a)
    seen[a] = seen.get(a, 0) + 1
  return out


def links(page: pathlib.Path) -> list:
  text = _FENCE.sub("", page.read_text())
  return [l for l in _LINK.findall(text) + _REF.findall(text) if not re.match(r"[a-z]+:", l)]


def test_anchor_matches_github():
  assert anchor("Group redundancy (`group_redundancy`)") == "group-redundancy-group_redundancy"
  assert anchor("An AVX-512 machine again: 15x DEAP") == "an-avx-512-machine-again-15x-deap"


def test_links_with_titles_references_and_repeated_headings(tmp_path):
  page = tmp_path / "p.md"
  page.write_text("# GA\n## GA\n[a](#ga-1 \"title\") and [b][r]\n\n[r]: q.md#x\n")
  assert links(page) == ["#ga-1", "q.md#x"]
  assert anchors(page) == {"ga", "ga-1"}


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_relative_links_resolve(page):
  broken = []
  for link in links(page):
    path, _, frag = link.partition("#")
    target = (page.parent / path).resolve() if path else page
    if not target.exists():
      broken.append(f"{link} (no file {path})")
    elif frag and target.suffix == ".md" and frag not in anchors(target):
      broken.append(f"{link} (no heading with anchor #{frag} in {target.name})")
  assert not broken, f"{page.name}: broken links: {broken}"
