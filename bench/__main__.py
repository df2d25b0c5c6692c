"""``python -m bench NAME [--quick]``: run one benchmark, print its table, save its JSON."""

from __future__ import annotations

import argparse
import sys

from bench import memory_search, routing_eval, thread_actors

BENCHMARKS = {
    "threads": thread_actors.main,
    "memory": memory_search.main,
    "routing": routing_eval.main,
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("name", choices=sorted(BENCHMARKS))
    parser.add_argument("--quick", action="store_true", help="fewer samples (a smoke run)")
    args = parser.parse_args(argv)
    return BENCHMARKS[args.name](quick=args.quick)


if __name__ == "__main__":
    sys.exit(main())
