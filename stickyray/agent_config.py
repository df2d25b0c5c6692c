"""An agent of the team configuration (``agents.yaml``): its prompt, model, intents,
memory and how Ray Serve scales it; the team around it is ``stickyray.config``.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator

__all__ = [
    "AGENT_NAME_PATTERN",
    "INTENT_NAME_PATTERN",
    "AgentConfig",
    "AgentMemoryConfig",
    "AutoscalingConfig",
    "IntentConfig",
    "ModelName",
    "ProviderName",
    "SlotName",
    "StrictModel",
    "check_slots_once",
]

AGENT_NAME_PATTERN = r"^[a-z][a-z0-9_]{0,39}$"
INTENT_NAME_PATTERN = r"^[A-Za-z][A-Za-z0-9_]{0,63}$"
ProviderName = Literal["openai", "anthropic", "offline"]
SLOT_NAME_PATTERN = r"^[A-Za-z_][A-Za-z0-9_]{0,63}$"
SlotName = Annotated[str, Field(pattern=SLOT_NAME_PATTERN)]


def _not_blank(value: str) -> str:
    # min_length=1 takes " ": a description the model routes on that says nothing.
    if not value.strip():
        raise ValueError("must not be blank: write some text, not only spaces")
    return value


def _model_name(value: str) -> str:
    # The provider answers "model not found" to every call of a name with spaces around it.
    if not value.strip():
        raise ValueError("must not be blank: name the model, e.g. gpt-4o-mini")
    if value != value.strip():
        raise ValueError(f"must not start or end with spaces: write {value.strip()!r}")
    return value


_Description = Annotated[str, AfterValidator(_not_blank)]
ModelName = Annotated[str, AfterValidator(_model_name)]


class StrictModel(BaseModel):
    """The base of every configuration section: an unknown key is an error naming it."""

    # No inf or nan: `.inf` is valid YAML, and an infinite timeout breaks what computes with it.
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class AutoscalingConfig(StrictModel):
    """Ray Serve autoscaling for one deployment (a subset of Serve's own settings)."""

    min_replicas: int = Field(default=1, ge=0)
    max_replicas: int = Field(default=1, ge=1)
    initial_replicas: int | None = Field(default=None, ge=0)
    target_ongoing_requests: float = Field(default=16.0, gt=0)
    upscale_delay_s: float = Field(default=5.0, ge=0)
    downscale_delay_s: float = Field(default=60.0, ge=0)

    @model_validator(mode="after")
    def _bounds(self) -> AutoscalingConfig:
        if self.min_replicas > self.max_replicas:
            raise ValueError("min_replicas must not exceed max_replicas")
        initial = self.initial_replicas
        if initial is not None and not self.min_replicas <= initial <= self.max_replicas:
            # Serve refuses it too, but only once Ray is up and the app deploys.
            raise ValueError(
                f"initial_replicas ({initial}) must be between min_replicas "
                f"({self.min_replicas}) and max_replicas ({self.max_replicas})"
            )
        return self


class AgentMemoryConfig(StrictModel):
    """An agent's long-term memory: what it is shown each turn and what it may do."""

    # The thread keeps at most this many recent messages while this agent is active; older
    # ones are summarised into an episodic memory (compression) before they leave.
    short_window: int | None = Field(default=None, ge=2, le=10_000)
    top_k: int = Field(default=5, ge=0, le=50)
    compression: bool = True
    decay_half_life_days: float = Field(default=30.0, gt=0)
    tools: bool = True
    core_block_limit: int = Field(default=2000, ge=1, le=100_000)


class IntentConfig(StrictModel):
    """Something the user can ask an agent to do; offered to the model as a tool."""

    name: str = Field(pattern=INTENT_NAME_PATTERN)
    description: str = ""
    required_slots: list[SlotName] = Field(default_factory=list)
    optional_slots: list[SlotName] = Field(default_factory=list)

    @model_validator(mode="after")
    def _slots_once(self) -> IntentConfig:
        check_slots_once(self.required_slots, self.optional_slots)
        return self


def check_slots_once(required: list[str], optional: list[str]) -> None:
    """An intent's slots become one JSON schema's properties: a repeated one makes a schema
    that providers refuse on the first call."""
    seen: set[str] = set()
    for slot in [*required, *optional]:
        if slot in seen:
            raise ValueError(f"slot {slot!r} is listed twice")
        seen.add(slot)


class AgentConfig(StrictModel):
    """One agent: its prompt, model, handoffs and how Ray Serve scales it."""

    name: str = Field(pattern=AGENT_NAME_PATTERN)
    description: _Description
    instructions: str = ""
    provider: ProviderName = "offline"
    model: ModelName | None = None
    # None leaves sampling to the provider's default (some models reject the parameter).
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    max_iterations: int = Field(default=6, ge=1, le=50)
    max_tokens: int = Field(default=1024, ge=1)
    # One tool call's deadline: the thread runs one turn at a time, so a hung backend
    # would hold the conversation.
    tool_timeout_s: float = Field(default=30.0, gt=0)
    # What one tool call may put into the conversation, which every later model call of the
    # turn sends (and pays for) again; a longer output keeps its start and its end.
    tool_output_max_chars: int = Field(default=20_000, ge=200)
    handoffs: list[str] | None = None
    can_return_to_supervisor: bool = True
    tools: list[str] = Field(default_factory=list)
    intents: list[IntentConfig] = Field(default_factory=list)
    slots: dict[str, str] = Field(default_factory=dict)
    memory: AgentMemoryConfig | None = None
    # Serve scaling. An agent replica spends its time waiting on the model, so it can hold
    # far more turns at once than Serve's default of 5 ongoing requests.
    num_replicas: int | None = Field(default=None, ge=1)
    autoscaling_config: AutoscalingConfig | None = None
    max_ongoing_requests: int = Field(default=100, ge=1)
    num_cpus: float = Field(default=0.0, ge=0.0)

    @model_validator(mode="after")
    def _check(self) -> AgentConfig:
        if self.num_replicas is not None and self.autoscaling_config is not None:
            raise ValueError("set num_replicas or autoscaling_config, not both")
        if self.provider != "offline" and not self.model:
            raise ValueError(f"model is required for provider {self.provider!r}")
        if "provider" not in self.model_fields_set:
            # The default provider answers offline: a model without a provider is one left
            # out, and the agent would give canned replies, uncharged, under the model's name.
            for field in ("model", "temperature"):
                if getattr(self, field) is not None:
                    raise ValueError(
                        f"{field} is set but provider is offline (the default): add provider: "
                        f"openai or anthropic, or remove {field}"
                    )
        if self.provider == "anthropic" and self.temperature is not None and self.temperature > 1:
            # Anthropic's range is 0-1: every call would be refused.
            raise ValueError("temperature: at most 1.0 for provider anthropic")
        self._check_slot_names()
        return self

    def _check_slot_names(self) -> None:
        used = list(
            dict.fromkeys(s for i in self.intents for s in [*i.required_slots, *i.optional_slots])
        )
        unused = [slot for slot in self.slots if slot not in used]
        undescribed = [slot for slot in used if slot not in self.slots]
        # A slot no intent takes still describes the agent to the offline router; one beside
        # an intent slot left without a description is a misspelling of it.
        if unused and undescribed:
            raise ValueError(
                f"agent {self.name!r}: slots: {unused[0]!r} is not a slot of its intents (they "
                f"take {', '.join(used)}), and {', '.join(undescribed)} has no description: "
                "correct the name (a slot kept for routing only needs every intent slot "
                "described)"
            )

    @property
    def model_name(self) -> str:
        """The model to ask for; the offline provider names its embedding model."""
        return self.model or "offline-all-MiniLM-L6-v2"
