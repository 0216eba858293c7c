# syntax=docker/dockerfile:1
# Image for the localpv-agent DaemonSet. Needs BuildKit (the default builder
# since Docker 23) for COPY --chmod.

# --- build: turn the source tree into a wheel, so no source lands in the final image
FROM python:3.11-slim-bookworm AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore
WORKDIR /src
COPY . .
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /wheels .

# --- runtime
FROM python:3.11-slim-bookworm
LABEL org.opencontainers.image.title="localpv-agent" \
      org.opencontainers.image.description="Node agent that turns prepared disks into Kubernetes local PersistentVolumes"

# MALLOC_ARENA_MAX: glibc gives each thread that allocates an arena of its own, up to 8 per core,
# and the agent starts a short-lived host-read thread every pass; each arena keeps what it once
# held. Two arenas: RSS +0.08 MiB over 10,000 mount/unmount cycles instead of +3.29 MiB
# (benchmarks/memory.py). The agent's threads mostly wait, so they do not contend for them.
ENV MALLOC_ARENA_MAX=2 \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore

# util-linux: wipefs, blkdiscard, blockdev, blkid, findmnt (cleaners, disk identity);
# e2fsprogs/xfsprogs: ext4 and xfs tools for the filesystems volumes carry;
# libudev1: loaded by pyudev at run time.
# Versions are not pinned: the image follows Debian bookworm's security updates.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends \
        e2fsprogs \
        libudev1 \
        util-linux \
        xfsprogs \
    && rm -rf /var/lib/apt/lists/*

# Block cleaners, at the paths the upstream provisioner's configs refer to.
COPY --chmod=0755 scripts/cleaners/ /scripts/

COPY --from=build /wheels/ /tmp/wheels/
RUN pip install --no-cache-dir /tmp/wheels/*.whl \
    && rm -rf /tmp/wheels

# Root on purpose: the agent opens block devices, runs the cleaners and removes
# files owned by any user inside released volumes.
# hadolint ignore=DL3002
USER 0

EXPOSE 8080
ENTRYPOINT ["localpv-agent"]
CMD ["run"]
