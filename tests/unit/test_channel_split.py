"""``split_text`` never sends a piece of whitespace alone: Telegram refuses one ("message text
is empty"), which would fail a reply whose every word was delivered."""

from __future__ import annotations

import random

from serve_app.channel_sender import split_text


def units(text: str) -> int:
    return len(text.encode("utf-16-le")) // 2


def assert_fair_pieces(text: str, pieces: list[str], limit: int) -> None:
    """Each piece has words and fits; together they are ``text``, in order, less only runs
    of whitespace left out between or after them."""
    assert all(piece.strip() for piece in pieces), pieces
    assert all(units(piece) <= limit for piece in pieces), pieces
    at = 0
    for piece in pieces:
        while not text.startswith(piece, at):
            assert text[at].isspace(), (text, pieces)  # only whitespace is left out
            at += 1
        at += len(piece)
    assert not text[at:].strip(), (text, pieces)


def test_a_reply_ending_in_blank_lines_just_past_the_limit_is_one_message() -> None:
    reply = "x" * 4094 + "\n\n\n\n"  # an answer just under 4,096 characters, then blank lines
    assert split_text(reply) == ["x" * 4094 + "\n\n"]  # not a second message of "\n\n"
    # Whitespace that would be a message of its own ends the piece before it when it fits...
    emoji = "\U0001f600" * 10  # two units each
    assert split_text("a" * 10 + "\n" + " " * 8 + emoji, limit=20) == [
        "a" * 10 + "\n" + " " * 8,
        emoji,
    ]
    # ... and is left out when it does not.
    assert split_text("a" * 16 + "\n" + "\t" * 20 + "b", limit=20) == ["a" * 16 + "\n", "b"]
    assert split_text(" " * 30 + "b", limit=20) == [" " * 10 + "b"]
    assert split_text("") == []


def test_no_piece_is_blank_and_only_whitespace_is_left_out() -> None:
    rng = random.Random(4096)
    alphabet = ["a", "b", "é", "\U0001f600", "\u200d", " ", "\n", "\t", "\u3000"]
    for _ in range(3000):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 400)))
        limit = rng.randint(2, 60)
        assert_fair_pieces(text, split_text(text, limit), limit)


def test_a_reply_loses_at_most_its_trailing_whitespace() -> None:
    """Replies as agents write them (words, single spaces and line breaks, maybe a blank line
    or a few at the end): the pieces join back into the reply, all but the whitespace that
    ends it."""
    rng = random.Random(613)
    words = ["a", "menu", "réservé", "\U0001f37d\ufe0f", "4096", "x" * 30]
    for _ in range(2000):
        limit = rng.randint(12, 80)
        parts = [rng.choice(words)]
        for _ in range(rng.randint(0, 120)):
            parts += [rng.choice([" ", " ", " ", "\n", "\n\n"]), rng.choice(words)]
        text = "".join(parts) + rng.choice(["", ".", "\n", "\n\n", " \n\n\n", "\n" * 9])
        pieces = split_text(text, limit)
        assert_fair_pieces(text, pieces, limit)
        joined = "".join(pieces)
        assert text.startswith(joined) and not text[len(joined) :].strip(), (text, pieces)
        assert joined.rstrip() == text.rstrip()
