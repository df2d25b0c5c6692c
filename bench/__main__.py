"""``python -m bench [NAME] [--quick]``: run a benchmark, print its table, save its JSON.

Without a name it runs ``compare``: stickyray against the raw Ray path and peer frameworks.
"""

from __future__ import annotations

import argparse
import math
import sys

from bench import compare, memory_search, routing_eval, runs, thread_actors

BENCHMARKS = {
    "compare": compare.main,
    "threads": thread_actors.main,
    "memory": memory_search.main,
    "routing": routing_eval.main,
    "runs": runs.main,
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("name", nargs="?", default="compare", choices=sorted(BENCHMARKS))
    parser.add_argument("--quick", action="store_true", help="fewer samples (a smoke run)")
    parser.add_argument(
        "--latency-ms",
        type=float,
        help="the fake LLM's latency per call, for compare (default 200)",
    )
    args = parser.parse_args(argv)
    if args.latency_ms is not None and args.name != "compare":
        parser.error(f"--latency-ms is for compare only; {args.name} uses its own")
    latency_ms = 200.0 if args.latency_ms is None else args.latency_ms
    # Throughput is compared with what the latency allows (threads / latency): it is no 0.
    if not math.isfinite(latency_ms) or latency_ms <= 0:
        parser.error(f"--latency-ms must be a number above 0, not {args.latency_ms}")
    if args.name == "compare":
        return compare.main(quick=args.quick, latency_s=latency_ms / 1000)
    return BENCHMARKS[args.name](quick=args.quick)


if __name__ == "__main__":
    sys.exit(main())
