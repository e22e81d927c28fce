# One image for every kvtier service and for etcd; the compose file picks the role with
# `python -m services.<name>` (or `etcd`). Build: docker build -t kvtier:dev .
# BASE_IMAGE: any Debian bookworm with Python 3.11, e.g. the local one that
# scripts/compose_base_image.sh makes without a registry (--build-arg BASE_IMAGE=kvtier-base:bookworm).
ARG BASE_IMAGE=python:3.11-slim-bookworm

# The runtime dependencies named in pyproject.toml, as a file whose content alone keys the
# cached dependency layer below (editing anything else in pyproject.toml does not reinstall).
FROM ${BASE_IMAGE} AS requirements
COPY pyproject.toml /
RUN python3 -c 'import tomllib; print("\n".join(tomllib.load(open("/pyproject.toml", "rb"))["project"]["dependencies"]))' >/requirements.txt

FROM ${BASE_IMAGE}

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/kvtier/bin:$PATH
# pip checks TLS against the system's CA store (with any CA the base image added), not its own.
ARG PIP_CERT=/etc/ssl/certs/ca-certificates.crt

# ISA-L for erasure coding (kvtier.erasure loads libisal.so.2 with ctypes); Debian's etcd for
# the compose file's etcd service. A base that has them already (compose_base_image.sh) needs
# no apt at all.
RUN dpkg -s libisal2 etcd-server etcd-client >/dev/null 2>&1 \
    || { apt-get update \
         && apt-get install -y --no-install-recommends libisal2 etcd-server etcd-client \
         && rm -rf /var/lib/apt/lists/*; }

# A fixed uid, so that files in named volumes keep one owner across rebuilds. /pki: the
# cluster's certificates; /etcd-data: etcd's (a fresh named volume takes the directory's owner
# and mode).
RUN useradd --system --uid 10001 --user-group --create-home --home-dir /home/kvtier kvtier \
    && mkdir /data /pki /etcd-data \
    && chown kvtier:kvtier /data /pki /etcd-data \
    && chmod 0700 /pki /etcd-data

# A virtualenv: Debian's own python3 refuses system-wide pip installs (PEP 668). The
# dependencies first, in a layer of their own that source changes do not rebuild.
WORKDIR /src
COPY --from=requirements /requirements.txt ./
RUN python3 -m venv /opt/kvtier \
    && pip install --no-cache-dir -r requirements.txt
COPY pyproject.toml README.md ./
COPY protos/ protos/
COPY libs/ libs/
COPY services/ services/
RUN pip install --no-cache-dir . \
    && rm -rf /src

# Run from outside the source tree: `python -m services.<name>` imports the installed package.
WORKDIR /home/kvtier
USER kvtier

EXPOSE 7000 9100
CMD ["kvtier", "--help"]
