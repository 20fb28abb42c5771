"""`iterdpo operator`: run the kopf operator in this process (in a pod, or on a laptop
against the current kubeconfig)."""

from __future__ import annotations

import logging
import os
import sys


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
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if metrics_port is not None:
        from iterdpo_operator.metrics import serve

        serve(metrics_port)  # Prometheus text format on :PORT/metrics
    # standalone: one operator per cluster (the Helm chart runs one replica); no peering CRD needed.
    kopf.run(standalone=True, clusterwide=all_namespaces, namespaces=[] if all_namespaces else namespaces,
             liveness_endpoint=liveness)  # fmt: skip
    return 0
