# The project image: every Kubeflow component (components/) runs in it. Its tag is named once, in
# components/image.py; build it with `make image` (TORCH=cuda, the default) or
# `make image TORCH=cpu`.
#
# It installs exactly what the development environment (`make setup`) installs, from the same
# committed files: requirements.lock, then PyTorch from requirements-torch.txt (CUDA) or
# requirements-torch-cpu.txt (CPU-only builds; their presence on PyTorch's CPU index is claimed,
# not verified, see that file), then the package itself without dependencies; `pip check` then
# proves the installed set complete and consistent.
# No ENTRYPOINT or CMD of our own: Kubeflow runs each component with its own command.
# The base image is pinned by tag; pin it by digest too (FROM python:...@sha256:...) where the
# registry can be reached to look the digest up.
FROM python:3.11.11-slim-bookworm

# cuda: the CUDA build of PyTorch with its runtime wheels (runs on the CPU without a GPU);
# cpu: the CPU-only build, a much smaller image.
ARG TORCH=cuda

LABEL org.opencontainers.image.source="https://github.com/switchprune/switchprune" \
      org.opencontainers.image.title="switchprune" \
      org.opencontainers.image.description="switchprune and its pinned dependencies, for the Kubeflow pipeline's components" \
      org.opencontainers.image.version="0.1.0" \
      org.opencontainers.image.licenses="Apache-2.0"

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore \
    DVC_NO_ANALYTICS=1 \
    MLFLOW_DISABLE_TELEMETRY=true \
    DO_NOT_TRACK=true

WORKDIR /tmp/switchprune

# Dependencies first, in their own layer, so that a change to the code alone reuses it.
# requirements-runtime.lock is the runtime closure of the package except PyTorch, and of kfp
# (its executor runs each component), so it is installed as it stands (--no-deps); PyTorch's file is installed on its own
# afterwards, because requirements-torch-cpu.txt replaces the index for its whole pip command.
COPY requirements-runtime.lock requirements-torch.txt requirements-torch-cpu.txt ./
RUN case "${TORCH}" in \
        cuda) torch_requirements=requirements-torch.txt ;; \
        cpu) torch_requirements=requirements-torch-cpu.txt ;; \
        *) echo "TORCH must be cuda or cpu, not '${TORCH}'" >&2; exit 1 ;; \
    esac \
    && pip install --no-cache-dir --no-deps -r requirements-runtime.lock \
    && pip install --no-cache-dir -r "${torch_requirements}"

# The package, from its sources only.
COPY pyproject.toml README.md ./
COPY src/ src/
# The launcher of multi-GPU TrainJobs, which the train component imports in its pod (the other
# components carry their whole code in the pipeline).
COPY components/__init__.py components/image.py components/trainjob.py /opt/switchprune/components/
ENV PYTHONPATH=/opt/switchprune
RUN pip install --no-cache-dir --no-deps . \
    && pip check \
    && python -c "import switchprune, torch, components.trainjob; print('switchprune', torch.__version__)" \
    && rm -rf /tmp/switchprune

# Not root: a fixed numeric uid, so that Kubernetes' runAsNonRoot can verify it.
RUN groupadd --gid 10001 app \
    && useradd --uid 10001 --gid 10001 --create-home --home-dir /home/app --shell /bin/bash app
WORKDIR /home/app
USER 10001:10001
