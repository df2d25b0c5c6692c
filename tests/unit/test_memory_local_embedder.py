"""The local model (all-MiniLM-L6-v2) embeds the whole of a long text, not only its start."""

from __future__ import annotations

import pytest

from memory.embedders import LocalEmbedder, _pieces
from memory.in_memory import InMemoryMemoryStore
from memory.long_term import NewMemory
from memory.service import LongTermMemory

# About 300 tokens: past the 256 the model reads at once.
FILLER = " ".join(f"we talked about the weather on day {i}." for i in range(30))
ALLERGY = " My account id is ZEBRA-42 and I am allergic to peanuts."
SKIING = " I go skiing in the Alps every winter."


@pytest.fixture(scope="module")
def local() -> LocalEmbedder:
    return LocalEmbedder()


async def test_the_end_of_a_memory_longer_than_the_model_reads_is_found(
    local: LocalEmbedder,
) -> None:
    model = local._load()
    assert len(model.tokenizer(FILLER, verbose=False)["input_ids"]) > model.max_seq_length
    memory = LongTermMemory(InMemoryMemoryStore(local.dimension), local)
    for tail in (ALLERGY, SKIING):
        await memory.remember("t", "u", NewMemory(content=FILLER + tail))
    for query, tail in (("what am I allergic to?", ALLERGY), ("where do I go skiing?", SKIING)):
        best, other = await memory.recall("t", "u", query, k=2)
        # Read only up to the model's window, both memories would embed alike.
        assert best.memory.content.endswith(tail) and best.similarity > other.similarity


def test_long_texts_are_cut_between_words_into_pieces_the_model_reads_whole(
    local: LocalEmbedder,
) -> None:
    tokenizer = local._load().tokenizer

    def tokens(text: str) -> list[int]:
        return list(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])

    text = " ".join(["uncharacteristically hyphen-ated words, 한국어 텍스트"] * 100)
    pieces = _pieces(tokenizer, text, 50)
    assert len(pieces) > 1 and all(n <= 50 and tokens(piece) for piece, n in pieces)
    # Nothing lost or split at the cuts: the pieces' tokens are the text's, in order.
    assert [t for piece, _ in pieces for t in tokens(piece)] == tokens(text)
    assert [n for _, n in pieces] == [len(tokens(piece)) for piece, _ in pieces]
    assert _pieces(tokenizer, "short", 50) == [("short", 1)]
