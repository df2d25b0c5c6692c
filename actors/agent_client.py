"""Calls agent deployments from a thread actor through Ray Serve handles."""

from __future__ import annotations

from typing import Any

from stickyray.turns import AgentRequest, AgentResult, CompressRequest, CompressResult

__all__ = ["ServeAgentCaller"]


class ServeAgentCaller:
    """An AgentCaller over one DeploymentHandle per agent."""

    def __init__(self, handles: dict[str, Any]) -> None:
        self._handles = handles

    async def __call__(self, agent: str, request: AgentRequest) -> AgentResult:
        result: AgentResult = await self._handles[agent].run.remote(request)
        return result

    async def compress(self, agent: str, request: CompressRequest) -> CompressResult:
        result: CompressResult = await self._handles[agent].compress.remote(request)
        return result
