"""The test suite's own index stays true: every ``test_*.py`` under ``tests/`` is named in
``tests/README.md`` (in the section of its directory), and every ``-*- test-case-name: ... -*-``
header in ``ovpnmgr/`` and ``proxy/`` names test modules that exist."""

import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parents[2]
TESTS = ROOT / "tests"
HEADER = re.compile(r"-\*-\s*test-case-name:\s*(.+?)\s*-\*-")


def readme_sections():
    """``{"unit": text, "integration": text, ...}``: each ``## `tests/<dir>/` ...`` section of the README."""
    text = (TESTS / "README.md").read_text()
    sections = {}
    for block in re.split(r"(?m)^## ", text)[1:]:
        m = re.match(r"`tests/([a-z_]+)/`", block)
        if m:
            sections[m.group(1)] = block
    return sections


def named(block):
    """The file names a README section writes in backticks (``a.py``, ``a.py`, `b.py``)."""
    return set(re.findall(r"`([A-Za-z0-9_]+\.py)`", block))


def test_every_test_module_is_named_in_its_readme_section():
    sections = readme_sections()
    missing = []
    for path in sorted(TESTS.rglob("test_*.py")):
        directory = path.relative_to(TESTS).parts[0]
        if path.name not in named(sections.get(directory, "")):
            missing.append(str(path.relative_to(ROOT)))
    assert not missing, "not named in its section of tests/README.md: %s" % ", ".join(missing)


def test_the_index_finds_the_suites_and_their_files():
    """The check above is not vacuous: the sections exist and this very file is found."""
    sections = readme_sections()
    assert {"unit", "integration"} <= set(sections), sorted(sections)
    assert pathlib.Path(__file__).name in named(sections["unit"])
    assert "test_dns.py" in named(sections["integration"])


def test_case_name_headers_name_existing_test_modules():
    wrong, seen = [], 0
    for package in ("ovpnmgr", "proxy"):
        for path in sorted((ROOT / package).rglob("*.py")):
            with open(path, encoding="utf-8") as f:
                head = "".join(f.readline() for _ in range(3))
            m = HEADER.search(head)
            if not m:
                continue
            for module in filter(None, (name.strip() for name in m.group(1).split(","))):
                seen += 1
                target = ROOT.joinpath(*module.split("."))
                if not (target.with_suffix(".py").is_file() or (target / "__init__.py").is_file()):
                    wrong.append("%s: %s" % (path.relative_to(ROOT), module))
    assert seen > 0, "no test-case-name header found at all"
    assert not wrong, "test-case-name headers naming no existing module: %s" % ", ".join(wrong)


IMPORTS_A_TEST_MODULE = re.compile(r"^\s*(?:from|import)\s+tests\.\w+\.test_\w+", re.M)


def test_no_test_module_imports_another():
    """Shared setup lives in fixtures and helper modules (tests/README.md, "Shared code"), so a
    test module can be read, moved or deleted without breaking another."""
    offenders = [
        str(path.relative_to(ROOT))
        for path in sorted(TESTS.rglob("*.py"))
        if IMPORTS_A_TEST_MODULE.search(path.read_text())
    ]
    assert not offenders, "these import from a test module: %s" % ", ".join(offenders)
    assert IMPORTS_A_TEST_MODULE.search("from tests.unit.test_controller import World")  # the check can fail
