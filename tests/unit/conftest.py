"""Fixtures of the fake LLM server's own tests: a private server and real SDK clients."""

from __future__ import annotations

from collections.abc import Iterator

import anthropic
import openai
import pytest

from stickyray.testing import FakeLLMServer
from tests.unit.fake_clients import AGENT


@pytest.fixture
def fake() -> Iterator[FakeLLMServer]:
    with FakeLLMServer() as server:
        yield server


@pytest.fixture
def oai(fake: FakeLLMServer) -> openai.OpenAI:
    return openai.OpenAI(
        base_url=fake.openai_base_url, api_key="test", max_retries=0, default_headers=AGENT
    )


@pytest.fixture
def claude(fake: FakeLLMServer) -> anthropic.Anthropic:
    return anthropic.Anthropic(
        base_url=fake.anthropic_base_url, api_key="test", max_retries=0, default_headers=AGENT
    )
