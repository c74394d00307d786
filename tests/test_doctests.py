"""The library's docstring examples run: every ``>>>`` example of every jaxprune module.

The same as ``python3 -m pytest --doctest-modules jaxprune``, but part of the suite's own test
command (one test per module, so ``-n 2`` spreads them). Examples that cannot run quickly (a
file that is not there, torch) carry ``# doctest: +SKIP``.
"""

import doctest
import importlib
import pkgutil
import types

import pytest

import jaxprune

MODULES = sorted(m.name for m in pkgutil.walk_packages(jaxprune.__path__, "jaxprune."))


def failures(module) -> list[str]:
  """The report of every failing docstring example of ``module`` (empty when all pass)."""
  runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
  out = []
  for test in doctest.DocTestFinder().find(module):
    if test.examples:
      report = []
      if runner.run(test, out=report.append).failed:
        out.append("".join(report))
  return out


def test_modules_found():
  assert {"jaxprune.units", "jaxprune.ga.mask_search", "jaxprune.models.resnet"} <= set(MODULES)


def test_a_wrong_example_is_reported():
  module = types.ModuleType("fake")
  source = 'def f():\n  """\n  >>> 1 + 1\n  3\n  >>> 2 + 2  # doctest: +SKIP\n  5\n  """\n'
  exec(source, module.__dict__)  # pylint: disable=exec-used
  module.f.__module__ = "fake"
  (report,) = failures(module)
  assert "Expected:\n    3\nGot:\n    2" in report and "2 + 2" not in report


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
  found = failures(importlib.import_module(name))
  assert not found, f"{name}: docstring examples failed:\n" + "\n".join(found)
