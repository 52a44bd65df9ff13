"""The ``simulate`` section of a config file (the demo's YAML holds it next to ``serve`` and ``arms``)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from reloop.engine.simulate.world import WorldConfig


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class ReportConfig(_Frozen):
    """Which arms the A/B readout compares; ``aa`` names two arms that run the same model."""

    treatment: str | None = Field(default=None, description="the arm the A/B readout judges")
    control: str | None = Field(default=None, description="the arm it is judged against")
    aa: tuple[str, str] | None = Field(
        default=None,
        description="two arms that run the same model: their difference is the noise the lift is read "
        "against",
    )

    @model_validator(mode="after")
    def _pair(self) -> ReportConfig:
        # Half a pair printed no readout at all, without a word.
        if (self.treatment is None) != (self.control is None) or (self.aa and not self.treatment):
            raise ValueError("give treatment and control together (and aa only with them)")
        return self

    def check_arms(self, arms: set[str]) -> None:
        """A name that is no arm (a typo) left the A/B readout out of the summary, without a word."""
        named = [self.treatment, self.control, *(self.aa or ())]
        unknown = sorted({n for n in named if n is not None} - arms)
        if unknown:
            raise ValueError(f"simulate.report: {unknown} not among the arms {sorted(arms)}")


class SimulateConfig(_Frozen):
    rate: float = Field(default=30.0, gt=0, allow_inf_nan=False, description="requests per second")
    concurrency: int = Field(default=2, ge=1, le=64, description="client threads sending requests")
    top_k: int = Field(default=10, ge=1, description="items shown per request")
    window: int = Field(default=5000, ge=10, description="rolling AUC window (impressions per arm)")
    world: dict[str, Any] = Field(default_factory=dict, description="WorldConfig fields")
    report: ReportConfig = ReportConfig()

    @model_validator(mode="after")
    def _world_ok(self) -> SimulateConfig:
        self.world_config()
        return self

    def world_config(self) -> WorldConfig:
        unknown = set(self.world) - set(WorldConfig.__dataclass_fields__)
        if unknown:
            raise ValueError(f"simulate.world: unknown keys {sorted(unknown)}")
        return WorldConfig(**self.world)


def simulate_config_from_dict(data: dict[str, Any]) -> SimulateConfig:
    from reloop.engine.serve.config import ConfigError

    try:
        config = SimulateConfig.model_validate(data.get("simulate") or {})
    except ValidationError as exc:
        msgs = "; ".join(
            f"simulate.{'.'.join(str(p) for p in e['loc'])}: {e['msg'].removeprefix('Value error, ')}"
            if e["loc"]
            else e["msg"].removeprefix("Value error, ")
            for e in exc.errors()
        )
        raise ConfigError(f"bad simulate config: {msgs}") from exc
    arms = {str(a["name"]) for a in data.get("arms") or [] if isinstance(a, dict) and "name" in a}
    if arms:
        try:
            config.report.check_arms(arms)
        except ValueError as exc:
            raise ConfigError(f"bad simulate config: {exc}") from exc
    return config
