# syntax=docker/dockerfile:1
# Edge: the official nginx image with the project's template, filled from EDGE_* variables at start
# (deploy/nginx/entrypoint.sh). 1.28 has upstream `resolve`, used with EDGE_RESOLVER (compose).
# Build from the repository root:  docker build -f deploy/docker/nginx.Dockerfile -t qwen3vl-edge .
FROM nginx:1.28-alpine

COPY deploy/nginx/nginx.conf.template /etc/nginx/templates/nginx.conf.template
COPY --chmod=0755 deploy/nginx/entrypoint.sh /usr/local/bin/edge-entrypoint

# Non-root: listen on 8080, runtime files (pid, temp paths) under /tmp/nginx.
ENV EDGE_LISTEN=8080 \
    EDGE_RUNTIME_DIR=/tmp/nginx
# uid/gid 101: the image's nginx user (numeric, so that Kubernetes runAsNonRoot can verify it)
USER 101:101
EXPOSE 8080

HEALTHCHECK --interval=10s --timeout=3s --start-period=5s --retries=3 \
    CMD ["wget", "-q", "-O", "/dev/null", "http://127.0.0.1:8080/health"]

STOPSIGNAL SIGQUIT
ENTRYPOINT ["/usr/local/bin/edge-entrypoint"]
