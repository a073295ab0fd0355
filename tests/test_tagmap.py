"""The tag map: the plant map loads; every broken map fails with file, line and field."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.cli import main
from gateway.tagmap import SourceError, load_tag_map, load_tag_map_text

from .conftest import PLANT

BROKEN = Path(__file__).parent / "tagmaps"

# file, then every (line, field path, message fragment) it must report
CASES = {
    "unknown_key.yaml": [(7, "devices[0].polling", "unknown key")],
    "duplicate_asset.yaml": [(10, "assets[1].id", "duplicate id 'filler-1' (also assets[0])")],
    "missing_device.yaml": [(11, "assets[0].tags.units_total.device", "no device 'plc-9'")],
    "bad_count.yaml": [(10, "assets[0].tags.units_total", "count 1 does not fit type uint32")],
    "overlapping_writable.yaml": [
        (10, "assets[0].tags.recipe_number.address", "writable addresses overlap assets[0].tags.speed_setpoint"),
    ],
    "bad_writable.yaml": [
        (3, "commands.writes", "Input should be a valid boolean"),
        (11, "assets[0].tags.speed_setpoint", "a writable number needs min and max"),
        (12, "assets[0].tags.units_total", "input is read-only in Modbus"),
        (13, "assets[0].tags.temperature_sp", "a writable OPC-UA tag needs type"),
    ],
    "bad_interval.yaml": [
        (4, "devices[0].interval", "'fast' is not a duration"),
        (5, "devices[1].interval", "greater than or equal to 0.01"),
    ],
    "several_errors.yaml": [
        (1, "gateway.id", "is not an id"),
        (2, "mqtt.port", "less than or equal to 65535"),
        (5, "devices[1].protocol", "unknown protocol 'profibus'"),
        (10, "assets[0].tags.status.type", "Input should be 'bool'"),
        (11, "assets[0].tags.running", "needs bit"),
        (12, "assets[0].tags.label", "a string needs count"),
    ],
    "duplicate_yaml_key.yaml": [(10, "assets[0].tags.status", "duplicate key (first at line 9)")],
    "syntax_error.yaml": [(3, "", "YAML syntax")],
    "inline_password.yaml": [(5, "mqtt.password", "secrets stay out of the tag map")],
    "bad_derived.yaml": [
        (13, "assets[0].derived.units_total", "'units_total' is also a tag of 'filler-1'"),
        (14, "assets[0].derived.rate", "reads 'units_totl', which is neither a tag nor a derived value"),
    ],
    "derived_cycle.yaml": [(12, "assets[0].derived", "derived values read each other in a cycle: a -> b -> a")],
    "bad_calendar.yaml": [(3, "gateway.timezone", "unknown time zone 'Europe/Madird'")],
    "bad_rule_fields.yaml": [
        (14, "assets[0].rules[0].delay", "'soon' is not a duration"),
        (15, "assets[0].rules[1]", "a target rule needs target (a number) or target_tag"),
    ],
    "bad_report_fields.yaml": [
        (4, "devices[0].max_silence", "greater than or equal to 1"),
        (9, "assets[0].max_silence", "'2d' is not a duration"),
        (11, "assets[0].tags.both", "deadband and deadband_percent: give one"),
        (12, "assets[0].tags.no_range", "deadband_percent is a percent of the tag's range: it needs min and max"),
        (13, "assets[0].tags.flat_range", "deadband_percent needs max above min"),
        (14, "assets[0].tags.running", "deadband_percent applies to numbers; a bool is sent when it changes"),
        (15, "assets[0].tags.status", "deadband 1 on an enum: it is sent when it changes, use deadband: 0"),
        (17, "assets[0].tags.rules_habit.deadband", "'2%': a percent of the tag's range is deadband_percent: 2"),
        (18, "assets[0].tags.quiet.max_silence", "'soon' is not a duration"),
        (19, "assets[0].tags.too_wide.deadband_percent", "less than or equal to 100"),
    ],
    "bad_report_devices.yaml": [
        (4, "devices[0].max_silence", "max_silence needs mode: poll"),
        (13, "assets[0].tags.temperature.max_silence", "device 'ua-1' subscribes: the server sends changes only"),
        (15, "assets[0].tags.pressure.deadband", "device 'ua-2' has deadband_type percent"),
        (11, "assets[0].max_silence", "device 'ua-1' subscribes"),
    ],
    "bad_plant_context.yaml": [
        (15, "assets[0].batch.id", "'batch_no' is not a tag of 'reactor-a'"),
        (15, "assets[0].batch.running[0]", "'heatting' is not a phase of 'status' (its enum: idle, heating, cleaning)"),
        (15, "assets[0].batch.critical[0]", "'batch_id' holds a string: a critical parameter is a number"),
        (22, "assets[1].production.counter", "'unit_count' is not a tag of 'filler'"),
        (22, "assets[1].production.downtime[1]",
         "'eror' is not a status of 'status' (its enum: idle, running, paused)"),
    ],
    "bad_rules.yaml": [
        (14, "assets[0].rules[0].tag", "no tag 'temperatur' in asset 'reactor-a'"),
        (17, "assets[0].rules[3].id", "duplicate rule id 'temperature_high' (also rules[1])"),
        (17, "assets[0].rules[3].when.status", "['heatting'] not among status's values: idle, heating"),
        (18, "assets[0].rules[4].tag", "a low rule needs a numeric tag; 'batch_id' is not"),
        (19, "assets[0].rules[5].target_tag", "no tag 'setpoint'"),
        (16, "assets[0].rules[2].limit", "high_high limit 80.0 of 'temperature' is not above its high limit 85.0"),
    ],
}


def test_every_broken_map_has_a_case() -> None:
    assert {p.name for p in BROKEN.glob("*.yaml")} == set(CASES)


@pytest.mark.parametrize("name", sorted(CASES))
def test_broken_map_names_file_line_and_field(name: str) -> None:
    path = BROKEN / name
    with pytest.raises(SourceError) as info:
        load_tag_map(path)
    problems = info.value.problems
    assert len(problems) == len(CASES[name]), [str(p) for p in problems]
    for problem, (line, field, fragment) in zip(problems, CASES[name], strict=True):
        assert problem.file == str(path)
        assert (problem.line, problem.path) == (line, field), str(problem)
        assert fragment in problem.message, str(problem)
        assert str(problem).startswith(f"{path}:{line}: ")


@pytest.mark.parametrize("name", sorted(CASES))
def test_check_command_fails_on_broken_maps(name: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check", str(BROKEN / name)]) == 2
    err = capsys.readouterr().err
    assert f"{BROKEN / name}:{CASES[name][0][0]}: " in err
    assert f"{len(CASES[name])} error(s)" in err


def test_plant_map_checks_and_reports_requests(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check", "--config", str(PLANT)]) == 0
    out = capsys.readouterr().out
    assert "6 devices, 8 assets, 146 tags" in out
    assert "Modbus requests per cycle: 20" in out
    assert "unit 1 holding 0+36 (17 tags)" in out


def test_plant_map_models_are_frozen() -> None:
    tm = load_tag_map(PLANT)
    with pytest.raises(ValueError, match="frozen"):
        tm.gateway.id = "other"  # type: ignore[misc]
    filling = tm.device("filling-1-plc")
    assert filling.interval == 1.0 and filling.timeout == 0.5
    assert tm.asset("filling-1").tags["units_total"].device == "filling-1-plc"  # asset default device


@pytest.mark.parametrize(
    ("text", "seconds"), [("500ms", 0.5), ("1s", 1.0), ("2m", 120.0), ("1h", 3600.0), ("0.25", 0.25), ("3", 3.0)]
)
def test_durations(tmp_path: Path, text: str, seconds: float) -> None:
    source = PLANT.read_text().replace("interval: 1s, timeout: 500ms", f"interval: {text}, timeout: 10ms", 1)
    path = tmp_path / "plant.yaml"
    path.write_text(source)
    assert load_tag_map(path).device("filling-1-plc").interval == seconds


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=200))
def test_loader_never_crashes_on_arbitrary_text(text: str) -> None:
    """Any text is either a valid map or a list of problems with a line number, never a traceback."""
    try:
        load_tag_map_text(text, "fuzz.yaml")
    except SourceError as exc:
        assert exc.problems
        assert all(p.file == "fuzz.yaml" and p.line >= 1 and p.message for p in exc.problems)


@settings(max_examples=150, deadline=None)
@given(st.lists(st.sampled_from(PLANT.read_text().splitlines()), max_size=40))
def test_loader_never_crashes_on_shuffled_plant_lines(lines: list[str]) -> None:
    """Lines of a real map in random order: plausible YAML that is broken in many ways."""
    try:
        load_tag_map_text("\n".join(lines), "shuffled.yaml")
    except SourceError as exc:
        assert all(p.line >= 1 and p.message for p in exc.problems)
