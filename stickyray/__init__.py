"""stickyray: a sticky multi-agent assistant runtime on Ray."""

from stickyray.agent_config import AgentConfig
from stickyray.config import TeamConfig, load_config
from stickyray.errors import (
    CheckpointConflict,
    ConfigError,
    InvalidThreadKey,
    ProviderError,
    StickyrayError,
    StoreUnavailable,
)
from stickyray.settings import Settings, load_settings

__version__ = "0.1.0"

__all__ = [
    "AgentConfig",
    "CheckpointConflict",
    "ConfigError",
    "InvalidThreadKey",
    "ProviderError",
    "Settings",
    "StickyrayError",
    "StoreUnavailable",
    "TeamConfig",
    "load_config",
    "load_settings",
]
