"""Environment settings, read once, typed, in one place."""

from __future__ import annotations

import ipaddress
import re
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from stickyray.errors import ConfigError
from stickyray.webhooks import check_secret

__all__ = ["Settings", "check_host", "check_ray_address", "load_settings", "masked"]


class Settings(BaseSettings):
    """Process settings from the environment.

    Each field is read from its alias only (``STICKYRAY_HOST``, ``REDIS_URL``, ...), and code
    builds one by alias too: reading fields by name as well would take a generic ``HOST`` or
    ``PORT`` from the environment and, say, bind the API to every interface.
    """

    # An empty variable (``OPENAI_API_KEY=`` in a .env file or a unit) means unset, as in
    # most tools; taken as a value it would be an empty key or the current directory.
    # Inputs hidden from a ValidationError's text: a URL may hold a password. load_settings
    # shows them masked.
    model_config = SettingsConfigDict(
        extra="ignore",
        frozen=True,
        env_ignore_empty=True,
        allow_inf_nan=False,
        hide_input_in_errors=True,
    )

    config: Path | None = Field(default=None, alias="STICKYRAY_CONFIG")
    data_dir: Path = Field(default=Path(".stickyray"), alias="STICKYRAY_DATA_DIR")
    redis_url: str | None = Field(default=None, alias="REDIS_URL")
    redis_appendfsync: Literal["always", "everysec", "no"] = Field(
        default="everysec", alias="STICKYRAY_REDIS_APPENDFSYNC"
    )
    database_url: str | None = Field(default=None, alias="DATABASE_URL")
    ray_address: str | None = Field(default=None, alias="RAY_ADDRESS")
    host: str = Field(default="127.0.0.1", alias="STICKYRAY_HOST")
    port: int = Field(default=8000, ge=1, le=65535, alias="STICKYRAY_PORT")
    openai_api_key: SecretStr | None = Field(default=None, alias="OPENAI_API_KEY")
    # Explicit defaults: given None, the SDKs read these variables themselves, and an empty
    # one becomes a base URL of "" that fails every call.
    openai_base_url: str = Field(default="https://api.openai.com/v1", alias="OPENAI_BASE_URL")
    anthropic_api_key: SecretStr | None = Field(default=None, alias="ANTHROPIC_API_KEY")
    anthropic_base_url: str = Field(default="https://api.anthropic.com", alias="ANTHROPIC_BASE_URL")
    llm_timeout_s: float = Field(default=60.0, gt=0, alias="STICKYRAY_LLM_TIMEOUT_S")
    llm_max_retries: int = Field(default=3, ge=0, alias="STICKYRAY_LLM_MAX_RETRIES")
    # Set, every /v1 route but the channels' webhooks needs "Authorization: Bearer <key>".
    api_key: SecretStr | None = Field(default=None, alias="STICKYRAY_API_KEY")
    # Signs the webhooks of queued runs (Standard Webhooks: "whsec_" + base64 of 24-64 bytes);
    # needed when agents.yaml lists runs.webhook_urls.
    webhook_secret: SecretStr | None = Field(default=None, alias="STICKYRAY_WEBHOOK_SECRET")
    # Channels: each is on when its credentials are set (see serve_app/channels.py).
    telegram_bot_token: SecretStr | None = Field(default=None, alias="TELEGRAM_BOT_TOKEN")
    # The bot's @username: "/supervisor@<it>" in a group is its command; one naming another
    # bot is not for this one. Unset, only plain commands ("/supervisor") are commands.
    telegram_bot_username: str | None = Field(
        default=None, alias="TELEGRAM_BOT_USERNAME", pattern=r"^@?[A-Za-z0-9_]{1,64}$"
    )
    telegram_webhook_secret: SecretStr | None = Field(default=None, alias="TELEGRAM_WEBHOOK_SECRET")
    telegram_api_base: str = Field(default="https://api.telegram.org", alias="TELEGRAM_API_BASE")
    whatsapp_access_token: SecretStr | None = Field(default=None, alias="WHATSAPP_ACCESS_TOKEN")
    whatsapp_app_secret: SecretStr | None = Field(default=None, alias="WHATSAPP_APP_SECRET")
    whatsapp_verify_token: SecretStr | None = Field(default=None, alias="WHATSAPP_VERIFY_TOKEN")
    whatsapp_api_base: str = Field(
        default="https://graph.facebook.com/v21.0", alias="WHATSAPP_API_BASE"
    )

    @field_validator(
        "api_key",
        "openai_api_key",
        "anthropic_api_key",
        "telegram_bot_token",
        "telegram_webhook_secret",
        "whatsapp_access_token",
        "whatsapp_app_secret",
        "whatsapp_verify_token",
    )
    @classmethod
    def _one_word(cls, secret: SecretStr | None) -> SecretStr | None:
        # A trailing newline (a secret mounted from a file) would end up in an HTTP header,
        # whose error then quotes the secret.
        if secret is not None and not ONE_WORD.fullmatch(secret.get_secret_value()):
            raise ValueError(ONE_WORD_RULE)
        return secret

    @field_validator("webhook_secret")
    @classmethod
    def _webhook_secret(cls, secret: SecretStr | None) -> SecretStr | None:
        if secret is not None:
            check_secret(secret.get_secret_value())
        return secret

    @field_validator("host")
    @classmethod
    def _host(cls, host: str) -> str:
        return check_host(host)

    @field_validator("telegram_bot_username")
    @classmethod
    def _username(cls, name: str | None) -> str | None:
        return name.removeprefix("@") if name is not None else None

    @field_validator("telegram_webhook_secret")
    @classmethod
    def _telegram_secret(cls, secret: SecretStr | None) -> SecretStr | None:
        # Telegram's own rule for setWebhook's secret_token: it refuses any other.
        if secret is not None and not re.fullmatch(
            r"[A-Za-z0-9_-]{1,256}", secret.get_secret_value()
        ):
            raise ValueError("must be 1-256 characters: letters, digits, _ and -")
        return secret

    @model_validator(mode="after")
    def _channels_complete(self) -> Settings:
        # A channel half set up would take messages it cannot authenticate or answer, or
        # pass the platform's checks and then refuse every message.
        channels = {
            "TELEGRAM_BOT_TOKEN": {
                "TELEGRAM_BOT_TOKEN": self.telegram_bot_token,
                "TELEGRAM_WEBHOOK_SECRET": self.telegram_webhook_secret,
            },
            "WHATSAPP_ACCESS_TOKEN": {
                "WHATSAPP_ACCESS_TOKEN": self.whatsapp_access_token,
                "WHATSAPP_APP_SECRET": self.whatsapp_app_secret,
                "WHATSAPP_VERIFY_TOKEN": self.whatsapp_verify_token,
            },
        }
        for variables in channels.values():
            given = [name for name, value in variables.items() if value is not None]
            missing = [name for name, value in variables.items() if value is None]
            if given and missing:
                raise ValueError(
                    f"{' and '.join(given)} set, so {' and '.join(missing)} must be too"
                )
        return self

    @field_validator(
        "openai_base_url", "anthropic_base_url", "telegram_api_base", "whatsapp_api_base"
    )
    @classmethod
    def _http_base(cls, url: str) -> str:
        # Anything else fails every reply only once the first one is sent, or the SDK's client
        # refuses it as an agent's replica starts, inside Ray.
        if _NOT_IN_URL.search(url):
            # Refused, not stripped, as keys are: a trailing newline from a file, say.
            raise ValueError(
                "must be a URL without spaces, line breaks or control characters: remove them"
            )
        if not url.startswith(("http://", "https://")):
            raise ValueError("must start with http:// or https://")
        try:
            parts = urlsplit(url)
            parts.port  # noqa: B018 (ValueError for a port that is no number of 0-65535)
        except ValueError as exc:
            if _userinfo_unencoded(url):
                raise ValueError(_PERCENT_ENCODE) from None
            raise ValueError(f"is not a URL ({exc})") from None
        if not parts.hostname:
            raise ValueError("must name a host: http(s)://HOST[:PORT][/PATH]")
        return url

    @field_validator("openai_base_url", "anthropic_base_url")
    @classmethod
    def _no_credentials(cls, url: str) -> str:
        # The SDKs send the key in a header, and the HTTP client then refuses credentials in
        # the URL on every call (the OpenAI SDK's ValueError, not even an API error).
        if "@" in urlsplit(url).netloc:
            raise ValueError(
                "must not hold credentials (USER:PASSWORD@): remove them; the API key "
                "variable carries the key"
            )
        return url

    @field_validator("anthropic_base_url")
    @classmethod
    def _anthropic_base(cls, url: str) -> str:
        # The SDK adds /v1 itself: every call would go to /v1/v1/messages and get a 404.
        if urlsplit(url).path.rstrip("/").endswith("/v1"):
            raise ValueError("must not end in /v1 (the Anthropic SDK adds it): drop the /v1")
        return url

    @field_validator("database_url")
    @classmethod
    def _postgres_scheme(cls, url: str | None) -> str | None:
        if url is not None and not url.startswith(("postgresql://", "postgres://")):
            raise ValueError("must start with postgresql:// or postgres://")
        if url is not None:
            # urlsplit: ValueError for a URL no client can parse, e.g. "Invalid IPv6 URL".
            hosts = urlsplit(url).netloc.rpartition("@")[2]
            for host in hosts.split(","):  # libpq and asyncpg take several: h1:5432,h2
                port = host.rpartition(":")[2] if ":" in host.rpartition("]")[2] else ""
                if port and not (port.isdigit() and 1 <= int(port) <= 65535):
                    if _userinfo_unencoded(url):
                        raise ValueError(_PERCENT_ENCODE)
                    raise ValueError(f"has port {port!r}: a port is 1-65535")
        return url

    @field_validator("redis_url")
    @classmethod
    def _redis_url(cls, url: str | None) -> str | None:
        # redis-py would only say so inside a deployment, after Ray and Serve started.
        if url is None:
            return None
        if not url.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError("must start with redis://, rediss:// or unix://")
        from redis.asyncio.connection import parse_url  # what the stores connect with

        try:
            parts = parse_url(url)
        except ValueError as exc:
            if _userinfo_unencoded(url):
                raise ValueError(f"is not a Redis URL: it {_PERCENT_ENCODE}") from None
            # Python's own reasons may quote the URL's user-info (a non-ASCII password).
            reason = _without_userinfo(str(exc), url)
            raise ValueError(f"is not a Redis URL ({reason}): {_REDIS_FORM}") from None
        if parts.get("port") == 0:
            raise ValueError(f"is not a Redis URL (port 0): {_REDIS_FORM}")
        return url


# What an HTTP header carries of a secret: printable ASCII, one word.
ONE_WORD = re.compile(r"[\x21-\x7e]+")
ONE_WORD_RULE = "must be printable ASCII without spaces or line breaks"
# What no URL holds (RFC 3986 escapes them): whitespace and control characters.
_NOT_IN_URL = re.compile(r"[\s\x00-\x1f\x7f-\x9f]")
_RAY_ADDRESS = re.compile(r"auto|local|ray://\S+|(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.-]+):\d{1,5}")
_SECRET = re.compile(r"KEY|TOKEN|SECRET|PASSWORD")
_REDIS_FORM = "write redis[s]://[[USER]:PASSWORD@]HOST[:PORT][/DB], a port of 1-65535"
# A URL's user-info: what precedes the last "@" of its authority. Without a scheme, only a
# "user:password@" (a URL that lost its scheme), so "@my_bot" or "a b@c" is kept as given.
# With a scheme: up to the authority's last "@"; or, after a "user:" with no "@" in the
# authority, up to the URL's last "@" (a password holding an unencoded "/", "?" or "#",
# which ends the authority early for URL parsers, but is still the password).
_USERINFO = re.compile(
    r"^([A-Za-z][A-Za-z0-9+.-]*://)(?:[^/?#]*@|[^/?#@]*:\S*@)|^[^\s/@:]*:[^\s/]*@"
)
_UNENCODED_IN_USERINFO = "/?#"
# What a host name is made of (RFC 1123 labels; "_" too, as in container names).
_HOST_LABEL = re.compile(r"(?!-)[A-Za-z0-9_-]{1,63}(?<!-)")


def _userinfo_unencoded(url: str) -> bool:
    """Whether ``url`` has an "@" past its authority's end: a password holding "/", "?" or
    "#" unencoded, which URL parsers read as host and port (an error about them would quote
    it)."""
    rest = url.partition("://")[2]
    end = min((i for i in (rest.find(c) for c in _UNENCODED_IN_USERINFO) if i >= 0), default=-1)
    return end >= 0 and "@" in rest[end:]


_PERCENT_ENCODE = (
    "has '/', '?' or '#' before its '@' (in the user name or password): percent-encode them "
    "(%2F, %3F, %23)"
)


def masked(value: Any) -> Any:
    """``value`` with the user-info of a URL (``user:password@``) masked, and any
    ``password=...`` (libpq's keyword form, a query parameter)."""
    if isinstance(value, str):
        value = re.sub(r"(?i)(password\s*=\s*)('[^']*'|[^\s&;]+)", r"\1***", value)
        value = _USERINFO.sub(lambda found: f"{found.group(1) or ''}***@", value, count=1)
    return value


def _without_userinfo(text: str, url: str) -> str:
    """``text`` (an error about ``url``) without the URL's user-info."""
    found = _USERINFO.match(url)
    if found is None:
        return text
    userinfo = found.group(0).removeprefix(found.group(1) or "")
    return text.replace(userinfo, "***@") if userinfo != "@" else text


def check_host(host: str) -> str:
    """``host`` if a server can bind to it (an IP address or a host name); ValueError saying
    what is wrong otherwise."""
    if not host:
        raise ValueError("must not be empty: give an IP address (e.g. 127.0.0.1) or a host name")
    if _NOT_IN_URL.search(host):
        raise ValueError(
            "must be an IP address or a host name without spaces, line breaks or control "
            "characters: remove them"
        )
    try:
        ipaddress.ip_address(host)
        return host
    except ValueError:
        pass
    labels = host.removesuffix(".").split(".")
    if (
        len(host) > 253
        or not all(_HOST_LABEL.fullmatch(label) for label in labels)
        or labels[-1].isdigit()  # an IPv4 address of the wrong shape: 10.0.0.256, 10.0.1
    ):
        raise ValueError(
            "must be an IP address (e.g. 127.0.0.1, 0.0.0.0 or ::, without brackets) or a host "
            "name (letters, digits, - and _, in labels separated by dots)"
        )
    return host


def load_settings() -> Settings:
    """Read the environment; a bad value raises ConfigError naming the variable."""
    try:
        return Settings()
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            name = ".".join(str(part) for part in err["loc"])
            message = str(err["msg"]).removeprefix("Value error, ")
            if not name:  # a rule across variables: its message names them
                problems.append(message)
            elif _SECRET.search(name):  # never echo a credential into logs
                problems.append(f"{name}: {message}")
            else:
                problems.append(f"{name}: {message} (got {masked(err.get('input'))!r})")
        raise ConfigError("bad environment setting: " + "; ".join(problems)) from None


def check_ray_address(address: str | None) -> None:
    """Raise ConfigError naming RAY_ADDRESS unless ``ray.init`` takes it.

    Only where this process joins a cluster: `ray job submit` reads the same variable as
    the dashboard's http:// address, so a shell may hold that form for other commands.
    """
    if address is not None and not _RAY_ADDRESS.fullmatch(address):
        raise ConfigError(
            f"bad environment setting: RAY_ADDRESS: must be auto, local, HOST:PORT of the head's "
            f"GCS (e.g. 10.0.0.5:6379) or ray://HOST:10001 (got {masked(address)!r}); the "
            "dashboard's http:// address is for `ray job submit` and `stickyray replay --address`"
        )
