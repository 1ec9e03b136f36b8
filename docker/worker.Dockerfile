# The GPU worker: Celery + torch (CUDA) + the method. One container per GPU.
# Build from the repository root:
#   docker build -f docker/worker.Dockerfile -t cgidm-worker .
FROM nvidia/cuda:12.6.3-runtime-ubuntu22.04

ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu126
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

# The CUDA build of torch first, so installing the project does not pull the default wheel.
RUN pip install --index-url "$TORCH_INDEX_URL" "torch>=2.2,<3"

WORKDIR /srv/cgidm
COPY pyproject.toml README.md ./
COPY cgidm ./cgidm
COPY cgidm_core ./cgidm_core
COPY app ./app
COPY worker ./worker
RUN pip install . \
 && useradd --uid 10001 --create-home cgidm \
 && mkdir -p /cache/huggingface /keys && chown cgidm /cache/huggingface /keys

USER cgidm
# Solo pool: the job runs in this process, so a warm shutdown (docker stop) interrupts it within
# a few PGD steps and puts it back in the queue, and the model cache lives as long as the worker.
CMD ["celery", "-A", "worker.celery_app", "worker", "--pool=solo", "--concurrency=1", "--loglevel=info"]
