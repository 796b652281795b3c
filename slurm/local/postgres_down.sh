#!/usr/bin/env bash
# Stop the PostgreSQL server started by postgres_up.sh, by the PID it recorded (fast shutdown:
# SIGINT; SIGKILL after 20 s). The data directory stays; delete $STATE to drop it.
STATE=${STATE:-/tmp/brainfm-postgres}
f="$STATE/postgres.pid.bg"
[[ -s "$f" ]] || { echo "postgres_down: no $f (not started by postgres_up.sh?)"; exit 0; }
pid=$(cat "$f")
if kill -0 "$pid" 2>/dev/null; then
  kill -INT "$pid"
  for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
  kill -0 "$pid" 2>/dev/null && { echo "postgres ($pid) still alive, sending KILL"; kill -KILL "$pid"; }
  echo "stopped postgres pid=$pid"
fi
rm -f "$f"
