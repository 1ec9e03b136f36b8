#!/usr/bin/env bash
# make compose-test: the docker-compose deployment, built and run for real (CI runs it after
# `make test`). As root on a Debian machine whose network reaches PyPI and Debian's packages but
# no image registry:
#   1. installs docker.io, docker-compose and debootstrap from Debian if missing; starts dockerd;
#   2. makes the base image from Debian itself (debootstrap | docker import), once per machine;
#   3. builds the four images with the Dockerfiles users build, changing only build args:
#      the base image, and torch (the CPU wheel pip finds on this machine, instead of CUDA);
#      the TLS-intercepting network's CA bundle goes in as a build secret (never in a layer);
#   4. runs cgidm_testkit/compose_check.py: up, a key, jobs through `cgidm submit` and the API,
#      worker killed mid-job, Redis restarted, two workers, down -v; every stage timed.
# Logs: build/compose-test/. Environment: COMPOSE_TEST_STEPS (PGD steps per demo job).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
STEPS=${COMPOSE_TEST_STEPS:-10}
LOGS=build/compose-test
PROJECT=cgidm-ci
CA_BUNDLE=/etc/ssl/certs/ca-certificates.crt
# Debian's docker client first: a newer client elsewhere on PATH may require the buildx plugin.
export PATH="/usr/sbin:/usr/bin:$PATH" DEBIAN_FRONTEND=noninteractive DOCKER_BUILDKIT=1 \
  HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
mkdir -p "$LOGS"
TIMES="$LOGS/times.tsv"
: >"$TIMES"

stage() {  # stage NAME COMMAND...: run it, print and record its duration
  local name=$1 start=$SECONDS
  shift
  echo "== $name"
  "$@"
  echo "== $name: $((SECONDS - start)) s"
  printf '%s\t%s\n' "$name" "$((SECONDS - start))" >>"$TIMES"
}

install_engine() {
  local missing=""
  test -x /usr/sbin/dockerd || missing="$missing docker.io"
  command -v docker-compose >/dev/null || missing="$missing docker-compose"
  command -v debootstrap >/dev/null || missing="$missing debootstrap"
  if [ -n "$missing" ]; then
    echo "installing Debian packages:$missing"
    apt-get update -qq
    apt-get install -y -qq $missing >"$LOGS/apt.log"
  fi
}

start_dockerd() {
  docker info >/dev/null 2>&1 && return 0
  echo "starting dockerd (log: $LOGS/dockerd.log)"
  setsid /usr/sbin/dockerd >"$LOGS/dockerd.log" 2>&1 </dev/null &
  for _ in $(seq 120); do docker info >/dev/null 2>&1 && return 0; sleep 1; done
  tail -20 "$LOGS/dockerd.log"
  echo "dockerd did not answer within 120 s" >&2
  return 1
}

# The Debian release and mirror this machine's apt uses; the base image gets the same.
CODENAME=$(. /etc/os-release && echo "$VERSION_CODENAME")
BASE_IMAGE=cgidm-local/debian:$CODENAME
debian_mirror() {
  local uri
  uri=$(awk '/^URIs:/ {print $2; exit}' /etc/apt/sources.list.d/debian.sources 2>/dev/null || true)
  [ -n "$uri" ] || uri=$(awk '$1 == "deb" && $2 ~ /debian\/?$/ {print $2; exit}' \
    /etc/apt/sources.list 2>/dev/null || true)
  echo "${uri:-http://deb.debian.org/debian}"
}

make_base_image() {
  if docker image inspect "$BASE_IMAGE" >/dev/null 2>&1; then
    echo "$BASE_IMAGE exists"
    return 0
  fi
  local root
  root=$(mktemp -d /var/tmp/cgidm-rootfs.XXXXXX)
  echo "debootstrap $CODENAME from $(debian_mirror) (log: $LOGS/debootstrap.log)"
  nice -n 10 debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
    "$CODENAME" "$root" "$(debian_mirror)" >"$LOGS/debootstrap.log" 2>&1
  tar -C "$root" -c . | docker import - "$BASE_IMAGE"
  rm -rf "$root"
}

# torch for the worker: the CPU build of torch 2.13.0 that pip finds on this machine (its pip
# configuration may point at local wheel folders a container cannot see), handed to the build
# through docker/wheels/.
fetch_torch_wheel() {
  mkdir -p docker/wheels
  ls docker/wheels/torch-2.13.0*.whl >/dev/null 2>&1 \
    || "$VENV/bin/pip" download -q --no-deps --only-binary=:all: --dest docker/wheels "torch==2.13.0"
  TORCH_WHEEL=$(ls docker/wheels/torch-2.13.0*.whl | head -1)
  TORCH_VERSION=$(basename "$TORCH_WHEEL" | cut -d- -f2)
  echo "torch for the worker image: $TORCH_WHEEL"
}

build_images() {  # build_images LOGFILE: the four images, each command echoed
  local log=$1
  local common=(--progress=plain --build-arg "BASE_IMAGE=$BASE_IMAGE"
    --secret "id=pip-cert,src=$CA_BUNDLE")
  build_one "$log" "${common[@]}" -f docker/ci/redis.Dockerfile -t cgidm-ci-redis .
  build_one "$log" "${common[@]}" -f docker/ci/s3.Dockerfile -t cgidm-ci-s3 .
  build_one "$log" "${common[@]}" -f docker/gateway.Dockerfile -t cgidm-gateway .
  build_one "$log" "${common[@]}" --build-arg TORCH_INDEX_URL=https://pypi.org/simple \
    --build-arg "TORCH_SPEC=torch==$TORCH_VERSION" -f docker/worker.Dockerfile -t cgidm-worker .
}

build_one() {  # build_one LOGFILE DOCKER-BUILD-ARGS...
  local log=$1 start=$SECONDS
  shift
  echo "+ docker build $*"
  if ! nice -n 10 docker build "$@" >>"$log" 2>&1; then
    tail -40 "$log"
    echo "docker build failed (log: $log)" >&2
    return 1
  fi
  echo "  $((SECONDS - start)) s"
}

stage "install docker.io, docker-compose, debootstrap" install_engine
stage "start dockerd" start_dockerd
check_compose_files() {  # docker-compose 1.29 reads the users' file set and CI's
  docker-compose -f docker-compose.yml -f docker-compose.override.yml config -q
  docker-compose -f docker-compose.yml -f docker-compose.cpu.yml -f docker-compose.ci.yml config -q
}
stage "docker-compose config (users' files, CI's files)" check_compose_files
stage "base image (debootstrap + import; skipped if present)" make_base_image
fetch_torch_wheel
cold=$(docker image inspect cgidm-worker >/dev/null 2>&1 && echo "build (images existed)" \
  || echo "cold build")
stage "$cold: 4 images" build_images "$LOGS/build.log"
stage "warm build: 4 images, nothing changed" build_images "$LOGS/build-warm.log"
docker images --format '{{.Repository}}:{{.Tag}} {{.Size}}' | grep -E '^cgidm' || true

"$VENV/bin/python" -m cgidm_testkit.compose_check --project "$PROJECT" --steps "$STEPS" \
  --timings "$TIMES" -f docker-compose.yml -f docker-compose.cpu.yml -f docker-compose.ci.yml
