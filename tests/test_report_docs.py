"""Tests for experiments.report_docs: study results in the docs come from results.json."""

import json

import pytest

from experiments import report_docs

FAKE = {
    "study": "toy",
    "settings": {"data": "features", "seed": 3, "quick": True},
    "results": {
        "summary": {
            "baseline": [{"H": 10, "acc": 0.123456, "ok": True},
                         {"H": 20, "acc": float("nan"), "note": "x"}],
            "big": [{"i": i} for i in range(5)],
        },
        "per_fold": {"curves": [{"loss": [1.0, 0.5]}]},   # not flat: no table
        "scalar": 1.5,
    },
}


def write_run(tmp_path, doc=FAKE):
  (tmp_path / "run" / doc["study"]).mkdir(parents=True)
  (tmp_path / "run" / doc["study"] / "results.json").write_text(json.dumps(doc))
  return str(tmp_path / "run")


def test_writes_tables_between_markers(tmp_path):
  page = tmp_path / "study-toy.md"
  page.write_text(f"# Toy\n\nMethod.\n\n{report_docs.BEGIN}\nold numbers\n{report_docs.END}\n\n"
                  "Footer.\n")
  report_docs.main(["--workdir", write_run(tmp_path), "--out", str(page), "--max_rows", "4"])
  text = page.read_text()
  assert text.startswith("# Toy\n\nMethod.\n\n" + report_docs.BEGIN)
  assert text.endswith(report_docs.END + "\n\nFooter.\n")
  assert "old numbers" not in text
  assert "data `features`, seed `3`, quick `True`" in text
  assert ("`summary.baseline`:\n\n| H | acc | ok | note |\n|---|---|---|---|\n"
          "| 10 | 0.1235 | True | - |\n| 20 | nan | - | x |\n") in text
  assert "summary.big" not in text            # 5 rows > --max_rows 4
  assert "per_fold" not in text                # a list of non-flat dicts is not a table
  assert "`scalars`:\n\n| name | value |\n|---|---|\n| scalar | 1.5 |\n" in text
  # Regenerating is idempotent.
  report_docs.main(["--workdir", str(tmp_path / "run"), "--out", str(page), "--max_rows", "4"])
  assert page.read_text() == text


def test_new_page_and_chosen_tables(tmp_path):
  page = tmp_path / "new.md"
  report_docs.main(["--workdir", write_run(tmp_path), "--out", str(page),
                    "--tables", "summary.big"])
  text = page.read_text()
  assert text.startswith(report_docs.BEGIN) and text.endswith(report_docs.END + "\n")
  assert "| i |\n|---|\n| 0 |\n| 1 |\n| 2 |\n| 3 |\n| 4 |\n" in text
  assert "summary.baseline" not in text


def test_summary_tables_are_the_default_when_present(tmp_path):
  doc = json.loads(json.dumps(FAKE))
  doc["results"]["per_fold"]["runs"] = [{"fold": 0, "acc": 0.5}]   # a flat per-fold table
  page = tmp_path / "p.md"
  report_docs.main(["--workdir", write_run(tmp_path, doc), "--out", str(page)])
  text = page.read_text()
  assert "`summary.baseline`" in text and "`summary.big`" in text and "`scalars`" in text
  assert "per_fold.runs" not in text
  del doc["results"]["summary"]                                     # no summary: every table
  section = report_docs.render(doc, source="r.json")
  assert "`per_fold.runs`" in section


def test_bad_input(tmp_path):
  page = tmp_path / "p.md"
  with pytest.raises(SystemExit, match="no finished study.*finished: none"):
    report_docs.main(["--workdir", str(tmp_path / "nowhere"), "--out", str(page)])
  workdir = write_run(tmp_path)
  with pytest.raises(SystemExit,
                     match=r"No table summary\.nope.*summary\.baseline, summary\.big, scalars"):
    report_docs.main(["--workdir", workdir, "--out", str(page), "--tables", "summary.nope"])
  with pytest.raises(ValueError, match="no 'results' key"):
    report_docs.render({"study": "x", "settings": {}}, source="r.json")
  page.write_text(f"{report_docs.BEGIN}\n{report_docs.BEGIN}\n{report_docs.END}\n")
  with pytest.raises(SystemExit, match="at most one"):
    report_docs.main(["--workdir", workdir, "--out", str(page)])
  assert not page.read_text().count("Generated")   # a refused page is left as it was


def test_invalid_results_json_is_one_line_and_the_page_is_written_whole(tmp_path):
  """A hand-edited results.json that is not JSON: one line naming it (was a JSONDecodeError
  traceback); and a written page leaves no temporary file beside it."""
  workdir = write_run(tmp_path)
  page = tmp_path / "docs" / "p.md"
  page.parent.mkdir()
  report_docs.main(["--workdir", workdir, "--out", str(page)])
  assert report_docs.BEGIN in page.read_text()
  assert sorted(p.name for p in page.parent.iterdir()) == ["p.md"]
  (tmp_path / "run" / "toy" / "results.json").write_text('{"study": "toy", ')
  with pytest.raises(SystemExit, match=r"results\.json is not valid JSON .*run the study again"):
    report_docs.main(["--workdir", workdir, "--out", str(page)])
