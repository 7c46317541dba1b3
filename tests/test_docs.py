"""The docs cannot drift from the code: the configuration reference is generated from the config
classes and every field must be documented; the configs and commands that README.md and docs/
name exist; the README stays short and the docs stand alone. (`mkdocs build --strict` runs
separately; it is not run here.)"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import io
import re
import sys
import typing
from pathlib import Path

import pytest

from align_gen.cli import main
from align_gen.config import RunConfig
from align_gen.objectives import available_objectives, objective_config_class

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = ROOT / "docs"
HOOK = DOCS / "hooks" / "config_reference.py"


def load_hook():
    spec = importlib.util.spec_from_file_location("config_reference_hook", HOOK)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # as mkdocs loads hooks (dataclasses look their module up)
    spec.loader.exec_module(module)
    return module


hook = load_hook()


def pages() -> dict[str, str]:
    """README.md and every Markdown page of docs/, by path relative to the repository."""
    paths = [README, *sorted(DOCS.rglob("*.md"))]
    return {str(path.relative_to(ROOT)): path.read_text() for path in paths}


# --------------------------------------------------------------------------------------------
# (a) The generated configuration reference


def config_keys(cls: type, prefix: str = "") -> list[str]:
    """Every leaf key of a config class, dotted, following nested config classes."""
    keys = []
    hints = typing.get_type_hints(cls)
    for field in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[field.name]):
            keys += config_keys(hints[field.name], f"{prefix}{field.name}.")
        else:
            keys.append(f"{prefix}{field.name}")
    return keys


def test_the_reference_documents_every_config_key() -> None:
    """Raises (UndocumentedFieldError) if any field has no comment in the source."""
    reference = hook.config_reference_markdown()
    rows = set(re.findall(r"^\| <code>([\w.]+)</code> \|", reference, flags=re.M))
    expected = set(config_keys(RunConfig))
    for name in available_objectives():
        expected |= {f"objective.{key}" for key in config_keys(objective_config_class(name))}
        assert f"### `objective` with `name: {name}`" in reference, name
    assert expected <= rows, f"missing from the reference: {sorted(expected - rows)}"
    assert all(row.count("|") == 5 for row in reference.splitlines() if row.startswith("| <code>")), "a cell leaks a |"


def test_every_objective_field_has_a_row_in_its_own_section() -> None:
    sections = {section.title: section for section in hook.config_sections()}
    for name in available_objectives():
        section = sections[f"objective.name: {name}"]
        fields = [field.name for field in dataclasses.fields(objective_config_class(name))]
        assert [row.key for row in section.rows] == [f"objective.{field}" for field in fields]
        assert all(row.doc for row in section.rows)
        assert section.rows[0].default == name  # objective.name's default is the objective itself


def test_configuration_page_has_the_marker_and_mkdocs_runs_the_hook() -> None:
    assert hook.MARKER in (DOCS / "configuration.md").read_text()
    mkdocs = (ROOT / "mkdocs.yml").read_text()
    assert "docs/hooks/config_reference.py" in mkdocs and "docs_dir: docs" in mkdocs
    rendered = hook.on_page_markdown(f"before\n{hook.MARKER}\nafter", page=None, config=None, files=None)
    assert hook.MARKER not in rendered and "| <code>seed</code> |" in rendered


@dataclasses.dataclass
class _Commented:
    """A docstring is not a field's documentation."""

    # This block is separated from the field by a blank line: it documents nothing.

    plain: int = 0
    # Two lines above the field
    # belong to it,
    above: int = 1  # and so does the inline comment.
    inline: str = "x"  # only inline
    # a block above a field written over
    # several lines
    spread: list[int] = dataclasses.field(
        default_factory=list,  # with a comment inside the statement
    )


@dataclasses.dataclass
class _Inherits(_Commented):
    above: int = 2  # re-declared: its own comment wins
    inline: str = "y"


def test_comments_are_read_from_the_source() -> None:
    comments = hook.own_field_comments(_Commented)
    assert comments["plain"] == ""
    assert comments["above"] == "Two lines above the field belong to it, and so does the inline comment."
    assert comments["inline"] == "only inline"
    assert comments["spread"] == "a block above a field written over several lines with a comment inside the statement"
    assert hook.field_comment(_Inherits, "above") == "re-declared: its own comment wins"
    assert hook.field_comment(_Inherits, "inline") == "only inline"  # from the base class
    assert hook.field_comment(_Inherits, "plain") == ""


def test_an_undocumented_field_fails_the_reference(monkeypatch: pytest.MonkeyPatch) -> None:
    real = hook.field_comment
    monkeypatch.setattr(
        hook, "field_comment", lambda cls, name: "" if (cls, name) == (RunConfig, "epochs") else real(cls, name)
    )
    with pytest.raises(hook.UndocumentedFieldError, match=r"\bepochs\b"):
        hook.config_reference_markdown()


def test_values_are_written_as_yaml() -> None:
    assert [hook.yaml_value(v) for v in (None, True, 3e-4, 1e-8, 0.99, 2500.0, "", [0, 1], {"a": 1.0})] == [
        "null", "true", "3e-4", "1e-8", "0.99", "2500.0", '""', "[0, 1]", "{a: 1.0}",
    ]


# --------------------------------------------------------------------------------------------
# (b) README.md and the configs the pages name


def test_readme_is_short_and_shows_the_two_commands() -> None:
    text = README.read_text()
    assert len(text.splitlines()) <= 300
    assert "make demo" in text and "make test" in text


CONFIG_PATH = re.compile(r"configs/[\w/.*{},-]+?\.yaml")


def expand(pattern: str) -> list[str]:
    """`a{b,c}d` -> [`abd`, `acd`] (one brace group at a time)."""
    match = re.search(r"\{([^{}]*)\}", pattern)
    if not match:
        return [pattern]
    return [x for part in match.group(1).split(",") for x in expand(pattern[: match.start()] + part + pattern[match.end() :])]


def test_every_config_the_pages_name_exists() -> None:
    for page, text in pages().items():
        for named in set(CONFIG_PATH.findall(text)):
            for path in expand(named):
                assert list(ROOT.glob(path)), f"{page} names {named}, but {path} does not exist"


def test_every_shipped_config_is_named_in_the_readme_or_the_docs() -> None:
    text = "\n".join(pages().values())
    for path in sorted((ROOT / "configs").glob("*.yaml")):
        assert f"configs/{path.name}" in text, path.name


# --------------------------------------------------------------------------------------------
# (c) Commands


def code_lines(text: str) -> list[str]:
    """Every line of the fenced code blocks (backslash continuations joined) and every inline code span."""
    lines = []
    for block in re.findall(r"^```[^\n]*\n(.*?)^```", text, flags=re.M | re.S):
        lines += block.replace("\\\n", " ").splitlines()
    prose = re.sub(r"^```.*?^```", "", text, flags=re.M | re.S)
    return lines + re.findall(r"`([^`\n]+)`", prose)


def align_gen_commands(text: str) -> list[list[str]]:
    """The words after each `align-gen` in code, up to a shell comment."""
    commands = []
    for line in code_lines(text):
        for match in re.finditer(r"(?<![\w:/-])align-gen ([^\n]*)", line):
            words = re.split(r"\s#", match.group(1))[0].split()
            commands.append(words)
    return commands


_HELP: dict[tuple[str, ...], tuple[int, str]] = {}


def command_help(words: tuple[str, ...]) -> tuple[int, str]:
    if words not in _HELP:
        out = io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
            try:
                code = main([*words, "--help"])
            except SystemExit as exit:
                code = exit.code
        _HELP[words] = (code or 0, out.getvalue())
    return _HELP[words]


def test_every_command_the_pages_name_exists_with_its_options() -> None:
    seen = 0
    for page, text in pages().items():
        for words in align_gen_commands(text):
            if not words or not re.fullmatch(r"[a-z][a-z-]*", words[0]):
                continue  # e.g. "align-gen (...)" in prose code
            command = tuple(words[:2]) if words[0] == "world" else (words[0],)
            code, helptext = command_help(command)
            assert code == 0, f"{page}: `align-gen {' '.join(command)}` is not a command"
            for option in re.findall(r"(?<![\w-])--[a-z][a-z-]*", " ".join(words)):
                assert re.search(rf"(?<![\w-]){option}\b", helptext), f"{page}: `align-gen {' '.join(command)}` has no {option}"
            seen += 1
    assert seen > 20


def test_every_objective_has_a_section() -> None:
    text = (DOCS / "objectives.md").read_text()
    for name in available_objectives():
        heading = name.replace("_", "[-_ ]")  # diffusion_dpo: "## Diffusion-DPO"
        assert re.search(rf"^## {heading}$", text, flags=re.M | re.I), name


# --------------------------------------------------------------------------------------------
# (d) The docs stand alone


def test_the_docs_cite_nothing_outside_the_repository() -> None:
    texts = {**pages(), "mkdocs.yml": (ROOT / "mkdocs.yml").read_text()}
    for page, text in texts.items():
        for forbidden in ("DESIGN.md", "STYLE.md", "../", "shared/", "/work/", "/home/"):
            assert forbidden not in text, f"{page} cites {forbidden}"
        assert not re.search(r"\bissues?\b", text, flags=re.I), f"{page} mentions an issue"
