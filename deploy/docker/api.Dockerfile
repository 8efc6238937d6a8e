# syntax=docker/dockerfile:1
# API service: FastAPI under gunicorn + uvicorn workers. No torch, no transformers.
# Build from the repository root:  docker build -f deploy/docker/api.Dockerfile -t qwen3vl-api .
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app
RUN groupadd --system --gid 10001 app \
    && useradd --system --uid 10001 --gid app --home-dir /app --no-create-home --shell /usr/sbin/nologin app \
    && mkdir -p /data \
    && chown app:app /data

COPY services/api/requirements.txt /tmp/api-requirements.txt
RUN pip install --no-cache-dir -r /tmp/api-requirements.txt && rm /tmp/api-requirements.txt

COPY services/__init__.py services/__init__.py
COPY services/protocol services/protocol
COPY services/api services/api

# Listen on every interface inside the container; sessions go to SQLite on the /data volume unless
# DATABASE_URL points at Postgres (compose and Kubernetes do).
ENV API_HOST=0.0.0.0 \
    API_PORT=8000 \
    SESSIONS_DB_PATH=/data/sessions.db
VOLUME ["/data"]
USER 10001:10001
EXPOSE 8000

HEALTHCHECK --interval=10s --timeout=3s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/health' % os.environ.get('API_PORT', '8000'), timeout=2)"]

# SIGTERM: gunicorn stops accepting, lets the workers finish their streams (graceful_timeout in the config).
STOPSIGNAL SIGTERM
CMD ["gunicorn", "-c", "services/api/gunicorn.conf.py", "services.api.main:create_app()"]
