"""How a YAML file becomes a typed object: stage configs, mixtures, example sets, corpus
recipes and schedules all load through `load_config`, with `key.sub=value` overrides for stage
configs. Unknown keys are rejected, and every error names the file, the field, the bad value and
what is allowed, so a typo fails in a second instead of after an hour of training. Free of
torch: flows import it.
"""

from __future__ import annotations

import difflib
import os
import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError


class ConfigError(ValueError):
    """A configuration problem, worded for the person who wrote the YAML."""


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


def load_config(schema: type[Strict], path: str | os.PathLike, overrides: list[str] = (),
                what: str = "config file") -> Any:
    """Read `path`, apply `key.sub=value` overrides, validate against `schema`: the one way a
    YAML file (stage config, mixture, example set, corpus recipe, schedules) becomes a typed
    object, with errors that name the file, the field, the value and what is allowed."""
    path = Path(path)
    found = find_file(path)
    if not found.is_file():
        raise ConfigError(f"{path}: {what} not found")
    try:
        raw = yaml.safe_load(found.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
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


def parse_stage_args(schema: type[Strict], argv: list[str]) -> tuple[Any, Path, list[str]]:
    """Parse `--config FILE [key=value ...]` as the stage scripts receive it from deepspeed."""
    # The deepspeed launcher appends --local_rank=N; the rank is read from the environment.
    args = [a for a in argv if not a.startswith("--local_rank")]
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
