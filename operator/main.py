"""`iterdpo operator`: run the kopf operator in this process (in a pod, or on a laptop
against the current kubeconfig)."""

from __future__ import annotations

import logging
import os
import sys

LOG_FORMATS = ("plain", "json")
# kopf's per-pass "Handler ... succeeded" lines and the kubelet's probe hits: DEBUG only, so
# that at INFO the log is iterdpo's own decisions and actions.
CHATTY_LOGGERS = ("kopf.objects", "kopf.activities", "aiohttp.access")


def configure_logging(level: str, log_format: str) -> None:
    """One line per record, plain or JSON (kopf's formatters, python-json-logger underneath)."""
    import kopf

    kopf.configure(log_format=kopf.LogFormat.JSON if log_format == "json" else kopf.LogFormat.FULL)
    logging.getLogger().setLevel(level)
    for name in CHATTY_LOGGERS:
        logging.getLogger(name).setLevel(logging.DEBUG if level == "DEBUG" else logging.WARNING)


def run_operator(*, namespaces: list[str], all_namespaces: bool, liveness: str | None = None,
                 metrics_port: int | None = None) -> int:  # fmt: skip
    import kopf

    import iterdpo_operator.handlers  # noqa: F401 - registers the handlers

    if not namespaces and not all_namespaces:
        print("iterdpo operator: say which namespaces to watch: -n NAMESPACE (repeatable) or -A", file=sys.stderr)
        return 2
    level = os.environ.get("ITERDPO_LOG_LEVEL", "INFO").upper()
    if level not in ("DEBUG", "INFO", "WARNING", "ERROR"):
        print(f"iterdpo operator: ITERDPO_LOG_LEVEL must be DEBUG, INFO, WARNING or ERROR (got {level!r})", file=sys.stderr)
        return 2
    log_format = os.environ.get("ITERDPO_LOG_FORMAT", "plain").lower()
    if log_format not in LOG_FORMATS:
        print(f"iterdpo operator: ITERDPO_LOG_FORMAT must be {' or '.join(LOG_FORMATS)} (got {log_format!r})", file=sys.stderr)
        return 2
    configure_logging(level, log_format)
    if metrics_port is not None:
        from iterdpo_operator.metrics import serve

        serve(metrics_port)  # Prometheus text format on :PORT/metrics
    # standalone: one operator per cluster (the Helm chart runs one replica); no peering CRD needed.
    kopf.run(standalone=True, clusterwide=all_namespaces, namespaces=[] if all_namespaces else namespaces,
             liveness_endpoint=liveness)  # fmt: skip
    return 0
