# The HTTP gateway: validates requests, stores inputs, enqueues jobs. No torch, so the image is
# small and starts in a second. Build from the repository root:
#   docker build -f docker/gateway.Dockerfile -t cgidm-gateway .
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# Pango and a font for WeasyPrint, which prints the PDF report
RUN apt-get update \
 && apt-get install -y --no-install-recommends libpango-1.0-0 libpangoft2-1.0-0 \
    fonts-dejavu-core \
 && rm -rf /var/lib/apt/lists/*

WORKDIR /srv/cgidm
COPY docker/gateway-requirements.txt /tmp/gateway-requirements.txt
RUN pip install -r /tmp/gateway-requirements.txt

# The shared package, the gateway and the method library, whose torch-free modules (names,
# errors, demo) the gateway and the CLI import; --no-deps keeps torch and diffusers out, and
# tests/service/test_deployment.py runs the gateway and every torch-free command without them.
COPY pyproject.toml README.md ./
COPY cgidm ./cgidm
COPY cgidm_core ./cgidm_core
COPY app ./app
RUN pip install --no-deps . && useradd --uid 10001 --no-create-home cgidm \
 && mkdir -p /keys && chown cgidm /keys

USER cgidm
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=5s --retries=5 \
  CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=4)"]
CMD ["uvicorn", "app.main:app", "--host", "0.0.0.0", "--port", "8000", "--proxy-headers"]
