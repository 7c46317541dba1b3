"""mkdocs hook: the configuration reference, generated from the config dataclasses.

At build time the line ``<!-- config-reference -->`` of ``configuration.md`` is replaced by one
table per config section: :class:`align_gen.config.RunConfig` and its nested dataclasses,
followed recursively, then every registered objective's own config class under ``objective.*``.
A row is the dotted key, its type, its default and its documentation, which in this code base is
the field's comment in the source: the ``#`` lines directly above the field and the inline
``# ...`` after it (a comment block separated from the field by a blank line does not count).
A field without a comment raises :class:`UndocumentedFieldError`, which fails the build (and
``tests/test_docs.py``): the reference cannot drift from the code.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import io
import re
import textwrap
import tokenize
import types
import typing
from typing import Any

MARKER = "<!-- config-reference -->"


class UndocumentedFieldError(RuntimeError):
    """A config field has no comment to document it."""


@dataclasses.dataclass
class Row:
    key: str  # the dotted config key
    type: str  # the field's type, readable
    default: str  # the default, as YAML would write it
    doc: str  # the field's comment


@dataclasses.dataclass
class Section:
    title: str  # the key prefix, e.g. "model.lora" ("" for the top level)
    class_name: str
    rows: list[Row]


# --------------------------------------------------------------------------------------------
# Comments of a class's fields


@functools.cache
def own_field_comments(cls: type) -> dict[str, str]:
    """The comment of every annotated field written in ``cls``'s own body (not inherited).

    A field's comment is the block of comment-only lines directly above it (no blank line in
    between) followed by the comments on the lines of its own statement; '' when there is none.
    """
    source = textwrap.dedent(inspect.getsource(cls))
    lines = source.splitlines()
    comments: dict[int, str] = {}
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type == tokenize.COMMENT:
            comments[token.start[0]] = token.string.lstrip("#").strip()
    class_def = next(node for node in ast.parse(source).body if isinstance(node, ast.ClassDef))
    result = {}
    for node in class_def.body:
        if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
            continue
        above: list[str] = []
        line = node.lineno - 1
        while line >= 1 and lines[line - 1].lstrip().startswith("#"):
            above.insert(0, comments[line])
            line -= 1
        own = [comments[n] for n in range(node.lineno, (node.end_lineno or node.lineno) + 1) if n in comments]
        result[node.target.id] = " ".join(part for part in above + own if part)
    return result


def field_comment(cls: type, name: str) -> str:
    """The comment of field ``name`` of ``cls``: where the field is written, or else where a base
    class writes the same field (an objective's ``name`` re-declares ObjectiveConfig's)."""
    for klass in cls.__mro__:
        if dataclasses.is_dataclass(klass) and name in klass.__dict__.get("__annotations__", {}):
            comment = own_field_comments(klass).get(name, "")
            if comment:
                return comment
    return ""


# --------------------------------------------------------------------------------------------
# Types and defaults, as a YAML user reads them


def type_name(hint: Any) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Literal:
        return " | ".join(f'"{arg}"' for arg in args)
    if origin in (typing.Union, types.UnionType):
        return " | ".join(type_name(arg) for arg in args)
    if origin is not None:
        return f"{getattr(origin, '__name__', str(origin))}[{', '.join(type_name(arg) for arg in args)}]"
    if hint is type(None):
        return "null"
    if hint is Any:
        return "any"
    return getattr(hint, "__name__", str(hint))


def yaml_value(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        if value and abs(value) < 1e-2:
            short = f"{value:.0e}"
            if float(short) == value:
                mantissa, exponent = short.split("e")
                return f"{mantissa}e{int(exponent)}"
        return repr(value)
    if isinstance(value, str):
        return value if value else '""'
    if isinstance(value, dict):
        return "{" + ", ".join(f"{key}: {yaml_value(item)}" for key, item in value.items()) + "}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(yaml_value(item) for item in value) + "]"
    return str(value)


def default_of(field: dataclasses.Field) -> Any:
    if field.default is not dataclasses.MISSING:
        return field.default
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    raise ValueError(f"config field {field.name!r} has no default.")


# --------------------------------------------------------------------------------------------
# The sections


def config_sections() -> list[Section]:
    """RunConfig and its nested dataclasses (depth first, in field order), then one section per
    registered objective. Raises UndocumentedFieldError naming every field without a comment."""
    from align_gen.config import RunConfig
    from align_gen.objectives import available_objectives, objective_config_class

    sections: list[Section] = []
    missing: list[str] = []

    def visit(cls: type, prefix: str, title: str) -> None:
        hints = typing.get_type_hints(cls)
        rows: list[Row] = []
        nested: list[tuple[type, str]] = []
        for field in dataclasses.fields(cls):
            key = f"{prefix}{field.name}"
            hint = hints[field.name]
            if dataclasses.is_dataclass(hint):
                nested.append((hint, key))
                continue
            doc = field_comment(cls, field.name)
            if not doc:
                missing.append(f"{key} ({cls.__module__}.{cls.__qualname__}.{field.name})")
            rows.append(Row(key, type_name(hint), yaml_value(default_of(field)), doc))
        sections.append(Section(title, cls.__name__, rows))
        for hint, key in nested:
            visit(hint, f"{key}.", key)

    visit(RunConfig, "", "")
    for name in available_objectives():
        visit(objective_config_class(name), "objective.", f"objective.name: {name}")
    if missing:
        raise UndocumentedFieldError(
            "config fields without a comment (add a `# ...` comment above the field or after it): "
            + ", ".join(missing)
        )
    return sections


_CODE_SPAN = re.compile(r"``(.+?)``|`([^`]+)`")


def _cell(text: str) -> str:
    """A comment as a Markdown table cell: its ``code`` and `code` spans as code, the rest as text."""
    out, end = [], 0
    for match in _CODE_SPAN.finditer(text):
        out += [_plain(text[end : match.start()]), _code(match.group(1) or match.group(2))]
        end = match.end()
    return "".join(out + [_plain(text[end:])])


def _plain(text: str) -> str:
    text = text.replace("\\", "\\\\").replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    for char in "*_[]|`":
        text = text.replace(char, "\\" + char)
    return text


def _code(text: str) -> str:
    """Inline code safe inside a Markdown table cell."""
    return "<code>" + text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace("|", "&#124;") + "</code>"


def config_reference_markdown() -> str:
    """The reference as Markdown: a heading and a table per section."""
    out = []
    for section in config_sections():
        if section.title.startswith("objective.name: "):
            name = section.title.removeprefix("objective.name: ")
            heading = f"### `objective` with `name: {name}`"
            intro = f"The `objective` section when `objective.name` is `{name}` (`{section.class_name}`)."
        elif section.title:
            heading = f"### `{section.title}`"
            intro = f"The `{section.title}` section (`{section.class_name}`)."
        else:
            heading = "### Top level"
            intro = f"Keys at the top of the file (`{section.class_name}`)."
        out += [heading, "", intro, "", "| key | type | default | meaning |", "| --- | --- | --- | --- |"]
        for row in section.rows:
            out.append(f"| {_code(row.key)} | {_code(row.type)} | {_code(row.default)} | {_cell(row.doc)} |")
        out.append("")
    return "\n".join(out)


# --------------------------------------------------------------------------------------------
# The mkdocs hook


def on_page_markdown(markdown: str, page: Any, config: Any, files: Any, **kwargs: Any) -> str:
    if MARKER in markdown:
        markdown = markdown.replace(MARKER, config_reference_markdown())
    return markdown
