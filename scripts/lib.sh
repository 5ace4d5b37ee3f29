# Shared by scripts/dev, scripts/test and scripts/bench: make sure PostgreSQL and Redis answer,
# installing and starting them from Debian's packages when they don't (needs root).
#
# Which servers: the caller sets SERVICES_PG_URL and SERVICES_REDIS_URL from the URLs it will use
# (DATABASE_URL, TEST_PG_URL, REDIS_URL, ...) before sourcing this file; host and port come
# from them. A server on this machine that does not answer is installed and started; one
# elsewhere is only waited for, with an error naming the URL.

log() {
  if [ -t 2 ]; then printf '\033[1m==> %s\033[0m\n' "$*" >&2; else printf '==> %s\n' "$*" >&2; fi
}

# host and port of a postgres:// or redis(s):// URL ($2: the default port).
url_host() {
  local rest=${1#*://}
  rest=${rest##*@}
  rest=${rest%%/*}
  rest=${rest%%\?*}
  if [[ $rest == \[* ]]; then rest=${rest#[}; echo "${rest%%]*}"; else echo "${rest%%:*}"; fi
}
url_port() {
  local rest=${1#*://}
  rest=${rest##*@}
  rest=${rest%%/*}
  rest=${rest%%\?*}
  rest=${rest##*]}
  if [[ $rest == *:* ]]; then echo "${rest##*:}"; else echo "$2"; fi
}

PG_HOST=${PG_HOST:-$(url_host "${SERVICES_PG_URL:-postgres://127.0.0.1}" 5432)}
PG_PORT=${PG_PORT:-$(url_port "${SERVICES_PG_URL:-postgres://127.0.0.1}" 5432)}
REDIS_HOST=${REDIS_HOST:-$(url_host "${SERVICES_REDIS_URL:-redis://127.0.0.1}" 6379)}
REDIS_PORT=${REDIS_PORT:-$(url_port "${SERVICES_REDIS_URL:-redis://127.0.0.1}" 6379)}
PG_HOST=${PG_HOST:-127.0.0.1}
REDIS_HOST=${REDIS_HOST:-127.0.0.1}

is_local() { [[ $1 =~ ^(127\.[0-9.]+|localhost|::1)$ ]]; }

# need COMMAND PACKAGE: installs Debian's PACKAGE when COMMAND is missing (as root), or stops
# naming it.
need() {
  command -v "$1" >/dev/null && return 0
  log "$1 is missing: installing Debian's $2"
  apt_install "$2"
}

port_open() { (exec 3<>"/dev/tcp/$1/$2") 2>/dev/null; }

wait_port() {
  for _ in $(seq 1 100); do port_open "$1" "$2" && return 0; sleep 0.1; done
  return 1
}

apt_install() {
  if [ "$(id -u)" != 0 ]; then
    log "$* missing and not root: install it (apt-get install $*) or point the URLs at a server"
    exit 1
  fi
  if [ -z "${APT_UPDATED:-}" ]; then
    DEBIAN_FRONTEND=noninteractive apt-get update -qq >/dev/null
    APT_UPDATED=1
  fi
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}

ensure_postgres() {
  if port_open "$PG_HOST" "$PG_PORT"; then return 0; fi
  if ! is_local "$PG_HOST"; then
    log "PostgreSQL at $PG_HOST:$PG_PORT does not answer (from ${SERVICES_PG_URL:-PG_HOST/PG_PORT}); start it or change the URL"
    exit 1
  fi
  if ! ls /etc/postgresql/*/main >/dev/null 2>&1; then
    log "installing PostgreSQL"
    apt_install postgresql
  fi
  local version
  version=$(ls /etc/postgresql | sort -V | tail -n 1)
  log "starting PostgreSQL $version"
  # Local development and tests only: trust connections from this machine.
  local hba="/etc/postgresql/$version/main/pg_hba.conf"
  if ! grep -q "stalewatch" "$hba"; then
    sed -i '1i # stalewatch: trust local TCP connections (development machine)\nhost all all 127.0.0.1/32 trust\nhost all all ::1/128 trust' "$hba"
  fi
  # The package may have started it already: start if not, and reload so the trust lines apply.
  pg_ctlcluster --skip-systemctl-redirect "$version" main start || true
  pg_ctlcluster --skip-systemctl-redirect "$version" main reload || true
  wait_port "$PG_HOST" "$PG_PORT" || { log "PostgreSQL did not start"; exit 1; }
}

# Change capture reads a logical replication slot, which needs wal_level=logical; turning it on
# takes a restart. Done here for the local cluster this script manages; for any other server it
# says what to set (the worker then logs that capture is off and the sweep covers changes).
ensure_logical_decoding() {
  need psql postgresql-client
  local url=${SERVICES_PG_URL:-postgres://postgres@$PG_HOST:$PG_PORT/postgres} level version
  level=$(psql "$url" -tAc "SHOW wal_level")
  [ "$level" = logical ] && return 0
  if [ "$(id -u)" != 0 ] || ! ls /etc/postgresql/*/main >/dev/null 2>&1 \
      || ! [[ "$PG_HOST" =~ ^(127\.0\.0\.1|localhost|::1)$ ]]; then
    log "PostgreSQL has wal_level=$level: set wal_level=logical and restart it for change capture"
    return 0
  fi
  version=$(ls /etc/postgresql | sort -V | tail -n 1)
  log "turning on logical decoding (wal_level=logical) and restarting PostgreSQL $version"
  psql "$url" -qc "ALTER SYSTEM SET wal_level = logical" >/dev/null
  pg_ctlcluster --skip-systemctl-redirect "$version" main restart
  wait_port "$PG_HOST" "$PG_PORT" || { log "PostgreSQL did not come back"; exit 1; }
  for _ in $(seq 1 100); do psql "$url" -tAc "SELECT 1" >/dev/null 2>&1 && break; sleep 0.1; done
}

ensure_redis() {
  if port_open "$REDIS_HOST" "$REDIS_PORT"; then return 0; fi
  if ! is_local "$REDIS_HOST"; then
    log "Redis at $REDIS_HOST:$REDIS_PORT does not answer (from ${SERVICES_REDIS_URL:-REDIS_HOST/REDIS_PORT}); start it or change the URL"
    exit 1
  fi
  if ! command -v redis-server >/dev/null; then
    log "installing Redis"
    apt_install redis-server
  fi
  log "starting Redis"
  mkdir -p /var/lib/redis /var/log/redis
  redis-server --daemonize yes --bind 127.0.0.1 -::1 --port "$REDIS_PORT" --save "" \
    --appendonly no --dir /var/lib/redis --logfile /var/log/redis/stalewatch.log
  wait_port "$REDIS_HOST" "$REDIS_PORT" || { log "Redis did not start"; exit 1; }
}

ensure_services() {
  ensure_postgres
  ensure_logical_decoding
  ensure_redis
}

# Creates database $1 on the local server when it does not exist.
ensure_database() {
  local name=$1
  # A server elsewhere is the operator's: its database is theirs to create.
  is_local "$PG_HOST" || return 0
  need psql postgresql-client
  local url="postgres://postgres@$PG_HOST:$PG_PORT/postgres"
  if [ "$(psql "$url" -tAc "SELECT 1 FROM pg_database WHERE datname = '$name'")" != 1 ]; then
    psql "$url" -qc "CREATE DATABASE $name" >/dev/null
  fi
}

# promtool (config and rule checks) and the Prometheus server the end-to-end metrics test runs
# both come with Debian's prometheus package. Only the binaries are used: the package's own
# service is not started.
ensure_prometheus() {
  if command -v promtool >/dev/null && command -v prometheus >/dev/null; then return 0; fi
  log "installing Prometheus (promtool and the server)"
  apt_install prometheus
}

# What scripts/test checks the deployment files with: Debian's docker-compose (v1, which
# validates a compose file without a container engine) and kubernetes-validate from PyPI (the
# Kubernetes schemas, offline), in a virtualenv under target/ with its PyYAML.
PYTOOLS=${PYTOOLS:-target/pytools}
ensure_deploy_tools() {
  if ! command -v docker-compose >/dev/null; then
    log "installing docker-compose"
    apt_install docker-compose
  fi
  if ! "$PYTOOLS/bin/python" -c "import kubernetes_validate, yaml" 2>/dev/null; then
    python3 -m venv --help >/dev/null 2>&1 || apt_install python3-venv
    log "installing kubernetes-validate into $PYTOOLS"
    mkdir -p "$(dirname "$PYTOOLS")"
    python3 -m venv "$PYTOOLS"
    "$PYTOOLS/bin/pip" install -q kubernetes-validate
  fi
}
