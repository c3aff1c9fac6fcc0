#!/usr/bin/env bash
# Start a throwaway PostgreSQL server on loopback for the shared-study tests; prints the
# URL to use. Installs Debian's postgresql if it is missing. The server's data lives in
# a temporary folder; it stops when the machine does (or with pg_ctl -D <dir> stop).
set -euo pipefail
if ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then
  apt-get update -qq >/dev/null && apt-get install -y -qq postgresql >/dev/null
fi
bin=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -n 1)
# a free loopback port, unless one is given
port=${DFGEN_PG_PORT:-$(python3 -c "import socket; s=socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])")}
data=$(mktemp -d /tmp/dfgen-pg.XXXXXX)
chown postgres "$data"
su postgres -c "$bin/initdb -D $data -A trust -U postgres" >/dev/null
su postgres -c "$bin/pg_ctl -D $data -o '-h 127.0.0.1 -p $port -k $data' -l $data/server.log -w start" >/dev/null
echo "postgresql://postgres@127.0.0.1:$port/postgres"
