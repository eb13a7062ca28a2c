#!/usr/bin/env bash
# Set up everything `make demo` and `make test` need on a fresh machine:
#   .venv with the project installed, and a Redis (and, for tests, a PostgreSQL) that answers.
# Usage: scripts/bootstrap.sh [demo|test|install]   (install: the .venv alone, for `make lint`)
set -euo pipefail
cd "$(dirname "$0")/.."
mode="${1:-demo}"
venv=.venv
py="$venv/bin/python"

say() { printf '\033[1m==> %s\033[0m\n' "$*" >&2; }

as_root() {
  if [ "$(id -u)" = 0 ]; then "$@"; elif command -v sudo >/dev/null; then sudo "$@"; else return 1; fi
}

apt_install() {
  command -v apt-get >/dev/null || return 1
  say "installing $* from the system's packages"
  as_root apt-get update -qq && as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@"
}

install_project() {
  if [ ! -x "$py" ]; then
    say "creating $venv"
    python3 -m venv "$venv"
    "$py" -m pip install -q --upgrade pip
  fi
  # torch first, pinned: a bare `torch` requirement would pull a multi-GB CUDA build on CPU boxes.
  "$py" -c "import torch" 2>/dev/null || { say "installing torch"; "$py" -m pip install -q "${TORCH_SPEC:-torch==2.13.0}"; }
  if [ ! -f "$venv/.installed" ] || [ pyproject.toml -nt "$venv/.installed" ]; then
    say "installing gemma-batch"
    "$py" -m pip install -q -e ".[api,worker,test]"
    touch "$venv/.installed"
  fi
}

redis_answers() { "$py" -c "import redis,sys; redis.Redis.from_url(sys.argv[1], socket_timeout=2).ping()" "$1" 2>/dev/null; }

ensure_redis() {
  local url="${GEMMA_BATCH_BROKER_URL:-redis://127.0.0.1:6379/0}"
  redis_answers "$url" && return 0
  local port; port=$("$py" -c "import sys; from urllib.parse import urlsplit; print(urlsplit(sys.argv[1]).port or 6379)" "$url")
  command -v redis-server >/dev/null || apt_install redis-server || {
    echo "Redis is not running and could not be installed: run 'sudo apt-get install redis-server' (or start Redis at $url)" >&2
    exit 1
  }
  say "starting redis-server on 127.0.0.1:$port"
  mkdir -p data
  redis-server --daemonize yes --bind 127.0.0.1 --port "$port" --save "" --appendonly no \
    --dir "$PWD/data" --logfile "$PWD/data/redis.log"
  for _ in $(seq 50); do redis_answers "$url" && return 0; sleep 0.1; done
  echo "redis-server did not answer at $url; see data/redis.log" >&2; exit 1
}

postgres_answers() { "$py" -c "import psycopg,sys; psycopg.connect(sys.argv[1], connect_timeout=3).close()" "$1" 2>/dev/null; }

ensure_postgres() {
  # Tests use the PostgreSQL at this URL; with none there, a private cluster is started on its port.
  local url="${GEMMA_BATCH_TEST_POSTGRES_URL:-postgresql://postgres@127.0.0.1:5432/test}"
  postgres_answers "$url" && return 0
  local bin; bin=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1)
  if [ -z "$bin" ]; then
    apt_install postgresql || { echo "PostgreSQL is needed by the tests: run 'sudo apt-get install postgresql'" >&2; exit 1; }
    bin=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -1)
  fi
  local port db dir run=()
  port=$("$py" -c "import sys; from urllib.parse import urlsplit; print(urlsplit(sys.argv[1]).port or 5432)" "$url")
  db=$("$py" -c "import sys; from urllib.parse import urlsplit; print(urlsplit(sys.argv[1]).path.strip('/') or 'postgres')" "$url")
  dir="${TMPDIR:-/tmp}/gemma-batch-pg-$port"
  # PostgreSQL refuses to run as root; the postgres account that its package creates runs it.
  [ "$(id -u)" = 0 ] && run=(runuser -u postgres --)
  say "starting a private PostgreSQL on 127.0.0.1:$port ($dir)"
  if [ ! -f "$dir/PG_VERSION" ]; then
    mkdir -p "$dir"; [ "$(id -u)" = 0 ] && chown postgres "$dir"
    "${run[@]}" "$bin/initdb" -D "$dir" -U postgres -A trust >/dev/null
  fi
  "${run[@]}" "$bin/pg_ctl" -D "$dir" -l "$dir/log" -w -o "-p $port -k $dir -c listen_addresses=127.0.0.1" start >/dev/null
  "${run[@]}" "$bin/createdb" -h 127.0.0.1 -p "$port" -U postgres "$db" 2>/dev/null || true
  postgres_answers "$url" || { echo "PostgreSQL did not answer at $url; see $dir/log" >&2; exit 1; }
}

ensure_chromium() {
  # The dashboard test drives Debian's chromium (no browser download: the network is closed).
  command -v chromium >/dev/null && return 0
  apt_install chromium || { echo "the dashboard test needs chromium: run 'sudo apt-get install chromium'" >&2; exit 1; }
}

install_project
[ "$mode" = install ] && exit 0
ensure_redis
if [ "$mode" = test ]; then ensure_postgres; ensure_chromium; fi
