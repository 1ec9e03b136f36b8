# The GPU worker: Celery + torch (CUDA) + the method. One container per GPU.
# Build from the repository root (BuildKit, the default of `docker compose` v2 and Docker 23+):
#   docker build -f docker/worker.Dockerfile -t cgidm-worker .
# Build args, all with the defaults users want:
#   BASE_IMAGE       a Debian/Ubuntu image; the CUDA runtime for GPUs. CI: a Debian bookworm made
#                    locally with debootstrap (its network reaches no image registry).
#   TORCH_INDEX_URL  where pip finds torch; the CUDA wheels by default. CI: PyPI.
#   TORCH_SPEC       which torch. CI: torch==2.13.0+cpu, the CPU wheel it puts in docker/wheels/.
# docker/wheels/ (empty in the repository) is mounted at build time as pip's --find-links, for
# wheels a network cannot download; nothing in it is copied into the image.
ARG BASE_IMAGE=nvidia/cuda:12.6.3-runtime-ubuntu22.04
FROM ${BASE_IMAGE}

ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu126
ARG TORCH_SPEC="torch>=2.2,<3"
ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HOME=/cache/huggingface \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    PATH=/opt/venv/bin:$PATH

RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv \
 && rm -rf /var/lib/apt/lists/* \
 && python3 -m venv /opt/venv

# The chosen torch build first, so installing the project does not pull the default wheel.
# pip-cert: an optional build secret, the CA bundle of a network that intercepts TLS
# (`docker build --secret id=pip-cert,src=/etc/ssl/certs/ca-certificates.crt`), mounted for
# the pip steps only and never written into a layer; without it pip uses its own CAs.
RUN --mount=type=secret,id=pip-cert --mount=type=bind,source=docker/wheels,target=/wheels \
    if [ -s /run/secrets/pip-cert ]; then export PIP_CERT=/run/secrets/pip-cert; fi \
 && pip install --find-links /wheels --index-url "$TORCH_INDEX_URL" "$TORCH_SPEC"

WORKDIR /srv/cgidm
COPY pyproject.toml README.md ./
COPY cgidm ./cgidm
COPY cgidm_core ./cgidm_core
COPY app ./app
COPY worker ./worker
# The project and its dependencies. The code is copied first, so any change to it runs this step
# again: pip's cache lives in a BuildKit cache mount (not in the image), so a rebuild installs
# the same wheels without downloading them again.
RUN --mount=type=secret,id=pip-cert --mount=type=cache,target=/root/.cache/pip \
    if [ -s /run/secrets/pip-cert ]; then export PIP_CERT=/run/secrets/pip-cert; fi \
 && env -u PIP_NO_CACHE_DIR pip install . \
 && useradd --uid 10001 --create-home cgidm \
 && mkdir -p /cache/huggingface /cache/models /keys \
 && chown cgidm /cache/huggingface /cache/models /keys

USER cgidm
# Solo pool: the job runs in this process, so a warm shutdown (docker stop) interrupts it within
# a few PGD steps and puts it back in the queue, and the model cache lives as long as the worker.
CMD ["celery", "-A", "worker.celery_app", "worker", "--pool=solo", "--concurrency=1", "--loglevel=info"]
