# tinkerd in a container: `tinkerd serve` (embedded) by default; docker-compose.yml runs the same
# image as the cluster's API (`tinkerd serve --redis ...`) and its workers (`tinkerd worker ...`).
# Redis is a separate service (redis:7).
#
#   docker build -t tinkerd .                                   # CPU torch
#   docker build -t tinkerd --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 .
#   docker run --rm -p 8000:8000 -v tinkerd-data:/data tinkerd  # embedded: API + worker
#
# A CUDA build of torch brings its CUDA libraries as wheels: the host needs only the NVIDIA driver
# and the NVIDIA Container Toolkit (`docker run --gpus all`, or the compose file's GPU stanza).
FROM python:3.11-slim

# Where torch comes from: the CPU wheels by default; a CUDA index (cu126, cu128, ...) for GPUs.
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG TORCH_VERSION=2.13.0

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    TINKERD_DATA_DIR=/data \
    TINKERD_HOST=0.0.0.0 \
    TINKERD_PORT=8000 \
    HF_HOME=/data/huggingface

# torch first, from its own index, so that installing tinkerd (torch>=2.4) keeps this build
# instead of pulling PyPI's default (CUDA) wheel.
RUN pip install --index-url "$TORCH_INDEX_URL" "torch==${TORCH_VERSION}"

WORKDIR /opt/tinkerd
COPY pyproject.toml README.md ./
COPY tinkerd ./tinkerd
RUN pip install . && rm -rf build *.egg-info

# Not root (Celery warns about running as root). A fresh named volume mounted on /data takes
# this directory's owner, so the data dir is writable.
RUN useradd --create-home --uid 1000 tinkerd && mkdir -p /data && chown tinkerd:tinkerd /data
USER tinkerd
WORKDIR /home/tinkerd
VOLUME ["/data"]

EXPOSE 8000
# The API's health (serve, embedded or --redis); a `tinkerd worker` container serves no HTTP, so
# give it its own check (docker-compose.yml does) or run it with --no-healthcheck.
HEALTHCHECK --interval=10s --timeout=5s --start-period=60s --retries=6 CMD \
    python -c "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/api/v1/healthz' % os.environ.get('TINKERD_PORT', '8000'), timeout=4)"
ENTRYPOINT ["tinkerd"]
CMD ["serve"]
