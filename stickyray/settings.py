"""Environment settings, read once, typed, in one place."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, SecretStr, ValidationError
from pydantic_settings import BaseSettings, SettingsConfigDict

from stickyray.errors import ConfigError

__all__ = ["Settings", "load_settings"]


class Settings(BaseSettings):
    """Process settings from the environment.

    Variable names are the field names in upper case unless an alias says otherwise
    (``STICKYRAY_CONFIG``, ``REDIS_URL``, ``RAY_ADDRESS``, ``OPENAI_API_KEY``, ...).
    """

    model_config = SettingsConfigDict(extra="ignore", populate_by_name=True, frozen=True)

    config: Path | None = Field(default=None, alias="STICKYRAY_CONFIG")
    data_dir: Path = Field(default=Path(".stickyray"), alias="STICKYRAY_DATA_DIR")
    redis_url: str | None = Field(default=None, alias="REDIS_URL")
    redis_appendfsync: str = Field(default="everysec", alias="STICKYRAY_REDIS_APPENDFSYNC")
    database_url: str | None = Field(default=None, alias="DATABASE_URL")
    ray_address: str | None = Field(default=None, alias="RAY_ADDRESS")
    host: str = Field(default="127.0.0.1", alias="STICKYRAY_HOST")
    port: int = Field(default=8000, ge=1, le=65535, alias="STICKYRAY_PORT")
    openai_api_key: SecretStr | None = Field(default=None, alias="OPENAI_API_KEY")
    openai_base_url: str | None = Field(default=None, alias="OPENAI_BASE_URL")
    anthropic_api_key: SecretStr | None = Field(default=None, alias="ANTHROPIC_API_KEY")
    anthropic_base_url: str | None = Field(default=None, alias="ANTHROPIC_BASE_URL")
    llm_timeout_s: float = Field(default=60.0, gt=0, alias="STICKYRAY_LLM_TIMEOUT_S")
    llm_max_retries: int = Field(default=3, ge=0, alias="STICKYRAY_LLM_MAX_RETRIES")


def load_settings() -> Settings:
    """Read the environment; a bad value raises ConfigError naming the variable."""
    try:
        return Settings()
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            name = ".".join(str(part) for part in err["loc"])
            problems.append(f"{name}: {err['msg']} (got {err.get('input')!r})")
        raise ConfigError("bad environment setting: " + "; ".join(problems)) from None
