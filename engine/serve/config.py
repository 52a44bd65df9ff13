"""Configuration of the scoring service: frozen pydantic models, loaded in one place.

One YAML file may hold several sections (the demo's does); the service reads ``serve``, ``arms`` and
``kafka``. Environment overrides: ``RELOOP_KAFKA_BOOTSTRAP`` replaces ``kafka.bootstrap``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class ColdStart(_Frozen):
    """An untrained model served as version 0 while the arm's registry is still empty. Without it the
    loop could never start: no snapshot without samples, no samples without served impressions.
    Built with the same seed as the trainer's initial model, so both agree on what v0 predicted."""

    backbone: str
    spec: dict[str, Any] = Field(description="FeatureSpec as data")
    seed: int = 0
    params: dict[str, Any] = Field(default_factory=dict, description="backbone settings")


class ArmMemoryConfig(_Frozen):
    """ReLoop2's error memory for one arm (engine/memory/): the live model's scores are corrected by the
    errors it made on similar samples whose labels came back, read from the arm's samples topic."""

    samples_topic: str = Field(description="the topic the arm's join stage writes (stages.samples_topic)")
    n_tables: int = Field(default=16, ge=1, le=64)
    n_bits: int = Field(default=12, ge=1, le=20, description="2**n_bits buckets per table")
    # Defaults: chosen on MovieLens-100K's selection weeks for DCN (docs/backtest/reloop2/report.md).
    lam: float = Field(default=0.3, ge=0.0, le=1.0, description="weight of the neighbours' error")
    prior_count: float = Field(default=200.0, ge=0.0, description="pseudo-samples shrinking towards the base")
    form: Literal["residual", "label"] = "label"
    seed: int = 0
    buffer: int = Field(default=20_000, ge=0, description="samples kept to re-key the memory on a reload")
    state_file: Path | None = Field(default=None, description=".npz saved every save_every_s and on stop")
    save_every_s: float = Field(default=30.0, gt=0)


class ArmConfig(_Frozen):
    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")
    weight: float = Field(default=1.0, gt=0)
    registry: Path = Field(description="snapshot registry root this arm's trainer writes")
    impressions_topic: str = "impressions"
    clicks_topic: str = "clicks"
    cold_start: ColdStart | None = None
    memory: ArmMemoryConfig | None = None
    # Settings for this arm's trainer (the demo passes them to `reloop run`); the service ignores them.
    train: dict[str, Any] = Field(default_factory=dict)


class LogConfig(_Frozen):
    enabled: bool = True
    client: Literal["confluent", "kafka-python"] = Field(
        default="confluent",
        description="confluent: requests put events straight into librdkafka's queue (C threads do the "
        "rest); kafka-python: a Python drain thread and kafka-python's sender (they compete with "
        "scoring for the GIL; docs/bench-serve.md)",
    )
    max_buffer: int = Field(default=100_000, ge=1)
    batch_size: int = Field(default=500, ge=1)
    linger_s: float = Field(default=0.02, ge=0)


class RequestLimits(_Frozen):
    """Bounds on one scoring request; beyond them it is refused (413 for the body, 422 otherwise) before
    any scoring work, so one request can never stall the service."""

    max_body_bytes: int = Field(default=1 << 20, gt=0, description="413 above this")
    max_feature_chars: int = Field(default=4096, gt=0, description="longest string feature value")
    max_feature_list: int = Field(default=1024, gt=0, description="most items in a multi-valued feature")
    max_future_ms: int | None = Field(
        default=300_000, ge=0, description="event_time_ms further ahead of the service clock is refused"
    )
    max_past_ms: int | None = Field(
        default=86_400_000, ge=0, description="event_time_ms further behind the service clock is refused"
    )


class KafkaConfig(_Frozen):
    bootstrap: str | None = None
    # Passed through to kafka-python untouched (security_protocol, sasl_mechanism, ssl_cafile, ...).
    settings: dict[str, Any] = Field(default_factory=dict)
    # Passed through to confluent-kafka untouched, librdkafka names (security.protocol, sasl.mechanism,
    # ssl.ca.location, ...). When empty, ``settings`` is translated (connectors/confluent/settings.py);
    # a kafka-python setting without an equivalent is refused at start, never dropped.
    confluent_settings: dict[str, Any] = Field(default_factory=dict)


class ServeConfig(_Frozen):
    host: str = "127.0.0.1"
    auth_token_file: Path | None = Field(
        default=None,
        description="require 'Authorization: Bearer <token>' (file content) on everything but the probes; "
        "the RELOOP_SERVE_TOKEN environment variable does the same",
    )
    port: int = Field(default=8000, ge=0, le=65535)
    top_k: int = Field(default=10, ge=1)
    reload_interval_s: float = Field(
        default=0.2, gt=0, description="registry poll period: a poll is two directory listings"
    )
    torch_threads: int = Field(default=1, ge=1)
    keep_alive_s: int = Field(default=5, ge=1, description="idle keep-alive connections are closed after")
    workers: int = Field(default=1, ge=1, description="serving processes sharing the port (SO_REUSEPORT)")
    salt: str = "reloop"
    arms: tuple[ArmConfig, ...] = Field(min_length=1)
    log: LogConfig = LogConfig()
    kafka: KafkaConfig = KafkaConfig()
    limits: RequestLimits = RequestLimits()

    @model_validator(mode="after")
    def _unique_arms(self) -> ServeConfig:
        names = [a.name for a in self.arms]
        if len(set(names)) != len(names):
            raise ValueError(f"arms: duplicate names {names}")
        topics = [a.impressions_topic for a in self.arms]
        if len(self.arms) > 1 and len(set(topics)) != len(topics):
            raise ValueError(
                "arms: each arm needs its own impressions_topic (each arm trains on its own feedback)"
            )
        return self


class ConfigError(ValueError):
    pass


def read_yaml(path: str | Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(Path(path).read_text())
    except FileNotFoundError as exc:
        raise ConfigError(f"config file not found: {path}") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path}: top level must be a mapping")
    return data


def serve_config_from_dict(data: dict[str, Any], *, base_dir: Path | None = None) -> ServeConfig:
    """Build a ServeConfig from a whole config document (sections ``serve``, ``arms``, ``kafka``)."""
    merged: dict[str, Any] = dict(data.get("serve") or {})
    if "arms" in data:
        merged["arms"] = data["arms"]
    if "kafka" in data:
        merged["kafka"] = data["kafka"]
    if "salt" in data and "salt" not in merged:
        merged["salt"] = data["salt"]
    bootstrap = os.environ.get("RELOOP_KAFKA_BOOTSTRAP")
    if bootstrap:
        merged["kafka"] = {**(merged.get("kafka") or {}), "bootstrap": bootstrap}
    try:
        config = ServeConfig.model_validate(merged)
    except ValidationError as exc:
        raise ConfigError(_explain(exc)) from exc
    if base_dir is not None:
        arms = tuple(
            a if a.registry.is_absolute() else a.model_copy(update={"registry": base_dir / a.registry})
            for a in config.arms
        )
        config = config.model_copy(update={"arms": arms})
    return config


def load_serve_config(path: str | Path) -> ServeConfig:
    return serve_config_from_dict(read_yaml(path))


def _explain(exc: ValidationError) -> str:
    lines = []
    for err in exc.errors():
        key = ".".join(str(p) for p in err["loc"]) or "(root)"
        lines.append(f"{key}: {err['msg']}")
    return "bad serve config: " + "; ".join(lines)
