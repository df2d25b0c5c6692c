"""The identity of a conversation thread, validated once and rendered in one place."""

from __future__ import annotations

import re
from dataclasses import dataclass

from stickyray.errors import InvalidThreadKey

__all__ = ["DEFAULT_TENANT", "ID_PATTERN", "ID_RULE", "NAMESPACE", "ThreadKey"]

# The Ray namespace of thread actors and thread hosts, whichever process creates them.
NAMESPACE = "stickyray"
DEFAULT_TENANT = "default"
# Tenants, thread ids, user ids and message ids all follow this rule.
ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._:@+=-]{0,127}$"
_ID = re.compile(ID_PATTERN)
ID_RULE = "1-128 characters: letters, digits and . _ : @ + = -, starting with a letter or digit"


@dataclass(frozen=True, slots=True)
class ThreadKey:
    """A (tenant, thread id) pair. Constructing one validates both parts."""

    tenant: str
    thread_id: str

    def __post_init__(self) -> None:
        if not _ID.fullmatch(self.tenant):
            raise InvalidThreadKey("tenant", self.tenant, ID_RULE)
        if not _ID.fullmatch(self.thread_id):
            raise InvalidThreadKey("thread_id", self.thread_id, ID_RULE)

    @classmethod
    def of(cls, thread_id: str, tenant: str = DEFAULT_TENANT) -> ThreadKey:
        """A key in ``tenant`` (the default tenant unless given)."""
        return cls(tenant=tenant, thread_id=thread_id)

    @property
    def actor_name(self) -> str:
        """The Ray actor name of the thread; '/' cannot occur in either part."""
        return f"thread/{self.tenant}/{self.thread_id}"

    def redis_key(self, suffix: str) -> str:
        """A Redis key of this thread. The braces keep a thread's keys in one cluster slot."""
        return f"stickyray:{{{self.tenant}/{self.thread_id}}}:{suffix}"

    def deltas_key(self, message_id: str, fingerprint: str) -> str:
        """The Redis stream of the text of ``message_id``'s reply, as it is written.

        The message's fingerprint is in the key: a different message sent with the same id
        (refused) must not read this one's reply meanwhile.
        """
        return self.redis_key(f"deltas:{message_id}:{fingerprint}")

    def __str__(self) -> str:
        return f"{self.tenant}/{self.thread_id}"
