"""The fake LLM server in a child process, scripted for the benchmarks.

In the benchmark's own process its request handling would share the GIL with the load
generator or the framework under test, which Ray workers do not pay.
"""

from __future__ import annotations

import contextlib
import json
import select
import subprocess
import sys
from pathlib import Path
from typing import Any

__all__ = ["REPLY", "FakeLLMProcess", "serve"]

REPLY = "Done: your booking is moved."


def serve(latency_s: float, script: str = "peers") -> None:
    """Child process: serve the scripted fake LLM; answer one JSON line per stdin command.

    ``script`` is ``peers`` (agents told apart by their prompts) or ``stickyray`` (by the
    agent header stickyray sends; ``raw`` is the raw pipeline's agent).
    """
    from stickyray.testing import FakeLLMServer, FakeReply

    # strict: anything off script is an HTTP 500, so the turn fails instead of being measured.
    fake = FakeLLMServer(latency_s, strict=True)
    if script == "stickyray":
        handoff = FakeReply.tool_call("transfer_to_bookings", {"reason": "b"})
        fake.on(agent="triage", reply=handoff)
        fake.on(agent="bookings", reply=FakeReply.text(REPLY))
        fake.on(agent="raw", reply=FakeReply.text(REPLY))
    else:
        fake.on(
            system_contains="triage agent",
            has_tool="transfer_to_bookings",
            after_tool_result=False,
            reply=FakeReply.tool_call("transfer_to_bookings", {}),
        )
        fake.on(system_contains="bookings specialist", reply=FakeReply.text(REPLY))
    with fake:
        print(json.dumps(fake.openai_base_url), flush=True)
        for command in sys.stdin:
            requests = fake.requests
            if command.strip() == "stats":
                answer: Any = [len(requests), sum(r.latency_s for r in requests)]
            else:  # "last"
                r = requests[-1]
                answer = {"messages": len(r.messages), "bytes": len(json.dumps(r.body))}
            print(json.dumps(answer), flush=True)


class FakeLLMProcess:
    """The fake LLM in a child process: its URL, request count and scripted LLM time.

    A plain subprocess rather than multiprocessing, whose spawn would re-run the caller's
    main module.
    """

    def __init__(self, latency_s: float, script: str = "peers") -> None:
        self.latency_s = latency_s
        code = f"from bench.fake_llm_process import serve; serve({latency_s!r}, {script!r})"
        self._process = subprocess.Popen(
            [sys.executable, "-c", code],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            cwd=Path(__file__).parent.parent,  # where `bench` imports from
        )
        assert self._process.stdout is not None
        ready, _, _ = select.select([self._process.stdout], [], [], 60)
        if not ready:
            self.stop()
            raise RuntimeError("fake LLM process did not start within 60 s")
        self.url: str = self._read()

    def _read(self) -> Any:
        assert self._process.stdout is not None
        line = self._process.stdout.readline()
        if not line:
            raise RuntimeError(f"fake LLM process exited ({self._process.poll()})")
        return json.loads(line)

    def _ask(self, command: str) -> Any:
        assert self._process.stdin is not None
        self._process.stdin.write(command + "\n")
        self._process.stdin.flush()
        return self._read()

    def stats(self) -> tuple[int, float]:
        """Requests so far and the sum of their scripted latencies (s)."""
        count, llm_s = self._ask("stats")
        return int(count), float(llm_s)

    def last_request(self) -> dict[str, Any]:
        """Size of the latest request: messages and JSON bytes."""
        last: dict[str, Any] = self._ask("last")
        return last

    def stop(self) -> None:
        """Stop the child: closing its stdin ends it; kill it if it lingers."""
        if self._process.stdin is not None:
            with contextlib.suppress(OSError):
                self._process.stdin.close()
        try:
            self._process.wait(15)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait(15)
        if self._process.stdout is not None:
            self._process.stdout.close()
