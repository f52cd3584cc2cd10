"""BUILD must declare every module and every test file of the package."""

import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _build_text() -> str:
    return (ROOT / "BUILD").read_text()


def _declared_sources(text: str) -> set[str]:
    return set(re.findall(r'"([\w/]+\.py)"', text))


def test_every_module_is_a_py_library():
    declared = _declared_sources(_build_text())
    modules = {
            str(p.relative_to(ROOT))
            for p in (ROOT / "moraljax").rglob("*.py")
            if p.name != "__init__.py"
    }
    missing = sorted(modules - declared)
    assert not missing, f"BUILD does not declare: {missing}"


def test_every_test_file_is_a_py_test():
    text = _build_text()
    tests = sorted(p.name for p in (ROOT / "tests").glob("*_test.py"))
    for name in tests:
        pattern = rf'py_test\(\s*name = "{name[:-3]}",\s*srcs = \["tests/{name}"\]'
        assert re.search(pattern, text), f"BUILD has no py_test for tests/{name}"


def test_build_names_only_existing_files():
    declared = _declared_sources(_build_text())
    absent = sorted(p for p in declared if not (ROOT / p).exists())
    assert not absent, f"BUILD names files that do not exist: {absent}"
