"""The benchmark scripts import, and the programs they run in fresh processes name only what
exists (a cleanup once removed an import that only such a program used, and the GA benchmark's
first-call column failed)."""

import ast
import importlib
import pathlib
import sys

import pytest

BENCH = pathlib.Path(__file__).resolve().parent.parent / "benchmarks"
SCRIPTS = sorted(p.stem for p in BENCH.glob("*.py"))


@pytest.fixture(scope="module", autouse=True)
def bench_path():
  sys.path.insert(0, str(BENCH))
  yield
  sys.path.remove(str(BENCH))


def _programs(module):
  """Module-level strings that are Python programs run in a fresh process."""
  for name, value in vars(module).items():
    if isinstance(value, str) and name.isupper() and "import " in value:
      yield name, value


def _is_submodule(package: str, name: str) -> bool:
  try:
    importlib.import_module(f"{package}.{name}")
    return True
  except ImportError:
    return False


def _missing_names(program: str) -> list[str]:
  """`module.attr` and `from module import name` in ``program`` that do not exist."""
  tree = ast.parse(program.format(bench=str(BENCH)))
  aliases, missing = {}, []
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      for a in node.names:
        aliases[a.asname or a.name.split(".")[0]] = importlib.import_module(
            a.name if a.asname else a.name.split(".")[0])
    elif isinstance(node, ast.ImportFrom):
      mod = importlib.import_module(node.module)
      missing += [f"{node.module}.{a.name}" for a in node.names
                  if not hasattr(mod, a.name) and not _is_submodule(node.module, a.name)]
  for node in ast.walk(tree):
    if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
        and node.value.id in aliases and not hasattr(aliases[node.value.id], node.attr)):
      missing.append(f"{node.value.id}.{node.attr}")
  return missing


@pytest.mark.parametrize("script", SCRIPTS)
def test_benchmark_imports_and_its_subprocess_programs_resolve(script):
  module = importlib.import_module(script)
  assert callable(getattr(module, "main", None)) or script.startswith("_")
  for name, program in _programs(module):
    assert _missing_names(program) == [], f"{script}.{name}"


def test_the_check_catches_a_missing_attribute():
  bad = "import time\nimport _timing as T\nwith T.NoSuchClock():\n  time.sleep(0)\n"
  assert _missing_names(bad) == ["T.NoSuchClock"]
  assert _missing_names("from _timing import NoSuchName\n") == ["_timing.NoSuchName"]
