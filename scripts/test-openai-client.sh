#!/usr/bin/env bash
# Runs the official `openai` Python client (tests/clients/openai_client.py: the API; openai_agents.py:
# tools and structured output) and `anthropic` client (tests/clients/anthropic_client.py: /v1/messages; openai_responses.py: /v1/responses) (pinned in scripts/requirements-client.txt, installed into
# a venv under ~/.cache/infer) against `infer serve` on the test model, then stops the server with
# SIGTERM and checks it exits cleanly; then tests/clients/several_models.py against the test model and
# tests/fixtures/tiny-bert served at once.
#
#   usage: scripts/test-openai-client.sh MODEL.gguf
#   INFER_BIN   the `infer` binary to test (default: built here with `cargo build --release -p infer-cli`;
#               scripts/test.sh passes the one its test build made, which a plain `-p infer-cli` build
#               would compile again with other dependency features)
set -euo pipefail
cd "$(dirname "$0")/.."
model="$1"
venv="${INFER_PY_CLIENT:-$HOME/.cache/infer/pyclient}"
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
fi
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check -r scripts/requirements-client.txt
bin="${INFER_BIN:-}"
if [ -z "$bin" ]; then
  cargo build --release --quiet -p infer-cli
  bin="${CARGO_TARGET_DIR:-target}/release/infer"
fi
port="$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
key="test-key-$RANDOM"
log="$(mktemp)"
"$bin" serve "$model" --port "$port" --api-key "$key" > "$log" 2>&1 &
pid=$!
trap 'kill $pid 2>/dev/null || true; rm -f "$log"' EXIT
python3 - "$port" <<'PY'
import sys, time, urllib.request
url = f"http://127.0.0.1:{sys.argv[1]}/health"
for _ in range(600):
    try:
        if urllib.request.urlopen(url).status == 200:
            sys.exit(0)
    except Exception:
        pass
    time.sleep(0.1)
sys.exit("infer serve did not become ready in 60 s")
PY
"$venv/bin/python" tests/clients/openai_client.py "http://127.0.0.1:$port" "$key"
"$venv/bin/python" tests/clients/openai_agents.py "http://127.0.0.1:$port" "$key"
"$venv/bin/python" tests/clients/anthropic_client.py "http://127.0.0.1:$port" "$key"
"$venv/bin/python" tests/clients/openai_responses.py "http://127.0.0.1:$port" "$key"
kill -TERM "$pid"
status=0
wait "$pid" || status=$?
cat "$log"
[ "$status" -eq 0 ] || { echo "infer serve exited with $status after SIGTERM"; exit 1; }
echo "openai client: ok (server stopped cleanly on SIGTERM)"

# Several models at once: a chat model and an embedding model (tests/clients/several_models.py).
port="$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
"$bin" serve "chat=$model" embed=tests/fixtures/tiny-bert --port "$port" --api-key "$key" --keep-alive 3s -c 512 > "$log" 2>&1 &
pid=$!
"$venv/bin/python" - "$port" <<'PY'
import sys, time, urllib.request
for _ in range(100):
    try:
        if urllib.request.urlopen(f"http://127.0.0.1:{sys.argv[1]}/health").status == 200:
            sys.exit(0)
    except Exception:
        pass
    time.sleep(0.1)
sys.exit("infer serve (several models) did not listen in 10 s")
PY
"$venv/bin/python" tests/clients/several_models.py "http://127.0.0.1:$port" "$key"
kill -TERM "$pid"
status=0
wait "$pid" || status=$?
[ "$status" -eq 0 ] || { cat "$log"; echo "infer serve (several models) exited with $status after SIGTERM"; exit 1; }
