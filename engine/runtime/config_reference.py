"""Every config key, its default, type and meaning, from the config models themselves: the page
docs/configuration.md is this module's output (``reloop config reference``; a test keeps them equal), so the
reference cannot drift from what the commands accept."""

from __future__ import annotations

import json
import types
import typing
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal, NamedTuple

import annotated_types
from pydantic import BaseModel, SecretStr
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined
from reloop.engine.config_common import model_in

INTRO = """# Configuration reference

Every key the commands read, with its default, its type and what it does; generated from the config
models (`reloop config reference` prints this page; a test keeps the two equal). The guides say when to
change what: [operations.md](operations.md#configuration) (loading, environment overrides, refusals),
[data-plane.md](data-plane.md) (`stages`), [observability.md](observability.md) (`metrics`),
[event-contract.md](event-contract.md) (`serve`, `arms`), [models.md](models.md) (`model`).

* `reloop run`, `join`, `train`, `replay` read a **run config** (below: from `kafka` to `log`);
  `reloop serve` and `reloop simulate` read the **service's file** (`serve`, `arms`, `kafka`, `salt`,
  `simulate`); `reloop demo` reads a file of its own (`deploy/config/demo.yaml`: a run config under `run`,
  the arms with their `train` overrides, `serve`, `simulate`).
* Any key can be set from the environment: `RELOOP__<SECTION>__<KEY>=value` (`RELOOP__TRAIN__BATCH_SIZE=512`),
  over the file. `reloop config show --config FILE` prints a file as the commands read it (defaults
  filled in, the environment applied, secrets hidden); `reloop config check --config FILE` refuses what
  they would refuse.
* "required": no default. A key whose value is a mapping of free keys (`client_config`, `model.params`,
  `simulate.world`) lists none: the table says where its keys come from.
"""

# Mappings read by a model of their own: listed key by key under the mapping's name.
_TYPED_DICTS = {"model.optimizer": "reloop.engine.models.config:OptimizerConfig"}
# Mappings of free keys: what they hold.
_FREE_DICTS = {
    "model.params": "the backbone's own settings (`reloop models --json` lists each backbone's, with "
    "defaults)",
    "model.spec": "the feature spec, inline: fields of kind categorical, numeric or multi (models.md)",
    "simulate.world": "the simulated world's settings (engine/simulate/world.py, WorldConfig)",
}


_NOTHING = object()


class _Row(NamedTuple):
    key: str
    field: FieldInfo
    default: Any  # the value the key takes when not given (_REQUIRED: none)
    absent: Any = _NOTHING  # its value when its whole section is left out, where that differs


_REQUIRED = object()
# The service sets these whatever its file's section holds when the key is not given.
_SERVICE_DEFAULTS = {"kafka.client": "confluent"}


def reference_markdown() -> str:
    from reloop.engine.runtime.config import RunConfig
    from reloop.engine.serve.config import ServeConfig
    from reloop.engine.simulate.config import SimulateConfig

    out = [INTRO, "## The run config\n"]
    for name, field in RunConfig.model_fields.items():
        out += [f"### {name}\n", *_about(field), *_table(list(_rows_of(name, field, _default_of(field))))]
    out += [
        "## The service's file\n",
        "Read by `reloop serve` and `reloop simulate`: `serve` (below, with `serve.log` and `serve.limits`),"
        " then `arms`, `kafka` and `salt` at the top of the file, and `simulate`.\n",
    ]
    fields = ServeConfig.model_fields
    for title, names in (("serve", [k for k in fields if k not in _SERVE_TOP_LEVEL]), ("arms", ["arms"]),
                         ("kafka", ["kafka"]), ("salt", ["salt"])):  # fmt: skip
        prefix = "serve." if title == "serve" else ""
        rows = [r for k in names for r in _rows_of(prefix + k, fields[k], _default_of(fields[k]))]
        rows = [
            r._replace(default=_SERVICE_DEFAULTS[r.key], absent=_NOTHING) if r.key in _SERVICE_DEFAULTS else r
            for r in rows
        ]
        out += [f"### {title}\n"]
        if title == "kafka":
            out += ["The run config's `kafka` keys; the service's client is confluent unless set.\n"]
        out += _table(rows)
    out += ["### simulate\n", *_table(list(_flat("simulate", SimulateConfig, None)))]
    return "\n".join(out).rstrip("\n") + "\n"


def _about(field: FieldInfo) -> list[str]:
    """The first paragraph of the section model's docstring, when it has one."""
    model = model_in(field.annotation)
    doc = (model.__doc__ or "").strip() if model is not None else ""
    if not doc or model.__doc__ == BaseModel.__doc__:
        return []
    return [_cell(doc.split("\n\n")[0]).replace("\\|", "|") + "\n"]


# In the service's file, at its top level (arms, kafka, salt) or listed under serve.<name> all the same.
_SERVE_TOP_LEVEL = {"arms", "kafka", "salt"}


def _default_of(field: FieldInfo) -> Any:
    if field.is_required():
        return _REQUIRED
    return field.get_default(call_default_factory=True)


def _rows_of(key: str, field: FieldInfo, default: Any) -> Iterator[_Row]:
    """The row of ``key``, or of every key under it: nested sections and typed mappings followed, each
    key's default read from its parent's default where that is a section (the service's kafka.client is
    confluent, the run config's kafka-python)."""
    nested = model_in(field.annotation)
    if key in _TYPED_DICTS:
        yield _Row(key, field, default)
        yield from _flat(key, _import(_TYPED_DICTS[key]), None)
    elif nested is None:
        yield _Row(key, field, default)
    else:
        if default is None:  # an optional section: off unless given
            yield _Row(key, field, None)
        section = default if isinstance(default, BaseModel) else None
        yield from _flat(f"{key}[]" if _is_sequence(field.annotation) else key, nested, section)


def _flat(prefix: str, model: type[BaseModel], defaults: BaseModel | None) -> Iterator[_Row]:
    """The rows of ``model``'s keys; ``defaults``: the section's own default (the run config's period
    section, left out, counts samples; given, only its own keys count)."""
    for name, field in model.model_fields.items():
        if field.exclude:
            continue
        for row in _rows_of(f"{prefix}.{name}", field, _default_of(field)):
            absent = (
                getattr(defaults, name, _NOTHING)
                if defaults is not None and row.key == f"{prefix}.{name}"
                else _NOTHING
            )
            if absent is not _NOTHING and not isinstance(absent, BaseModel) and absent != row.default:
                row = row._replace(absent=absent)
            yield row


def _table(rows: list[_Row]) -> list[str]:
    lines = ["| key | default | type | meaning |", "|---|---|---|---|"]
    for key, field, default, absent in rows:
        meaning = _FREE_DICTS.get(key) or field.description or ""
        if key in _TYPED_DICTS:
            meaning = meaning or "a mapping of the keys below"
        elif not meaning and default is None and model_in(field.annotation) is not None:
            meaning = (model_in(field.annotation).__doc__ or "").strip().split("\n\n")[0]
        shown = _default(default)
        if absent is not _NOTHING:
            section = key.rsplit(".", 1)[0]
            shown += f"; {_default(absent)} with no `{section}` section"
        lines.append(f"| `{key}` | {shown} | {_type(field)} | {_cell(meaning)} |")
    lines.append("")
    return lines


def _cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


def _default(value: Any) -> str:
    if value is _REQUIRED or value is PydanticUndefined:
        return "required"
    if isinstance(value, SecretStr):
        return "(secret)"
    if isinstance(value, BaseModel):
        return ""
    if isinstance(value, Path):
        value = str(value)
    text = json.dumps(value, default=str) if not isinstance(value, str) else value
    if text == "":
        return '""'
    return _cell(text if len(text) <= 40 else text[:37] + "...")


def _type(field: FieldInfo) -> str:
    text = _type_text(field.annotation)
    bounds = [_bound(m) for m in field.metadata]
    bounds = [b for b in bounds if b]
    return _cell(text + (f" ({', '.join(bounds)})" if bounds else ""))


def _bound(meta: Any) -> str:
    for kind, sign, attr in ((annotated_types.Ge, ">=", "ge"), (annotated_types.Gt, ">", "gt"),
                             (annotated_types.Le, "<=", "le"), (annotated_types.Lt, "<", "lt")):  # fmt: skip
        if isinstance(meta, kind):
            return f"{sign} {getattr(meta, attr)}"
    if isinstance(meta, annotated_types.MinLen):
        return f"at least {meta.min_length}"
    if isinstance(meta, annotated_types.MaxLen):
        return f"at most {meta.max_length}"
    return ""


def _type_text(annotation: Any) -> str:
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is typing.Annotated:
        return _type_text(args[0])
    if origin in (typing.Union, types.UnionType):
        return " or ".join("null" if a is type(None) else _type_text(a) for a in args)
    if origin is Literal:
        return "one of " + ", ".join(str(a) for a in args)
    if origin in (list, tuple, set, frozenset):
        inner = [a for a in args if a is not Ellipsis]
        if origin is tuple and len(inner) > 1 and Ellipsis not in args:
            return f"{len(inner)} of " + _type_text(inner[0])
        return "list of " + (_type_text(inner[0]) if inner else "values")
    if origin is dict or annotation is dict:
        return "mapping"
    if isinstance(annotation, type):
        if issubclass(annotation, BaseModel):
            return "section"
        names = {str: "string", int: "int", float: "number", bool: "bool", SecretStr: "secret", Path: "path"}
        return names.get(annotation, annotation.__name__)
    return str(annotation)


def _is_sequence(annotation: Any) -> bool:
    origin = typing.get_origin(annotation)
    if origin in (list, tuple):
        return True
    return any(_is_sequence(a) for a in typing.get_args(annotation))


def _import(path: str) -> type[BaseModel]:
    import importlib

    module, name = path.split(":")
    return getattr(importlib.import_module(module), name)
