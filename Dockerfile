# One image for every kvtier service; the compose file picks the role with
# `python -m services.<name>`. Build: docker build -t kvtier:dev .
FROM python:3.11-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# ISA-L for erasure coding (kvtier.erasure loads libisal.so.2 with ctypes).
RUN apt-get update \
    && apt-get install -y --no-install-recommends libisal2 \
    && rm -rf /var/lib/apt/lists/*

# A fixed uid, so that files in named volumes keep one owner across rebuilds. /pki: the
# cluster's certificates (a fresh named volume takes this directory's owner and mode).
RUN useradd --system --uid 10001 --user-group --create-home --home-dir /home/kvtier kvtier \
    && mkdir /data /pki \
    && chown kvtier:kvtier /data /pki \
    && chmod 0700 /pki

WORKDIR /src
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
