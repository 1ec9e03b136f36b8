# CI only: an S3 API for the stack in place of MinIO (whose image CI's network cannot pull):
# moto's standalone server, the same S3 server the process tests run, from PyPI, on the local
# Debian base (scripts/compose_test.sh). It keeps objects in memory: a restart empties it.
ARG BASE_IMAGE=debian:bookworm-slim
FROM ${BASE_IMAGE}
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 PATH=/opt/venv/bin:$PATH
# pip-cert: the CA bundle of CI's TLS-intercepting network, a build secret never kept in a layer.
RUN --mount=type=secret,id=pip-cert \
    if [ -s /run/secrets/pip-cert ]; then export PIP_CERT=/run/secrets/pip-cert; fi \
 && python3 -m venv /opt/venv \
 && pip install "moto[server]>=5" \
 && useradd --uid 10002 --no-create-home s3
USER s3
EXPOSE 9000
HEALTHCHECK --interval=5s --timeout=3s --retries=20 \
  CMD ["python3", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:9000/moto-api/', timeout=2)"]
CMD ["moto_server", "-H", "0.0.0.0", "-p", "9000"]
