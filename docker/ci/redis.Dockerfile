# CI only: Redis from Debian's redis-server, because CI's network reaches no image registry to
# pull the public redis image that docker-compose.yml names for users. Built from the same local
# Debian base as the CI images (scripts/compose_test.sh); runs as Debian's `redis` user.
ARG BASE_IMAGE=debian:bookworm-slim
FROM ${BASE_IMAGE}
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends redis-server \
 && rm -rf /var/lib/apt/lists/* \
 && mkdir -p /data && chown redis:redis /data
WORKDIR /data
USER redis
EXPOSE 6379
CMD ["redis-server", "--appendonly", "yes", "--protected-mode", "no"]
