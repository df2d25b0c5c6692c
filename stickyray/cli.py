"""The ``stickyray`` command: serve, chat, check, dashboard, replay, memory, bench and
fake-llm."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from stickyray.config_files import in_file
from stickyray.errors import ConfigError

__all__ = ["main"]


def _serve(args: argparse.Namespace) -> int:
    from stickyray.serve_command import run_serve

    return run_serve(args)


def _reembed(args: argparse.Namespace) -> int:
    from stickyray.reembed_command import run_reembed

    return run_reembed(args)


def _positive(value: str) -> int:
    number = int(value) if value.isdigit() else 0
    if number < 1:
        raise argparse.ArgumentTypeError(f"{value!r} is not a positive whole number")
    return number


def _port(value: str) -> int:
    port = int(value) if value.isdigit() else 0
    if not 1 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{value!r} is not a port number (1-65535)")
    return port


def _host(value: str) -> str:
    from stickyray.settings import check_host

    try:
        return check_host(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"{value!r} {exc}") from None


def _check(args: argparse.Namespace) -> int:
    from serve_app.tools import check_tools
    from stickyray.config import load_config

    try:
        team = load_config(args.config)
        check_tools(team)
    except ConfigError as exc:
        print(f"stickyray: {in_file(exc, args.config)}", file=sys.stderr)
        return 2
    names = ", ".join(s.name for s in team.specialists)
    print(f"{args.config}: ok (supervisor {team.supervisor.name}; specialists {names})")
    return 0


def _dashboard(args: argparse.Namespace) -> int:
    from stickyray.dashboard import dashboard_json

    content = dashboard_json()
    if args.out is None:
        print(content)
        return 0
    try:
        args.out.write_text(content + "\n")
    except OSError as exc:
        print(f"stickyray: cannot write {args.out}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    print(f"stickyray: the Grafana dashboard is in {args.out}")
    return 0


def _chat(args: argparse.Namespace) -> int:
    from stickyray.chat import run_chat
    from stickyray.settings import ONE_WORD, ONE_WORD_RULE

    # The key is all this client reads from the environment: the rest is the server's.
    key = os.environ.get("STICKYRAY_API_KEY") or None
    if key is not None and not ONE_WORD.fullmatch(key):
        print(f"stickyray: STICKYRAY_API_KEY {ONE_WORD_RULE}", file=sys.stderr)
        return 2
    return run_chat(args.url, args.thread, api_key=key)


def _replay(args: argparse.Namespace) -> int:
    from replay.submit import submit_replay

    return submit_replay(
        args.dialogues,
        args.agents,
        args.out,
        args.address,
        args.concurrency,
        args.limit,
        args.hosting,
    )


def _bench(argv: list[str]) -> int:
    from bench.__main__ import main as bench_main

    return bench_main(argv)


def _fake_llm(argv: list[str]) -> int:
    from stickyray.testing.fake_llm import main as fake_main

    return fake_main(argv)


_PASS_THROUGH = {"bench": _bench, "fake-llm": _fake_llm}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="stickyray", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="start Ray, Redis and the app; serve HTTP until Ctrl-C")
    serve.add_argument(
        "--config",
        type=Path,
        help="agents.yaml (default: STICKYRAY_CONFIG, else the shipped customer-assistant sample)",
    )
    serve.add_argument(
        "--host", type=_host, help="bind address (default: STICKYRAY_HOST or 127.0.0.1)"
    )
    serve.add_argument(
        "--port", type=_port, help="HTTP port, 1-65535 (default: STICKYRAY_PORT or 8000)"
    )
    serve.set_defaults(func=_serve)

    chat = sub.add_parser("chat", help="talk to a running server from the terminal")
    chat.add_argument("thread", nargs="?", help="thread id (default: a new one)")
    chat.add_argument("--url", default="http://127.0.0.1:8000", help="server URL")
    chat.set_defaults(func=_chat)

    check = sub.add_parser("check", help="validate an agents.yaml without starting anything")
    check.add_argument("config", type=Path)
    check.set_defaults(func=_check)

    dashboard = sub.add_parser(
        "dashboard", help="write the Grafana dashboard of stickyray's metrics (JSON)"
    )
    dashboard.add_argument(
        "--out",
        type=Path,
        help="the file to write (e.g. in Grafana's provisioning folder); standard output if absent",
    )
    dashboard.set_defaults(func=_dashboard)

    replay = sub.add_parser("replay", help="replay recorded dialogues as a Ray job; report routing")
    replay.add_argument("dialogues", type=Path, help="JSONL, one dialogue per line")
    replay.add_argument(
        "--agents",
        type=Path,
        required=True,
        help="agents.yaml, or agents.json (a list of services)",
    )
    replay.add_argument("--address", help="Ray dashboard address (default: a local cluster)")
    replay.add_argument("--concurrency", type=int, default=8, help="dialogues at once")
    replay.add_argument("--limit", type=int, help="replay only the first N dialogues")
    replay.add_argument("--out", type=Path, default=Path("replay-report"), help="report folder")
    replay.add_argument(
        "--hosting",
        choices=["pooled", "actor"],
        default="pooled",
        help="threads as objects in a few host actors (default), or one actor per thread",
    )
    replay.set_defaults(func=_replay)

    memory = sub.add_parser("memory", help="long-term memory maintenance")
    memory_sub = memory.add_subparsers(dest="memory_command", required=True)
    reembed = memory_sub.add_parser(
        "reembed",
        help="move every stored memory to the embedding model agents.yaml names "
        "(stop serving first)",
    )
    reembed.add_argument(
        "--config",
        type=Path,
        help="agents.yaml whose memory section names the new model (default: STICKYRAY_CONFIG, "
        "else the shipped sample)",
    )
    reembed.add_argument(
        "--batch-size", type=_positive, default=64, help="memories embedded at once (default 64)"
    )
    reembed.set_defaults(func=_reembed)

    fake = sub.add_parser(
        "fake-llm", help="run the fake OpenAI/Anthropic server (for tests)", add_help=False
    )
    fake.add_argument("rest", nargs=argparse.REMAINDER)
    bench = sub.add_parser(
        "bench", help="benchmarks: python -m bench [NAME] [--quick]", add_help=False
    )
    bench.add_argument("rest", nargs=argparse.REMAINDER)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``stickyray`` command."""
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    argv = sys.argv[1:] if argv is None else argv
    # These hand every argument to their own parser; argparse's REMAINDER would not take
    # options such as --port that come first.
    if argv and argv[0] in _PASS_THROUGH:
        return _PASS_THROUGH[argv[0]](argv[1:])
    args = _parser().parse_args(argv)
    result: int = args.func(args)
    return result


if __name__ == "__main__":
    sys.exit(main())
