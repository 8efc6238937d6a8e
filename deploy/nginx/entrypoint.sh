#!/bin/sh
# Container entrypoint of the edge: fill nginx.conf.template from EDGE_* variables (the same template and
# defaults as deploy/nginx/render.py), check it, then run nginx in the foreground as PID 1.
#
#   EDGE_API_UPSTREAMS  comma-separated api replicas host:port          (default api:8000)
#   EDGE_LISTEN         [addr:]port to listen on                        (default 8080: no root needed)
#   EDGE_RESOLVER       off | auto (first nameserver of /etc/resolv.conf) | an address   (default off)
#                       With a resolver the upstream names are re-resolved while nginx runs (`resolve`,
#                       nginx >= 1.27.3): compose replicas that are recreated get new addresses. Kubernetes
#                       needs none: the api Service's ClusterIP never changes.
#   EDGE_CLIENT_MAX_BODY_SIZE (64m)  EDGE_RATE_LIMIT (1000r/s)  EDGE_RATE_BURST (2000)  EDGE_CONN_LIMIT (128)
#   EDGE_RETRY_AFTER_SECONDS (1)  EDGE_READ_TIMEOUT (3600s)  EDGE_CLIENT_TIMEOUT (60s)
#   EDGE_WORKER_PROCESSES (auto)  EDGE_WORKER_CONNECTIONS (4096)
#   EDGE_RUNTIME_DIR (/tmp/nginx)  EDGE_ERROR_LOG (/dev/stderr)  EDGE_ACCESS_LOG (/dev/stdout)
#   EDGE_TEMPLATE (/etc/nginx/templates/nginx.conf.template)  EDGE_RESOLV_CONF (/etc/resolv.conf)
#   EDGE_RENDER_ONLY=1  write the config and exit (used by the tests)
set -eu

: "${EDGE_API_UPSTREAMS:=api:8000}"
: "${EDGE_LISTEN:=8080}"
: "${EDGE_RESOLVER:=off}"
: "${EDGE_CLIENT_MAX_BODY_SIZE:=64m}"
: "${EDGE_RATE_LIMIT:=1000r/s}"
: "${EDGE_RATE_BURST:=2000}"
: "${EDGE_CONN_LIMIT:=128}"
: "${EDGE_RETRY_AFTER_SECONDS:=1}"
: "${EDGE_READ_TIMEOUT:=3600s}"
: "${EDGE_CLIENT_TIMEOUT:=60s}"
: "${EDGE_WORKER_PROCESSES:=auto}"
: "${EDGE_WORKER_CONNECTIONS:=4096}"
: "${EDGE_RUNTIME_DIR:=/tmp/nginx}"
: "${EDGE_ERROR_LOG:=/dev/stderr}"
: "${EDGE_ACCESS_LOG:=/dev/stdout}"
: "${EDGE_TEMPLATE:=/etc/nginx/templates/nginx.conf.template}"
: "${EDGE_RESOLV_CONF:=/etc/resolv.conf}"

if [ "$EDGE_RESOLVER" = "auto" ]; then
    EDGE_RESOLVER=$(awk '$1 == "nameserver" { print $2; exit }' "$EDGE_RESOLV_CONF")
    [ -n "$EDGE_RESOLVER" ] || { echo "edge: EDGE_RESOLVER=auto but no nameserver in $EDGE_RESOLV_CONF" >&2; exit 1; }
fi
case "$EDGE_RESOLVER" in *:*) EDGE_RESOLVER="[$EDGE_RESOLVER]" ;; esac

resolve=""
EDGE_RESOLVER_DIRECTIVE="# no resolver"
if [ "$EDGE_RESOLVER" != "off" ]; then
    resolve=" resolve"
    EDGE_RESOLVER_DIRECTIVE="resolver $EDGE_RESOLVER valid=10s ipv6=off;"
fi

EDGE_API_SERVERS=""
for upstream in $(echo "$EDGE_API_UPSTREAMS" | tr ',' ' '); do
    line="server ${upstream}${resolve};"
    if [ -z "$EDGE_API_SERVERS" ]; then
        EDGE_API_SERVERS="$line"
    else
        EDGE_API_SERVERS="$EDGE_API_SERVERS
        $line"
    fi
done
[ -n "$EDGE_API_SERVERS" ] || { echo "edge: EDGE_API_UPSTREAMS is empty" >&2; exit 1; }

EDGE_USER_DIRECTIVE="# user: unchanged"
export EDGE_LISTEN EDGE_API_SERVERS EDGE_RUNTIME_DIR EDGE_CLIENT_MAX_BODY_SIZE EDGE_RATE_LIMIT EDGE_RATE_BURST \
    EDGE_CONN_LIMIT EDGE_CLIENT_TIMEOUT EDGE_RETRY_AFTER_SECONDS EDGE_READ_TIMEOUT EDGE_WORKER_PROCESSES EDGE_WORKER_CONNECTIONS \
    EDGE_RESOLVER_DIRECTIVE EDGE_ERROR_LOG EDGE_ACCESS_LOG EDGE_USER_DIRECTIVE

for sub in client_body proxy fastcgi uwsgi scgi logs; do
    mkdir -p "$EDGE_RUNTIME_DIR/$sub"
done
# Only the EDGE_* names are substituted: nginx's own $variables stay as they are.
vars='${EDGE_LISTEN} ${EDGE_API_SERVERS} ${EDGE_RUNTIME_DIR} ${EDGE_CLIENT_MAX_BODY_SIZE} ${EDGE_RATE_LIMIT}
${EDGE_RATE_BURST} ${EDGE_CONN_LIMIT} ${EDGE_CLIENT_TIMEOUT} ${EDGE_RETRY_AFTER_SECONDS} ${EDGE_READ_TIMEOUT} ${EDGE_WORKER_PROCESSES}
${EDGE_WORKER_CONNECTIONS} ${EDGE_RESOLVER_DIRECTIVE} ${EDGE_ERROR_LOG} ${EDGE_ACCESS_LOG} ${EDGE_USER_DIRECTIVE}'
envsubst "$vars" < "$EDGE_TEMPLATE" > "$EDGE_RUNTIME_DIR/nginx.conf"

if [ "${EDGE_RENDER_ONLY:-0}" = "1" ]; then
    echo "$EDGE_RUNTIME_DIR/nginx.conf"
    exit 0
fi
exec nginx -p "$EDGE_RUNTIME_DIR" -c "$EDGE_RUNTIME_DIR/nginx.conf" -e "$EDGE_ERROR_LOG" "$@"
