"""The tier markers: registered in pyproject, and a test without exactly one tier stops the collection."""

from __future__ import annotations

import tomllib

import pytest

import conftest

pytestmark = pytest.mark.unit

MARKERS = tomllib.loads((conftest.REPO_ROOT / "pyproject.toml").read_text())["tool"]["pytest"]["ini_options"]["markers"]


@pytest.fixture
def suite(pytester):
    """A pytester folder configured like the repository (its markers, --strict-markers) whose
    collection runs tests/conftest.py's hooks."""
    pytester.makeini("[pytest]\naddopts = --strict-markers\nmarkers =\n"
                     + "".join(f"    {line}\n" for line in MARKERS))

    def run(source: str, *args: str):
        pytester.makepyfile(test_sample=source)
        return pytester.runpytest_inprocess("-p", "no:hypothesispytest", *args, plugins=[conftest])
    return run


def test_pyproject_registers_each_tier_and_only_those():
    assert [line.split(":")[0] for line in MARKERS] == list(conftest.TIERS)


def test_tests_with_one_tier_each_run_and_minus_m_selects_a_tier(suite):
    source = """
        import pytest

        @pytest.mark.unit
        def test_fast():
            pass

        @pytest.mark.integration
        def test_loopback():
            pass

        @pytest.mark.system
        @pytest.mark.parametrize("n", [1, 2])
        def test_whole_run(n):
            pass
    """
    suite(source).assert_outcomes(passed=4)
    suite(source, "-m", "unit").assert_outcomes(passed=1, deselected=3)
    suite(source, "-m", "system").assert_outcomes(passed=2, deselected=2)


def test_a_module_mark_gives_every_test_of_the_module_its_tier(suite):
    source = """
        import pytest

        pytestmark = pytest.mark.integration

        def test_one():
            pass

        def test_two():
            pass
    """
    suite(source, "-m", "integration").assert_outcomes(passed=2)


def test_a_test_without_a_tier_stops_the_collection_and_is_named(suite):
    result = suite("""
        import pytest

        @pytest.mark.unit
        def test_classified():
            pass

        def test_forgotten():
            pass
    """)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*every test needs exactly one tier marker*",
                                 "*test_sample.py::test_forgotten: no tier*"])
    assert "test_classified" not in result.stderr.str()
    result.assert_outcomes()  # nothing ran


def test_a_test_with_two_tiers_stops_the_collection_even_when_another_tier_is_selected(suite):
    result = suite("""
        import pytest

        pytestmark = pytest.mark.unit

        @pytest.mark.system
        def test_twice():
            pass
    """, "-m", "integration")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*test_sample.py::test_twice: tiers unit, system*"])


def test_a_misspelt_tier_is_an_unknown_marker(suite):
    result = suite("""
        import pytest

        @pytest.mark.unti
        def test_typo():
            pass
    """)
    assert result.ret != pytest.ExitCode.OK
    result.stdout.fnmatch_lines(["*'unti' not found in `markers` configuration option*"])
