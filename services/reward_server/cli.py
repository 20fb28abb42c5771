"""`iterdpo serve-reward` / `python -m iterdpo_reward_server`: validate, check, serve.

Order matters: flags (or the run file's spec.reward) are validated (exit 2) and the
checkpoint's config and tokenizer checked (cheap; exit 1) before the port opens, so a
wrong kind or a missing chat template fails at once; the weights then load behind
/readyz. SIGTERM (what Kubernetes and the local runner send) shuts down gracefully and
exits 0; a failed weight load stops the server with exit code 1.
"""

from __future__ import annotations

import logging
import signal

from iterdpo.errors import report, stage_main

PROG = "iterdpo serve-reward"
# An idle keep-alive connection is closed after this long: longer than the annotator's
# httpx expiry (5 s), so the client drops idle connections first (no reuse of a connection
# the server is closing), yet short enough that idle clients do not pile up connections.
KEEP_ALIVE_SECONDS = 15


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from iterdpo_reward_server.scorers import scorer_kind
    from iterdpo_reward_server.settings import settings_from_args

    checked = []

    def check() -> None:
        settings = settings_from_args(argv)
        settings.resolved_device()
        scorer_kind(settings.reward.kind).preflight(settings)
        checked.append(settings)

    code = stage_main(PROG, check)
    if code:
        return code
    (settings,) = checked

    import uvicorn

    from iterdpo_reward_server.app import create_app

    fatal: list[str] = []

    def on_fatal(message: str) -> None:
        fatal.append(message)
        server.should_exit = True

    app = create_app(settings, on_fatal=on_fatal)
    server = uvicorn.Server(
        uvicorn.Config(app, host=settings.host, port=settings.port, log_level="info", timeout_graceful_shutdown=30,
                       timeout_keep_alive=KEEP_ALIVE_SECONDS)  # fmt: skip
    )
    # uvicorn re-raises the signal that stopped it once shut down; with these
    # handlers in place that is a no-op, so a graceful stop exits 0.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)
    server.run()
    if fatal:
        report(PROG, fatal[0])
        return 1
    return 0 if server.started else 1
