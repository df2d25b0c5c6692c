"""Builds the Serve application from a team configuration."""

from __future__ import annotations

from ray.serve import Application

from serve_app.deployments import agent_deployment, embedder_deployment
from serve_app.ingress import INGRESS_DEPLOYMENT, Ingress
from serve_app.run_worker import RUN_WORKER_DEPLOYMENT, RunWorker
from serve_app.tools import check_tools
from stickyray.config import TeamConfig
from stickyray.settings import Settings
from stickyray.webhooks import check_webhooks

__all__ = ["APP_NAME", "build_app"]

APP_NAME = "stickyray"


def build_app(team: TeamConfig, settings: Settings, app_name: str = APP_NAME) -> Application:
    """The ingress bound to one deployment per agent, the run worker, and the embedder if an
    agent needs the local model."""
    check_tools(team)
    check_webhooks(team, settings)
    embedder = embedder_deployment(team.embedder).bind() if team.needs_embedder else None
    agents = {
        agent.name: agent_deployment(agent).bind(agent.name, team, settings, embedder, app_name)
        for agent in team.agents
    }
    from ray import serve

    ingress = serve.deployment(
        name=INGRESS_DEPLOYMENT,
        num_replicas=team.ingress.num_replicas,
        max_ongoing_requests=team.ingress.max_ongoing_requests,
        ray_actor_options={"num_cpus": 0},
    )(Ingress)
    # One replica: it reads the run queue alone (a lease makes sure), and only forwards.
    run_worker = serve.deployment(
        name=RUN_WORKER_DEPLOYMENT, num_replicas=1, ray_actor_options={"num_cpus": 0}
    )(RunWorker).bind(team, settings, agents, app_name)
    return ingress.bind(team, settings, agents, app_name, embedder, run_worker)
