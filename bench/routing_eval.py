"""Offline routing on SGD dev: stateless vs sticky vs sticky with evidence switching.

Loads ``sgd-dev`` (``$STICKYRAY_DATASETS`` or ``../shared/datasets`` next to the repo), turns
every service into an ``AgentProfile``, embeds every distinct user turn once with
all-MiniLM-L6-v2 and then replays the dialogues through ONE ``EvidenceRouter`` three ways:

- stateless: ``route`` on each turn alone;
- sticky: ``route`` on the first turn, never switch;
- switching: ``route`` on the first turn, then ``check`` on every later turn with the last
  ``RECENT_USER_MESSAGES`` user messages; a switch moves to the decision's agent.

A turn is right when the agent active for it is among the turn's labelled services (the
domain columns count the domain, the name before ``_``, instead). A routing decision is the
first route of a dialogue plus every switch; stateless counts one per turn.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from memory.embedders import LocalEmbedder
from providers.routing import RECENT_USER_MESSAGES, AgentProfile, EvidenceRouter
from replay.baselines import STRATEGIES, Policy

RESULTS = Path(__file__).parent / "results"
DEFAULT_DATASETS = Path(__file__).resolve().parents[1].parent / "shared" / "datasets"
QUICK_DIALOGUES = 300
GOAL = {"accuracy": 0.90, "decisions_per_turn": 0.25}


def datasets_dir() -> Path:
    """Where the shared datasets live: ``$STICKYRAY_DATASETS`` or the repo's sibling."""
    return Path(os.environ.get("STICKYRAY_DATASETS", DEFAULT_DATASETS))


def load(quick: bool) -> tuple[list[AgentProfile], list[dict[str, Any]]]:
    """The agents and (the first ``QUICK_DIALOGUES`` if quick) dialogues of sgd-dev."""
    root = datasets_dir() / "sgd-dev"
    agents = [
        AgentProfile.from_dataset_entry(e) for e in json.loads((root / "agents.json").read_text())
    ]
    with (root / "dialogues.jsonl").open() as lines:
        dialogues = [json.loads(line) for line in lines if line.strip()]
    return agents, dialogues[:QUICK_DIALOGUES] if quick else dialogues


def domain(service: str) -> str:
    """``Hotels_4`` -> ``Hotels``."""
    return service.split("_")[0]


def evaluate(
    router: EvidenceRouter,
    policy: Policy,
    dialogues: list[dict[str, Any]],
    vectors: list[np.ndarray],
) -> dict[str, Any]:
    """Accuracy (per service and per domain), decisions per turn and the confusions."""
    turns = right = right_domain = decisions = 0
    by_service: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    by_domain: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    wrong: dict[str, Counter[str]] = defaultdict(Counter)
    for dialogue, dialogue_vectors in zip(dialogues, vectors, strict=True):
        agents, made = policy(router, dialogue_vectors, [t["user"] for t in dialogue["turns"]])
        decisions += made
        for turn, agent in zip(dialogue["turns"], agents, strict=True):
            labels = turn["services"]
            if not labels:
                continue  # a turn that addresses no service is not scored
            turns += 1
            ok = agent in labels
            ok_domain = domain(agent) in {domain(s) for s in labels}
            right += ok
            right_domain += ok_domain
            for service in labels:
                by_service[service][0] += ok
                by_service[service][1] += 1
            for name in {domain(s) for s in labels}:
                by_domain[name][0] += ok_domain
                by_domain[name][1] += 1
            if not ok:
                wrong[labels[0]][agent] += 1
    return {
        "turns": turns,
        "accuracy": right / turns,
        "domain_accuracy": right_domain / turns,
        "decisions_per_turn": decisions / turns,
        "per_service": {k: v[0] / v[1] for k, v in sorted(by_service.items())},
        "per_domain": {k: v[0] / v[1] for k, v in sorted(by_domain.items())},
        "confusions": {
            service: {
                "most_wrong": c.most_common(1)[0][0],
                "count": c.most_common(1)[0][1],
                "wrong": sum(c.values()),
            }
            for service, c in sorted(wrong.items())
        },
    }


def report(name: str, result: dict[str, Any], confusions: bool) -> None:
    """Print one strategy's numbers."""
    print(
        f"\n{name}: accuracy {result['accuracy']:.3f} (domain {result['domain_accuracy']:.3f}), "
        f"{result['decisions_per_turn']:.3f} decisions/turn over {result['turns']} turns"
    )
    print("  per domain:  " + "  ".join(f"{k} {v:.2f}" for k, v in result["per_domain"].items()))
    print("  per service: " + "  ".join(f"{k} {v:.2f}" for k, v in result["per_service"].items()))
    if confusions:
        print("  most frequent wrong agent per right service:")
        for service, c in result["confusions"].items():
            print(
                f"    {service:<14} -> {c['most_wrong']:<14} {c['count']:>4} of {c['wrong']} wrong"
            )


def main(quick: bool = False) -> int:
    """Run the evaluation, print the tables, write ``results/routing_eval.json``."""
    started = time.perf_counter()
    agents, dialogues = load(quick)
    texts = sorted({turn["user"] for d in dialogues for turn in d["turns"]})
    # One batch for every distinct text; the cache must hold them all at once.
    embedder = LocalEmbedder(cache_size=len(texts) + 1_000)
    router = EvidenceRouter(embedder, agents)
    asyncio.run(router.prepare())
    matrix = embedder.embed_sync(texts)
    row = {text: i for i, text in enumerate(texts)}
    vectors = [matrix[[row[t["user"]] for t in d["turns"]]] for d in dialogues]
    embedded = time.perf_counter()
    print(
        f"sgd-dev: {len(agents)} agents, {len(dialogues)} dialogues, {len(texts)} distinct "
        f"user turns embedded in {embedded - started:.0f} s"
    )
    results = {}
    for name, policy in STRATEGIES.items():
        results[name] = evaluate(router, policy, dialogues, vectors)
        report(name, results[name], confusions=name == "switching")
    best = results["switching"]
    met = (
        best["accuracy"] >= GOAL["accuracy"]
        and best["decisions_per_turn"] <= GOAL["decisions_per_turn"]
    )
    print(
        f"\ngoal (switching): accuracy >= {GOAL['accuracy']}, decisions/turn <= "
        f"{GOAL['decisions_per_turn']}: {'met' if met else 'NOT met'} "
        f"(per domain {best['domain_accuracy']:.3f})"
    )
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / "routing_eval.json"
    out.write_text(
        json.dumps(
            {
                "benchmark": "routing_eval",
                "quick": quick,
                "model": LocalEmbedder.MODEL_NAME,
                "dialogues": len(dialogues),
                "recent_user_messages": RECENT_USER_MESSAGES,
                "seconds": {
                    "embed": round(embedded - started, 1),
                    "total": round(time.perf_counter() - started, 1),
                },
                "goal": GOAL,
                "goal_met": met,
                "strategies": results,
            },
            indent=2,
        )
    )
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m bench.routing_eval", description=__doc__)
    parser.add_argument("--quick", action="store_true", help=f"first {QUICK_DIALOGUES} dialogues")
    sys.exit(main(quick=parser.parse_args().quick))
