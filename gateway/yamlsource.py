"""YAML with positions: every value's line, so an error can name file, line and field."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

Loc = tuple[str | int, ...]


@dataclass(frozen=True)
class Problem:
    """One error in a file: where it is and what is wrong."""

    file: str
    line: int
    path: str
    message: str

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}"
        return f"{where}: {self.path}: {self.message}" if self.path else f"{where}: {self.message}"


class SourceError(Exception):
    """A document with one or more problems; ``problems`` lists every one found."""

    def __init__(self, problems: list[Problem]) -> None:
        self.problems = problems
        super().__init__("\n".join(str(p) for p in problems))


@dataclass
class Document:
    file: str
    data: Any
    lines: dict[Loc, int] = field(default_factory=dict)

    def locate(self, loc: Loc) -> tuple[int, str]:
        """Line and dotted field path for a validation ``loc``.

        Elements of ``loc`` that are not in the document (a union's discriminator, pydantic's
        ``[key]`` marker) are left out of the path, except the last one: that is the name of a
        missing field, which points at its parent's line.
        """
        matched: Loc = ()
        shown: list[str | int] = []
        for i, elem in enumerate(loc):
            for cand in (elem, str(elem)) if isinstance(elem, int) else (elem,):
                if matched + (cand,) in self.lines:
                    matched += (cand,)
                    shown.append(elem)
                    break
            else:
                if i == len(loc) - 1 and elem != "[key]":
                    shown.append(elem)
        return self.lines.get(matched, 1), format_path(shown)


def format_path(loc: list[str | int] | Loc) -> str:
    out = ""
    for elem in loc:
        out += f"[{elem}]" if isinstance(elem, int) else (f".{elem}" if out else str(elem))
    return out


def load(path: Path, display: str | None = None) -> Document:
    """Parse ``path``; raise SourceError for unreadable files, bad syntax or duplicate keys."""
    name = display or str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise SourceError([Problem(name, 1, "", f"cannot read: {exc}")]) from exc
    return parse(text, name)


def parse(text: str, name: str) -> Document:
    loader: yaml.SafeLoader | None = None
    try:
        loader = yaml.SafeLoader(text)
        node = loader.get_single_node()
        data = loader.construct_document(node) if node is not None else None
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark else 1
        raise SourceError([Problem(name, line, "", f"YAML syntax: {exc.problem}")]) from exc
    except yaml.YAMLError as exc:  # e.g. a control character the YAML reader refuses
        line = text.count("\n", 0, getattr(exc, "position", 0)) + 1
        raise SourceError([Problem(name, line, "", f"YAML: {exc}".splitlines()[0])]) from exc
    except RecursionError as exc:
        raise SourceError([Problem(name, 1, "", "YAML nested too deeply")]) from exc
    finally:
        if loader is not None:
            loader.dispose()
    doc = Document(name, data)
    problems: list[Problem] = []
    if node is not None:
        _index(node, (), doc.lines, problems, name)
    if problems:
        raise SourceError(problems)
    return doc


def _index(node: yaml.Node, path: Loc, lines: dict[Loc, int], problems: list[Problem], name: str) -> None:
    lines.setdefault(path, node.start_mark.line + 1)
    if isinstance(node, yaml.MappingNode):
        seen: dict[str, int] = {}
        for key_node, value_node in node.value:
            key = str(key_node.value)
            line = key_node.start_mark.line + 1
            if key in seen:
                problems.append(
                    Problem(name, line, format_path([*path, key]), f"duplicate key (first at line {seen[key]})")
                )
                continue
            seen[key] = line
            lines[(*path, key)] = line
            _index(value_node, (*path, key), lines, problems, name)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _index(item, (*path, i), lines, problems, name)
