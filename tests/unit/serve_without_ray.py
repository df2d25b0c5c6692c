"""`stickyray serve` as it runs, but without Ray: ``python -m tests.unit.serve_without_ray
serve [...]``, from the repository root.

ray.init is the real one, refused just after it puts in Ray's driver SIGTERM handler (the
``storage`` argument is gone since Ray 2.48), so the process has the signal handlers a real
serve has; Serve's calls do nothing, and the embedded servers are real. The serve loop
checks its servers every 0.2 s instead of every few seconds.
"""

from __future__ import annotations

import os
import signal
import sys
from typing import Any

import ray
from ray import serve

import serve_app.app
import stickyray.cli
import stickyray.metrics
import stickyray.serve_command

_real_init = ray.init
_initialized = [False]


def _init(**_: Any) -> None:
    try:
        _real_init(address="local", storage="/nonexistent")
    except RuntimeError:
        pass  # refused: nothing of Ray started
    if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        sys.exit("serve_without_ray: ray.init no longer puts in a SIGTERM handler")
    _initialized[0] = True


def main() -> int:
    """Run the real ``stickyray.cli.main`` with Ray and Serve stubbed."""
    ray.init = _init  # type: ignore[assignment]
    ray.is_initialized = lambda: _initialized[0]
    ray.shutdown = lambda *_, **__: None
    serve.start = lambda **_: None
    serve.shutdown = lambda: None
    serve.delete = lambda *_: None
    serve.run = lambda *_, **__: None  # type: ignore[assignment]
    serve_app.app.build_app = lambda *_, **__: None  # type: ignore[assignment]
    stickyray.metrics.metrics_url = lambda: None
    # The stubbed Serve listens where it was asked to (the tests set STICKYRAY_PORT).
    asked = ("127.0.0.1", int(os.environ.get("STICKYRAY_PORT", "8000")))
    stickyray.serve_command._serve_http = lambda: asked
    stickyray.serve_command._SERVER_CHECK_S = 0.2
    return stickyray.cli.main(sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())
