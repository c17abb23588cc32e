# syntax=docker/dockerfile:1
# A hospital's site executor: `veil executor serve`, every setting from the environment (see compose.yaml
# and `veil executor serve --help`). The site's catalog, data and audit-signing key live in a volume at
# /srv/veil/site; the state database is PostgreSQL (VEIL_DATABASE_URL) or SQLite in that volume.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# PyTorch's CPU build first: from the default index, `veil[site]` would pull the CUDA build (gigabytes)
RUN pip install --index-url https://download.pytorch.org/whl/cpu torch==2.13.0

# the executor, with PostgreSQL for the state database; .dockerignore leaves the lab extension's
# sources out, so the build hook (setup.py) builds no bundle: a site serves no JupyterLab
RUN --mount=type=bind,source=.,target=/tmp/veil,rw pip install "/tmp/veil[site,postgres]"

RUN useradd --system --uid 10001 --create-home --home-dir /srv/veil veil \
    && mkdir -p /srv/veil/site && chown veil:veil /srv/veil/site
USER veil
WORKDIR /srv/veil

ENV VEIL_SITE_CONFIG=/srv/veil/site/site.toml \
    VEIL_HOST=0.0.0.0 \
    VEIL_PORT=8700 \
    VEIL_WORKERS=1 \
    VEIL_LOG_FORMAT=json
VOLUME ["/srv/veil/site"]
EXPOSE 8700

# /health answers 200 when the executor is up and its state database answers, else 503
HEALTHCHECK --interval=30s --timeout=5s --start-period=120s --retries=3 \
    CMD python -c "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/health' % os.environ.get('VEIL_PORT', '8700'), timeout=4)"

CMD ["veil", "executor", "serve"]
