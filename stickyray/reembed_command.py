"""``stickyray memory reembed``: re-embed every stored memory with the configured embedder,
reporting progress and what the embedding model's requests cost."""

from __future__ import annotations

import argparse
import asyncio
import sys
from typing import TYPE_CHECKING, Any

from stickyray.config_files import load_team
from stickyray.errors import ConfigError, StoreUnavailable

if TYPE_CHECKING:
    from stickyray.turns import Usage

__all__ = ["run_reembed"]


def run_reembed(args: argparse.Namespace) -> int:
    """`stickyray memory reembed`: re-embed every memory with the configured embedder."""
    import asyncpg

    from memory.embedded_postgres import EmbeddedPostgres
    from memory.embedders import LocalEmbedder
    from stickyray.errors import StickyrayError
    from stickyray.settings import load_settings

    try:
        settings = load_settings()
        _, team = load_team(args.config, settings.config)
        if team.memory.embedder == "openai" and settings.openai_api_key is None:
            raise ConfigError("memory.embedder openai needs OPENAI_API_KEY")
        if team.memory.embedder == "local" and not LocalEmbedder.installed():
            raise ConfigError(f"the local embedder is not installed: {LocalEmbedder.INSTALL_HINT}")
        embedded = settings.data_dir / "postgres"
        if settings.database_url is None and (pids := EmbeddedPostgres.holders(embedded)):
            raise ConfigError(
                f"the embedded Postgres in {embedded} is in use by another process (pid "
                f"{', '.join(map(str, pids))}), such as a stickyray serve: stop it first, since "
                "it would go on storing the old model's vectors"
            )
    except ConfigError as exc:
        print(f"stickyray: {exc}", file=sys.stderr)
        return 2
    postgres = None
    url = settings.database_url
    if url is None:
        postgres = EmbeddedPostgres(embedded)
        try:
            postgres.start()
        except Exception as exc:
            print(f"stickyray: cannot start the embedded Postgres: {exc}", file=sys.stderr)
            return 2
        url = postgres.admin_url  # the memories of every tenant: past row-level security
    spent: list[Usage] = []  # what the embedding model's requests cost, as they are made
    try:
        done = asyncio.run(_reembed_all(url, team.memory, settings, args.batch_size, spent))
    except ConfigError as exc:
        print(f"stickyray: {exc}", file=sys.stderr)
        return 2
    except (StickyrayError, OSError, asyncpg.PostgresError) as exc:
        print(f"stickyray: cannot re-embed: {exc}", file=sys.stderr)
        return 1
    except Exception as exc:  # the embedding model's own failures; finished batches are kept
        print(f"stickyray: cannot re-embed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(
            "stickyray: interrupted; run it again to finish (finished batches are kept)",
            file=sys.stderr,
        )
        return 130
    finally:
        if postgres is not None:
            postgres.stop()
        if spent:  # also when it stopped halfway: those requests were paid for
            print(f"stickyray: {_spending(spent, team.embedding_price())}", flush=True)
    model = team.memory.embedder_id
    if done is None:
        print(f"stickyray: the memories are embedded by {model} already; nothing to do")
    else:
        print(f"stickyray: the memories are now embedded by {model} ({done:,} re-embedded)")
    return 0


def _spending(spent: list[Usage], price: Any) -> str:
    """What re-embedding spent: tokens, requests, and the cost at ``price`` when known."""
    from stickyray.turns import Usage

    total = sum(spent, Usage())
    said = f"the embedding model took {total.input_tokens:,} tokens in {total.requests:,} requests"
    if price is None:
        return f"{said} (add it to agents.yaml's pricing for its cost)"
    return f"{said}, ${price.charge(total).cost_usd:.6f} at agents.yaml's pricing"


async def _reembed_all(
    url: str, memory: Any, settings: Any, batch_size: int, spent: list[Usage]
) -> int | None:
    """Re-embed every memory at ``url`` with ``memory``'s embedder; None if it did already.
    What each request of an OpenAI embedder spends is added to ``spent``."""
    import time
    from contextlib import AsyncExitStack

    import asyncpg

    from memory.embedders import Embedder, LocalEmbedder
    from memory.reembed import reembed
    from providers.factory import openai_embedder

    shown = 0.0

    def progress(done: int, total: int) -> None:
        nonlocal shown
        if time.monotonic() - shown >= 1.0 or done == total:
            shown = time.monotonic()
            print(f"stickyray: re-embedded {done:,} of {total:,} memories", flush=True)

    async with AsyncExitStack() as stack:
        embedder: Embedder
        if memory.embedder == "openai":
            embedder = openai_embedder(memory, settings, stack, on_usage=spent.append)
        else:
            embedder = LocalEmbedder()
        try:
            conn = await asyncpg.connect(url, timeout=10.0)
        except OSError as exc:
            raise StoreUnavailable("postgres", str(exc) or type(exc).__name__) from exc
        stack.push_async_callback(conn.close)
        done = await reembed(conn, embedder, memory.embedder_id, batch_size, progress)
    return done
