#!/usr/bin/env bash
# Start a private PostgreSQL server for an Optuna study (tests, a workstation): Debian's
# `postgresql` binaries, its own data directory, listening on loopback only, no systemd.
#
#   STATE=/tmp/brainfm-postgres PGPORT=55432 bash slurm/local/postgres_up.sh
#   -> prints the storage URL on its last line: postgresql+psycopg2://brainfm@127.0.0.1:55432/optuna
#   brainfm-search ... search.storage=<that URL>
#   STATE=/tmp/brainfm-postgres bash slurm/local/postgres_down.sh      # stops it by its PID
#
# Environment: STATE (data directory parent, default /tmp/brainfm-postgres), PGPORT (55432),
# PGDB (optuna), PGUSER_NAME (brainfm). Authentication is `trust` on 127.0.0.1: for a machine
# shared with other users, put a password in and use md5/scram (or a NERSC database service).
# Run as root, the server runs as the `postgres` system user (PostgreSQL refuses root); STATE is
# then handed to that user. Installs `postgresql` with apt-get when its binaries are missing.
set -euo pipefail
STATE=${STATE:-/tmp/brainfm-postgres}
PORT=${PGPORT:-55432}
DB=${PGDB:-optuna}
ROLE=${PGUSER_NAME:-brainfm}

pg_bin() { ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1; }
if [[ -z "$(pg_bin)" ]]; then
  if [[ $(id -u) -ne 0 ]]; then echo "postgres_up: PostgreSQL is not installed (apt-get install postgresql, as root)" >&2; exit 2; fi
  apt-get update -q
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends postgresql
fi
BIN=$(pg_bin)

if [[ -s "$STATE/postgres.pid.bg" ]] && kill -0 "$(cat "$STATE/postgres.pid.bg")" 2>/dev/null; then
  echo "postgres_up: already running (pid $(cat "$STATE/postgres.pid.bg"))" >&2
  echo "postgresql+psycopg2://${ROLE}@127.0.0.1:${PORT}/${DB}"
  exit 0
fi

mkdir -p "$STATE"
AS=()
if [[ $(id -u) -eq 0 ]]; then
  chown -R postgres:postgres "$STATE"
  chmod 0700 "$STATE"
  # setpriv execs: $! below is the server's own PID (runuser/su would fork)
  AS=(setpriv --reuid=postgres --regid=postgres --init-groups)
fi

if [[ ! -s "$STATE/data/PG_VERSION" ]]; then
  "${AS[@]}" "$BIN/initdb" -D "$STATE/data" -U "$ROLE" --auth=trust --encoding=UTF8 --no-locale >"$STATE/initdb.log" 2>&1 \
    || { cat "$STATE/initdb.log" >&2; exit 1; }
fi

# loopback TCP only, the Unix socket inside STATE (not /var/run/postgresql)
"${AS[@]}" "$BIN/postgres" -D "$STATE/data" -h 127.0.0.1 -p "$PORT" -k "$STATE" \
  -c max_connections=200 >"$STATE/postgres.log" 2>&1 &
echo $! > "$STATE/postgres.pid.bg"

for _ in $(seq 150); do
  "$BIN/pg_isready" -q -h 127.0.0.1 -p "$PORT" && break
  kill -0 "$(cat "$STATE/postgres.pid.bg")" 2>/dev/null || { cat "$STATE/postgres.log" >&2; exit 1; }
  sleep 0.1
done
"$BIN/pg_isready" -q -h 127.0.0.1 -p "$PORT" || { echo "postgres_up: server did not become ready" >&2; cat "$STATE/postgres.log" >&2; exit 1; }
if ! "$BIN/psql" -h 127.0.0.1 -p "$PORT" -U "$ROLE" -d postgres -tAc "SELECT 1 FROM pg_database WHERE datname='${DB}'" | grep -q 1; then
  "$BIN/createdb" -h 127.0.0.1 -p "$PORT" -U "$ROLE" "$DB"
fi
echo "postgres_up: pid $(cat "$STATE/postgres.pid.bg"), data $STATE/data, port $PORT" >&2
echo "postgresql+psycopg2://${ROLE}@127.0.0.1:${PORT}/${DB}"
