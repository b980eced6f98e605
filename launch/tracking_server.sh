#!/usr/bin/env bash
# The MLflow tracking server with authentication (MLflow's basic-auth app); docs/security.md.
#
#   export MLFLOW_TRACKING_USERNAME=alice MLFLOW_TRACKING_PASSWORD=...   # the admin, as the jobs use it
#   bash launch/tracking_server.sh --host 127.0.0.1 --port 5000 --root /shared/mlflow [--backend-store-uri URI]
#
# Everything lives under --root (created with mode 700): the run store (sqlite:///ROOT/mlflow.db
# unless --backend-store-uri), the artifacts (ROOT/artifacts, uploaded through the server), the user
# store (ROOT/basic_auth.db), the auth config (ROOT/basic_auth.ini, mode 600) and the CSRF key
# (ROOT/flask_secret_key, mode 600, made once). The admin is MLFLOW_TRACKING_USERNAME; its password,
# MLFLOW_TRACKING_PASSWORD, reaches the server through its environment (MLFLOW_AUTH_ADMIN_PASSWORD),
# never a file, and is taken only when the user store is first created (change it later with
# MLflow's update-password API). A user without a grant gets nothing (default_permission
# NO_PERMISSIONS): a request without credentials gets 401.
# Bind to 127.0.0.1 and reach it through an SSH tunnel, or put a TLS proxy in front: basic auth
# sends the password with every request.
set -euo pipefail

die() { echo "tracking_server: error: $*" >&2; exit 2; }

HOST=127.0.0.1 PORT=5000 ROOT="" BACKEND="" WORKERS=""
while [ $# -gt 0 ]; do
    case "$1" in
        --host) HOST=${2:?--host needs a value}; shift 2 ;;
        --port) PORT=${2:?--port needs a value}; shift 2 ;;
        --root) ROOT=${2:?--root needs a folder}; shift 2 ;;
        --backend-store-uri) BACKEND=${2:?--backend-store-uri needs a URI}; shift 2 ;;
        --workers) WORKERS=${2:?--workers needs a number}; shift 2 ;;
        -h|--help) sed -n '2,17p' "$0"; exit 0 ;;
        *) die "unknown argument $1 (usage: --host H --port P --root DIR [--backend-store-uri URI] [--workers N])" ;;
    esac
done
[ -n "$ROOT" ] || die "--root DIR is required (the server's stores and artifacts)"
[ -n "${MLFLOW_TRACKING_USERNAME:-}" ] && [ -n "${MLFLOW_TRACKING_PASSWORD:-}" ] \
    || die "set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD (the admin user): the server does not start without authentication"
[ ${#MLFLOW_TRACKING_PASSWORD} -ge 12 ] || die "MLFLOW_TRACKING_PASSWORD must have at least 12 characters (MLflow's rule)"

REPO=$(cd "$(dirname "$0")/.." && pwd)
PY=${DYNTRAIN_PYTHON:-$REPO/.venv/bin/python}
[ -x "$PY" ] || PY=python3

umask 077
mkdir -p "$ROOT" || die "cannot create --root $ROOT"
ROOT=$(cd "$ROOT" && pwd)
chmod 700 "$ROOT"
cat > "$ROOT/basic_auth.ini" <<EOF
[mlflow]
default_permission = NO_PERMISSIONS
database_uri = sqlite:///$ROOT/basic_auth.db
admin_username = $MLFLOW_TRACKING_USERNAME
authorization_function = mlflow.server.auth:authenticate_request_basic_auth
# a checked password is remembered for 60 s (per worker): without it every request of a job pays
# PBKDF2 (about 1 s a request seen on a busy 2-core node); a changed password takes up to 60 s
auth_cache_ttl_seconds = 60
EOF
chmod 600 "$ROOT/basic_auth.ini"
[ -s "$ROOT/flask_secret_key" ] || "$PY" -c "import secrets; print(secrets.token_hex(32))" > "$ROOT/flask_secret_key"
chmod 600 "$ROOT/flask_secret_key"

export MLFLOW_AUTH_CONFIG_PATH="$ROOT/basic_auth.ini"
export MLFLOW_AUTH_ADMIN_PASSWORD="$MLFLOW_TRACKING_PASSWORD"
MLFLOW_FLASK_SERVER_SECRET_KEY=$(cat "$ROOT/flask_secret_key")
export MLFLOW_FLASK_SERVER_SECRET_KEY
# MLflow 3 starts a job runner and seven huey consumers (up to 47 threads) for its GenAI jobs with
# every server, and leaves their queue folder in /dev/shm at each stop; dyntrain runs none of those
# jobs. Off unless the environment turns them on.
export MLFLOW_SERVER_ENABLE_JOB_EXECUTION=${MLFLOW_SERVER_ENABLE_JOB_EXECUTION:-false}
echo "tracking_server: MLflow with authentication on http://$HOST:$PORT (admin $MLFLOW_TRACKING_USERNAME), store in $ROOT"
exec "$PY" -m mlflow server --app-name basic-auth --host "$HOST" --port "$PORT" \
    --backend-store-uri "${BACKEND:-sqlite:///$ROOT/mlflow.db}" --artifacts-destination "$ROOT/artifacts" \
    ${WORKERS:+--workers "$WORKERS"}
