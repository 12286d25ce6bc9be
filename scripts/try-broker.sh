#!/usr/bin/env bash
# Start a broker on a temporary data root (embedded queue, no RabbitMQ), send it the seed's
# example retrieval request like a user would, show the reply and the bookkeeping, stop it.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
root=$(mktemp -d)
port=${SF_DAQ_REST_PORT:-18002}
mkdir -p "$root/maloja/data/p18493/raw"
SF_DAQ_DATA_ROOT=$root SF_DAQ_LOCAL_BEAMLINE=maloja SF_DAQ_AMQP_URL= \
  .venv/bin/sf-daq-broker serve --host 127.0.0.1 --port "$port" > "$root/broker.log" 2>&1 &
broker=$!
trap 'kill $broker 2>/dev/null; wait $broker 2>/dev/null || true' EXIT
.venv/bin/python - "$port" "$root" <<'PY'
import json, sys, time, pathlib, requests
port, root = sys.argv[1], pathlib.Path(sys.argv[2])
url = f"http://127.0.0.1:{port}"
for _ in range(300):
    try:
        if requests.get(f"{url}/health", timeout=1).ok:
            break
    except requests.ConnectionError:
        time.sleep(0.1)
request = {
    "pgroup": "p18493", "directory_name": "covid/detector_test2",
    "start_pulseid": 11884948775, "stop_pulseid": 11884949774,
    "channels_list": ["SAR-CVME-TIFALL5:EvtSet", "SAR-CVME-TIFALL4:EvtSet"],
    "detectors": {"JF15T08V01": {}},
}
reply = requests.post(f"{url}/retrieve_from_buffers", json=request, timeout=10).json()
print("reply:", json.dumps(reply, indent=2))
run_json = root / "maloja/data/p18493/raw/run_info/000000/run_000001.json"
print(f"\n{run_json}:\n{run_json.read_text()}")
refused = requests.post(f"{url}/retrieve_from_buffers", json=dict(request, stop_pulseid=1), timeout=10)
print(f"a bad request is refused ({refused.status_code}):", refused.json()["message"])
sys.exit(0 if reply["status"] == "ok" else 1)
PY
