"""Read the roads file and validate each road against roads.schema.json: the one reader of the roads file.

This one file serves both sides: the DAGs import it as `answersheet_roadsfile` (git-synced dags/, the
stock Airflow image) and the stage CLI as `answersheet.roadsfile` (src/answersheet/roadsfile.py is a symlink to
this file, so the wheel and the images ship these bytes). So it imports only the stdlib, PyYAML and
jsonschema (an Airflow dependency). Each problem is one line: `road 'x': key 'detect.conf_thres': problem`,
built from the jsonschema error's path; the schema's non-standard `errorMessage` (ajv-errors' keyword) gives
the problem text where the generic one would be vague (patterns, alternatives).
"""

from __future__ import annotations

import copy
import json
import math
import zoneinfo
from pathlib import Path
from typing import Any

import yaml
from jsonschema import Draft202012Validator, FormatChecker, validators
from jsonschema.exceptions import ValidationError, best_match

SCHEMA_PATH = Path(__file__).with_name("roads.schema.json")
SCHEMA: dict[str, Any] = json.loads(SCHEMA_PATH.read_text(encoding="utf-8"))
ROAD_SCHEMA: dict[str, Any] = SCHEMA["$defs"]["road"]
ROAD_KEYS = tuple(ROAD_SCHEMA["properties"])


class RoadsFileError(ValueError):
    """A problem in the roads file; the message names the file or the road and the key."""


def _finite(checker, value) -> bool:
    """JSON numbers are finite: YAML's `.nan` passes every `minimum`/`maximum` (comparisons with nan are
    false) and `.inf` every `minimum`, so `conf_thres: .nan` would publish a sheet without boxes and
    `max_ratio: .inf` would switch the zip-bomb guard off."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _integer(checker, value) -> bool:
    """An int, not a float that happens to be whole (`imgsz: 640.0` is a typo, not an image size)."""
    return isinstance(value, int) and not isinstance(value, bool)


_FORMATS = FormatChecker()


@_FORMATS.checks("iana-time-zone", raises=(ValueError, zoneinfo.ZoneInfoNotFoundError))
def _time_zone(value: object) -> bool:
    return not isinstance(value, str) or zoneinfo.ZoneInfo(value) is not None


_FORMATS.checks("date", raises=ValueError)(Draft202012Validator.FORMAT_CHECKER.checkers["date"][0])
_Validator = validators.extend(Draft202012Validator, type_checker=Draft202012Validator.TYPE_CHECKER.redefine_many(
    {"number": _finite, "integer": _integer}))
_ROAD = _Validator({"$defs": SCHEMA["$defs"], "$ref": "#/$defs/road"}, format_checker=_FORMATS)


class _Loader(yaml.SafeLoader):
    """YAML without the timestamp type: `start_date: 2026-11-02` stays the string the schema checks."""


_Loader.yaml_implicit_resolvers = {
    ch: [r for r in rs if r[0] != "tag:yaml.org,2002:timestamp"]
    for ch, rs in yaml.SafeLoader.yaml_implicit_resolvers.items()
}


def deep_merge(base: dict, over: dict) -> dict:
    """base updated by over, recursing into mappings (lists are replaced), as helm merges values."""
    out = copy.deepcopy(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def schema_default(*path: str) -> Any:
    """The schema's `default` of one road key, by its path (e.g. "detect", "shards")."""
    node = ROAD_SCHEMA
    for key in path:
        node = node["properties"][key]
    return copy.deepcopy(node["default"])


def schema_defaults(section: str) -> dict[str, Any]:
    """The schema's `default` of each key of a road section (e.g. `schedule`)."""
    props = ROAD_SCHEMA["properties"][section]["properties"]
    return {key: copy.deepcopy(sub["default"]) for key, sub in props.items() if "default" in sub}


def fail(road: Any, key: str, problem: str) -> RoadsFileError:
    return RoadsFileError(f"road {road!r}: key {key!r}: {problem}")


def _one_line(text: object) -> str:
    return " ".join(str(text).split())


def _read_text(p: Path) -> str:
    """The roads file as text; every way it can be unreadable is one line naming the file."""
    try:
        raw = p.read_bytes()
    except FileNotFoundError:
        raise RoadsFileError(f"{p}: roads file not found") from None
    except IsADirectoryError:
        raise RoadsFileError(f"{p}: is a directory, not a roads file") from None
    except OSError as exc:
        raise RoadsFileError(f"{p}: cannot read the roads file: {exc.strerror or exc}") from None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        raise RoadsFileError(f"{p}: line {line}: not UTF-8 text (byte 0x{raw[exc.start]:02x}); "
                             "save the roads file as UTF-8") from None


def _yaml_error(p: Path, exc: yaml.YAMLError) -> RoadsFileError:
    """PyYAML's multi-line message as one line: file, line, column, problem."""
    mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    problem = " ".join(x for x in (getattr(exc, "context", None), getattr(exc, "problem", None)) if x)
    return RoadsFileError(f"{p}: {where}not valid YAML: {_one_line(problem or exc)}")


def read_roads(path: str | Path) -> list[dict]:
    """Each road's raw mapping with `defaults` deep-merged in (not yet validated: see check_road)."""
    p = Path(path)
    text = _read_text(p)
    try:
        doc = yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader
    except yaml.YAMLError as exc:
        raise _yaml_error(p, exc) from None
    if not isinstance(doc, dict) or not isinstance(doc.get("roads"), list):
        raise RoadsFileError(f"{p}: expected a mapping with a 'roads' list")
    unknown = [k for k in doc if k not in SCHEMA["properties"]]
    if unknown:
        raise RoadsFileError(f"{p}: unknown top-level key(s) {unknown} (allowed: defaults, roads)")
    defaults = doc.get("defaults") or {}
    if not isinstance(defaults, dict):
        raise RoadsFileError(f"{p}: 'defaults' must be a mapping")
    roads = []
    for i, road in enumerate(doc["roads"]):
        if not isinstance(road, dict):
            raise RoadsFileError(f"{p}: roads[{i}] must be a mapping")
        roads.append(deep_merge(defaults, road))
    return roads


_TYPES = {"integer": "an integer", "number": "a finite number", "string": "a string", "boolean": "true or false",
          "object": "a mapping", "array": "a list", "null": "null"}


def _bounds(schema: dict) -> str:
    low = schema.get("minimum", schema.get("exclusiveMinimum"))
    high = schema.get("maximum")
    if low is not None and high is not None:
        return f" in [{low:g}, {high:g}]"
    if low is not None:
        return f" {'>' if 'exclusiveMinimum' in schema else '>='} {low:g}"
    return ""


def _problem(error: ValidationError) -> tuple[list, str]:
    """(path, problem) of one jsonschema error, in the words of the roads file's messages."""
    path, schema, value, kind = list(error.absolute_path), error.schema, error.instance, error.validator
    custom = schema.get("errorMessage") if isinstance(schema, dict) else None
    if kind == "additionalProperties":
        allowed = list(schema.get("properties", {}))
        path.append(next(k for k in value if k not in allowed))
        return path, f"unknown key (allowed: {', '.join(allowed)})"
    if kind == "required":
        path.append(next(k for k in error.validator_value if k not in value))
        return path, custom or "required"
    if custom:
        return path, f"{custom}, got {value!r}"
    if kind in ("minimum", "maximum", "exclusiveMinimum"):
        return path, f"must be{_bounds(schema)}, got {value!r}"
    if kind == "type":
        types = schema["type"] if isinstance(schema["type"], list) else [schema["type"]]
        return path, f"must be {' or '.join(_TYPES[t] for t in types)}{_bounds(schema)}, got {value!r}"
    if kind == "enum":
        return path, f"must be one of {tuple(schema['enum'])!r}, got {value!r}"
    if kind == "uniqueItems":
        return path, "has duplicates"
    if kind == "minItems" and schema["minItems"] == 1:
        return path, "must not be empty"
    if kind == "multipleOf":
        return path, f"must be a multiple of {schema['multipleOf']}, got {value!r}"
    return path, _one_line(error.message)


def road_error(raw: dict) -> str | None:
    """The first problem of one merged road as `road 'x': key 'a.b': problem`, or None when it is valid."""
    error = next(iter(_ROAD.iter_errors(raw)), None)
    if error is None:
        return None
    if error.context and not error.schema.get("errorMessage"):  # anyOf without a message: its best branch
        error = best_match(error.context)
    path, problem = _problem(error)
    if path and isinstance(path[-1], int):  # an item of a list of names: the list is the key
        problem = f"item {path.pop()}: {problem}"
    key = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in path).lstrip(".")
    road = raw.get("id")
    return f"road {road!r}: key {key!r}: {problem}"


def check_road(raw: dict) -> None:
    """RoadsFileError naming the road and the key when the merged road does not match the schema."""
    problem = road_error(raw)
    if problem:
        raise RoadsFileError(problem)
