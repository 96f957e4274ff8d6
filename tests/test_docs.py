"""The user-facing docs promise only what exists: every flag they name is a CLI option, every
config key is a TrainConfig field, every relative link points at a file (and heading) of the
repository, and nothing points at notes outside it."""
import re
from pathlib import Path

import pytest

from onelayer.cli import cli
from onelayer.config import FIELDS

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def text(path: Path) -> str:
    return path.read_text(encoding="utf-8")


def not_built_yet() -> str:
    """The README's paragraph that lists what is not built, where unbuilt flags may appear."""
    readme = text(ROOT / "README.md")
    start = readme.find("Not built yet:")
    return "" if start < 0 else readme[start:readme.index("\n\n", start)]


# A launcher's own flags (torchrun, accelerate launch), up to the `-m onelayer` it starts on
# the same command line (continued lines included).
LAUNCHER = re.compile(r"(torchrun|accelerate launch)\b(?:\\\n|[^\n])*?(?=-m onelayer)")
# A repository script's command line (continued lines included): its flags are the script's.
SCRIPT = re.compile(r"python ((?:scripts|benchmarks)/\w+\.py)((?:\\\n|[^\n])*)")
FLAG = re.compile(r"(?<![\w-])--[a-z][a-z0-9-]*")


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_documented_flags_are_cli_options(doc):
    known = {"--help"} | {opt for command in (cli, *cli.commands.values()) for param in command.params
                          for opt in (*param.opts, *param.secondary_opts)}
    flags = set(FLAG.findall(SCRIPT.sub("", LAUNCHER.sub("", text(doc)))))
    unbuilt = set(FLAG.findall(not_built_yet()))
    assert flags - known - unbuilt == set()


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_documented_script_flags_exist(doc):
    for script, args in SCRIPT.findall(text(doc)):
        source = text(ROOT / script)
        assert [f for f in FLAG.findall(args) if f'"{f}"' not in source] == [], script


def test_documented_config_keys_are_fields():
    # `key = value` as in a TOML file, or a bare `key=`
    keys = {k for doc in DOCS for k in re.findall(r"`([a-z][a-z0-9_]*)(?: = |=`)", text(doc))}
    assert keys, "the docs show config keys (docs/tasks.md does)"
    assert keys - set(FIELDS) == set()


def anchors(path: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to dashes."""
    headings = re.findall(r"^#+ (.+)$", text(path), flags=re.M)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in headings}


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_relative_links_resolve_inside_the_repository(doc):
    for target in re.findall(r"\]\(([^)\s]+)\)", text(doc)):
        if re.match(r"[a-z]+://", target):
            continue
        file, _, anchor = target.partition("#")
        path = (doc.parent / file).resolve() if file else doc
        assert path.is_relative_to(ROOT) and path.exists(), (doc.name, target)
        if anchor:
            assert anchor in anchors(path), (doc.name, target)
    body = text(doc)
    assert "ALGORITHMS.md" not in body and "../shared" not in body


def test_the_algorithms_page_is_linked_from_the_readme():
    assert "(docs/algorithms.md)" in text(ROOT / "README.md")
