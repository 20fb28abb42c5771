"""The Dockerfile's images, built for real (images/build.sh: podman on Debian stand-in bases)
and run: each image's user, entrypoint and read-only root; every stage program's --help in
the runtime images; and the tiny policy's Generate (vLLM) and Train (DeepSpeed under torchrun)
inside the CPU runtime image, with the exact commands, spec file and security settings the
operator gives its pods (uid 1000, read-only root, no capabilities, /tmp the only writable
path besides the run's volume, no network).

The images take ~13 min to build cold (2 cores), so the tests skip unless the image store exists
(images/build.sh ran once: CI runs it through build.sh) or ITERDPO_BUILD_IMAGES=1 asks for it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from runfiles import write_tiny_pairs, write_tiny_run

from iterdpo.atomic import read_json, read_jsonl
from iterdpo.cli import STAGE_PROGRAMS, TOOLS
from iterdpo.layout import RunLayout
from iterdpo.runfile import load_run
from iterdpo.stages import Stage
from iterdpo_operator.builders import CONTAINER_SECURITY, POD_SECURITY, SPEC_FILE, planned, spec_config_map

HERE = Path(__file__).resolve().parent
PODMAN = HERE / "images" / "podman"
IMAGES = {"operator": "localhost/iterdpo-operator:0.1.0", "runtime-cpu": "localhost/iterdpo:0.1.0-cpu",
          "runtime": "localhost/iterdpo:0.1.0"}  # fmt: skip
DEBIAN = "localhost/iterdpo-test/debian:bookworm"  # the stand-in base: its user is root
CACHE = Path(os.environ.get("ITERDPO_IMAGE_CACHE", Path.home() / ".cache" / "iterdpo-images"))
UID = POD_SECURITY["runAsUser"]
# What CONTAINER_SECURITY and the pods' volumes say, in podman's words.
assert CONTAINER_SECURITY["readOnlyRootFilesystem"] and CONTAINER_SECURITY["capabilities"] == {"drop": ["ALL"]}
RESTRICTED = ("--read-only", "--read-only-tmpfs=false", "--tmpfs", "/tmp:rw,exec,mode=1777", "--cap-drop", "ALL",
              "--security-opt", "no-new-privileges", "-e", "HOME=/tmp", "--network", "none")  # fmt: skip

pytestmark = pytest.mark.slow


def built_images() -> dict[str, str]:
    """IMAGES, current (images/build.sh: a no-op when cached); skips when they cannot be."""
    if shutil.which("podman") is None:
        pytest.skip("podman is not installed: run tests/cluster/images/build.sh (it installs it, as root)")
    if not (CACHE / "storage").is_dir() and os.environ.get("ITERDPO_BUILD_IMAGES") != "1":
        pytest.skip(f"no image store in {CACHE}: run tests/cluster/images/build.sh (or ITERDPO_BUILD_IMAGES=1)")
    subprocess.run([str(HERE / "images" / "build.sh")], check=True, stdout=subprocess.DEVNULL)
    return IMAGES


@pytest.fixture(scope="module")
def images() -> dict[str, str]:
    return built_images()


@pytest.fixture()
def pod_tiny(tiny):
    """The tiny models, readable by the pods' uid: pytest makes its folders 0700, as a volume
    owned by another user would be, and the pod's `Permission denied` is what a cluster gives."""
    tiny.root.chmod(0o755)
    return tiny


def podman(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([str(PODMAN), *args], capture_output=True, text=True, timeout=timeout)


def config(image: str) -> dict:
    out = podman("image", "inspect", "--format", "{{json .Config}}", image)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def run_in(image: str, *argv: str, options: tuple[str, ...] = RESTRICTED, timeout: int = 600) -> subprocess.CompletedProcess:
    return podman("run", "--rm", *options, image, *argv, timeout=timeout)


@pytest.mark.parametrize(("target", "user", "entrypoint", "cmd"), [
    ("operator", "65532:65532", ["iterdpo", "operator"], None),
    ("runtime-cpu", f"{UID}:{UID}", None, ["iterdpo", "--help"]),
    ("runtime", f"{UID}:{UID}", None, ["iterdpo", "--help"]),
])  # fmt: skip
def test_each_image_runs_as_its_numeric_user_with_its_entrypoint(images, target, user, entrypoint, cmd):
    c = config(images[target])
    assert c["User"] == user
    assert c.get("Entrypoint") == entrypoint and c.get("Cmd") == cmd
    assert c["WorkingDir"] == "/home/iterdpo"
    assert c["Labels"]["io.iterdpo.inputs"]  # the build's input hash: a stale image is rebuilt
    # the image's own entrypoint with --help, or its own command (`iterdpo operator` alone
    # refuses to start without the namespaces to watch)
    ran = run_in(images[target], *(["--help"] if entrypoint else []), options=RESTRICTED)
    assert ran.returncode == 0, ran.stderr[-2000:]
    assert "usage: iterdpo" in ran.stdout


def test_operator_image_has_no_torch_and_cannot_write_its_root(images):
    script = ("import importlib.util as u, os; assert u.find_spec('torch') is None; print(os.getuid()); "
              "open('/tmp/ok', 'w').write('x')\ntry: open('/home/iterdpo/x', 'w')\n"
              "except OSError as e: print(e.strerror)")  # fmt: skip
    ran = run_in(images["operator"], "-c", script, options=(*RESTRICTED, "--entrypoint", "python"))
    assert ran.returncode == 0, ran.stderr
    assert ran.stdout.split("\n")[:2] == ["65532", "Read-only file system"]


HELP = [("iterdpo", "--help"), *(("iterdpo", name, "--help") for name in {**STAGE_PROGRAMS, **TOOLS}),
        ("torchrun", "--help"), ("python", "-m", "iterdpo_trainer", "--help"),
        ("python", "-m", "iterdpo_trainer.reward_model", "--help"), ("python", "-m", "iterdpo_trainer.sft", "--help")]  # fmt: skip


@pytest.mark.parametrize("target", ["runtime-cpu", "runtime"])
def test_runtime_images_run_every_stage_programs_help_on_a_read_only_root(images, target):
    """One container: each command's exit status, then what the user may write."""
    lines = [f"{' '.join(argv)} > /dev/null 2> /tmp/err; echo \"$? {' '.join(argv)}\"; cat /tmp/err >&2" for argv in HELP]
    lines += ["for p in / /opt/iterdpo /home/iterdpo /tmp; do touch $p/probe 2> /dev/null && echo \"writable $p\"; done"]
    ran = run_in(images[target], "bash", "-c", "\n".join(lines))
    assert ran.returncode == 0, ran.stderr[-3000:]
    results = ran.stdout.splitlines()
    assert [line for line in results if not line.startswith(("0 ", "writable"))] == [], ran.stderr[-3000:]
    assert len([line for line in results if line.startswith("0 ")]) == len(HELP)
    assert [line for line in results if line.startswith("writable")] == ["writable /tmp"]


def _pod_files(tmp_path: Path, tiny, **spec) -> tuple[Path, Path]:
    """A tiny run whose storage is a host folder the pod's uid owns (a volume with fsGroup does
    that on a cluster), and the spec file the operator's ConfigMap would hold."""
    runs = tmp_path / "runs"
    runs.mkdir()
    os.chown(runs, UID, UID)
    run_file = write_tiny_run(tmp_path / "run.yaml", tiny, name="image", storage_root=runs, **spec)
    pod_spec = tmp_path / "pod-run.yaml"
    pod_spec.write_text(spec_config_map(load_run(run_file))["data"]["run.yaml"])
    return run_file, pod_spec


def _as_a_pod(tiny, pod_spec: Path, runs: Path) -> tuple[str, ...]:
    """podman options for one stage container: the pods' security, their spec file and volume."""
    return (*RESTRICTED, "--user", f"{UID}:{UID}", "--shm-size", "1g", "-e", "DS_ACCELERATOR=cpu",
            "-e", "OMP_NUM_THREADS=1", "-v", f"{pod_spec}:{SPEC_FILE}:ro", "-v", f"{tiny.root}:{tiny.root}:ro",
            "-v", f"{runs}:{runs}")  # fmt: skip


def test_runtime_cpu_image_generates_with_vllm_as_the_generate_pod_does(images, pod_tiny, tmp_path):
    tiny = pod_tiny
    run_file, pod_spec = _pod_files(tmp_path, tiny, generation={"samplesPerPrompt": 2, "maxNewTokens": 8})
    run = load_run(run_file)
    (job,) = planned(run, 1, Stage.GENERATE).jobs
    ran = run_in(images["runtime-cpu"], *job.argv, options=_as_a_pod(tiny, pod_spec, tmp_path / "runs"))
    assert ran.returncode == 0, ran.stderr[-4000:]
    layout = RunLayout.of(run)
    marker = read_json(layout.shard_marker(1, 0, 1))
    records = read_jsonl(layout.shard_file(1, 0, 1))
    assert marker["prompts_in"] == len(read_jsonl(tiny.prompts[0])) == len(records) + len(marker["left_out"])
    assert all(len(r["responses"]) == 2 for r in records)
    assert layout.shard_file(1, 0, 1).stat().st_uid == UID  # written by the pod's user


def test_runtime_cpu_image_trains_with_deepspeed_under_torchrun_as_the_train_pod_does(images, pod_tiny, tmp_path):
    tiny = pod_tiny
    run_file, pod_spec = _pod_files(tmp_path, tiny, training={"epochs": 1, "zeroStage": 2})
    run = load_run(run_file)
    pairs = write_tiny_pairs(run_file, 8)
    os.chown(pairs, UID, UID)
    for folder in (pairs.parent, *pairs.parent.parents):
        if folder == tmp_path / "runs":
            break
        os.chown(folder, UID, UID)
    (job,) = planned(run, 1, Stage.TRAIN).jobs
    ran = run_in(images["runtime-cpu"], *job.argv, options=_as_a_pod(tiny, pod_spec, tmp_path / "runs"))
    assert ran.returncode == 0, ran.stderr[-4000:]
    layout = RunLayout.of(run)
    checkpoint = layout.checkpoint(1)
    assert list(checkpoint.glob("*.safetensors")) and (checkpoint / "config.json").is_file()
    assert checkpoint.stat().st_uid == UID
