# The HTTP gateway: validates requests, stores inputs, enqueues jobs. No torch, so the image is
# small and starts in a second. Build from the repository root (BuildKit, the default of
# `docker compose` v2 and of Docker 23+):
#   docker build -f docker/gateway.Dockerfile -t cgidm-gateway .
# BASE_IMAGE: any Debian-like image with Python >= 3.10 and its venv module. CI builds from a
# Debian bookworm made locally with debootstrap (python3, python3-venv), because its network
# reaches no image registry (scripts/compose_test.sh); users get the public image below.
ARG BASE_IMAGE=python:3.11-slim
FROM ${BASE_IMAGE}

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/venv/bin:$PATH

# Pango and a font for WeasyPrint, which prints the PDF report
RUN apt-get update \
 && apt-get install -y --no-install-recommends libpango-1.0-0 libpangoft2-1.0-0 \
    fonts-dejavu-core \
 && rm -rf /var/lib/apt/lists/*

WORKDIR /srv/cgidm
COPY docker/gateway-requirements.txt /tmp/gateway-requirements.txt
# pip-cert: an optional build secret, the CA bundle of a network that intercepts TLS
# (`docker build --secret id=pip-cert,src=/etc/ssl/certs/ca-certificates.crt`). It is mounted
# for this step only and never written into a layer; without it pip uses its own CAs.
RUN --mount=type=secret,id=pip-cert \
    if [ -s /run/secrets/pip-cert ]; then export PIP_CERT=/run/secrets/pip-cert; fi \
 && python3 -m venv /opt/venv \
 && pip install -r /tmp/gateway-requirements.txt

# The shared package, the gateway and the method library, whose torch-free modules (names,
# errors, demo) the gateway and the CLI import; --no-deps keeps torch and diffusers out, and
# tests/service/test_deployment.py runs the gateway and every torch-free command without them.
COPY pyproject.toml README.md ./
COPY cgidm ./cgidm
COPY cgidm_core ./cgidm_core
COPY app ./app
RUN --mount=type=secret,id=pip-cert \
    if [ -s /run/secrets/pip-cert ]; then export PIP_CERT=/run/secrets/pip-cert; fi \
 && pip install --no-deps . \
 && useradd --uid 10001 --no-create-home cgidm \
 && mkdir -p /keys && chown cgidm /keys

USER cgidm
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=5s --retries=5 \
  CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=4)"]
CMD ["uvicorn", "app.main:app", "--host", "0.0.0.0", "--port", "8000", "--proxy-headers"]
