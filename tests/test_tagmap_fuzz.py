"""Fuzzing the tag map loader: whatever the file holds, the loader returns a TagMap or raises SourceError,
and every problem names the file, a line and (inside the document) the field. Never a traceback.

Inputs: arbitrary text and bytes, YAML built from YAML's own tokens (anchors, tags, flow and block
syntax), a table of known nasties (alias bombs, unsafe tags, huge integers, .nan where numbers are
expected, ...) and structured mutations of the plant's map. Examples are derandomized: every run sees
the same inputs.
"""

from __future__ import annotations

import contextlib
import copy
import datetime as dt
import io
import re
import time
import typing
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel

from gateway.cli import main
from gateway.tagmap import TagMap, load_tag_map, load_tag_map_text
from gateway.yamlsource import Problem, SourceError, format_path, parse

from .conftest import PLANT

NAME = "fuzz.yaml"
PLANT_TEXT = PLANT.read_text(encoding="utf-8")
PLANT_DATA = yaml.safe_load(PLANT_TEXT)

FUZZ = settings(derandomize=True, database=None, deadline=None, print_blob=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


# -- the property ------------------------------------------------------------------------------------

def _field_names(model: type[BaseModel], seen: set[type] | None = None) -> set[str]:
    """Every field name of the tag map's models: the only names a problem may add to a document path."""
    seen = set() if seen is None else seen
    names: set[str] = set()
    if model in seen:
        return names
    seen.add(model)
    todo: list[Any] = []
    for name, info in model.model_fields.items():
        names.add(name)
        todo.append(info.annotation)
    while todo:
        tp = todo.pop()
        if isinstance(tp, type) and issubclass(tp, BaseModel):
            names |= _field_names(tp, seen)
        todo.extend(typing.get_args(tp))
    return names


FIELDS = _field_names(TagMap)


def _norm(path: str) -> str:
    """``a[0].b`` and the document's ``a.0.b`` (an int key) compare equal."""
    return re.sub(r"\[(-?\d+)\]", r".\1", path).lstrip(".")


def _document_paths(text: str) -> tuple[dict[str, int], bool] | None:
    """Every path of the document and its line, and whether it is a mapping; None when it does not parse."""
    try:
        doc = parse(text, NAME)
    except SourceError:
        return None
    return {_norm(format_path(loc)): line for loc, line in doc.lines.items()}, isinstance(doc.data, dict)


YAML_BREAK = r"\r\n|[\r\n\x85\u2028\u2029]"  # how YAML counts lines


def _assert_reported(exc: SourceError, text: str, name: str = NAME,
                     document: tuple[dict[str, int], bool] | None = None) -> None:
    """Problems name the file, a line of it and, when the document parsed, an existing field or a missing one."""
    assert exc.problems, "a SourceError without problems"
    paths, mapping = document or ({}, False)
    last_line = len(re.findall(YAML_BREAK, text)) + 1
    for p in exc.problems:
        assert isinstance(p, Problem)
        shown = str(p)
        assert p.file == name, shown
        assert 1 <= p.line <= last_line, shown
        assert p.message and isinstance(p.message, str), shown
        assert shown.startswith(f"{name}:{p.line}: "), shown
        for leak in ("Traceback", "<unprintable", "Exceeds the limit", "constrained-", "function-", "[key]"):
            assert leak not in shown, shown
        path = _norm(p.path)
        if document is None or not path:  # not parsed, or the document as a whole
            continue
        if path in paths:
            if not p.message.startswith("duplicate key"):  # the later occurrence: its own line
                assert p.line == paths[path], shown
            continue
        # Not in the document: a field that is missing (or inherited), named under an existing parent.
        parent, _, last = path.rpartition(".")
        assert parent in paths, shown
        assert p.line == paths[parent], shown
        assert last in FIELDS, shown
    if mapping:
        assert all(p.path for p in exc.problems), [str(p) for p in exc.problems]  # a mapping: fields to name


def _check_text(text: str) -> TagMap | SourceError:
    try:
        return load_tag_map_text(text, NAME)
    except SourceError as exc:
        _assert_reported(exc, text, document=_document_paths(text))
        return exc


def _check_file(path: Path, data: bytes) -> TagMap | SourceError:
    path.write_bytes(data)
    try:
        return load_tag_map(path)
    except SourceError as exc:
        _assert_reported(exc, data.decode("utf-8", errors="replace"), name=str(path))
        return exc


# -- arbitrary text and bytes --------------------------------------------------------------------------

TOKENS = [
    "gateway", "mqtt", "devices", "assets", "id", "tags", "rules", "derived", "kind", "limit", "a", "x",
    ":", ": ", " ", "  ", "\n", "\n  ", "\n    ", "- ", "[", "]", "{", "}", ", ", "&a ", "*a", "&b ", "*b",
    "<<: ", "? ", "!!int ", "!!float ", "!!bool ", "!!binary ", "!!timestamp ", "!!set ", "!!omap ", "!!pairs ",
    "!!str ", "!!null ", "!!map ", "!!seq ", "!!python/object/apply:os.system ", "!!python/name:os.system ",
    "!foo ", "!<tag:x,2000:y> ", "'", '"', "# c", "|", "|-\n  ", ">", "---", "...", "~", "null", "true", "yes",
    "1", "-1", "0", "00", "0x1F", "0o17", "0b101", "0b", "0x", "1_000", "1:30", "190:20:30", ".nan", ".inf",
    "-.inf", "1.5e3", "1e400", "1.0e400", "2001-12-14", "2001-02-30", "2001-12-14t21:59:43.10-05:00",
    "2001-12-14 21:59:43.10 -25:00", "\t", "\x00", "\ufeff", "\x85", "\u2028", "\x1b", "%YAML 1.1\n",
    "%TAG ! tag:x,2000:\n", "\\", "\\x00", "=", "99999999999999999999999999999", "9" * 400, "0x" + "f" * 300,
    "modbus_tcp", "opcua", "holding", "counter_rate", "high", "{value:.2f}", "{asset_name!z}",
]
yaml_like = st.lists(st.sampled_from(TOKENS), max_size=40).map("".join)


@settings(FUZZ, max_examples=500)
@given(st.text(max_size=300) | yaml_like)
@example("a: 2001-02-30")  # ValueError from the timestamp constructor
@example("a: !!int abc")  # ValueError
@example("a: !!int ''")  # IndexError
@example("a: !!bool maybe")  # KeyError
@example("a: !!timestamp x")  # AttributeError
@example("a: &a [*a]")  # RecursionError while indexing the document
@example("a: " + "9" * 5000)  # ValueError: more digits than Python converts
@example("!!int")  # IndexError: an empty int
@example("!!float")  # IndexError
@example("?")  # a null key: its path and line
@example("!!str :")  # an empty key: a path of its own
@example("\ufeff\x00")
def test_loader_reports_any_text(text: str) -> None:
    _check_text(text)


@pytest.fixture(scope="module")
def fuzz_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fuzz") / "map.yaml"


def _splice(parts: tuple[bytes, int, bytes]) -> bytes:
    base, at, junk = parts
    at %= len(base) + 1
    return base[:at] + junk + base[at:]


encodings = st.sampled_from(["utf-8", "utf-8-sig", "utf-16", "utf-16-le", "utf-32", "latin-1", "cp1252"])
any_bytes = st.one_of(
    st.binary(max_size=300),
    st.tuples(yaml_like, encodings).map(lambda te: te[0].encode(te[1], errors="replace")),
    st.tuples(st.just(PLANT_TEXT.encode()), st.integers(0, 1 << 16), st.binary(min_size=1, max_size=8)).map(_splice),
)


@settings(FUZZ, max_examples=300)
@given(any_bytes)
@example(b"\xff\xfe\x00")  # not UTF-8
@example(b"\xef\xbb\xbfgateway: {id: x}\n")  # UTF-8 with a BOM
@example(b"a: b\x00c\n")  # NUL
@example(b"!!bool")  # KeyError: an empty bool
@example(b"\xfe\xff\x00a\x00:\x00 \x001")  # UTF-16 BE with a BOM
def test_loader_reports_any_file(fuzz_file: Path, data: bytes) -> None:
    _check_file(fuzz_file, data)


# -- YAML nasties, one by one --------------------------------------------------------------------------

def _bomb(levels: int, width: int = 9) -> str:
    lines = [f"l0: &l0 [{', '.join(['lol'] * width)}]"]
    lines += [f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * width)}]" for i in range(1, levels)]
    return "\n".join(lines) + "\n"


def _plant(old: str, new: str) -> str:
    assert old in PLANT_TEXT, old
    return PLANT_TEXT.replace(old, new, 1)


def _plant_line(fragment: str) -> int:
    """Line of the plant map where ``fragment`` starts."""
    return PLANT_TEXT[: PLANT_TEXT.index(fragment)].count("\n") + 1


# name -> text, then the first problem's (line, path, message fragment); line 0: where the stack ran out
NASTIES: dict[str, tuple[str, tuple[int, str, str]]] = {
    "billion_laughs": (_bomb(9), (8, "l7", "would expand the document beyond")),
    "alias_in_own_anchor": ("a: &a [1, *a]\n", (1, "a[1]", "alias inside its own anchor")),
    "alias_in_own_mapping": ("a: &a\n  b: 1\n  c: *a\n", (3, "a.c", "alias inside its own anchor")),
    "alias_in_own_block_list": ("a: &a\n  - b: [*a]\n", (2, "a[0].b[0]", "alias inside its own anchor")),
    "python_object": ("gateway: !!python/object/apply:os.system ['true']\n",
                      (1, "gateway", "could not determine a constructor")),
    "python_name": ("x: !!python/name:os.system\n", (1, "x", "could not determine a constructor")),
    "unknown_tag": ("gateway:\n  id: !secret edge\n", (2, "gateway.id", "could not determine a constructor")),
    "duplicate_key": ("gateway: {id: a}\ngateway: {id: b}\n", (2, "gateway", "duplicate key (first at line 1)")),
    "huge_int": ("mqtt:\n  port: " + "9" * 5000 + "\n", (2, "mqtt.port", "too large")),
    "huge_hex_int": ("mqtt:\n  port: 0x" + "f" * 4000 + "\n", (2, "mqtt.port", "too large")),
    "huge_sexagesimal_int": ("port: 1" + ":59" * 300 + "\n", (1, "port", "too large")),
    "bad_explicit_int": ("a:\n  - !!int abc\n", (2, "a[0]", "invalid int 'abc'")),
    "empty_explicit_float": ("a: !!float ''\n", (1, "a", "invalid float ''")),
    "bad_explicit_bool": ("a: !!bool maybe\n", (1, "a", "invalid bool 'maybe'")),
    "bad_explicit_timestamp": ("a: !!timestamp soon\n", (1, "a", "invalid timestamp 'soon'")),
    "impossible_date": ("a:\n  b: 2001-02-30\n", (2, "a.b", "day is out of range for month")),
    "impossible_offset": ("a: 2001-12-14 21:59:43.10 -25:00\n", (1, "a", "invalid timestamp")),
    "bad_binary": ("a: !!binary 5\n", (1, "a", "failed to decode base64")),
    "deep_flow": ("a: " + "[" * 600 + "]" * 600 + "\n", (1, "", "nested too deeply")),
    "deep_block": ("".join(f"{' ' * i}k{i}:\n" for i in range(1000)), (0, "", "nested too deeply")),
    "sequence_key": ("? [a, b]\n: 1\n", (1, "", "found unhashable key")),
    "mapping_key_inside": ("gateway:\n  {a: 1}: x\n", (2, "gateway", "found unhashable key")),
    "null_key": (PLANT_TEXT + "~: 1\n", (PLANT_TEXT.count("\n") + 1, "None", "Keys should be strings")),
    "bool_key": ("gateway:\n  id: x\n  true: x\n", (3, "gateway[1]", "Keys should be strings")),
    "date_key": ("gateway:\n  id: x\n  2001-01-01: x\n", (3, "gateway.'datetime.date(2001, 1, 1)'",
                                                         "Keys should be strings")),
    "empty_key": ("gateway: {id: x, '': 1}\n", (1, "gateway.''", "unknown key")),
    "int_and_bool_key": ("a:\n  1: x\n  true: y\n", (3, "a[1]", "duplicate key (first at line 2)")),
    "merge_of_scalar": ("a: {<<: 1}\n", (1, "a", "expected a mapping or list of mappings for merging")),
    "nul": ("a: b\x00c\n", (1, "", "unacceptable character #x0000")),
    "two_documents": ("a: 1\n---\nb: 2\n", (2, "", "found another document")),
    "not_a_mapping": ("- 1\n", (1, "", "valid dictionary")),
    "empty": ("", (1, "", "valid dictionary")),
    # numbers where numbers are expected, but not usable ones
    "nan_limit": (_plant("limit: 85,", "limit: .nan,"), (_plant_line("limit: 85,"), "assets[0].rules[0].limit",
                                                           "finite number")),
    "inf_scale": (_plant("scale: 0.1, unit: \"%\"", "scale: .inf, unit: \"%\""),
                  (_plant_line("scale: 0.1, unit: \"%\""), "assets[3].tags.speed_setpoint.scale", "finite number")),
    "inf_percent_tolerance": (_plant("tolerance: 2%", "tolerance: inf%"),
                              (_plant_line("tolerance: 2%"), "assets[0].rules[6].tolerance", "finite number")),
    "nan_port": (_plant("port: 1883", "port: .nan"), (_plant_line("port: 1883"), "mqtt.port", "finite number")),
    "timestamp_port": (_plant("port: 1883", "port: 2001-12-14"),
                       (_plant_line("port: 1883"), "mqtt.port", "valid integer")),
    "nul_in_file_name": (_plant("  topic_prefix: ninu/plant-1\n",
                                "  topic_prefix: ninu/plant-1\n  password_file: \"a\\0b\"\n"),
                         (_plant_line("  topic_prefix: ninu/plant-1\n") + 1, "mqtt.password_file", "NUL character")),
    "binary_id": (_plant("id: edge-01", "id: !!binary //79"),
                  (_plant_line("id: edge-01"), "gateway.id", "valid string")),
    "huge_hex_enum_in_when": (_plant("when: {status: [running]}", "when: {status: [0x" + "f" * 4000 + "]}"),
                              (_plant_line("when: {status: [running]}"), "x-station-rules[3].when.status[0]",
                               "too large")),
    "huge_hex_kind": (_plant("kind: high, limit: 85", "kind: 0x" + "f" * 4000 + ", limit: 85"),
                      (_plant_line("kind: high, limit: 85"), "x-reactor-rules[0].kind", "too large")),
    "dict_in_when": (_plant("when: {status: [running]}", "when: {status: [{a: 1}]}"),
                     (_plant_line("when: {status: [running]}"), "assets[3].rules[3].when.status[0]",
                      "valid string")),
    # message templates that would fail only when the alarm is raised
    "format_spec_on_text": (_plant('message: "{asset_name}:', 'message: "{value:.2f}:'),
                            (_plant_line('message: "{asset_name}:'), "assets[0].rules[4].message",
                             "Unknown format code 'f'")),
    "bad_conversion": (_plant('message: "{asset_name}:', 'message: "{asset_name!z}:'),
                       (_plant_line('message: "{asset_name}:'), "assets[0].rules[4].message",
                        "Unknown conversion specifier z")),
    "nested_placeholder": (_plant('message: "{asset_name}:', 'message: "{value:{x}}:'),
                           (_plant_line('message: "{asset_name}:'), "assets[0].rules[4].message",
                            "no placeholders inside a format spec")),
    # errors inside unions: the path names the document's fields, not the union's members
    "derived_kind_null": (_plant("idle_time: {kind: status_time", "idle_time: {kind: ~"),
                          (_plant_line("idle_time: {kind: status_time"), "assets[3].derived.idle_time.kind",
                           "unknown kind 'None'")),
    "derived_kind_missing": (_plant("idle_time: {kind: status_time,", "idle_time: {"),
                             (_plant_line("idle_time: {kind: status_time"), "assets[3].derived.idle_time.kind",
                              "required")),
    "derived_model_error": (
        _plant("rate: counted_units_per_hour, target", "rate: target_units_per_hour, target"),
        (_plant_line("rate: counted_units_per_hour, target"), "assets[3].derived.efficiency",
         "rate and target name the same value")),
}


@pytest.mark.parametrize("name", sorted(NASTIES))
def test_nasty_yaml_is_reported(name: str) -> None:
    text, (line, path, fragment) = NASTIES[name]
    start = time.perf_counter()
    result = _check_text(text)
    elapsed = time.perf_counter() - start
    assert isinstance(result, SourceError), name
    first = result.problems[0]
    assert (first.line if line else 0, first.path) == (line, path), str(first)
    assert fragment in first.message, str(first)
    assert elapsed < 2.0, f"{name} took {elapsed:.2f}s"


def test_undecodable_file_names_the_line(fuzz_file: Path) -> None:
    result = _check_file(fuzz_file, b"gateway:\n  id: caf\xe9\n")
    assert isinstance(result, SourceError)
    assert (result.problems[0].line, result.problems[0].path) == (2, "")
    assert "cannot read" in result.problems[0].message and "utf-8" in result.problems[0].message


def test_alias_bomb_is_refused_before_expanding() -> None:
    """Twelve levels of nine: 9**12 values if expanded; refused after looking at 120 nodes."""
    start = time.perf_counter()
    with pytest.raises(SourceError, match="would expand the document beyond"):
        load_tag_map_text(_bomb(12), NAME)
    assert time.perf_counter() - start < 0.5


def test_modest_aliases_still_load() -> None:
    """The plant map's anchors (x-station-tags, ...) expand five times over: well within the limit."""
    assert isinstance(_check_text(PLANT_TEXT), TagMap)


# -- structured mutations of the plant's map -----------------------------------------------------------

DocPath = tuple[str | int, ...]
Mutation = tuple[DocPath, str, Any, Any]  # where, drop/replace/rename, the new value, the new key


def _paths(node: object, at: DocPath = ()) -> list[DocPath]:
    out: list[DocPath] = []
    if isinstance(node, dict):
        for k, v in node.items():
            out.append((*at, k))
            out += _paths(v, (*at, k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            out.append((*at, i))
            out += _paths(v, (*at, i))
    return out


PLANT_PATHS = _paths(PLANT_DATA)
PLANT_KEYS = sorted({p[-1] for p in PLANT_PATHS if isinstance(p[-1], str)})

keys = st.sampled_from(sorted(set(PLANT_KEYS) | FIELDS)) | st.from_regex(r"[a-z_][a-z0-9_-]{0,12}", fullmatch=True)
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.integers(-(1 << 70), 1 << 70),
    st.sampled_from([0, -1, 1 << 64, -(1 << 63), 10**400, -(10**400), 65536]),  # 10**400: beyond 1024 bits
    st.floats(),  # nan, inf, -0.0, subnormals
    st.text(max_size=20),
    st.sampled_from(["", " ", "500ms", "-1s", "1e400", "2%", "nan%", "{value:.2f}", "ns=2;s=x", "x-y"]),
    st.dates(),
    st.datetimes(timezones=st.just(dt.UTC)),
    st.binary(max_size=8),
)
values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(keys | st.integers(0, 9), inner, max_size=3),
    max_leaves=6,
)


def _container(doc: Any, path: DocPath) -> Any:
    """The mapping or list holding ``path``; None when earlier mutations removed or replaced it."""
    parent = None
    for elem in path:
        parent = doc
        found = elem in parent if isinstance(parent, dict) else (
            isinstance(parent, list) and isinstance(elem, int) and elem < len(parent))
        if not found:
            return None
        doc = parent[elem]
    return parent


def _mutate(parent: Any, last: str | int, op: str, value: Any, key: Any) -> None:
    if op == "drop":
        del parent[last]
    elif op == "replace":
        parent[last] = value
    elif isinstance(parent, dict):  # rename: the key changes, its place and value stay
        items = [(key if k == last else k, v) for k, v in parent.items()]
        parent.clear()
        parent.update(items)
    else:  # in a list: a new item before it
        parent.insert(last, value)


mutation = st.tuples(
    st.sampled_from(PLANT_PATHS),
    st.sampled_from(["drop", "replace", "replace", "rename"]),
    values,
    keys | st.sampled_from([0, 1, True, None]),
)


DUMPER = getattr(yaml, "CSafeDumper", yaml.SafeDumper)


def _mutated(mutations: list[Mutation]) -> str:
    doc = copy.deepcopy(PLANT_DATA)  # keeps the anchors' sharing: one mutation shows at every alias
    for path, op, value, key in mutations:
        parent = _container(doc, path)
        if parent is not None:
            _mutate(parent, path[-1], op, value, key)
    return yaml.dump(doc, Dumper=DUMPER, sort_keys=False, allow_unicode=True, width=120)


@settings(FUZZ, max_examples=80)
@given(st.lists(mutation, min_size=1, max_size=4))
@example([(("assets", 0, "rules", 0, "limit"), "replace", float("nan"), "")])
@example([(("devices", 1, "port"), "replace", 10**400, "")])
@example([(("assets", 3, "derived", "idle_time", "kind"), "replace", None, "")])
@example([(("assets", 3, "rules", 3, "when", "status", 0), "replace", {"a": 1}, "")])
@example([(("assets", 0, "rules", 4, "message"), "replace", "{value:.2f}", "")])
@example([(("assets", 3, "tags", "status"), "rename", None, None)])
@example([(("gateway",), "rename", None, True)])
def test_mutated_plant_map_loads_or_is_reported(mutations: list[Mutation]) -> None:
    _check_text(_mutated(mutations))


# -- the check command ---------------------------------------------------------------------------------

def _run_check(path: Path) -> tuple[int, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(["check", str(path)])
    return code, out.getvalue() + err.getvalue()


CHECK_CASES = {
    "bomb.yaml": _bomb(9).encode(),
    "python_object.yaml": b"gateway: !!python/object/apply:os.system ['true']\n",
    "impossible_date.yaml": b"gateway:\n  id: 2001-02-30\n",
    "huge_int.yaml": ("mqtt:\n  port: " + "9" * 5000 + "\n").encode(),
    "recursive.yaml": b"gateway: &g {id: *g}\n",
    "not_utf8.yaml": b"gateway: {id: \xff}\n",
    "nan_limit.yaml": NASTIES["nan_limit"][0].encode(),
    "bad_template.yaml": NASTIES["format_spec_on_text"][0].encode(),
    "nul_file_name.yaml": NASTIES["nul_in_file_name"][0].encode(),
}


@pytest.mark.parametrize("name", sorted(CHECK_CASES))
def test_check_command_reports_without_traceback(tmp_path: Path, name: str) -> None:
    path = tmp_path / name
    path.write_bytes(CHECK_CASES[name])
    code, output = _run_check(path)
    assert code == 2, output
    assert "Traceback" not in output
    assert f"{path}:" in output and "error(s)" in output


@settings(FUZZ, max_examples=10)
@given(st.lists(mutation, min_size=1, max_size=3))
def test_check_command_on_mutated_maps(fuzz_file: Path, mutations: list[Mutation]) -> None:
    """A mutated map either checks (0) or is reported (2); an exception would escape main()."""
    fuzz_file.write_text(_mutated(mutations), encoding="utf-8")
    code, output = _run_check(fuzz_file)
    assert code in (0, 2), output
    assert "Traceback" not in output
    if code == 2:
        assert f"{fuzz_file}:" in output
