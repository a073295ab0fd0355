"""Tests for drivers/modbus/planner.py: table cases and properties against a reference DP."""

from __future__ import annotations

from collections import Counter
from itertools import groupby

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from drivers.modbus.planner import Limits, PlanError, Point, ReadRequest, plan
from drivers.modbus.types import ADDRESS_SPACE, MAX_READ_BITS, MAX_READ_REGISTERS, Table

H, I, C, D = Table.HOLDING, Table.INPUT, Table.COIL, Table.DISCRETE


def pt(key: str, address: int, count: int = 1, table: Table = H, unit: int = 1) -> Point:
    return Point(key, unit, table, address, count)


def shape(requests: list[ReadRequest]) -> list[tuple[int, Table, int, int, dict[str, int]]]:
    return [(r.unit, r.table, r.address, r.count, dict(r.points)) for r in requests]


# --------------------------------------------------------------------------------------------
# Table tests.
# --------------------------------------------------------------------------------------------


def test_empty_plan() -> None:
    assert plan([]) == []


def test_single_point() -> None:
    assert shape(plan([pt("a", 40, 2)])) == [(1, H, 40, 2, {"a": 0})]


def test_contiguous_tags_merge() -> None:
    reqs = plan([pt("a", 0), pt("b", 1, 2), pt("c", 3, 4), pt("d", 7)])
    assert shape(reqs) == [(1, H, 0, 8, {"a": 0, "b": 1, "c": 3, "d": 7})]


def test_input_order_does_not_matter() -> None:
    points = [pt("d", 7), pt("b", 1, 2), pt("a", 0), pt("c", 3, 4)]
    assert shape(plan(points)) == shape(plan(sorted(points, key=lambda p: p.address)))


def test_gap_with_default_limits_splits() -> None:
    reqs = plan([pt("a", 0), pt("b", 2)])
    assert shape(reqs) == [(1, H, 0, 1, {"a": 0}), (1, H, 2, 1, {"b": 0})]


@pytest.mark.parametrize(
    ("max_gap", "second", "expected"),
    [
        # a = registers 10..11 (end 12); the hole is second - 12.
        (3, 15, [(1, H, 10, 6, {"a": 0, "b": 5})]),  # hole 3 == max_gap: merge
        (3, 16, [(1, H, 10, 2, {"a": 0}), (1, H, 16, 1, {"b": 0})]),  # hole 4 > max_gap: split
        (0, 12, [(1, H, 10, 3, {"a": 0, "b": 2})]),  # adjacent, no hole
        (0, 13, [(1, H, 10, 2, {"a": 0}), (1, H, 13, 1, {"b": 0})]),
        (20, 32, [(1, H, 10, 23, {"a": 0, "b": 22})]),
        (20, 33, [(1, H, 10, 2, {"a": 0}), (1, H, 33, 1, {"b": 0})]),
    ],
)
def test_gap_threshold(max_gap: int, second: int, expected: list[object]) -> None:
    reqs = plan([pt("a", 10, 2), pt("b", second)], Limits(max_gap=max_gap))
    assert shape(reqs) == expected


def test_gap_is_measured_from_the_furthest_end_so_far() -> None:
    # a covers 0..9; b (inside a) ends at 3; c at 10 is adjacent to a's end, not b's.
    reqs = plan([pt("a", 0, 10), pt("b", 2, 2), pt("c", 10)])
    assert shape(reqs) == [(1, H, 0, 11, {"a": 0, "b": 2, "c": 10})]


def test_two_bit_in_register_tags_on_one_register_merge() -> None:
    reqs = plan([pt("run", 100), pt("fault", 100)])
    assert shape(reqs) == [(1, H, 100, 1, {"run": 0, "fault": 0})]


def test_uint32_overlapping_a_uint16_merges() -> None:
    reqs = plan([pt("u16", 11), pt("u32", 10, 2)])
    assert shape(reqs) == [(1, H, 10, 2, {"u32": 0, "u16": 1})]
    assert sorted(k for r in reqs for k, _ in r.points) == ["u16", "u32"]


def test_identical_points_are_each_covered_once() -> None:
    reqs = plan([pt("x", 5, 4), pt("y", 5, 4), pt("z", 6, 2)])
    assert shape(reqs) == [(1, H, 5, 4, {"x": 0, "y": 0, "z": 1})]
    assert Counter(k for r in reqs for k, _ in r.points) == Counter({"x": 1, "y": 1, "z": 1})


def test_different_tables_never_merge() -> None:
    points = [pt(f"{t}", 0, 1, t) for t in (H, I, C, D)]
    reqs = plan(points, Limits(max_gap=100))
    assert len(reqs) == 4
    assert {(r.table, r.address, r.count, r.points) for r in reqs} == {
        (t, 0, 1, ((f"{t}", 0),)) for t in (H, I, C, D)
    }


def test_different_units_never_merge() -> None:
    reqs = plan([pt("a", 0, unit=1), pt("b", 1, unit=2), pt("c", 1, unit=1)], Limits(max_gap=10))
    assert shape(reqs) == [(1, H, 0, 2, {"a": 0, "c": 1}), (2, H, 1, 1, {"b": 0})]


def test_overlapping_tags_split_by_the_limit_give_overlapping_reads() -> None:
    # a = 0..7, b = 5..12: together 13 > 10 registers, so both reads are needed and they overlap.
    reqs = plan([pt("a", 0, 8), pt("b", 5, 8)], Limits(max_registers=10))
    assert shape(reqs) == [(1, H, 0, 8, {"a": 0}), (1, H, 5, 8, {"b": 0})]


def test_register_limit_splits_126_registers() -> None:
    reqs = plan([pt(f"r{i}", i) for i in range(126)])
    assert [(r.address, r.count, len(r.points)) for r in reqs] == [(0, 125, 125), (125, 1, 1)]
    assert dict(reqs[0].points)["r124"] == 124
    assert dict(reqs[1].points) == {"r125": 0}


def test_register_limit_exactly_125_is_one_request() -> None:
    reqs = plan([pt("first", 0), pt("last", 124)], Limits(max_gap=200))
    assert shape(reqs) == [(1, H, 0, MAX_READ_REGISTERS, {"first": 0, "last": 124})]
    reqs = plan([pt("first", 0), pt("last", 125)], Limits(max_gap=200))
    assert shape(reqs) == [(1, H, 0, 1, {"first": 0}), (1, H, 125, 1, {"last": 0})]


def test_register_limit_counts_the_end_of_a_wide_tag() -> None:
    # 0..123 single registers then a uint32 at 124..125: 126 registers -> the uint32 moves on.
    points = [pt(f"r{i}", i) for i in range(124)] + [pt("wide", 124, 2)]
    reqs = plan(points)
    assert [(r.address, r.count) for r in reqs] == [(0, 124), (124, 2)]
    assert dict(reqs[1].points) == {"wide": 0}


@pytest.mark.parametrize("table", [C, D])
def test_bit_limit_splits_2001_bits(table: Table) -> None:
    reqs = plan([pt(f"b{i}", i, table=table) for i in range(2001)])
    assert [(r.table, r.address, r.count, len(r.points)) for r in reqs] == [
        (table, 0, MAX_READ_BITS, 2000),
        (table, 2000, 1, 1),
    ]


def test_bit_tables_are_not_bound_by_the_register_limit() -> None:
    reqs = plan([pt(f"b{i}", i, table=C) for i in range(500)])
    assert [(r.address, r.count) for r in reqs] == [(0, 500)]


def test_custom_register_limit() -> None:
    reqs = plan([pt(f"r{i}", i) for i in range(25)], Limits(max_registers=10))
    assert [(r.address, r.count) for r in reqs] == [(0, 10), (10, 10), (20, 5)]
    assert all(dict(r.points) == {f"r{r.address + k}": k for k in range(r.count)} for r in reqs)


def test_custom_bit_limit() -> None:
    reqs = plan([pt(f"c{i}", i, table=C) for i in range(7)], Limits(max_bits=3))
    assert [(r.address, r.count) for r in reqs] == [(0, 3), (3, 3), (6, 1)]


def test_custom_limit_with_gaps_and_wide_tags() -> None:
    limits = Limits(max_gap=2, max_registers=10)
    points = [pt("a", 100, 2), pt("b", 104, 4), pt("c", 108, 2), pt("d", 111, 2), pt("e", 115)]
    reqs = plan(points, limits)
    # a..c span 100..109 (10 registers); d would make 13 -> new request; e: hole 2 -> merges.
    assert shape(reqs) == [
        (1, H, 100, 10, {"a": 0, "b": 4, "c": 8}),
        (1, H, 111, 5, {"d": 0, "e": 4}),
    ]


def test_offsets_inside_requests() -> None:
    points = [pt("a", 1000, 2), pt("b", 1003), pt("c", 1004, 4), pt("d", 1010, 2), pt("e", 2000)]
    reqs = plan(points, Limits(max_gap=2))
    assert shape(reqs) == [
        (1, H, 1000, 12, {"a": 0, "b": 3, "c": 4, "d": 10}),
        (1, H, 2000, 1, {"e": 0}),
    ]


def test_highest_address_is_allowed() -> None:
    assert shape(plan([pt("top", 65535)])) == [(1, H, 65535, 1, {"top": 0})]
    assert shape(plan([pt("top", 65534, 2)])) == [(1, H, 65534, 2, {"top": 0})]


@pytest.mark.parametrize(
    ("point", "limits"),
    [
        (pt("big", 0, 126), Limits()),
        (pt("big", 0, 11), Limits(max_registers=10)),
        (pt("bits", 0, 2001, C), Limits()),
        (pt("bits", 0, 4, D), Limits(max_bits=3)),
        (pt("zero", 0, 0), Limits()),
        (pt("past", 65535, 2), Limits()),
        (pt("past", 65530, 10), Limits()),
        (pt("past", 65536, 1), Limits()),
        (pt("neg", -1, 1), Limits()),
    ],
)
def test_plan_error(point: Point, limits: Limits) -> None:
    with pytest.raises(PlanError, match=point.key):
        plan([pt("ok", 0), point], limits)


def test_request_str() -> None:
    (req,) = plan([pt("a", 3, 2)])
    assert str(req) == "unit 1 holding 3+2 (1 tags)"


# --------------------------------------------------------------------------------------------
# Properties.
# --------------------------------------------------------------------------------------------


def min_requests(points: list[Point], max_gap: int, size: int) -> int:
    """Reference DP: fewest consecutive runs (in (address, end) order) that are each valid reads."""
    pts = sorted(points, key=lambda p: (p.address, p.end))
    n = len(pts)
    best = [0] + [n + 1] * n  # best[i]: fewest requests covering pts[:i]
    for i in range(n):
        start, end = pts[i].address, pts[i].end
        for j in range(i, n):
            if j > i:
                if pts[j].address - end > max_gap:
                    break
                end = max(end, pts[j].end)
            if end - start > size:
                break
            best[j + 1] = min(best[j + 1], best[i] + 1)
    return best[n]


def brute_min_requests(points: list[Point], max_gap: int, size: int) -> int:
    """Same rules by exhaustive search over all cut positions (cross-checks the DP itself)."""
    pts = sorted(points, key=lambda p: (p.address, p.end))
    n = len(pts)

    def valid(run: list[Point]) -> bool:
        end = run[0].end
        for p in run[1:]:
            if p.address - end > max_gap:
                return False
            end = max(end, p.end)
        return end - run[0].address <= size

    best = n
    for mask in range(1 << (n - 1)):
        runs, cur = [], [pts[0]]
        for k in range(1, n):
            if mask >> (k - 1) & 1:
                runs.append(cur)
                cur = []
            cur.append(pts[k])
        runs.append(cur)
        if all(valid(r) for r in runs):
            best = min(best, len(runs))
    return best


@st.composite
def scenarios(draw: st.DrawFn, max_points: int = 40,
              units: tuple[int, ...] = (0, 1, 2),
              tables: tuple[Table, ...] = (H, I, C, D)) -> tuple[list[Point], Limits]:
    limits = Limits(
        max_gap=draw(st.integers(0, 20), label="max_gap"),
        max_registers=draw(st.integers(8, MAX_READ_REGISTERS), label="max_registers"),
        max_bits=draw(st.integers(1, MAX_READ_BITS), label="max_bits"),
    )
    near_top = draw(st.booleans(), label="near_top")
    base = ADDRESS_SPACE - 400 if near_top else 0
    n = draw(st.integers(1, max_points), label="n")
    points = []
    for i in range(n):
        table = draw(st.sampled_from(tables))
        count = 1 if table.is_bits else draw(st.integers(1, 8))
        address = base + draw(st.integers(0, 400 - count))
        points.append(Point(f"k{i}", draw(st.sampled_from(units)), table, address, count))
    return points, limits


def check_plan(points: list[Point], limits: Limits, reqs: list[ReadRequest]) -> None:
    by_key = {p.key: p for p in points}
    covered = Counter(k for r in reqs for k, _ in r.points)
    assert covered == Counter(list(by_key)), "every point exactly once"

    for r in reqs:
        assert r.points, "no empty request"
        assert 1 <= r.count <= limits.size(r.table)
        assert r.address >= 0 and r.address + r.count <= ADDRESS_SPACE
        members = [by_key[k] for k, _ in r.points]
        for (_key, offset), p in zip(r.points, members, strict=True):
            assert (p.unit, p.table) == (r.unit, r.table)
            assert offset >= 0
            assert offset + p.count <= r.count
            assert r.address + offset == p.address
        # The read is exactly the hull of its points (no wasted registers at either end).
        assert r.address == min(p.address for p in members)
        assert r.address + r.count == max(p.end for p in members)
        # Inside the read, no hole between points is larger than max_gap.
        ordered = sorted(members, key=lambda p: (p.address, p.end))
        end = ordered[0].end
        for p in ordered[1:]:
            assert p.address - end <= limits.max_gap
            end = max(end, p.end)

    # Groups are contiguous in the output, and sorted by address inside each group.
    keys = [(r.unit, r.table) for r in reqs]
    assert len(set(keys)) == len([k for k, _ in groupby(keys)]), "each unit/table in one run"
    for _, group in groupby(reqs, key=lambda r: (r.unit, r.table)):
        rs = list(group)
        for prev, nxt in zip(rs, rs[1:], strict=False):
            assert prev.address < nxt.address
            if nxt.address < prev.address + prev.count:
                # Reads may overlap only when tags themselves do: the first tag of the next read
                # overlaps a tag of the previous one, so neither read could have been shortened.
                first = by_key[nxt.points[0][0]]
                assert first.address == nxt.address
                assert any(
                    by_key[k].address <= first.address < by_key[k].end for k, _ in prev.points
                )


@settings(max_examples=300, deadline=None)
@given(scenarios())
def test_plan_properties(scenario: tuple[list[Point], Limits]) -> None:
    points, limits = scenario
    check_plan(points, limits, plan(points, limits))


@settings(max_examples=200, deadline=None)
@given(scenarios())
def test_plan_is_deterministic_and_order_independent(scenario: tuple[list[Point], Limits]) -> None:
    points, limits = scenario
    assert plan(points, limits) == plan(list(reversed(points)), limits)


@settings(max_examples=150, deadline=None)
@given(data=st.data())
def test_requests_do_not_overlap_when_tags_do_not(data: st.DataObject) -> None:
    limits = Limits(
        max_gap=data.draw(st.integers(0, 20)), max_registers=data.draw(st.integers(8, 125))
    )
    counts = data.draw(st.lists(st.integers(1, 8), min_size=1, max_size=40))
    holes = data.draw(st.lists(st.integers(0, 25), min_size=len(counts), max_size=len(counts)))
    points, address = [], 0
    for i, (count, hole) in enumerate(zip(counts, holes, strict=True)):
        address += hole
        points.append(pt(f"k{i}", address, count))
        address += count
    reqs = plan(data.draw(st.permutations(points)), limits)
    check_plan(points, limits, reqs)
    for prev, nxt in zip(reqs, reqs[1:], strict=False):
        assert prev.address + prev.count <= nxt.address


@settings(max_examples=500, deadline=None)
@given(scenarios(max_points=8, units=(1,), tables=(H,)))
def test_register_plan_is_minimal(scenario: tuple[list[Point], Limits]) -> None:
    points, limits = scenario
    reqs = plan(points, limits)
    check_plan(points, limits, reqs)
    assert len(reqs) == min_requests(points, limits.max_gap, limits.max_registers)


@settings(max_examples=500, deadline=None)
@given(
    points=st.lists(
        st.tuples(st.integers(0, 30), st.integers(1, 8)), min_size=1, max_size=8
    ).map(lambda xs: [pt(f"k{i}", a, c) for i, (a, c) in enumerate(xs)]),
    max_gap=st.integers(0, 20),
    size=st.integers(8, 16),
)
def test_plan_is_minimal_with_tight_limits(points: list[Point], max_gap: int, size: int) -> None:
    limits = Limits(max_gap=max_gap, max_registers=size)
    reqs = plan(points, limits)
    check_plan(points, limits, reqs)
    expected = min_requests(points, max_gap, size)
    assert expected == brute_min_requests(points, max_gap, size)
    assert len(reqs) == expected


@settings(max_examples=300, deadline=None)
@given(
    addresses=st.lists(st.integers(0, 40), min_size=1, max_size=8),
    max_gap=st.integers(0, 20),
    max_bits=st.integers(1, 12),
)
def test_bit_plan_is_minimal(addresses: list[int], max_gap: int, max_bits: int) -> None:
    points = [pt(f"c{i}", a, 1, C) for i, a in enumerate(addresses)]
    limits = Limits(max_gap=max_gap, max_bits=max_bits)
    reqs = plan(points, limits)
    check_plan(points, limits, reqs)
    assert len(reqs) == min_requests(points, max_gap, max_bits)
