"""The `iterdpo` command: the local runner, and every stage program as a subcommand.

Stage programs (generate, serve-reward, annotate) are what containers run on
Kubernetes; training runs as `torchrun -m iterdpo_trainer`. Heavy imports
(torch, vLLM) happen inside the subcommand that needs them.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from iterdpo.stages import PROGRAMS, Program

from iterdpo.local import DEFAULT_WORKDIR


def _load_here(run_file: Path, workdir: Path):
    """The run file, checked against this machine (its paths, the workdir) before anything is written."""
    from iterdpo.local.runner import with_storage_root
    from iterdpo.localpaths import check_local_paths, root_problems, runner_problems
    from iterdpo.runfile import SpecError, load_run

    run = with_storage_root(load_run(run_file), workdir)
    problems = runner_problems(run) + root_problems("--workdir", Path(workdir))
    if problems:
        raise SpecError(str(run_file), problems)
    return check_local_paths(run, str(run_file), run_file.resolve().parent)


def _run(args) -> int:
    from iterdpo.local.report import reward_trend, status_table
    from iterdpo.local.runner import AlreadyRunning, LocalRunner, RunFailed, SpecChanged

    run = _load_here(args.run_file, args.workdir)
    try:
        status = LocalRunner(run, args.workdir).execute()
    except RunFailed as exc:
        print(f"iterdpo run: {exc}", file=sys.stderr)
        print("fix the cause and run the same command again to resume from the failed stage", file=sys.stderr)
        return 1
    except (SpecChanged, AlreadyRunning) as exc:
        print(f"iterdpo run: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    print(status_table(run.name, status, run.spec.iterations))
    trend = reward_trend(status)
    print(f"Succeeded: {trend}" if trend else "Succeeded")
    return 0


def _cluster_status(name: str, namespace: str | None):
    """The status of the IterativeDPORun `name` in the cluster of the current kubeconfig."""
    from iterdpo.status import RunStatus
    from iterdpo_operator.kube import Kube, current_namespace, load_config

    namespace = namespace or current_namespace()
    body = Kube(load_config()).read_run(namespace, name)
    if body is None:
        raise LookupError(f"no IterativeDPORun {name!r} in namespace {namespace!r}")
    if not body.get("status"):
        print(unclaimed_hint(name, namespace), file=sys.stderr)
    return RunStatus.of_resource(body), (body.get("spec") or {}).get("iterations")


def unclaimed_hint(name: str, namespace: str) -> str:
    """What to check when a run in the cluster has no status: no operator has looked at it."""
    return (f"iterdpo status: {namespace}/{name} has no status yet: no iterdpo operator has picked it up. Check that "
            f"one runs (kubectl get pods -A -l app.kubernetes.io/name=iterdpo) and watches namespace {namespace!r} "
            "(its --namespace flags; Helm value watch.namespaces), or apply the run in a namespace it watches.")  # fmt: skip


def _plot_file(value: str) -> Path:
    """argparse type of --plot: a .png, .svg or .pdf name (refused before the run is read)."""
    from iterdpo.local.plot import PlotError, plot_format

    try:
        plot_format(Path(value))
    except PlotError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return Path(value)


def _status(args) -> int:
    from iterdpo.local.report import status_table
    from iterdpo.local.runner import load_status, status_path

    path = status_path(args.workdir, args.name)
    status = None if args.cluster else load_status(path)
    iterations = None
    if status is None:
        try:
            status, iterations = _cluster_status(args.name, args.namespace)
        except Exception as exc:  # noqa: BLE001 - no kubeconfig, no cluster, no such run: say which
            where = "" if args.cluster else f"no run named {args.name!r} under {args.workdir} (no {path}), and "
            print(f"iterdpo status: {where}the cluster has none: {exc}", file=sys.stderr)
            return 1
    if args.json:
        import json

        print(json.dumps(status.to_json(), indent=2))
    else:
        print(status_table(args.name, status, iterations))
    if args.plot is not None:
        from iterdpo.local.plot import PlotError, plot_status

        try:
            print(f"plot: {plot_status(args.name, status, args.plot)}", file=sys.stderr if args.json else sys.stdout)
        except (PlotError, OSError) as exc:
            print(f"iterdpo status: {exc}", file=sys.stderr)
            return 2
    return 0


def _render(args) -> int:
    from iterdpo.runfile import SpecError, read_document
    from iterdpo_operator.builders import to_yaml
    from iterdpo_operator.stage_children import render_round
    from iterdpo_operator.defaults import defaults_from_env, with_defaults
    from iterdpo_operator.validation import InvalidRun, validate_resource

    body = read_document(args.run_file)
    if not isinstance(body, dict) or not isinstance(body.get("metadata", {}), dict):
        raise SpecError(str(args.run_file), ["the document must be a mapping with a metadata mapping"])
    metadata = body.setdefault("metadata", {})
    if args.namespace:
        metadata["namespace"] = args.namespace
    metadata.setdefault("namespace", "default")
    try:
        run = with_defaults(validate_resource(body), defaults_from_env())
    except InvalidRun as exc:
        print(f"iterdpo render: {args.run_file} cannot run on Kubernetes:", file=sys.stderr)
        for line in str(exc).splitlines():
            print(f"  - {line}", file=sys.stderr)
        return 2
    if not 1 <= args.iteration <= run.spec.iterations:
        print(f"iterdpo render: --iteration must be between 1 and {run.spec.iterations}", file=sys.stderr)
        return 2
    print(f"# Every manifest of round {args.iteration} of {run.name}, as the operator creates them "
          "(it adds ownerReferences to the run).")  # fmt: skip
    print(to_yaml(render_round(run, args.iteration)), end="")
    return 0


def _resume(args) -> int:
    from datetime import datetime, timezone

    from iterdpo_operator.kube import Kube, current_namespace, load_config
    from iterdpo_operator.reconcile import RESUME_ANNOTATION

    token = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    namespace = args.namespace or current_namespace()
    phase = Kube(load_config()).ask_resume(namespace, args.name, token)
    if phase is None:
        print(f"iterdpo resume: no IterativeDPORun {args.name!r} in namespace {namespace!r}", file=sys.stderr)
        return 1
    if phase != "Failed":
        print(f"iterdpo resume: {namespace}/{args.name} is {phase}, not Failed: nothing to resume", file=sys.stderr)
        return 1
    print(f"asked {namespace}/{args.name} to resume its failed stage ({RESUME_ANNOTATION}={token})")
    return 0


def _operator(args) -> int:
    from iterdpo_operator.main import run_operator

    return run_operator(namespaces=args.namespace, all_namespaces=args.all_namespaces, liveness=args.liveness,
                        metrics_port=args.metrics_port)  # fmt: skip


def _validate(args) -> int:
    from iterdpo.runfile import SpecError, parse_run, read_document

    if args.kubernetes:
        from iterdpo_operator.validation import kubernetes_problems

        # As the operator sees it: no run file to resolve ./ paths against.
        run = parse_run(read_document(args.run_file), source=str(args.run_file))
        problems = kubernetes_problems(run)
        if problems:
            raise SpecError(str(args.run_file), problems)
        where = "on Kubernetes"
    else:
        run = _load_here(args.run_file, args.workdir)
        where = "on this machine"
    print(f"{args.run_file}: valid IterativeDPORun {run.name!r} ({run.spec.iterations} rounds), runnable {where}")
    return 0


def _plan(args) -> int:
    import shlex

    from iterdpo.local.runner import load_status, status_path
    from iterdpo.planner import Finished, next_step
    from iterdpo.status import RunStatus

    run = _load_here(args.run_file, args.workdir)
    status = load_status(status_path(args.workdir, run.name)) or RunStatus()
    step = next_step(run, status, spec_file=str(Path(args.workdir).resolve() / run.name / "run.json"))
    if isinstance(step, Finished):
        stopped = f" (stopped by gates.{step.gate.gate}: {step.gate.message})" if step.gate else ""
        print(f"nothing left to run{stopped}; final policy {step.final_policy}")
        return 0
    print(f"next: round {step.iteration}, {step.stage} (policy {step.policy})")
    for service in step.services:
        print(f"  service {service.command.name}: {shlex.join(service.command.argv)}")
    for job in step.jobs:
        print(f"  job {job.name}: {shlex.join(job.argv)}")
    return 0


def _make_tiny(args) -> int:
    from iterdpo.tiny import build_tiny

    assets = build_tiny(args.out)
    print(f"tiny policy: {assets.policy}\ntiny reward model: {assets.reward}")
    for path in assets.prompts:
        print(f"prompts: {path}")
    print(f"preference pairs (labelled by the tiny reward model): {assets.preferences}")
    print(f"chat conversations (for the SFT stage): {assets.sft}")
    print(f"sums with gold answers (for reward kind verifiable): {assets.arithmetic}")
    return 0


# Stage programs parse their own arguments (argparse's REMAINDER cannot pass "--flags" on);
# which exist is the stage table's business.
STAGE_PROGRAMS = {p.name: p for p in PROGRAMS}
# Tools that parse their own arguments too, but run no stage.
TOOLS = {p.name: p for p in (
    Program("judge", "iterdpo_reward_server.judge:main",
            "score a local run's samples with another reward model (a gold judge), round by round"),
)}  # fmt: skip


def _stage_program(name: str, argv: list[str]) -> int:
    import importlib

    module, _, function = {**STAGE_PROGRAMS, **TOOLS}[name].target.partition(":")
    return getattr(importlib.import_module(module), function)(argv)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="iterdpo", description="Online iterative DPO, locally or on Kubernetes.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("run", help="run (or resume) a run file on this machine")
    p.add_argument("run_file", type=Path)
    p.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR, help="where status and artifacts go")
    p.set_defaults(func=_run)

    p = sub.add_parser("status", help="print a run's per-round table")
    p.add_argument("name")
    p.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR)
    p.add_argument("--json", action="store_true", help="print status.json as is")
    p.add_argument("--cluster", action="store_true", help="read the IterativeDPORun from the cluster (default: "
                   "the local run, else the cluster of the current kubeconfig)")  # fmt: skip
    p.add_argument("-n", "--namespace", help="namespace of the cluster run (default: the kubeconfig's)")
    p.add_argument("--plot", type=_plot_file, metavar="FILE", help="also draw the rounds (reward, win rate, length, KL) "
                   "into FILE (.png, .svg or .pdf; needs matplotlib: pip install 'iterdpo[plot]')")  # fmt: skip
    p.set_defaults(func=_status)

    p = sub.add_parser("render", help="print every Kubernetes manifest of a round (for review or GitOps)")
    p.add_argument("run_file", type=Path)
    p.add_argument("--iteration", type=int, default=1, help="which round (default 1)")
    p.add_argument("-n", "--namespace", help="namespace (default: the file's, else 'default')")
    p.set_defaults(func=_render)

    p = sub.add_parser("resume", help="resume a failed IterativeDPORun in the cluster from its failed stage")
    p.add_argument("name")
    p.add_argument("-n", "--namespace", help="default: the kubeconfig's")
    p.set_defaults(func=_resume)

    p = sub.add_parser("operator", help="run the Kubernetes operator (kopf) against the current kubeconfig")
    p.add_argument("-n", "--namespace", action="append", default=[], help="watch this namespace (repeatable)")
    p.add_argument("-A", "--all-namespaces", action="store_true", help="watch every namespace")
    p.add_argument("--liveness", help="serve a liveness endpoint, e.g. http://0.0.0.0:8080/healthz")
    p.add_argument("--metrics-port", type=int, help="serve Prometheus metrics on this port (/metrics)")
    p.set_defaults(func=_operator)

    p = sub.add_parser("validate", help="check a run file without running anything")
    p.add_argument("run_file", type=Path)
    p.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR, help="as for iterdpo run (checked writable)")
    p.add_argument("--kubernetes", action="store_true", help="check it as the operator will (paths under the "
                   "volume, names, GPUs) instead of against this machine's files")  # fmt: skip
    p.set_defaults(func=_validate)

    p = sub.add_parser("plan", help="print the next stage and its exact command lines")
    p.add_argument("run_file", type=Path)
    p.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR)
    p.set_defaults(func=_plan)

    p = sub.add_parser("make-tiny", help="build the tiny demo models and prompt sets (no downloads)")
    p.add_argument("out", type=Path)
    p.set_defaults(func=_make_tiny)

    for name, program in {**TOOLS, **STAGE_PROGRAMS}.items():
        sub.add_parser(name, help=f"{program.help} (see: iterdpo {name} --help)", add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    from iterdpo.errors import UsageError

    argv = sys.argv[1:] if argv is None else argv
    if argv and (argv[0] in STAGE_PROGRAMS or argv[0] in TOOLS):
        return _stage_program(argv[0], argv[1:])
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except UsageError as exc:  # the run file, a flag, the prompt data: exit 2, one message
        print(f"iterdpo {args.command}: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
