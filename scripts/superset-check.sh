#!/usr/bin/env bash
# Apache Superset against a vecsearch database, end to end, through Superset's REST API only:
# install Superset into a virtual environment of its own, give it a SQLite metadata store, start
# it, add the vecsearch reader's URL as a database, run `vecsearch_similar` in SQL Lab, print the
# rows. Exits 0 only when SQL Lab returned rows. docs/sql.md has a dated transcript.
#
#   vecsearch db start --tcp --port 5433
#   scripts/superset-check.sh "$(vecsearch db reader superset)" [WORKDIR]
#
# WORKDIR (default: a new temporary directory) receives venv/, superset_config.py, the metadata
# store superset.db and superset.log. A WORKDIR/venv that already has Superset is reused; so is
# SUPERSET_VENV=DIR. IMAGE_ID=N queries that image (default: the smallest id). PYTHON picks the
# interpreter (Superset 6.1 needs Python 3.10-3.12). Superset pins SQLAlchemy 1.4: never install
# it into vecsearch's own environment.
set -euo pipefail

usage="usage: scripts/superset-check.sh READER_URL [WORKDIR] (READER_URL: the postgresql://... that \`vecsearch db reader NAME\` prints after \`vecsearch db start --tcp\`)"
if [ $# -lt 1 ] || [ $# -gt 2 ]; then echo "error: $usage" >&2; exit 2; fi
reader_url=$1
case "$reader_url" in
  postgresql://*@*:*/*) ;;
  postgresql://*\?host=/*)
    echo "error: $reader_url is a unix-socket URL: run \`vecsearch db start --tcp\`, then \`vecsearch db reader NAME\` again" >&2
    exit 2 ;;
  *) echo "error: $usage" >&2; exit 2 ;;
esac
workdir=${2:-$(mktemp -d -t superset-check.XXXXXX)}
mkdir -p "$workdir"
workdir=$(cd "$workdir" && pwd)
venv=${SUPERSET_VENV:-$workdir/venv}
# What a bare `pip install apache-superset==6.1.0` lacks or gets wrong here (2026-12-03):
# flask-caching 2.5 breaks `superset db upgrade` (an unexpected keyword argument
# 'ignore_delete_many_errors'); without cachetools the postgresql driver does not load.
packages=("apache-superset==6.1.0" "flask-caching<2.3.1" rich cachetools psycopg2-binary)

step() { printf '\n$ %s\n' "$*"; }

if [ ! -x "$venv/bin/superset" ]; then
  python=${PYTHON:-}
  if [ -z "$python" ]; then
    for candidate in python3.11 python3.12 python3.10 python3; do
      if command -v "$candidate" >/dev/null 2>&1 &&
         "$candidate" -c 'import sys; sys.exit(not (3, 10) <= sys.version_info[:2] <= (3, 12))'; then
        python=$candidate; break
      fi
    done
  fi
  if [ -z "$python" ]; then
    echo "error: Superset 6.1 needs Python 3.10, 3.11 or 3.12: install one, or set PYTHON=/path/to/python3.11" >&2
    exit 2
  fi
  step "$python -m venv $venv && $venv/bin/pip install ${packages[*]}"
  "$python" -m venv "$venv"
  "$venv/bin/python" -m pip install --quiet --upgrade pip
  start=$SECONDS
  "$venv/bin/python" -m pip install --quiet "${packages[@]}"
  echo "installed in $((SECONDS - start)) s"
else
  echo "reusing $venv"
fi
"$venv/bin/python" -c 'import importlib.metadata as m; print("superset", m.version("apache-superset"), "sqlalchemy", m.version("sqlalchemy"), "psycopg2", m.version("psycopg2-binary"))'

export SUPERSET_CONFIG_PATH=$workdir/superset_config.py FLASK_APP=superset
cat >"$SUPERSET_CONFIG_PATH" <<EOF
# Superset's own metadata store (dashboards, users, saved queries), not vecsearch's data.
SECRET_KEY = "$("$venv/bin/python" -c 'import secrets; print(secrets.token_urlsafe(42))')"
SQLALCHEMY_DATABASE_URI = "sqlite:///$workdir/superset.db"
EOF
admin_password=$("$venv/bin/python" -c 'import secrets; print(secrets.token_urlsafe(18))')

step "superset db upgrade && superset fab create-admin ... && superset init"
start=$SECONDS
"$venv/bin/superset" db upgrade >"$workdir/setup.log" 2>&1 &&
"$venv/bin/superset" fab create-admin --username admin --firstname vecsearch --lastname check \
  --email admin@localhost --password "$admin_password" >>"$workdir/setup.log" 2>&1 &&
"$venv/bin/superset" init >>"$workdir/setup.log" 2>&1 || {
  echo "error: Superset's setup failed; the end of $workdir/setup.log:" >&2; tail -20 "$workdir/setup.log" >&2; exit 1; }
echo "set up in $((SECONDS - start)) s"

port=$("$venv/bin/python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
step "superset run --host 127.0.0.1 -p $port --with-threads"
"$venv/bin/superset" run --host 127.0.0.1 -p "$port" --with-threads >"$workdir/superset.log" 2>&1 &
superset_pid=$!
trap 'kill "$superset_pid" 2>/dev/null || true; wait "$superset_pid" 2>/dev/null || true' EXIT

# The REST calls, with Superset's own Python (requests is one of its dependencies).
ADMIN_PASSWORD=$admin_password READER_URL=$reader_url PORT=$port IMAGE_ID=${IMAGE_ID:-} \
SUPERSET_PID=$superset_pid LOG=$workdir/superset.log "$venv/bin/python" - <<'PY'
import json
import os
import re
import sys
import time

import requests

base = f"http://127.0.0.1:{os.environ['PORT']}"
http = requests.Session()


def fail(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(1)


def call(method: str, path: str, body: dict | None = None) -> dict:
    shown = json.dumps(body) if body is not None else ""
    shown = re.sub(r'("password": ")[^"]*', r"\1***", shown)
    shown = re.sub(r"(postgresql\+psycopg2://[^:]+:)[^@]+", r"\1***", shown)
    print(f"\n$ {method} {path} {shown}".rstrip())
    response = http.request(method, base + path, json=body, timeout=120)
    try:
        answer = response.json()
    except ValueError:
        fail(f"{method} {path}: HTTP {response.status_code}, not JSON: {response.text[:500]}")
    if response.status_code >= 400:
        fail(f"{method} {path}: HTTP {response.status_code}: {json.dumps(answer)[:2000]}")
    return answer


deadline = time.monotonic() + 180
while True:
    try:
        if http.get(base + "/health", timeout=5).text.strip() == "OK":
            break
    except requests.ConnectionError:
        pass
    if time.monotonic() > deadline or not os.path.exists(f"/proc/{os.environ['SUPERSET_PID']}"):
        fail(f"Superset did not answer on {base}/health; see {os.environ['LOG']}")
    time.sleep(1)

token = call("POST", "/api/v1/security/login", {"username": "admin", "password": os.environ["ADMIN_PASSWORD"],
                                                "provider": "db", "refresh": False})["access_token"]
print("-> access_token (a JWT)")
http.headers["Authorization"] = f"Bearer {token}"
csrf = call("GET", "/api/v1/security/csrf_token/")["result"]
print("-> csrf token")
http.headers.update({"X-CSRFToken": csrf, "Referer": base})

uri = re.sub(r"^postgresql://", "postgresql+psycopg2://", os.environ["READER_URL"])
database = call("POST", "/api/v1/database/", {"database_name": "vecsearch", "sqlalchemy_uri": uri,
                                              "expose_in_sqllab": True})
print(f"-> database id {database['id']}")


def sql_lab(sql: str) -> list[dict]:
    answer = call("POST", "/api/v1/sqllab/execute/", {"database_id": database["id"], "sql": sql,
                                                      "runAsync": False, "schema": "public"})
    if answer.get("status") != "success":
        fail(f"SQL Lab: {json.dumps(answer)[:2000]}")
    return answer["data"]


image_id = os.environ["IMAGE_ID"]
if not image_id:
    first = sql_lab("SELECT min(id) AS id, count(*) AS images FROM images")
    print("-> " + json.dumps(first))
    image_id = first[0]["id"]
    if image_id is None:
        fail("the database has no images: run `vecsearch load DIR` first")
rows = sql_lab(f"SELECT * FROM vecsearch_similar({int(image_id)}, 5)")
print(f"-> {len(rows)} rows")
for row in rows:
    print(json.dumps(row))
if not rows:
    fail(f"SQL Lab returned no rows for vecsearch_similar({image_id}, 5)")
PY
