"""The replay report: routing accuracy and cost, in report.json, report.md and a chart."""

from __future__ import annotations

import base64
import io
import json
import tarfile
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

from replay.dataset import Dialogue, SkippedLine
from replay.driver import TurnRecord
from stickyray.config import TeamConfig

__all__ = [
    "REPORT_FILES",
    "accuracy",
    "figure",
    "pack_report",
    "summarize",
    "unpack_report",
    "write_report",
]

REPORT_FILES = ("report.json", "report.md", "routing.png", "turns.jsonl")


def _pct_ms(values: list[float], q: float) -> float | None:
    """A percentile of latencies in seconds, in ms; None when no turn was timed."""
    if not values:
        return None
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))] * 1000, 1)


def _most_frequent(wrong: Counter[str]) -> dict[str, Any]:
    """The wrong agent that answered most often; a tie goes to the first name, and the
    others tied are listed, so the table does not depend on the order of the dialogues."""
    top = max(wrong.values())
    tied = sorted(agent for agent, count in wrong.items() if count == top)
    return {"most_frequent_wrong": tied[0], "count": top, "tied_with": tied[1:]}


def _domain(name: str) -> str:
    return name.split("_")[0]


def accuracy(records: list[TurnRecord], key: Any = None) -> tuple[float | None, int]:
    """Share of labelled turns answered by one of their labelled agents; and their count.

    With ``key`` (e.g. the domain of a name), answers and labels are compared through it.
    ``None`` when no turn is labelled: there is nothing to score, which is not a score of 0.
    """
    labelled = [r for r in records if r.labels]
    right = sum(1 for r in labelled if _right(r, key))
    return (right / len(labelled) if labelled else None), len(labelled)


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 4)


def figure(value: float | None) -> str:
    """An accuracy as the report prints it: three decimals, or n/a."""
    return "n/a" if value is None else f"{value:.3f}"


def _right(record: TurnRecord, key: Any = None) -> bool:
    if record.agent is None:
        return False
    if key is None:
        return record.agent in record.labels
    return key(record.agent) in {key(label) for label in record.labels}


def _by(records: list[TurnRecord], key: Any = None) -> dict[str, float]:
    """Accuracy over the turns labelled with each service (or each ``key`` of one).

    A turn is right as in ``accuracy``, so a turn addressing two services and answered by
    either counts as right in both rows.
    """
    groups: dict[str, list[TurnRecord]] = defaultdict(list)
    for record in records:
        for label in {key(label) if key else label for label in record.labels}:
            groups[label].append(record)
    return {
        name: round(sum(1 for r in group if _right(r, key)) / len(group), 4)
        for name, group in sorted(groups.items())
    }


def _cost(team: TeamConfig, records: list[TurnRecord]) -> dict[str, Any] | None:
    """The cost at agents.yaml's pricing (null when it sets none), in all and per agent.

    Summed as ``Usage.__add__`` sums it: an agent with requests of unknown cost (their
    replies reported no token usage) has an unknown cost, null, and so has the total, rather
    than a figure that is too low; ``unmeasured_requests`` counts those requests per agent.
    """
    known: dict[str, float] = defaultdict(float)
    unmeasured: Counter[str] = Counter()
    for record in records:
        for agent, usage in record.usage_by_agent.items():
            if usage.get("cost_usd") is not None:
                known[agent] += float(usage["cost_usd"] or 0.0)
            elif any(usage.get(k) for k in ("requests", "input_tokens", "output_tokens")):
                # Nothing spent costs nothing; something spent at no known cost is unknown.
                unmeasured[agent] += int(
                    usage.get("unmeasured_requests") or usage.get("requests") or 0
                )
    if not known and team.pricing is None:
        return None
    by_agent: dict[str, float | None] = {a: round(v, 6) for a, v in known.items()}
    by_agent.update(dict.fromkeys(unmeasured))
    return {
        "total": None if unmeasured else round(sum(known.values()), 6),
        "by_agent": dict(sorted(by_agent.items())),
        "unmeasured_requests": dict(sorted(unmeasured.items())),
    }


def summarize(
    team: TeamConfig,
    dialogues: list[Dialogue],
    records: list[TurnRecord],
    skipped: list[SkippedLine],
    elapsed_s: float,
    baselines: dict[str, dict[str, float | None]] | None = None,
) -> dict[str, Any]:
    """Every figure of the report, as a JSON-able dict."""
    acc, labelled = accuracy(records)
    turns = len(records)
    calls: Counter[str] = Counter()
    llm_calls: Counter[str] = Counter()
    tokens: dict[str, dict[str, int]] = defaultdict(lambda: {"input": 0, "output": 0})
    for record in records:
        calls.update(record.agents_called)
        for agent, usage in record.usage_by_agent.items():
            llm_calls[agent] += int(usage.get("requests") or 0)
            tokens[agent]["input"] += int(usage.get("input_tokens") or 0)
            tokens[agent]["output"] += int(usage.get("output_tokens") or 0)
    wrong: dict[str, Counter[str]] = defaultdict(Counter)
    for record in records:
        if record.labels and record.agent not in record.labels:
            for label in record.labels:  # each service the turn addressed lost it
                wrong[label][record.agent or "(none)"] += 1
    agents = {a.name for a in team.agents}
    unknown = Counter(label for r in records for label in r.labels if label not in agents)
    confusion = {right: _most_frequent(c) for right, c in sorted(wrong.items())}
    decisions = sum(1 for r in records if r.supervisor_called)
    latencies = [r.latency_s for r in records if r.status != "error"]
    runtime = {
        "accuracy": _round(acc),
        "supervisor_decisions_per_turn": round(decisions / max(turns, 1), 4),
    }
    return {
        "dialogues": len(dialogues),
        "turns": turns,
        "labelled_turns": labelled,
        "skipped_lines": [s.model_dump() for s in skipped],
        "elapsed_s": round(elapsed_s, 1),
        "routing": {
            **runtime,
            "supervisor_decisions": decisions,
            "domain_accuracy": _round(accuracy(records, _domain)[0]),
            "per_service": _by(records),
            "per_domain": _by(records, _domain),
            "handoffs": sum(r.handoffs for r in records),
            "returns_to_supervisor": sum(r.returns for r in records),
            "confusion": confusion,
            # Labels that name no agent can never be answered right: a naming mismatch
            # between the dialogues and the agents file, not a routing error.
            "unknown_labels": dict(sorted(unknown.items())),
        },
        "agent_calls": dict(sorted(calls.items())),
        "llm_calls": dict(sorted(llm_calls.items())),
        "tokens": {k: v for k, v in sorted(tokens.items())},
        "cost_usd": _cost(team, records),
        # Of turns that got an answer; null when none did (0 would read as instant).
        "latency_ms": {
            "p50": _pct_ms(latencies, 0.50),
            "p95": _pct_ms(latencies, 0.95),
            "p99": _pct_ms(latencies, 0.99),
        },
        # A completed turn can carry an error too (an agent that ran out of iterations).
        "errors": sum(1 for r in records if r.status != "completed" or r.error),
        "strategies": {"sticky with switching (this run)": runtime, **(baselines or {})},
        "supervisor": team.supervisor.name,
    }


def _inline(text: object) -> str:
    """``text`` made safe for one Markdown table cell: a ``|`` would end the cell and a line
    break the row. Labels come from the user's dataset, so they may hold either."""
    escaped = str(text).replace("\\", "\\\\").replace("|", "\\|")
    return " ".join(escaped.splitlines())


def _markdown(report: dict[str, Any]) -> str:
    routing = report["routing"]
    lines = [
        "# Replay report",
        "",
        f"{report['dialogues']} dialogues, {report['turns']} turns "
        f"({report['labelled_turns']} labelled), {len(report['skipped_lines'])} skipped lines, "
        f"{report['elapsed_s']} s.",
        "",
        "| strategy | accuracy | supervisor decisions / turn |",
        "| --- | --- | --- |",
    ]
    for name, figures in report["strategies"].items():
        lines.append(
            f"| {_inline(name)} | {figure(figures['accuracy'])} | "
            f"{figures['supervisor_decisions_per_turn']:.3f} |"
        )
    lines += [
        "",
        f"Accuracy per domain (an agent of a labelled service's domain answered): "
        f"{figure(routing['domain_accuracy'])}.",
        f"Handoffs {routing['handoffs']}, returns to the supervisor "
        f"{routing['returns_to_supervisor']}, errors {report['errors']}.",
        "Turn latency "
        + ", ".join(
            f"{q} {'n/a' if ms is None else f'{ms} ms'}" for q, ms in report["latency_ms"].items()
        )
        + ".",
        "",
        "## Accuracy per domain",
        "",
        "| domain | accuracy |",
        "| --- | --- |",
    ]
    lines += [f"| {_inline(d)} | {a:.3f} |" for d, a in routing["per_domain"].items()]
    lines += ["", "## Accuracy per service", "", "| service | accuracy |", "| --- | --- |"]
    lines += [f"| {_inline(s)} | {a:.3f} |" for s, a in routing["per_service"].items()]
    lines += [
        "",
        "## Most frequent wrong agent",
        "",
        "| right agent | answered instead | turns |",
        "| --- | --- | --- |",
    ]
    lines += [
        f"| {_inline(r)} | {_inline(', '.join([c['most_frequent_wrong'], *c['tied_with']]))} "
        f"| {c['count']} |"
        for r, c in routing["confusion"].items()
    ]
    if routing["unknown_labels"]:
        lines += [
            "",
            "Labels that name no agent (those turns count as wrong): "
            + ", ".join(
                f"{_inline(label)} ({n} turns)" for label, n in routing["unknown_labels"].items()
            )
            + ".",
        ]
    lines += [
        "",
        "## Agent calls, LLM calls and tokens",
        "",
    ]
    cost = report["cost_usd"]
    if cost is None:
        lines += [
            "| agent | agent calls | LLM calls | input tokens | output tokens |",
            "| --- | --- | --- | --- | --- |",
        ]
    else:
        if cost["total"] is None:
            unknown = ", ".join(
                f"{_inline(agent)} {n}" for agent, n in cost["unmeasured_requests"].items()
            )
            lines.append(
                "Cost at the agents file's pricing: unknown, rather than too low: some model "
                f"replies reported no token usage (requests of unknown cost: {unknown})."
            )
        else:
            lines.append(f"Cost at the agents file's pricing: ${cost['total']:.4f} in all.")
        lines += [
            "",
            "| agent | agent calls | LLM calls | input tokens | output tokens | cost (USD) |",
            "| --- | --- | --- | --- | --- | --- |",
        ]
    for agent in sorted(set(report["agent_calls"]) | set(report["llm_calls"])):
        t = report["tokens"].get(agent, {"input": 0, "output": 0})
        row = (
            f"| {_inline(agent)} | {report['agent_calls'].get(agent, 0)} | "
            f"{report['llm_calls'].get(agent, 0)} | {t['input']} | {t['output']} |"
        )
        if cost is not None:
            spent = cost["by_agent"].get(agent, 0.0)
            row += " unknown |" if spent is None else f" {spent:.4f} |"
        lines.append(row)
    lines += ["", "![accuracy vs supervisor calls](routing.png)", ""]
    return "\n".join(lines)


def _chart(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    for name, figures in report["strategies"].items():
        x, y = figures["supervisor_decisions_per_turn"], figures["accuracy"]
        if y is None:  # no labelled turns: nothing to place on the accuracy axis
            continue
        ax.scatter([x], [y], s=60)
        ax.annotate(name, (x, y), textcoords="offset points", xytext=(6, 4), fontsize=8)
    ax.set_xlabel("supervisor decisions per turn")
    ax.set_ylabel("routing accuracy")
    ax.set_xlim(0, 1.05)
    ax.set_ylim(0, 1.0)
    ax.grid(alpha=0.3)
    ax.set_title("Routing accuracy vs supervisor calls")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write_report(
    out: Path,
    team: TeamConfig,
    dialogues: list[Dialogue],
    records: list[TurnRecord],
    skipped: list[SkippedLine],
    elapsed_s: float,
    baselines: dict[str, dict[str, float | None]] | None = None,
) -> dict[str, Any]:
    """Write report.json, report.md, routing.png and turns.jsonl into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    report = summarize(team, dialogues, records, skipped, elapsed_s, baselines)
    # Whatever the machine's locale: labels and dialogue ids may be any Unicode.
    (out / "report.json").write_text(json.dumps(report, indent=2), encoding="utf-8")
    (out / "report.md").write_text(_markdown(report), encoding="utf-8")
    turns = "".join(r.model_dump_json() + "\n" for r in records)
    (out / "turns.jsonl").write_text(turns, encoding="utf-8")
    _chart(report, out / "routing.png")
    return report


def pack_report(out: Path) -> str:
    """The report files of ``out`` as one line of text (base64 of a gzipped tar).

    A job's log is the one channel the Jobs API gives back to whoever submitted it, so this
    is how a report written on a cluster reaches the machine that asked for it.
    """
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for name in REPORT_FILES:
            if (out / name).is_file():
                tar.add(out / name, arcname=name)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def unpack_report(packed: str, out: Path) -> list[str]:
    """Write the files of a ``pack_report`` line into ``out``; returns their names.

    Only the report's own file names are written, whatever else the archive holds. The new
    report replaces an older one in ``out``: a report file it does not have is removed,
    so no earlier run's chart stays beside it. Nothing else in ``out`` is touched.
    """
    out.mkdir(parents=True, exist_ok=True)
    written = []
    with tarfile.open(fileobj=io.BytesIO(base64.b64decode(packed)), mode="r:gz") as tar:
        for member in tar.getmembers():
            source = tar.extractfile(member) if member.isfile() else None
            if member.name in REPORT_FILES and source is not None:
                (out / member.name).write_bytes(source.read())
                written.append(member.name)
    # Removed last: an archive that cannot be opened leaves the old report as it was, and so
    # does one without a report.json (no report at all).
    if "report.json" not in written:
        return written
    for name in REPORT_FILES:
        stale = out / name
        if name not in written and (stale.is_file() or stale.is_symlink()):
            stale.unlink()
    return written
