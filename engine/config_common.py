"""What the processor's config (engine/runtime/config.py) and the scoring service's (engine/serve/config.py)
share: the Kafka connection section, the consumer and producer sections, the one environment scheme
(pydantic-settings), the check for renamed keys and the redaction of credentials.

The ``kafka`` section holds what every consumer and producer (and admin client) of a program uses: the
client library, the bootstrap servers, the security settings (the SASL password and the SSL key password
are secrets: ``repr``, ``str`` and ``model_dump`` show ``**********``; the clients get the value) and
``client_config``, settings common to every client. ``consumer`` and ``producer`` hold the rest.

>>> k = KafkaSection(security_protocol="SASL_SSL", sasl_mechanism="PLAIN", sasl_username="u",
...                  sasl_password="hunter2")
>>> "hunter2" in repr(k) or "hunter2" in str(k.model_dump())
False
>>> k.connection()["sasl_plain_password"], k.connection("confluent")["sasl.password"]
('hunter2', 'hunter2')
"""

from __future__ import annotations

import json
import math
import os
import re
import tomllib
import typing
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import EnvSettingsSource, SettingsError
from reloop.engine.netaddr import bootstrap_problem

ENV_PREFIX = "RELOOP__"


def _kafka_topic_name(value: str) -> str:
    # Kafka's own rule (kafka.common.internals.Topic): the broker refused the topic only when it was
    # first created or written, long after the start, in the client's words.
    if not _TOPIC_NAME.fullmatch(value) or value in (".", ".."):
        raise ValueError(
            f"{value!r} is not a Kafka topic name (1 to 249 of the characters a-z A-Z 0-9 . _ -, "
            "not '.' or '..')"
        )
    return value


_TOPIC_NAME = re.compile(r"[A-Za-z0-9._-]{1,249}")
TopicName = Annotated[str, AfterValidator(_kafka_topic_name)]

# What pydantic prints for a secret (`reloop config show`): given back as a value, it would be the password.
SECRET_MASK = "**********"
MASKED = "is the mask reloop config show prints for a secret, not the secret: give the value itself"

# A path a user writes: ``~`` is their home, as in a shell (it made a folder named "~" in the working
# folder, which a later ``rm -rf ~`` would take for the home).
UserPath = Annotated[str, AfterValidator(os.path.expanduser)]
UserFilePath = Annotated[Path, AfterValidator(Path.expanduser)]
Client = Literal["kafka-python", "confluent"]


class ConfigError(ValueError):
    """A configuration that cannot be used; the message names the bad key."""


class UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing a key given twice in one mapping (the last one won in silence: a
    second ``train:`` block dropped the first one's settings)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # "<<: *anchor": its keys may be overridden
                continue
            key = self.construct_object(key_node, deep=deep)
            try:
                duplicate = key in seen
            except TypeError:  # an unhashable key: PyYAML's own error follows
                break
            if duplicate:
                raise yaml.constructor.ConstructorError(
                    None, None, f"found key {key!r} twice in one mapping", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def read_document(path: str | os.PathLike[str], what: str = "config") -> Any:
    """The data of a YAML file (TOML when its suffix is ``.toml``, in any case); a ConfigError naming the
    file for whatever stops it: missing, a folder, not UTF-8, not parsing, nested past Python's recursion
    limit (each was a traceback), or a YAML key given twice in one mapping. A UTF-8 byte-order mark is not
    content (TOML refused it)."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        from reloop.engine.resources import packaged_copy_of

        copy = packaged_copy_of(p)
        installed = f" (the copy installed with reloop: {copy})" if copy is not None else ""
        raise ConfigError(f"{what} file not found: {p}{installed}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{what} {p} is not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except OSError as exc:
        raise ConfigError(f"cannot read {what} {p}: {exc.strerror or exc}") from None
    toml = p.suffix.lower() == ".toml"
    try:
        return tomllib.loads(text) if toml else yaml.load(text, Loader=UniqueKeyLoader)  # noqa: S506 - safe
    except (yaml.YAMLError, tomllib.TOMLDecodeError) as exc:
        detail = yaml_error_text(exc) if isinstance(exc, yaml.YAMLError) else str(exc)
        raise ConfigError(f"{what} {p} is not valid {'TOML' if toml else 'YAML'}: {detail}") from None
    except RecursionError:
        raise ConfigError(f"{what} {p} is nested too deeply to read") from None


class _Section(BaseModel):
    # str_min_length: an empty value (RELOOP__KAFKA__BOOTSTRAP= from an unset variable) is refused, not
    # taken (an empty checkpoint.dir wrote snapshots into the working folder).
    model_config = ConfigDict(frozen=True, extra="forbid", str_min_length=1)


# The typed connection settings: (kafka-python name, librdkafka name).
_CONNECTION = {
    "security_protocol": ("security_protocol", "security.protocol"),
    "sasl_mechanism": ("sasl_mechanism", "sasl.mechanism"),
    "sasl_username": ("sasl_plain_username", "sasl.username"),
    "sasl_password": ("sasl_plain_password", "sasl.password"),
    "ssl_cafile": ("ssl_cafile", "ssl.ca.location"),
    "ssl_certfile": ("ssl_certfile", "ssl.certificate.location"),
    "ssl_keyfile": ("ssl_keyfile", "ssl.key.location"),
    "ssl_key_password": ("ssl_password", "ssl.key.password"),
}


class KafkaSection(_Section):
    """The connection of every Kafka client of the program (consumers, producers, admin)."""

    client: Client = Field(
        default="kafka-python",
        description="the Kafka client library: kafka-python (pure Python) or confluent (librdkafka: ~5x the "
        "consume rate). client_config keys are in its names (librdkafka's for confluent: 'client.id')",
    )
    bootstrap: str = Field(
        default="127.0.0.1:9092",
        description="host:port of the brokers, comma-separated (a host without a port takes 9092)",
    )
    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] | None = Field(
        default=None, description="null: PLAINTEXT; SSL, SASL_PLAINTEXT or SASL_SSL with the settings below"
    )
    sasl_mechanism: str | None = Field(default=None, description="PLAIN, SCRAM-SHA-256, SCRAM-SHA-512 ...")
    sasl_username: str | None = Field(default=None, description="with sasl_mechanism and sasl_password")
    sasl_password: SecretStr | None = Field(default=None, description="a secret: never printed")
    ssl_cafile: str | None = Field(
        default=None, description="PEM file of the CA that signed the brokers' certificates"
    )
    ssl_certfile: str | None = Field(
        default=None, description="PEM file of this client's certificate (mutual TLS)"
    )
    ssl_keyfile: str | None = Field(default=None, description="PEM file of that certificate's private key")
    ssl_key_password: SecretStr | None = Field(default=None, description="a secret: never printed")
    replication_factor: int | None = Field(
        default=None,
        ge=1,
        description="replication of the topics reloop creates (reloop kafka topics, the samples topic); "
        "null: the broker's default.replication.factor, as Kafka Streams takes it. Give 3 where the "
        "cluster's min.insync.replicas is 2 and its default is lower (reloop produces with acks=all)",
    )
    client_config: dict[str, Any] = Field(
        default_factory=dict,
        description="settings for every client, consumer and producer (client_id, timeouts ...), in the "
        "names of kafka.client; consumer-only or producer-only settings go in "
        "consumer/producer.client_config",
    )

    @field_validator("bootstrap")
    @classmethod
    def _bootstrap_list(cls, value: str) -> str:
        problem = bootstrap_problem(value)
        if problem is not None:
            raise ValueError(f"{value!r}: {problem}")
        return value

    @field_validator("ssl_cafile", "ssl_certfile", "ssl_keyfile")
    @classmethod
    def _ssl_file_readable(cls, value: str | None) -> str | None:
        # Checked here: a missing file failed later as a TLS error (kafka-python, after its bootstrap
        # timeout) or at the client's build in librdkafka's words ("ssl.ca.location failed").
        if value is not None:
            value = os.path.expanduser(value)
        if value is not None and not os.access(value, os.R_OK):
            why = "does not exist" if not os.path.exists(value) else "cannot be read by this process"
            raise ValueError(f"{value!r} {why}")
        return value

    @field_validator("sasl_password", "ssl_key_password", mode="before")
    @classmethod
    def _secret_not_empty(cls, value: Any) -> Any:
        if value == "":  # an unset variable's expansion; str_min_length's message would be 'not a string'
            raise ValueError("is empty; unset it (or give null) for none")
        if value == SECRET_MASK:
            raise ValueError(MASKED)
        return value

    @model_validator(mode="after")
    def _one_place_per_setting(self) -> KafkaSection:
        names = {name: field for field, pair in _CONNECTION.items() for name in pair}
        for key in self.client_config:
            if key in names:
                raise ValueError(f"client_config.{key}: give it as kafka.{names[key]}")
        if self.client == "kafka-python":
            from reloop.connectors.kafka.settings import client_settings

            known = client_settings()
            unknown = sorted(k for k in self.client_config if k not in known)
            if unknown:
                raise ValueError(f"client_config: {unknown} are not kafka-python settings")
        missing = self._sasl_credentials_missing()
        if missing:
            # kafka-python retried the login that could not be made (its "expected str instance,
            # NoneType found") as a broker outage until recovery.give_up_after_s: an unset variable, a
            # Secret not mounted.
            raise ValueError(
                f"{' and '.join(missing)} must be set with security_protocol {self.security_protocol} and "
                f"sasl_mechanism {self.sasl_mechanism or 'PLAIN (the default)'}"
            )
        wrong = consumer_only_settings(self)
        if wrong:
            # The same settings go to the producers, which would refuse these and stop the program.
            raise ValueError(
                f"client_config: {sorted(wrong)} are not producer settings (kafka.client_config goes to "
                "every consumer and producer): put them in consumer.client_config"
            )
        return self

    def _sasl_credentials_missing(self) -> list[str]:
        """The user and password settings a SASL login by name needs and lacks (PLAIN, SCRAM-*; with
        no sasl_mechanism given, kafka-python's PLAIN: librdkafka's default, GSSAPI, needs neither)."""
        if not (self.security_protocol or "").startswith("SASL_"):
            return []
        mechanism = self.sasl_mechanism or ("PLAIN" if self.client == "kafka-python" else "GSSAPI")
        if mechanism.upper() != "PLAIN" and not mechanism.upper().startswith("SCRAM-"):
            return []
        return [name for name in ("sasl_username", "sasl_password") if getattr(self, name) is None]

    def connection(self, client: Client | None = None) -> dict[str, Any]:
        """The connection settings with the secrets' values, in the names of ``client`` (default: the
        section's): what every consumer, producer and admin client of that library gets."""
        client = client or self.client
        out: dict[str, Any] = {}
        for field, (kafka_python, librdkafka) in _CONNECTION.items():
            value = getattr(self, field)
            if value is None:
                continue
            if isinstance(value, SecretStr):
                value = value.get_secret_value()
            out[kafka_python if client == "kafka-python" else librdkafka] = value
        return {**out, **self._client_config_for(client)}

    def _client_config_for(self, client: Client) -> dict[str, Any]:
        if client == self.client or not self.client_config:
            return dict(self.client_config)
        if client == "confluent":
            from reloop.connectors.confluent.settings import to_librdkafka

            try:
                return to_librdkafka(self.client_config)
            except ValueError as exc:
                raise ConfigError(f"kafka.client_config: {exc}") from None
        raise ConfigError(
            "kafka.client_config holds librdkafka settings (kafka.client: confluent) but this part uses "
            "kafka-python; give the connection with the kafka.security_*/sasl_*/ssl_* keys instead"
        )


class ConsumerSection(_Section):
    """The processor's consumers: what only a consumer has (the connection is in ``kafka``)."""

    group_id: str | None = Field(
        default="reloop-trainer", description="offsets are committed here after each durable snapshot"
    )
    client_config: dict[str, Any] = Field(
        default_factory=dict, description="consumer-only settings (fetch_max_wait_ms ...), over kafka's"
    )
    poll_max_records: int = Field(default=4096, gt=0, description="records a poll returns at most")
    poll_timeout_s: float = Field(default=0.1, ge=0, description="how long a poll waits for records")
    merge_idle_ms: int = Field(
        default=2_000,
        ge=0,
        description="release records of other partitions after one partition had nothing for this long",
    )
    merge_lookahead: int = Field(
        default=8,
        ge=1,
        description="a record merges at the earliest timestamp of itself and the records after it in its"
        " partition, this many in all (a record stamped ahead goes with its successors)",
    )


class ProducerSection(_Section):
    """The processor's producers (samples and dead-letter topics): producer-only settings."""

    client_config: dict[str, Any] = Field(
        default_factory=dict,
        description="producer-only settings (linger_ms, compression_type ...), over kafka's",
    )


def consumer_only_settings(kafka: KafkaSection) -> list[str]:
    """The keys of ``kafka.client_config`` a producer would refuse (they belong in consumer.client_config)."""
    if kafka.client == "kafka-python":
        from reloop.connectors.kafka.settings import producer_settings

        producer = producer_settings()
        return [k for k in kafka.client_config if k not in producer]
    return [k for k in kafka.client_config if k.startswith(("fetch.", "auto.", "group.", "session."))]


def yaml_error_text(exc: yaml.YAMLError) -> str:
    """PyYAML's error on one line, where it is, without the snippet of the file it quotes (a password on
    that line was printed with it)."""
    if isinstance(exc, yaml.MarkedYAMLError):
        mark = exc.problem_mark or exc.context_mark
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        return "; ".join(p for p in (exc.context, exc.problem) if p) + where
    return " ".join(str(exc).split())


# Client settings whose values are credentials (kafka-python and librdkafka names): librdkafka's
# ssl.key.pem and ssl.keystore.* hold a private key inline, sasl.kerberos.keytab names a credential file.
_SECRET_KEY = re.compile(
    r"password|secret|token|credential|oauth|jaas|private|api_?key|pem|keytab|ssl[._]key\b", re.IGNORECASE
)
REDACTED = "<redacted>"


def redact(settings: Mapping[str, Any]) -> dict[str, Any]:
    """``settings`` with the value of every credential-like key replaced by a marker.

    >>> redact({"security_protocol": "SASL_SSL", "sasl_plain_password": "hunter2"})
    {'security_protocol': 'SASL_SSL', 'sasl_plain_password': '<redacted>'}
    """
    return {k: REDACTED if _SECRET_KEY.search(str(k)) else v for k, v in settings.items()}


def check_moved(data: Mapping[str, Any], moved: Mapping[tuple[str, ...], str], where: str = "") -> None:
    """Refuse every renamed key present in ``data``, naming its new place (and its environment name)."""
    found = []
    for path, new in moved.items():
        node: Any = data
        for part in path:
            if not isinstance(node, Mapping) or part not in node:
                break
            node = node[part]
        else:
            old = ".".join(path)
            env = ENV_PREFIX + new.split(" ")[0].replace(".", "__").upper()
            found.append(f"{old} moved to {new} (environment: {env})")
    if found:
        raise ConfigError(f"invalid config{where}: " + "; ".join(found))


class _MappingEnvSource(EnvSettingsSource):
    """pydantic-settings' environment source over a given mapping (default os.environ)."""

    def __init__(self, model: type[BaseModel], env: Mapping[str, str]) -> None:
        super().__init__(
            model,  # type: ignore[arg-type] - reads only model_config and the fields
            case_sensitive=False,
            env_prefix=ENV_PREFIX,
            env_nested_delimiter="__",
            env_parse_none_str="null",
        )
        # The given variables instead of os.environ: ``env_vars`` is the table the source reads its values
        # from (case-insensitive here, so lower-cased like the source's own loading does).
        self.env_vars = {k.lower(): v for k, v in env.items()}


#: Sections only the scoring service reads: `reloop run` leaves their variables to it, so one environment
#: (the demo's, a compose file's) can hold both programs' settings.
SERVE_ONLY_SECTIONS = frozenset({"serve", "arms", "salt"})


def env_values(
    model: type[BaseModel], env: Mapping[str, str], *, others: frozenset[str] = frozenset()
) -> dict[str, Any]:
    """The ``RELOOP__<SECTION>__<KEY>`` variables of ``env`` as nested config data for ``model``.

    Names are case-insensitive; ``__`` separates levels. A value is what pydantic makes of the string for
    a typed key (``512`` an int, ``true`` a bool); a list, a dict or a whole section is JSON; inside a free
    dict (``kafka.client_config``, ``model.params``) a JSON value is decoded and anything else stays a
    string. ``null`` is None. A variable naming no section of ``model`` is an error, unless its section is
    one of ``others`` (another program's: left alone).
    """
    ours = {}
    for name, value in env.items():
        if name.upper().startswith(ENV_PREFIX):
            parts = name[len(ENV_PREFIX) :].split("__")
            if len(parts) > 1 and "" in parts:  # RELOOP__TRAIN__ was reported as key "train."
                raise ConfigError(
                    f"environment variable {name}: an empty name between or after '__' "
                    "(RELOOP__<SECTION>__<KEY>)"
                )
            section = parts[0].lower()
            if section in others and section not in model.model_fields:
                continue
            if section not in model.model_fields:
                raise ConfigError(f"environment variable {name}: unknown section {section!r}")
        ours[name] = value
    env = ours
    try:
        data = _MappingEnvSource(model, env)()
    except SettingsError as exc:
        # pydantic-settings names the section ('error parsing value for field "train" from source
        # "_MappingEnvSource"'), not the variable whose JSON does not parse.
        found = re.search(r'field "([^"]+)"', str(exc))
        section = f"{ENV_PREFIX}{found.group(1) if found else ''}".upper()
        ours = [n for n in env if n.upper() == section or n.upper().startswith(section + "__")]
        bad = [n for n in ours if not _parses_as_json(env[n])]
        exact = [n for n in bad if n.upper() == section]
        meant = [n for n in bad if env[n].lstrip().startswith(("{", "["))]
        which = ", ".join(sorted(exact or meant or bad)) or section
        raise ConfigError(
            f"environment variable {which}: not valid JSON (a list, a dict or a whole section is JSON)"
        ) from None
    return _decode_free_dicts(model, data)


def reportable_errors(exc: ValidationError) -> list[Any]:
    """pydantic's errors less the "too short" of a list whose items failed (arms: "at least 1 item,
    not 0" after its only arm's own error): the items' errors say why."""
    errors = exc.errors()
    failed_items = {e["loc"][:i] for e in errors for i, part in enumerate(e["loc"]) if isinstance(part, int)}
    return [e for e in errors if not (e["type"] == "too_short" and e["loc"] in failed_items)]


def describe_errors(
    exc: ValidationError,
    overrides: Mapping[str, Any] | None = None,
    names: Iterable[str] = (),
    model: type[BaseModel] | None = None,
    prefix: str = "",
) -> str:
    """pydantic's errors on one line, each naming its key (and the variable that set it, ``env_origin``),
    without the values: pydantic's own text spans lines and shows each bad input, secrets included.
    ``model``: the model validated, whose keys an unknown one is compared with (``did you mean``);
    ``prefix``: where that model sits in the document (``model.spec.``), before every key."""
    lines = []
    for err in reportable_errors(exc):
        # A check of the whole model has no loc: the prefix alone names it ("model.spec", not "model.spec.").
        key = (prefix + ".".join(str(x) for x in err["loc"])).rstrip(".")
        where = f"{key}: " if key else ""  # a check of the whole document names its keys itself
        lines.append(f"{where}{error_text(err, model)}{env_origin(err['loc'], overrides or {}, names)}")
    return "; ".join(lines)


def error_text(err: Mapping[str, Any], model: type[BaseModel] | None = None) -> str:
    """``error_message``, but "unknown key" for a key the model does not have, with the nearest one it
    has when one is close (``batch_sise``: did you mean batch_size?)."""
    if err["type"] != "extra_forbidden":
        return error_message(err)
    loc = tuple(err["loc"])
    near = _nearest_key(model, loc[:-1], str(loc[-1])) if model is not None and loc else None
    return f"unknown key (did you mean {near}?)" if near else "unknown key"


def _nearest_key(model: type[BaseModel], path: Sequence[object], name: str) -> str | None:
    import difflib

    current: type[BaseModel] | None = model
    for part in path:  # down the nested models; an index into a list or tuple of them stays put
        if current is None:
            return None
        if isinstance(part, int):
            continue
        field = current.model_fields.get(str(part))
        current = model_in(field.annotation) if field is not None else None
    if current is None:
        return None
    keys = [k for k, f in current.model_fields.items() if not f.exclude]
    found = difflib.get_close_matches(name, keys, n=1, cutoff=0.75)
    return found[0] if found else None


def model_in(annotation: Any) -> type[BaseModel] | None:
    """The model an annotation holds: itself, or inside Optional, a union, a list or tuple of them."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        found = model_in(arg)
        if found is not None:
            return found
    return None


def error_message(err: Mapping[str, Any]) -> str:
    """pydantic's message for one error, without the "Value error, " that it puts before the text of a
    ``ValueError`` raised by a validator (ours, which say what is wrong in their own words)."""
    msg = str(err["msg"])
    return msg.removeprefix("Value error, ") if err.get("type") == "value_error" else msg


def _parses_as_json(value: str) -> bool:
    try:
        json.loads(value)
    except ValueError:
        return False
    return True


def env_origin(loc: Sequence[object], overrides: Mapping[str, Any], names: Iterable[str] = ()) -> str:
    """`` (environment variable RELOOP__A__B)`` when the key at ``loc`` (or a section above it) came from
    the environment overrides ``overrides`` (``env_values``' result), else ``""``: a bad value named only
    by its key sends the reader to a file that does not hold it. ``names``: the variables set, so that a
    key given inside a JSON value (``RELOOP__TRAIN='{"batch_size": 0}'``) names the variable that holds it."""
    given = {n.upper() for n in names}
    node: Any = overrides
    path: list[str] = []
    for part in loc:
        if not isinstance(node, Mapping) or str(part) not in node:
            return ""
        path.append(str(part))
        node = node[str(part)]
        variable = f"{ENV_PREFIX}{'__'.join(path).upper()}"
        if variable in given:  # this variable set it (a JSON value set what it holds)
            return f" (environment variable {variable})"
        if not isinstance(node, Mapping):
            break
    if not path:
        return ""
    if isinstance(node, Mapping):  # a check of the whole section: the environment set only part of it
        names = ", ".join(f"{ENV_PREFIX}{'__'.join([*path, str(k)]).upper()}" for k in node)
        return f" (the section has values from environment variables: {names})"
    return f" (environment variable {ENV_PREFIX}{'__'.join(path).upper()})"


def env_setting(key: str, env: Mapping[str, str] | None = None) -> str:
    """`` (environment variables RELOOP__MODEL__PARAMS__EMBEDDING_DIM, ...)`` naming the variables of ``env``
    (default os.environ) that set ``key`` (``model.params``) or a key under it, else ``""``: for the
    checks made after loading (a backbone's params, built by its registry), which ``env_origin`` does not
    see, so that an error there sends the reader to the variable, not to a file that does not hold it."""
    env = os.environ if env is None else env
    stem = ENV_PREFIX + key.replace(".", "__").upper()
    names = sorted(n for n in env if n.upper() == stem or n.upper().startswith(stem + "__"))
    if not names:
        return ""
    return f" (environment variable{'s' if len(names) > 1 else ''} {', '.join(names)})"


def _decode_free_dicts(model: type[BaseModel], data: dict[str, Any]) -> dict[str, Any]:
    out = dict(data)
    for name, value in data.items():
        if value == "null":
            out[name] = None
        field = model.model_fields.get(name)
        if field is None or not isinstance(value, dict):
            continue
        sub = _model_of(field.annotation)
        if sub is not None:
            out[name] = _decode_free_dicts(sub, value)
        elif typing.get_origin(field.annotation) is dict or _is_optional_dict(field.annotation):
            out[name] = _decode_leaves(value)
    return out


def _model_of(annotation: Any) -> type[BaseModel] | None:
    for candidate in (annotation, *typing.get_args(annotation)):
        if isinstance(candidate, type) and issubclass(candidate, BaseModel):
            return candidate
    return None


def _is_optional_dict(annotation: Any) -> bool:
    return any(typing.get_origin(a) is dict for a in typing.get_args(annotation))


def _decode_leaves(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _decode_leaves(v) for k, v in value.items()}
    if isinstance(value, str):
        try:
            return json.loads(value)
        except ValueError:
            return value
    return value


def deep_merge(base: Mapping[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    """``over`` merged into ``base``, mappings key by key (the environment over the file)."""
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def int_at_least(low: int) -> typing.Callable[[str], int]:
    """An argparse ``type``: an integer >= ``low``, else argparse's one-line usage error."""
    import argparse

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"expected an integer >= {low}, got {value}")
        return value

    return parse


def positive_float(text: str) -> float:
    """An argparse ``type``: a finite number > 0 (NaN and inf parse as floats: an unpaced rate, a duration
    or a timeout that never ends), else argparse's one-line usage error."""
    import argparse

    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"expected a finite number > 0, got {text!r}")
    return value


def path_problem(value: str | os.PathLike[str], *, folder: bool) -> str | None:
    """Why ``value`` cannot be (or become) a folder (``folder``) or a file: it exists as the other kind,
    or a part of it is a file. None when it can. Whether it may be written is left to the run: a config
    may be checked on another machine than the one it runs on. A path of the wrong kind failed where it
    was first opened, in the operating system's words (``FileExistsError``), retried as if the broker
    had failed."""
    path = Path(value)
    if path.exists():
        if folder != path.is_dir():
            kind, wanted = ("file", "folder") if folder else ("folder", "file")
            return f"{str(path)!r} is a {kind}, expected a {wanted}"
        return None
    for part in path.parents:  # the nearest part that exists
        if part.exists():
            return None if part.is_dir() else f"{str(part)!r} is a file, so {str(path)!r} cannot be made"
    return None


def folder_arg(text: str) -> Path:
    """An argparse ``type``: a folder that exists or can be made (``path_problem``), else exit 2."""
    import argparse

    problem = path_problem(text, folder=True)
    if problem is not None:
        raise argparse.ArgumentTypeError(problem)
    return Path(text)


def port_arg(low: int = 1) -> typing.Callable[[str], int]:
    """An argparse ``type``: a TCP port in ``low``..65535 (0: a free one, where a command takes that),
    else argparse's one-line usage error (a larger one failed inside ``bind``; text read as "invalid
    value")."""
    import argparse

    def parse(text: str) -> int:
        try:
            port = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a port in {low}..65535, got {text!r}") from None
        if not low <= port <= 65535:
            raise argparse.ArgumentTypeError(f"expected a port in {low}..65535, got {port}")
        return port

    return parse
