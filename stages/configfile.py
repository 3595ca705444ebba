"""How a YAML file becomes a typed object: stage configs, mixtures, example sets, corpus
recipes and schedules all load through `load_config`, with `key.sub=value` overrides for stage
configs. Unknown keys are rejected, and every error names the file, the field, the bad value and
what is allowed, so a typo fails in a second instead of after an hour of training. Free of
torch: flows import it.
"""

from __future__ import annotations

import base64
import difflib
import json
import os
import re
from pathlib import Path
from typing import Any, Iterable, Iterator

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError


class ConfigError(ValueError):
    """A configuration problem, worded for the person who wrote the YAML."""


class DataError(ValueError):
    """A data problem found before training, naming the file (and line) and what is wrong."""


class Strict(BaseModel):
    # extra="forbid" turns a misspelt key into an error instead of a silently ignored default.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


REPO_ROOT = Path(__file__).resolve().parent.parent


def find_file(path: str | os.PathLike) -> Path:
    """Config paths are relative to the working directory, else to the alignflow checkout."""
    p = Path(path)
    if p.is_absolute() or p.exists():
        return p
    return REPO_ROOT / p if (REPO_ROOT / p).exists() else p


def jsonl_rows(lines: Iterable[bytes | str], where: str) -> Iterator[tuple[str, dict]]:
    """(`file:line`, row) for each non-blank line of a JSON-lines file, given as raw byte
    lines (or decoded ones). Text that is not UTF-8, a line that is not JSON, or a value that
    is not an object is a DataError naming the line, so a bad row fails in its reader, not deep
    in a rank."""
    for i, raw in enumerate(lines, 1):
        if not raw.strip():
            continue
        at = f"{where}:{i}"
        try:
            line = raw.decode("utf-8") if isinstance(raw, bytes) else raw
        except UnicodeDecodeError as e:
            raise DataError(f"{at}: not UTF-8 text (byte {raw[e.start:e.start + 1]!r} at column "
                            f"{e.start + 1}); re-encode the file as UTF-8") from None
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{at}: not valid JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(row, dict):
            raise DataError(f"{at}: each line must be a JSON object, got "
                            f"{type(row).__name__}")
        yield at, row


def read_jsonl(path: str | os.PathLike) -> Iterator[tuple[str, dict]]:
    with open(path, "rb") as f:
        yield from jsonl_rows(f, str(path))


def read_text(path: str | os.PathLike) -> str:
    """A UTF-8 text file; other bytes are a DataError naming the line, not mojibake."""
    blob = Path(path).read_bytes()
    try:
        return blob.decode("utf-8")
    except UnicodeDecodeError as e:
        line = blob.count(b"\n", 0, e.start) + 1
        raise DataError(f"{path}:{line}: not UTF-8 text (byte {blob[e.start:e.start + 1]!r}); "
                        f"re-encode the file as UTF-8") from None


def text_value(row: dict, key: str, at: str) -> str | None:
    """row[key] as text: a string, or None when absent or null; anything else (a number, a
    list) is a DataError, since str() would train on its repr without anyone noticing."""
    value = row.get(key)
    if value is None or isinstance(value, str):
        return value
    raise DataError(f"{at}: field '{key}' must be text, got {type(value).__name__} "
                    f"{_short(value)}")


def number_value(row: dict, key: str, at: str) -> float:
    value = row.get(key)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    raise DataError(f"{at}: field '{key}' must be a number, got {type(value).__name__} "
                    f"{_short(value)}")


def _short(value: Any) -> str:
    text = json.dumps(value, ensure_ascii=False, default=str)
    return text if len(text) <= 40 else text[:37] + "..."


def load_config(schema: type[Strict], path: str | os.PathLike, overrides: list[str] = (),
                what: str = "config file") -> Any:
    """Read `path`, apply `key.sub=value` overrides, validate against `schema`: the one way a
    YAML file (stage config, mixture, example set, corpus recipe, schedules) becomes a typed
    object, with errors that name the file, the field, the value and what is allowed."""
    path = Path(path)
    found = find_file(path)
    if not found.is_file():
        raise ConfigError(f"{path}: {what} not found")
    raw = read_yaml(found, path) or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: top level must be a mapping of fields, got {type(raw).__name__}")
    from_cli = set()
    for item in overrides:
        key, value = _parse_override(item)
        annotation = _check_key(schema, key.split("."), f"{path}: override '{item}'")
        if annotation in (str, str | None) and value is not None and not isinstance(value, str):
            value = item.split("=", 1)[1]   # a digest of digits is a name, not a number
        _set_dotted(raw, key, value)
        from_cli.add(key)
    try:
        return schema.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(_explain(path, schema, e, from_cli)) from None


def read_yaml(found: Path, path: str | os.PathLike | None = None) -> Any:
    """The parsed YAML of a file; a syntax error is a ConfigError naming it and the line."""
    try:
        return yaml.safe_load(found.read_text())
    except UnicodeDecodeError:
        raise ConfigError(f"{path or found}: not UTF-8 text") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path or found}: not valid YAML: {e}") from None


ENCODED = "--override-b64="
_SHELL_SAFE = re.compile(r"[\w@%+=:,./-]+")


def shell_safe(item: str) -> str:
    """An override that survives any remote shell. DeepSpeed's multi-node runners join the
    arguments into one shell command unquoted (pdsh wraps only those with spaces), so `$`, `;`
    or quotes in a value would be interpreted there; such an item travels base64-encoded."""
    if _SHELL_SAFE.fullmatch(item):
        return item
    return ENCODED + base64.urlsafe_b64encode(item.encode()).decode()


def parse_stage_args(schema: type[Strict], argv: list[str]) -> tuple[Any, Path, list[str]]:
    """Parse `--config FILE [key=value ...]` as the stage scripts receive it from deepspeed."""
    # The deepspeed launcher appends --local_rank=N; the rank is read from the environment.
    args = [base64.urlsafe_b64decode(a[len(ENCODED):]).decode() if a.startswith(ENCODED) else a
            for a in argv if not a.startswith("--local_rank")]
    if len(args) < 2 or args[0] != "--config":
        raise ConfigError("usage: --config FILE [key.sub=value ...]")
    path, overrides = Path(args[1]), args[2:]
    return load_config(schema, path, overrides), path, overrides


def _parse_override(item: str) -> tuple[str, Any]:
    if "=" not in item or not re.match(r"^[A-Za-z_][\w.]*=", item):
        raise ConfigError(f"override '{item}' is not of the form key.sub=value")
    key, text = item.split("=", 1)
    # YAML parsing gives `lr=3e-4` a float and `zero_stage=2` an int, as in the file.
    try:
        return key, yaml.safe_load(text) if text != "" else None
    except yaml.YAMLError:
        return key, text


def _check_key(schema: type[BaseModel], parts: list[str], where: str) -> Any:
    """The annotation of the field at `parts`, or a ConfigError naming the unknown part."""
    model: Any = schema
    annotation = None
    for i, part in enumerate(parts):
        fields = getattr(model, "model_fields", None)
        if fields is None:
            raise ConfigError(f"{where}: '{'.'.join(parts[:i])}' is a value, not a section")
        if part not in fields:
            raise ConfigError(f"{where}: unknown field '{'.'.join(parts[:i + 1])}'"
                              f"{_suggest(part, fields)}")
        annotation = fields[part].annotation
        model = _submodel(annotation)
    return annotation


def _submodel(annotation: Any) -> Any:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()):
        if isinstance(arg, type) and issubclass(arg, BaseModel):
            return arg
    return None


def _set_dotted(raw: dict, key: str, value: Any) -> None:
    node = raw
    *parents, last = key.split(".")
    for p in parents:
        if not isinstance(node.get(p), dict):
            node[p] = {}
        node = node[p]
    node[last] = value


def _suggest(name: str, fields: dict) -> str:
    close = difflib.get_close_matches(name, list(fields), n=1)
    hint = f"; did you mean '{close[0]}'?" if close else ""
    return f"{hint} Allowed: {', '.join(fields)}"


def _explain(path: Path, schema: type[BaseModel], err: ValidationError, from_cli: set[str]) -> str:
    lines = [f"{path}: invalid {schema.__name__} ({err.error_count()} problem(s))"]
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"])
        origin = " (set on the command line)" if loc in from_cli else ""
        if e["type"] == "extra_forbidden":
            parent = _model_at(schema, e["loc"][:-1])
            fields = parent.model_fields if parent else {}
            lines.append(f"  {loc}: unknown field{origin}{_suggest(str(e['loc'][-1]), fields)}")
        elif e["type"] == "missing":
            lines.append(f"  {loc}: required field is missing")
        elif isinstance(e.get("input"), dict):
            # A rule across fields (a model validator): its input is a whole section, and the
            # message already names the fields; the dump would only bury it.
            lines.append(f"  {loc + ': ' if loc else ''}{e['msg'].removeprefix('Value error, ')}")
        else:
            where = f"{loc}: " if loc else ""
            lines.append(f"  {where}got {e.get('input')!r}{origin}: {e['msg']}")
    return "\n".join(lines)


def _model_at(schema: type[BaseModel], loc: tuple) -> Any:
    model: Any = schema
    for part in loc:
        fields = getattr(model, "model_fields", {})
        if part not in fields:
            return None
        model = _submodel(fields[part].annotation)
    return model


def resolved(cfg: BaseModel) -> dict:
    """The fully resolved config as plain JSON data, as stored in every manifest."""
    return cfg.model_dump(mode="json")
