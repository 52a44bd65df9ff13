"""The user documentation (README.md, docs/*.md) against the code's own truth, so drift fails CI:

* every ``reloop ...`` command line (shell blocks and inline code) parses with the real subcommand parser,
  and every ``python -m reloop.bench.X --flag`` names a module and a flag it has;
* every config key (``train.batch_size``, ``RELOOP__SERVE__AUTH_TOKEN``, the YAML blocks) exists in the
  config models, and every default stated next to one is the model's;
* every ``reloop_*`` series named is exported, the metric table matches ``SERIES``, every alert exists;
* every file path and every link (with its #anchor) resolves; every table row has its header's cells
  (an unescaped ``|`` in a code span splits a GitHub table cell);
* the dead-letter reasons table and bring-your-own-log's options table match the code.

docs/backtest/ (result reports) is left out except for link targets.
"""

from __future__ import annotations

import argparse
import fnmatch
import importlib
import importlib.util
import re
import shlex
import typing
from collections.abc import Iterator
from dataclasses import MISSING, fields
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import BaseModel
from pydantic.fields import FieldInfo

ROOT = Path(__file__).resolve().parents[2]
DOCS = (ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")))
SHELL_LANGS = {"bash", "sh", "shell", "console"}


def rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


# --- reading the markdown -------------------------------------------------------------------------------


def fenced_blocks(text: str) -> Iterator[tuple[int, str, list[str]]]:
    """(first line number, language, lines) of each fenced block."""
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        m = re.match(r"\s*```\s*(\S*)", lines[i])
        if m:
            start, lang, body = i + 2, m.group(1).lower(), []
            i += 1
            while i < len(lines) and not lines[i].lstrip().startswith("```"):
                body.append(lines[i])
                i += 1
            yield start, lang, body
        i += 1


def prose(text: str) -> str:
    """The text with fenced blocks blanked (line numbers kept)."""
    out, inside = [], False
    for line in text.splitlines():
        if line.lstrip().startswith("```"):
            inside = not inside
            out.append("")
        else:
            out.append("" if inside else line)
    return "\n".join(out)


def inline_spans(text: str) -> Iterator[tuple[int, str]]:
    """(line number, content) of each inline code span outside fenced blocks; a span may cross lines."""
    body = prose(text)
    for m in re.finditer(r"(?<!`)`([^`]+)`(?!`)", body):
        yield body.count("\n", 0, m.start()) + 1, " ".join(m.group(1).split())


def shell_lines(text: str) -> Iterator[tuple[int, str]]:
    """(line number, command) of each shell block line, backslash continuations joined, comments cut."""
    for start, lang, body in fenced_blocks(text):
        if lang not in SHELL_LANGS:
            continue
        buf: list[str] = []
        first = start
        for k, line in enumerate(body):
            if not buf:
                first = start + k
            stripped = line.strip()
            if stripped.endswith("\\"):
                buf.append(stripped[:-1])
                continue
            buf.append(stripped)
            yield first, " ".join(buf)
            buf = []


def snippets() -> Iterator[tuple[str, int, str]]:
    for doc in DOCS:
        text = doc.read_text(encoding="utf-8")
        for n, s in shell_lines(text):
            yield rel(doc), n, re.sub(r"(^|\s)#\s.*$", "", s)
        for n, s in inline_spans(text):
            yield rel(doc), n, s


# --- 1. command lines ----------------------------------------------------------------------------------

PLACEHOLDER = re.compile(r"^(\.\.\.|[A-Z][A-Z0-9_]*(?::[A-Z][A-Z0-9_]*)?)$")


class _Refused(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> typing.NoReturn:
        raise _Refused(message)


_PARSERS: dict[str, _Parser] = {}


def subcommand_parser(name: str) -> _Parser:
    """The subcommand's own parser, with nothing required: a doc may name one flag of a command."""
    from reloop.engine.runtime import cli

    if name not in _PARSERS:
        p = _Parser(prog=f"reloop {name}")
        cli._load(name).configure(p)
        for action in p._actions:
            action.required = False
        for group in p._mutually_exclusive_groups:
            group.required = False
        _PARSERS[name] = p
    return _PARSERS[name]


def sample_value(action: argparse.Action | None) -> str:
    """A value the action accepts, for a placeholder (``M``, ``...``, ``HOST:PORT``)."""
    if action is None:
        return "x"
    if action.choices:
        return str(next(iter(action.choices)))
    for v in ("2", "x"):
        try:
            if action.type is not None:
                action.type(v)
            return v
        except (argparse.ArgumentTypeError, TypeError, ValueError):
            continue
    return "x"


def reloop_invocations(snippet: str) -> Iterator[list[str]]:
    """The argument lists of each ``reloop ...`` (or ``python -m reloop.bench``) in a snippet, table-cell
    alternatives (``up \\| status``) expanded and optional brackets (``[--world-size M]``) opened."""
    for piece in re.split(r"\s*(?:&&|\|\||;|&(?=\s|$)|(?<!\\)\|(?!\|))\s*", snippet):
        words = piece.replace("[", " ").replace("]", " ").split()
        start = None
        for i, w in enumerate(words):
            if w == "reloop" or w.endswith("/reloop"):
                start, name = i + 1, None
                break
            if w == "reloop.bench" and i >= 2 and words[i - 1] == "-m" and "python" in words[i - 2]:
                start, name = i + 1, "bench"
                break
        if start is None:
            continue
        rest = " ".join(words[start:])
        try:
            toks = shlex.split(rest.replace("\\|", " \\| "), posix=False)
        except ValueError:
            toks = rest.split()
        toks = [t.strip("'\"") if t[:1] in "'\"" else t for t in toks]
        prefix = ["bench"] if name == "bench" else []
        yield from _alternatives(prefix + toks)


def _alternatives(toks: list[str]) -> Iterator[list[str]]:
    if "\\|" not in toks:
        yield toks
        return
    i = toks.index("\\|")
    alts, j = [toks[i - 1]], i
    while j < len(toks) and toks[j] == "\\|":
        alts.append(toks[j + 1])
        j += 2
    for alt in alts:
        yield from _alternatives(toks[: i - 1] + [alt] + toks[j:])


def check_invocation(toks: list[str]) -> str | None:
    """None when the arguments parse, else why not."""
    from reloop.engine.runtime import cli

    if not toks or toks[0] in {"-V", "--version", "-h", "--help"}:
        return None
    name = toks[0]
    if name not in cli.COMMANDS:
        return f"unknown command {name!r} (the commands: {', '.join(cli.COMMANDS)})"
    parser = subcommand_parser(name)
    positionals = [a for a in parser._actions if not a.option_strings]
    args: list[str] = []
    pending: argparse.Action | None = None  # an option still waiting for its value
    pos = 0
    for t in toks[1:]:
        if t.startswith("-") and len(t) > 1 and not PLACEHOLDER.match(t):
            opt = t.split("=", 1)[0]
            action = parser._option_string_actions.get(opt)
            pending = action if action is not None and action.nargs != 0 and "=" not in t else None
            args.append(t)
            continue
        if PLACEHOLDER.match(t):
            if pending is not None:
                t = sample_value(pending)
            elif pos < len(positionals):
                t = sample_value(positionals[pos])
        if pending is None:
            pos += 1
        pending = None
        args.append(t)
    if pending is not None:  # `reloop backtest --label-noise`: the flag named, its value left out
        args.append(sample_value(pending))
    try:
        ns = parser.parse_args(args)
    except _Refused as exc:
        return str(exc)
    if name == "bench" and getattr(ns, "only", None):
        from reloop.bench.suite import FIGURES

        unknown = sorted(set(ns.only.split(",")) - set(FIGURES))
        if unknown:
            return f"--only: unknown figure(s) {unknown} (the figures: {', '.join(FIGURES)})"
    return None


def test_every_reloop_command_line_parses():
    problems, checked = [], 0
    for doc, n, snippet in snippets():
        for toks in reloop_invocations(snippet):
            checked += 1
            why = check_invocation(toks)
            if why is not None:
                problems.append(f"{doc}:{n}: `reloop {' '.join(toks)}`: {why}")
    assert not problems, "\n".join(problems)
    assert checked >= 50  # the extraction itself works


def test_the_command_checker_refuses_what_the_cli_refuses():
    assert check_invocation(["run", "--config", "x.yaml"]) is None
    assert check_invocation(["train", "--config", "...", "--world-size", "M"]) is None
    assert check_invocation(["backtest", "--label-noise"]) is None
    assert check_invocation(["bench", "--only", "serve,snapshots"]) is None
    assert "unknown command" in check_invocation(["deadletter", "summary"])
    assert "unrecognized" in check_invocation(["run", "--config", "x", "--nosuch"])
    assert "invalid choice" in check_invocation(["kafka", "start"])
    assert "unknown figure" in check_invocation(["bench", "--only", "nosuch"])
    assert [list(t) for t in reloop_invocations("reloop kafka up \\| down --port 1")] == [
        ["kafka", "up", "--port", "1"],
        ["kafka", "down", "--port", "1"],
    ]


def test_bench_module_commands_name_real_modules_and_flags():
    problems, checked = [], 0
    for doc, n, snippet in snippets():
        for m in re.finditer(r"(?:-m\s+reloop\.bench\.(\w+)|\bbench/(\w+)\.py)((?:\s+[^|;&]*)?)", snippet):
            module = m.group(1) or m.group(2)
            path = ROOT / "bench" / f"{module}.py"
            checked += 1
            if not path.is_file():
                problems.append(f"{doc}:{n}: no module reloop.bench.{module}")
                continue
            source = path.read_text(encoding="utf-8")
            for flag in re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", m.group(3)):
                if f'"{flag}"' not in source and f"'{flag}'" not in source:
                    problems.append(f"{doc}:{n}: reloop.bench.{module} has no option {flag}")
    assert not problems, "\n".join(problems)
    assert checked >= 10


def test_dotted_python_names_resolve():
    problems, checked = [], 0
    for doc, n, snippet in snippets():
        for m in re.finditer(r"(?<![\w./-])reloop\.(?:engine|connectors|bench)(?:\.\w+)+", snippet):
            parts = m.group(0).split(".")
            checked += 1
            for k in range(len(parts), 1, -1):
                module = ".".join(parts[:k])
                try:
                    found = importlib.util.find_spec(module) is not None
                except ModuleNotFoundError:
                    found = False
                if found:
                    obj: Any = importlib.import_module(module)
                    for attr in parts[k:]:
                        obj = getattr(obj, attr, None)
                    if obj is None:
                        problems.append(f"{doc}:{n}: {m.group(0)} does not exist")
                    break
            else:
                problems.append(f"{doc}:{n}: no module for {m.group(0)}")
    assert not problems, "\n".join(problems)
    assert checked >= 20


# --- 2. config keys and their defaults -------------------------------------------------------------------


def _models_in(annotation: Any) -> list[type[BaseModel]]:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [m for a in typing.get_args(annotation) for m in _models_in(a)]


def _is_free_dict(annotation: Any) -> bool:
    if typing.get_origin(annotation) in (dict, typing.Mapping) or annotation is dict:
        return True
    return any(_is_free_dict(a) for a in typing.get_args(annotation))


def config_roots() -> dict[str, list[type[BaseModel]]]:
    from reloop.engine.runtime.config import RunConfig
    from reloop.engine.serve.config import ArmConfig, ServeConfig
    from reloop.engine.simulate.config import SimulateConfig

    roots = {name: _models_in(f.annotation) for name, f in RunConfig.model_fields.items()}
    roots.update(serve=[ServeConfig], arms=[ArmConfig], simulate=[SimulateConfig], salt=[])
    return roots


def moved_keys() -> set[tuple[str, ...]]:
    from reloop.engine.runtime.config import MOVED
    from reloop.engine.serve.config import MOVED as SERVE_MOVED

    return {tuple(k) for k in (*MOVED, *SERVE_MOVED)}


# Typed dicts: the model section keeps the optimizer's settings as a dict that OptimizerConfig reads.
def _typed_dict(models: list[type[BaseModel]], key: str) -> list[type[BaseModel]] | None:
    from reloop.engine.models.config import OptimizerConfig
    from reloop.engine.runtime.config import ModelSection

    if key == "optimizer" and ModelSection in models:
        return [OptimizerConfig]
    return None


def resolve_key(parts: list[str]) -> FieldInfo | bool:
    """The field ``parts`` names (True under a free dict or for a whole section), or False."""
    roots = config_roots()
    models = roots.get(parts[0])
    if models is None:
        return False
    info: FieldInfo | bool = True
    for part in parts[1:]:
        if "*" in part:
            return any(fnmatch.fnmatch(name, part) for m in models for name in m.model_fields)
        typed = _typed_dict(models, part)
        found = [m.model_fields[part] for m in models if part in m.model_fields]
        if not found:
            return False
        info = found[0]
        if typed is not None:
            models = typed
        elif _is_free_dict(info.annotation):
            return True
        else:
            models = [m for f in found for m in _models_in(f.annotation)]
    return info


KEY_SPAN = re.compile(r"^([a-z][a-z0-9_]*(?:\.[a-z0-9_*]+)+)(?:\s*[:=]\s*.*)?$")
ENV_NAME = re.compile(r"RELOOP__([A-Z0-9_]*[A-Z0-9*])")

# Names the docs give as examples of what is refused; each must be refused.
REFUSED_ENV_EXAMPLES = {"RELOOP__SERV__PORT": "a section neither program has"}


def doc_config_keys() -> Iterator[tuple[str, int, list[str], str]]:
    roots = config_roots()
    for doc in DOCS:
        text = doc.read_text(encoding="utf-8")
        for n, span in inline_spans(text):
            for m in ENV_NAME.finditer(span):
                if m.group(0) in REFUSED_ENV_EXAMPLES:
                    continue
                parts = [p for p in m.group(1).lower().split("__") if p]
                yield rel(doc), n, parts, m.group(0)
            m = KEY_SPAN.match(span)
            if m and m.group(1).split(".")[0] in roots:
                yield rel(doc), n, m.group(1).split("."), span
        for start, lang, body in fenced_blocks(text):
            if lang not in {"yaml", "yml"}:
                continue
            data = yaml.safe_load("\n".join(body))
            if isinstance(data, dict) and set(data) <= set(roots):
                for parts in _leaf_paths(data):
                    yield rel(doc), start, parts, ".".join(parts) + " (YAML block)"


def _leaf_paths(data: dict, prefix: tuple[str, ...] = ()) -> Iterator[list[str]]:
    for k, v in data.items():
        path = (*prefix, str(k))
        if isinstance(v, dict) and v:
            yield list(path)
            yield from _leaf_paths(v, path)
        else:
            yield list(path)


def test_config_keys_the_docs_name_exist():
    moved = moved_keys()
    problems, checked = [], 0
    for doc, n, parts, what in doc_config_keys():
        checked += 1
        if tuple(parts) in moved or any(tuple(parts[:k]) in moved for k in range(2, len(parts))):
            continue  # the table of keys that moved (refused at load, naming the new place)
        if resolve_key(parts) is False:
            problems.append(f"{doc}:{n}: `{what}`: no config key {'.'.join(parts)}")
    assert not problems, "\n".join(problems)
    assert checked >= 100


def test_the_refused_examples_are_refused():
    from reloop.engine.config_common import ConfigError
    from reloop.engine.runtime.config import load_config_dict

    text = "\n".join(d.read_text(encoding="utf-8") for d in DOCS)
    example = yaml.safe_load((ROOT / "deploy" / "config" / "reloop.example.yaml").read_text())
    for name in REFUSED_ENV_EXAMPLES:
        assert name in text  # still an example in the docs (else drop it here)
        with pytest.raises(ConfigError, match=name):
            load_config_dict(example, env={name: "1"})


def test_the_key_resolver_refuses_unknown_keys():
    assert resolve_key(["train", "batch_size"]) is not False
    assert resolve_key(["serve", "limits", "max_body_bytes"]) is not False
    assert resolve_key(["model", "optimizer", "small_steps_below"]) is not False
    assert resolve_key(["kafka", "client_config", "anything"]) is True
    assert resolve_key(["kafka", "sasl_*"]) is True
    assert resolve_key(["train", "batch_sise"]) is False
    assert resolve_key(["model", "optimizer", "lr_dense"]) is False
    assert resolve_key(["serve", "auth_token_path"]) is False


_UNITS = {"ms": 1e-3, "s": 1.0, "min": 60.0, "h": 3600.0, "day": 86400.0, "days": 86400.0}
_BYTES = {"KiB": 1024, "MiB": 1024**2}
STATED = re.compile(
    r"`([a-z][a-z0-9_]*(?:\.[a-z0-9_]+)+)`(?:,\s*default:?\s*|\s*\((?:default:?\s*)?)"
    r"`?(null|true|false|-?[0-9][0-9,_]*(?:\.[0-9]+)?(?:e-?[0-9]+)?)`?"
    r"(?:\s*(KiB|MiB|ms|s|min|h|days?)\b)?(?=[\s);,:]|$)"
)


def stated_value(value: str, unit: str | None, key: str) -> Any:
    """The doc's value in the key's own unit (``_ms``, ``_s``, ``_bytes`` by its suffix)."""
    if value in ("null", "true", "false"):
        return {"null": None, "true": True, "false": False}[value]
    number = float(value.replace(",", "").replace("_", ""))
    if unit in _BYTES:
        return number * _BYTES[unit]
    if unit in _UNITS:
        seconds = number * _UNITS[unit]
        if key.endswith("_ms"):
            return seconds * 1000
        if key.endswith("_s"):
            return seconds
        return None  # a unit the key's name does not tell: not compared
    return number


def test_stated_defaults_are_the_models_defaults():
    problems, checked = [], 0
    for doc in DOCS:
        body = " ".join(prose(doc.read_text(encoding="utf-8")).split())
        rows = list(_key_default_rows(doc))
        found = [(m.group(1), m.group(2), m.group(3)) for m in STATED.finditer(body)]
        found += [(k, m.group(2), m.group(3)) for k, v in rows if (m := STATED.match(f"`{k}` ({v})"))]
        for key, value, unit in found:
            info = resolve_key(key.split("."))
            if not isinstance(info, FieldInfo):
                continue  # a free dict's key or not a config key: nothing to compare
            want = stated_value(value, unit, key)
            if want is None and value != "null":
                continue
            got = info.get_default(call_default_factory=True)
            checked += 1
            if isinstance(got, bool) or got is None or want is None:
                ok = got == want
            else:
                ok = isinstance(got, int | float) and abs(float(got) - float(want)) <= 1e-9 * max(
                    1, abs(want)
                )
            if not ok:
                problems.append(
                    f"{rel(doc)}: `{key}` stated {value}{' ' + unit if unit else ''}, default is {got!r}"
                )
    assert not problems, "\n".join(problems)
    assert checked >= 15


def _key_default_rows(doc: Path) -> Iterator[tuple[str, str]]:
    """(key, default) of the rows of tables headed ``| key | default |``."""
    header = None
    for line in doc.read_text(encoding="utf-8").splitlines():
        cells = _cells(line)
        if cells is None:
            header = None
            continue
        if header is None:
            header = [c.lower() for c in cells]
            continue
        if len(header) >= 2 and header[1] == "default" and re.fullmatch(r"`[a-z0-9_.]+`", cells[0]):
            yield cells[0].strip("`"), cells[1]


# --- 3. metrics and alerts -----------------------------------------------------------------------------


def test_metric_names_the_docs_use_are_exported():
    from reloop.connectors.metrics.prometheus import SERIES, exported_series_names
    from reloop.engine.loss.losses import VARIANTS

    names = exported_series_names() | {s.name for s in SERIES}
    problems, checked = [], 0
    for doc in DOCS:
        for n, line in enumerate(doc.read_text(encoding="utf-8").splitlines(), 1):
            for m in re.finditer(r"(?<![\w/.-])reloop_[a-z0-9_]*[a-z0-9](\*|_\*)?", line):
                name = m.group(0)
                if name in VARIANTS:  # loss variants (reloop_kd ...), not series
                    continue
                checked += 1
                if name.endswith("*"):
                    ok = any(s.startswith(name.rstrip("*")) for s in names)
                else:
                    ok = name in names
                if not ok:
                    problems.append(f"{rel(doc)}:{n}: {name} is not a series the code exports")
    assert not problems, "\n".join(problems)
    assert checked >= 30


def test_the_metric_table_is_series():
    from reloop.connectors.metrics.prometheus import BUILD_INFO, SERIES

    by_field = {s.field: s for s in SERIES}
    seen, problems = set(), []
    for line in (ROOT / "docs" / "observability.md").read_text(encoding="utf-8").splitlines():
        cells = _cells(line)
        if cells is None or len(cells) < 4:
            continue
        if cells[1].startswith(BUILD_INFO):
            seen.add(BUILD_INFO)
            continue
        s = by_field.get(cells[0])
        if s is None:
            continue
        seen.add(s.field)
        items = [i.strip() for i in re.sub(r"\([^)]*\)", "", cells[3]).split(",")]
        labels = tuple(items) if all(re.fullmatch(r"[a-z_]+", i) for i in items) else ()  # else a remark
        if cells[1].split()[0] != s.name or cells[2] != s.kind or labels != s.labels:
            problems.append(f"docs/observability.md: {cells[:4]} but SERIES has {s.name} {s.kind} {s.labels}")
    missing = sorted({s.field for s in SERIES} - seen)
    assert not problems, "\n".join(problems)
    assert not missing, f"docs/observability.md's table lacks the series of {missing}"
    assert BUILD_INFO in seen


def test_alerts_the_docs_name_exist():
    rules = yaml.safe_load((ROOT / "deploy" / "prometheus" / "alerts.yml").read_text())
    alerts = {r["alert"] for g in rules["groups"] for r in g["rules"] if "alert" in r}
    named = set()
    for doc in DOCS:
        for n, line in enumerate(doc.read_text(encoding="utf-8").splitlines(), 1):
            for name in re.findall(r"\bReloop[A-Z][A-Za-z]+", line):
                named.add(name)
                assert name in alerts, f"{rel(doc)}:{n}: no alert {name} in deploy/prometheus/alerts.yml"
    assert alerts <= named, f"alerts no doc describes: {sorted(alerts - named)}"


# --- 4. paths, links, tables ---------------------------------------------------------------------------

PATH = re.compile(r"(?<![\w./~-])((?:deploy|bench|docs|engine|connectors|scripts|tests|\.ci)/[\w./*-]*[\w*])")
NOT_PATHS = {"engine/bare"}  # docs/models.md: a column label of a measurement, not a file


def test_paths_the_docs_name_exist():
    problems, checked = [], 0
    for doc in DOCS:
        for n, line in enumerate(doc.read_text(encoding="utf-8").splitlines(), 1):
            for m in PATH.finditer(line):
                path = m.group(1).rstrip(".")
                if path in NOT_PATHS:
                    continue
                checked += 1
                exists = any(ROOT.glob(path)) if "*" in path else (ROOT / path).exists()
                if not exists:
                    problems.append(f"{rel(doc)}:{n}: {path} does not exist")
    assert not problems, "\n".join(problems)
    assert checked >= 50


def _slugs(text: str) -> set[str]:
    """GitHub's heading anchors."""
    out: set[str] = set()
    seen: dict[str, int] = {}
    for line in prose(text).splitlines():
        m = re.match(r"#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not m:
            continue
        slug = re.sub(r"[^\w\- ]", "", m.group(1).strip().lower()).replace(" ", "-")
        k = seen.get(slug, 0)
        seen[slug] = k + 1
        out.add(slug if k == 0 else f"{slug}-{k}")
    return out


def test_links_between_docs_resolve():
    problems, checked = [], 0
    for doc in DOCS:
        text = doc.read_text(encoding="utf-8")
        for m in re.finditer(r"\]\(([^)\s]+)\)", prose(text)):
            target = m.group(1)
            if re.match(r"[a-z]+:", target):
                continue
            checked += 1
            path, _, anchor = target.partition("#")
            dest = (doc.parent / path) if path else doc
            n = prose(text).count("\n", 0, m.start()) + 1
            if not dest.exists():
                problems.append(f"{rel(doc)}:{n}: link {target}: {path} does not exist")
            elif anchor and dest.suffix == ".md" and anchor not in _slugs(dest.read_text(encoding="utf-8")):
                problems.append(f"{rel(doc)}:{n}: link {target}: no heading #{anchor} in {dest.name}")
    assert not problems, "\n".join(problems)
    assert checked >= 20


def _cells(line: str) -> list[str] | None:
    """A table row's cells as GitHub splits them: on every ``|`` not escaped, code spans included."""
    s = line.strip()
    if not s.startswith("|"):
        return None
    s = s[1:-1] if s.endswith("|") and not s.endswith("\\|") else s[1:]
    return [c.strip() for c in re.split(r"(?<!\\)\|", s)]


def test_table_rows_have_their_headers_cells():
    problems = []
    for doc in DOCS:
        width = None
        for n, line in enumerate(prose(doc.read_text(encoding="utf-8")).splitlines(), 1):
            cells = _cells(line)
            if cells is None:
                width = None
            elif width is None:
                width = len(cells)
            elif len(cells) != width:
                problems.append(
                    f"{rel(doc)}:{n}: {len(cells)} cells under a {width}-column header (a `|` in a code span "
                    f"needs `\\|` in a table): {line.strip()[:100]}"
                )
    assert not problems, "\n".join(problems)


# --- 5. tables that restate the code -------------------------------------------------------------------


def test_the_dead_letter_reasons_table_is_the_reasons():
    from reloop.engine.runtime.deadletters_cmd import KNOWN_REASONS

    text = (ROOT / "docs" / "operations.md").read_text(encoding="utf-8")
    section = text.split("## Bad records (dead letters)", 1)[1].split("\n\n", 2)[1]
    documented = set()
    for line in section.splitlines():
        cells = _cells(line)
        if cells and cells[0] not in ("reason", "---"):
            documented |= set(re.findall(r"`([a-z_]+)`", cells[0]))
    assert documented == KNOWN_REASONS - {"unknown"}


def test_the_impression_log_options_table_is_the_options():
    from reloop.connectors.files.datasets import ImpressionLog

    text = (ROOT / "docs" / "bring-your-own-log.md").read_text(encoding="utf-8")
    section = text.split("### Options", 1)[1].split("\n### ", 1)[0]
    options = {f.name: f for f in fields(ImpressionLog)}
    documented = {}
    for line in section.splitlines():
        cells = _cells(line)
        if cells and re.fullmatch(r"`\w+`", cells[0]):
            documented[cells[0].strip("`")] = cells[1]
    assert documented, "no options table found"
    for key, default in documented.items():
        assert key in options, f"docs/bring-your-own-log.md: no option {key}"
        code = options[key].default
        if default.startswith("`") and code is not MISSING:
            stated = default.strip("`").replace("\\|", "|")
            assert stated == code, (
                f"docs/bring-your-own-log.md: {key} default {stated!r}, the code's {code!r}"
            )
