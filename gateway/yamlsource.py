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
        if isinstance(elem, int):
            out += f"[{elem}]"
            continue
        key = elem if elem and not any(c in elem for c in ".[]") else repr(elem)  # empty, or reads as several
        out += f".{key}" if out else key
    return out


def load(path: Path, display: str | None = None) -> Document:
    """Parse ``path``; raise SourceError for unreadable files, bad syntax or duplicate keys."""
    name = display or str(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise SourceError([Problem(name, 1, "", f"cannot read: {exc}")]) from exc
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        raise SourceError([Problem(name, line, "", f"cannot read: {exc}")]) from exc
    return parse(text, name)


def parse(text: str, name: str) -> Document:
    loader: _Loader | None = None
    node: yaml.Node | None = None
    try:
        loader = _Loader(text)
        node = loader.get_single_node()
        if node is not None:
            _check_aliases(node, name, loader.alias_lines)
        data = loader.construct_document(node) if node is not None else None
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark else 1
        where = _path_at(node, mark) if node is not None and mark else ""
        what = "YAML value" if isinstance(exc, yaml.constructor.ConstructorError) else "YAML syntax"
        raise SourceError([Problem(name, line, where, f"{what}: {exc.problem}")]) from exc
    except yaml.YAMLError as exc:  # e.g. a control character the YAML reader refuses
        line = text.count("\n", 0, getattr(exc, "position", 0)) + 1
        raise SourceError([Problem(name, line, "", f"YAML: {exc}".splitlines()[0])]) from exc
    except RecursionError as exc:
        line = loader.get_mark().line + 1 if loader is not None else 1
        raise SourceError([Problem(name, line, "", "YAML nested too deeply")]) from exc
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


MAX_INT_BITS = 1024  # no number of a tag map comes near; larger ones are refused (and cannot even be printed)
# Values aliases may add to a document: an alias bomb ("billion laughs") stops here, while a 100,000-tag
# map of identical PLCs sharing one register map (an anchor) still loads.
MAX_ALIASED = 2_000_000


class _Mark:
    """A position in the tag map without a reference to the text around it. PyYAML's Mark has a
    dict per instance and every node keeps two: a tag map of 10,000 tags holds some 200,000 of them
    while it is composed, which set the gateway's peak memory."""

    __slots__ = ("column", "index", "line", "name")
    buffer = pointer = None

    def __init__(self, mark: yaml.Mark) -> None:
        self.name, self.index, self.line, self.column = mark.name, mark.index, mark.line, mark.column

    def get_snippet(self, *_: object, **__: object) -> None:
        return None

    def __str__(self) -> str:
        return f'  in "{self.name}", line {self.line + 1}, column {self.column + 1}'


class _Loader(yaml.SafeLoader):
    """SafeLoader whose bad scalars (``2001-02-30``, ``!!int abc``, huge integers) are errors with a line."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self.alias_lines: dict[tuple[int, int], int] = {}  # (container, index or key node) -> line of an alias

    def compose_node(self, parent: yaml.Node | None, index: Any) -> yaml.Node | None:
        """``index``: the item's position in a sequence, the key's node in a mapping."""
        if parent is not None and self.check_event(yaml.AliasEvent):
            where = index if isinstance(index, int) else id(index)
            event = self.peek_event()  # type: ignore[no-untyped-call]
            self.alias_lines[(id(parent), where)] = event.start_mark.line + 1
        node = super().compose_node(parent, index)
        if node is not None:  # an alias's node is slim already; a recursive one has no end yet
            if not isinstance(node.start_mark, _Mark):
                node.start_mark = _Mark(node.start_mark)
            if node.end_mark is not None and not isinstance(node.end_mark, _Mark):
                node.end_mark = _Mark(node.end_mark)
        return node

    def construct_object(self, node: yaml.Node, deep: bool = False) -> Any:
        try:
            return super().construct_object(node, deep)
        except (ValueError, TypeError, KeyError, IndexError, AttributeError, OverflowError) as exc:
            kind = node.tag.rsplit(":", 1)[-1]
            detail = f" ({exc})" if isinstance(exc, ValueError) else ""
            raise yaml.constructor.ConstructorError(
                None, None, f"invalid {kind} {_clip(node.value)}{detail}", node.start_mark
            ) from exc

    def construct_yaml_int(self, node: yaml.ScalarNode) -> int:
        value = None if len(node.value) > 4 * MAX_INT_BITS else super().construct_yaml_int(node)
        if value is None or value.bit_length() > MAX_INT_BITS:
            raise yaml.constructor.ConstructorError(
                None, None, f"integer {_clip(node.value)} is too large (at most {MAX_INT_BITS} bits)", node.start_mark
            )
        return value


_Loader.add_constructor("tag:yaml.org,2002:int", _Loader.construct_yaml_int)


def _clip(value: object, size: int = 40) -> str:
    text = value if isinstance(value, str) else ""
    return repr(text if len(text) <= size else text[:size] + "...")


def _key(node: yaml.Node) -> str | int:
    """A mapping key as validation errors name it: a string or an integer as is, another value by its repr."""
    if node.tag == "tag:yaml.org,2002:str" or not isinstance(node, yaml.ScalarNode):
        return str(node.value)
    try:
        value = yaml.constructor.SafeConstructor().construct_object(node)
    except (yaml.YAMLError, ValueError, TypeError, KeyError, IndexError, AttributeError):
        return str(node.value)
    if isinstance(value, int):
        return int(value) if value.bit_length() <= MAX_INT_BITS else str(node.value)
    return value if isinstance(value, str) else repr(value)


def _check_aliases(root: yaml.Node, name: str, alias_lines: dict[tuple[int, int], int]) -> None:
    """Refuse an alias inside its own anchor, and aliases that would expand the document beyond MAX_ALIASED
    values; both without expanding anything (every node is visited once)."""
    size: dict[int, int] = {}  # node -> values it expands to; -1 while its children are being counted
    uses: dict[int, int] = {}
    first: dict[int, tuple[Loc, int]] = {}  # node -> its first path and line

    def count(node: yaml.Node, path: Loc, line: int) -> int:
        key = id(node)
        uses[key] = uses.get(key, 0) + 1
        if key in size:
            if size[key] < 0:
                raise SourceError([Problem(name, line, format_path(path),
                                           "alias inside its own anchor (a recursive structure)")])
            return size[key]
        size[key], first[key] = -1, (path, line)
        total = 1
        if isinstance(node, yaml.MappingNode):
            for k, v in node.value:
                k_line = k.start_mark.line + 1
                total += count(k, path, k_line)
                total += count(v, (*path, _key(k)), alias_lines.get((key, id(k)), k_line))
        elif isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                total += count(item, (*path, i), alias_lines.get((key, i), item.start_mark.line + 1))
        size[key] = total
        return total

    if count(root, (), root.start_mark.line + 1) - len(size) > MAX_ALIASED:
        worst = max((k for k in uses if uses[k] > 1), key=lambda k: size[k] * (uses[k] - 1))
        path, line = first[worst]
        raise SourceError([Problem(
            name, line, format_path(path),
            f"aliases of this value ({size[worst]} values, used {uses[worst]} times) would expand the document "
            f"beyond {MAX_ALIASED} values",
        )])


def _path_at(root: yaml.Node, mark: yaml.Mark) -> str:
    """Field path of the value that starts at ``mark`` (of its mapping for a key), else of the innermost
    value around ``mark``."""
    seen: set[int] = set()
    around: Loc = ()
    todo: list[tuple[yaml.Node, Loc]] = [(root, ())]
    while todo:
        node, path = todo.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        if node.start_mark.index == mark.index:
            return format_path(path)
        if not node.start_mark.index <= mark.index < node.end_mark.index:
            continue
        around = path if len(path) >= len(around) else around
        if isinstance(node, yaml.MappingNode):
            if any(k.start_mark.index == mark.index for k, _ in node.value):
                return format_path(path)
            todo.extend((v, (*path, _key(k))) for k, v in reversed(node.value))  # popped in document order
        elif isinstance(node, yaml.SequenceNode):
            todo.extend((item, (*path, i)) for i, item in reversed(list(enumerate(node.value))))
    return format_path(around)


def _index(node: yaml.Node, path: Loc, lines: dict[Loc, int], problems: list[Problem], name: str) -> None:
    lines.setdefault(path, node.start_mark.line + 1)
    if isinstance(node, yaml.MappingNode):
        seen: dict[str | int, int] = {}
        for key_node, value_node in node.value:
            key = _key(key_node)
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
