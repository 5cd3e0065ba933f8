"""The README and docs/ against the repository: paths, links, navigation, the CLI reference and the
quick-start commands. The docs site itself is built by ``mkdocs build --strict`` in CI (.ci/run),
which checks anchors and imports every command of the CLI reference."""

from __future__ import annotations

import importlib
import re
import shlex
import tomllib
from pathlib import Path

import click
import pytest
import yaml

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parent.parent
DOCS = REPO / "docs"
README = REPO / "README.md"
README_MAX_LINES = 200

FENCED_CODE = re.compile(r"^```.*?^```", re.MULTILINE | re.DOTALL)
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
BACKTICKED = re.compile(r"`([^`\s]+)`")
MKDOCS_CLICK = re.compile(r"^::: mkdocs-click\n((?:    :\w+: .*\n)+)", re.MULTILINE)
# History belongs in git: dates, issue numbers and "until"/"before" notes go stale the day they are written.
HISTORY = re.compile(r"\b20\d\d-\d\d-\d\d\b|\bissue[- ]?#?\d+|\bas (?:this|it) did until\b", re.IGNORECASE)


def doc_pages() -> list[Path]:
    return sorted(DOCS.glob("*.md"))


def prose(path: Path) -> str:
    """The Markdown outside fenced code blocks."""
    return FENCED_CODE.sub("", path.read_text())


def nav_pages(nav) -> list[str]:
    """Every page file the nav lists, however deeply nested."""
    if isinstance(nav, str):
        return [nav]
    if isinstance(nav, list):
        return [page for item in nav for page in nav_pages(item)]
    if isinstance(nav, dict):
        return [page for value in nav.values() for page in nav_pages(value)]
    raise AssertionError(f"mkdocs.yml: unexpected nav entry {nav!r}")


def console_scripts() -> dict[str, str]:
    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]


def load_entry_point(target: str):
    module, _, attribute = target.partition(":")
    return getattr(importlib.import_module(module), attribute)


def quick_start_commands() -> list[str]:
    """The command lines of the README's quick-start block, comments left out."""
    section = README.read_text().split("## Quick start", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"^```bash\n(.*?)^```", section, re.MULTILINE | re.DOTALL)
    assert block, "README.md: no ```bash block in the Quick start section"
    return [line.strip() for line in block.group(1).splitlines()
            if line.strip() and not line.lstrip().startswith("#")]


def ci_lines() -> list[str]:
    return [line.strip() for line in (REPO / ".ci" / "run").read_text().splitlines()]


# -- (a) the module map names only what exists, and every module -----------------------------------

def architecture_paths() -> list[str]:
    """Backticked repository paths in docs/architecture.md: words with a slash (``genfl_server/engine.py``,
    ``shared/proto/``), not dotted names (``grpc.aio``) or file names alone."""
    return [word for word in BACKTICKED.findall(prose(DOCS / "architecture.md"))
            if "/" in word and not word.startswith(("http:", "https:"))]


def test_every_path_the_architecture_map_names_exists():
    paths = architecture_paths()
    assert len(paths) >= 40, f"docs/architecture.md names only {len(paths)} paths: is the module map gone?"
    missing = [path for path in paths if not (REPO / path).exists()]
    assert not missing, f"docs/architecture.md names paths that do not exist: {missing}"


def test_the_architecture_map_names_every_module():
    packages = ("shared", "genfl_server", "genfl_client", "genfl_experiments")
    named = set(architecture_paths())
    modules = [path.relative_to(REPO).as_posix()
               for package in packages
               for path in sorted((REPO / package).rglob("*.py"))
               if path.name != "__init__.py" and "proto" not in path.relative_to(REPO).parts]
    assert modules
    # A subpackage named as a whole (``genfl_experiments/sweep/``) covers its modules; a top-level
    # package's name (a section heading) does not.
    subpackages = [path for path in named if path.endswith("/") and path.rstrip("/") not in packages]
    unnamed = [module for module in modules
               if module not in named and not any(module.startswith(p) for p in subpackages)]
    assert not unnamed, f"docs/architecture.md's module map does not say what these do: {unnamed}"


# -- (b) the nav and the pages are the same set ----------------------------------------------------

def test_the_nav_lists_exactly_the_docs_pages():
    config = yaml.safe_load((REPO / "mkdocs.yml").read_text())
    assert config.get("docs_dir", "docs") == "docs"
    listed = nav_pages(config["nav"])
    assert len(listed) == len(set(listed)), f"mkdocs.yml lists a page twice: {listed}"
    missing = [page for page in listed if not (DOCS / page).is_file()]
    assert not missing, f"mkdocs.yml's nav lists pages that do not exist: {missing}"
    pages = {path.relative_to(DOCS).as_posix() for path in DOCS.rglob("*.md")}
    unlisted = sorted(pages - set(listed))
    assert not unlisted, f"docs pages missing from mkdocs.yml's nav: {unlisted}"


# -- (c) the README is short, and every relative link resolves --------------------------------------

def test_readme_is_short():
    lines = len(README.read_text().splitlines())
    assert lines <= README_MAX_LINES, f"README.md has {lines} lines (at most {README_MAX_LINES}): move detail to docs/"


@pytest.mark.parametrize("page", [README, *doc_pages()], ids=lambda p: p.relative_to(REPO).as_posix())
def test_every_relative_link_resolves_to_a_file(page: Path):
    targets = [target for target in LINK.findall(prose(page))
               if not re.match(r"[a-z][a-z0-9+.-]*:", target) and not target.startswith("#")]
    broken = [target for target in targets
              if not (page.parent / target.split("#", 1)[0]).resolve().is_file()]
    assert not broken, f"{page.relative_to(REPO)}: links to files that do not exist: {broken}"


def test_readme_links_into_every_docs_page():
    linked = {(REPO / target.split("#", 1)[0]).resolve() for target in LINK.findall(prose(README))}
    unlinked = [page.name for page in doc_pages() if page.resolve() not in linked]
    assert not unlinked, f"README.md does not link to docs pages {unlinked}"


def test_docs_carry_no_history():
    for page in [README, *doc_pages()]:
        found = HISTORY.findall(page.read_text())
        assert not found, f"{page.relative_to(REPO)}: say why, not when (git has the history): {found}"


# -- (d) the quick start is what the set-up script and CI run -------------------------------------

def test_quick_start_has_the_three_commands():
    setup, demo, tests = quick_start_commands()
    assert setup.split(" && ")[0] == "bash scripts/setup.sh"
    assert (REPO / "scripts" / "setup.sh").is_file()
    assert demo.startswith("genfl-launch ")
    assert tests == "python -m pytest"


def test_quick_start_set_up_is_what_ci_runs():
    setup, _, _ = quick_start_commands()
    lines = ci_lines()
    for step in setup.split(" && "):
        assert step in lines, f".ci/run does not run the README's set-up step {step!r}"


def test_quick_start_test_command_is_what_ci_runs():
    _, _, tests = quick_start_commands()
    ci_tests = [line for line in ci_lines() if "pytest" in line and not line.startswith("#")]
    assert ci_tests == [tests], f".ci/run runs {ci_tests}, the README says {tests!r}"


def test_quick_start_demo_parses_as_its_console_script():
    _, demo, _ = quick_start_commands()
    name, *args = shlex.split(demo)
    assert name in console_scripts(), f"{name} is not a console script in pyproject.toml"
    command = load_entry_point(console_scripts()[name])
    # Real parsing: an unknown option, a bad choice or a value out of range raises here.
    command.make_context(name, args)


# -- the CLI reference covers every console script --------------------------------------------------

def cli_reference() -> dict[str, str]:
    """prog_name -> "module:command" of every ``::: mkdocs-click`` block in docs/cli.md."""
    blocks = {}
    for block in MKDOCS_CLICK.findall((DOCS / "cli.md").read_text()):
        fields = dict(re.findall(r"^    :(\w+): (.*)$", block, re.MULTILINE))
        blocks[fields["prog_name"]] = f"{fields['module']}:{fields['command']}"
    return blocks


def test_cli_reference_documents_every_console_script_from_its_entry_point():
    reference = cli_reference()
    for name, target in console_scripts().items():
        assert reference.get(name) == target, (
            f"docs/cli.md documents {name} as {reference.get(name)}; pyproject.toml runs {target}")
        assert isinstance(load_entry_point(target), click.Command), f"{name} ({target}) is not a click command"


# -- documented commands use real options ----------------------------------------------------------

def documented_commands() -> list[tuple[str, list[str]]]:
    """(page, argv) of every console-script command line in the README's and docs' bash blocks."""
    scripts = console_scripts()
    found = []
    for page in [README, *doc_pages()]:
        for block in re.findall(r"^```bash\n(.*?)^```", page.read_text(), re.MULTILINE | re.DOTALL):
            for line in block.replace("\\\n", " ").splitlines():
                line = re.sub(r"(^|\s)#.*", "", line)
                for part in re.split(r"&&|\|\||[;&|]", line):
                    words = shlex.split(part)
                    if words and words[0] in scripts:
                        found.append((page.relative_to(REPO).as_posix(), words))
    return found


def test_documented_commands_use_real_options():
    commands = documented_commands()
    assert len(commands) >= 5, f"found only {commands}: are the examples gone?"
    for page, (name, *args) in commands:
        command = load_entry_point(console_scripts()[name])
        options = {opt for param in command.params for opt in (*param.opts, *param.secondary_opts)}
        unknown = [arg for arg in args if arg.startswith("--") and arg.split("=", 1)[0] not in options]
        assert not unknown, f"{page}: {name} has no option {unknown}"


def walkthrough_names() -> list[str]:
    """The dotted names (``genfl_…``) that docs/architecture.md's walk-throughs pass through."""
    text = prose(DOCS / "architecture.md")
    section = text[text.index("## Walk-throughs"):]
    return [name for name in BACKTICKED.findall(section) if name.startswith("genfl_") and "." in name]


def resolve(dotted: str):
    """The object a dotted name stands for: the longest importable module, then attributes."""
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            target = importlib.import_module(".".join(parts[:cut]))
        except ModuleNotFoundError:
            continue
        for attribute in parts[cut:]:
            target = getattr(target, attribute)
        return target
    raise ModuleNotFoundError(dotted)


def test_the_walkthroughs_name_functions_that_exist():
    names = walkthrough_names()
    assert len(names) >= 20, names  # one weight tensor's round trip and one setting's path, step by step
    missing = []
    for name in names:
        try:
            resolve(name)
        except (ImportError, AttributeError):
            missing.append(name)
    assert not missing, f"docs/architecture.md's walk-throughs name what the code does not have: {missing}"
