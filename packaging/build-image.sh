#!/usr/bin/env bash
# Build bedside's OCI image on this machine with nothing pulled from a container registry:
#
#   1. base   a minimal Debian root file system made with debootstrap from the Debian mirror
#             (python3, python3-venv, ca-certificates), committed as localhost/bedside-base:SUITE
#   2. image  packaging/Containerfile built on that base (bedside and its dependencies from PyPI),
#             committed as localhost/bedside:TAG (TAG: the commit's short hash unless --tag)
#   3. --run  (optional) start the image with throwaway TLS files, a token and a model repository,
#             wait for its health check and for /v2/health/ready, ask for a model, stop it
#
# Needs root (or a user namespace), buildah, debootstrap, and podman for --run: on Debian
# `apt-get install buildah podman debootstrap`. Where overlay mounts or namespaces are refused,
# `--storage-driver vfs --isolation chroot` (the defaults here) work without either.
#
#   packaging/build-image.sh                       # base (once) + image
#   packaging/build-image.sh --run --models DIR    # ... then start it and probe readiness
#   packaging/build-image.sh --rebuild-base        # make the base again (security updates)
set -euo pipefail

SUITE=bookworm
MIRROR=http://deb.debian.org/debian
WORK=${TMPDIR:-/var/tmp}/bedside-image
TAG=""
REF=HEAD
WORKTREE=0
RUN=0
MODELS=""
REBUILD_BASE=0
RUNTIME=${PODMAN_RUNTIME:-}
BUILD=1
STORAGE_DRIVER=${STORAGE_DRIVER:-vfs}
ISOLATION=${BUILDAH_ISOLATION:-chroot}
# the CA bundle pip trusts inside the build (a secret, in no layer): this host's, as pip here uses it
CA_BUNDLE=${PIP_CERT:-${SSL_CERT_FILE:-/etc/ssl/certs/ca-certificates.crt}}
HTTP_PORT=18000 # host ports for --run (the image listens on bedside's defaults inside)
GRPC_PORT=18001

usage() {
    sed -n '2,17p' "$0" | sed 's/^# \{0,1\}//'
    cat <<EOF
options:
  --suite NAME             Debian suite of the base (default $SUITE)
  --mirror URL             Debian mirror (default $MIRROR)
  --work DIR               where the base root file system and the build context go (default $WORK)
  --ref REF                the commit the image is built from (default HEAD)
  --worktree               build from the working tree instead (git's files, tracked and not ignored)
  --tag TAG                tag of the image (default: the commit's short hash; -dirty from a changed tree)
  --rebuild-base           make the base again even if localhost/bedside-base:SUITE exists
  --storage-driver NAME    containers-storage driver (default $STORAGE_DRIVER; overlay where it works)
  --isolation TYPE         buildah RUN isolation: chroot (default) or oci
  --ca-bundle FILE         CA certificates pip trusts during the build, mounted as a secret
                           (default: \$PIP_CERT, else \$SSL_CERT_FILE, else Debian's bundle)
  --run                    start the image afterwards and probe it (needs podman)
  --no-build               with --run: start the image built before (--tag), build nothing
  --models DIR             model repository for --run (default: an empty one)
  --runtime NAME           OCI runtime for --run: crun or runc (default: podman's; crun refuses hybrid
                           cgroup v1/v2 hosts, where runc works)
  --http-port N            host port for --run's REST (default $HTTP_PORT)
  --grpc-port N            host port for --run's gRPC (default $GRPC_PORT)
EOF
}

while [[ $# -gt 0 ]]; do
    case $1 in
    --suite) SUITE=$2; shift 2 ;;
    --mirror) MIRROR=$2; shift 2 ;;
    --work) WORK=$2; shift 2 ;;
    --tag) TAG=$2; shift 2 ;;
    --ref) REF=$2; shift 2 ;;
    --worktree) WORKTREE=1; shift ;;
    --rebuild-base) REBUILD_BASE=1; shift ;;
    --storage-driver) STORAGE_DRIVER=$2; shift 2 ;;
    --isolation) ISOLATION=$2; shift 2 ;;
    --ca-bundle) CA_BUNDLE=$2; shift 2 ;;
    --run) RUN=1; shift ;;
    --no-build) BUILD=0; shift ;;
    --models) MODELS=$2; shift 2 ;;
    --runtime) RUNTIME=$2; shift 2 ;;
    --http-port) HTTP_PORT=$2; shift 2 ;;
    --grpc-port) GRPC_PORT=$2; shift 2 ;;
    -h | --help) usage; exit 0 ;;
    *) echo "unknown option $1 (--help lists them)" >&2; exit 2 ;;
    esac
done

HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/.." && pwd)
BASE=localhost/bedside-base:$SUITE
if [[ -z $TAG ]]; then
    TAG=$(git -C "$ROOT" rev-parse --short "$REF")
    if [[ $WORKTREE == 1 && -n $(git -C "$ROOT" status --porcelain -- pyproject.toml README.md src packaging) ]]; then
        TAG+=-dirty
    fi
fi
IMAGE=localhost/bedside:$TAG
BUILDAH=(buildah --storage-driver "$STORAGE_DRIVER")
PODMAN=(podman --storage-driver "$STORAGE_DRIVER")

step() { printf '== %s\n' "$*"; }
need() {
    command -v "$1" >/dev/null || {
        echo "$1 is missing: apt-get install $2" >&2
        exit 1
    }
}
need buildah buildah
need git git
mkdir -p "$WORK"

# --- 1. the base: Debian from the mirror, no registry ------------------------------------------
if [[ $BUILD == 0 ]]; then
    step "base and image: not built (--no-build), $IMAGE as it is"
elif [[ $REBUILD_BASE == 1 ]] || ! "${BUILDAH[@]}" inspect --type image "$BASE" >/dev/null 2>&1; then
    need debootstrap debootstrap
    rootfs=$WORK/rootfs-$SUITE
    step "base: debootstrap $SUITE from $MIRROR into $rootfs (a few minutes)"
    rm -rf "$rootfs"
    debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates "$SUITE" "$rootfs" "$MIRROR"
    # what a running image never needs: package lists and downloaded .debs
    rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/log/*.log
    step "base: committing $BASE"
    ctr=$("${BUILDAH[@]}" from scratch)
    mnt=$("${BUILDAH[@]}" mount "$ctr")
    tar -C "$rootfs" --numeric-owner -cf - . | tar -C "$mnt" --numeric-owner -xpf -
    "${BUILDAH[@]}" umount "$ctr" >/dev/null
    "${BUILDAH[@]}" config --cmd /bin/bash --env LANG=C.UTF-8 \
        --label org.opencontainers.image.description="Debian $SUITE minbase + python3 (debootstrap, built locally)" \
        "$ctr"
    "${BUILDAH[@]}" commit --rm "$ctr" "$BASE" >/dev/null
    rm -rf "$rootfs"
else
    step "base: $BASE is there (--rebuild-base makes it again)"
fi

# --- 2. the image: the build context is a commit (or, with --worktree, git's files as they are) ---
if [[ $BUILD == 1 ]]; then
    ctx=$WORK/context
    rm -rf "$ctx"
    mkdir -p "$ctx"
    if [[ $WORKTREE == 0 ]]; then
        step "image: build context from git archive $REF in $ctx"
        git -C "$ROOT" archive --format=tar "$REF" -- pyproject.toml README.md src packaging | tar -C "$ctx" -xf -
    else
        step "image: build context from the working tree (git's files, tracked and not ignored) in $ctx"
        (cd "$ROOT" && git ls-files -z --cached --others --exclude-standard -- pyproject.toml README.md src packaging |
            while IFS= read -r -d '' f; do if [[ -e $f ]]; then printf '%s\0' "$f"; fi; done | tar --null -T - -cf -) |
            tar -C "$ctx" -xf -
    fi
    step "image: buildah build -> $IMAGE (docker format: OCI images drop HEALTHCHECK)"
    "${BUILDAH[@]}" build --isolation "$ISOLATION" --pull=never --format docker --layers \
        --secret "id=ca-bundle,src=$CA_BUNDLE" --build-arg "BASE=$BASE" -f "$ctx/packaging/Containerfile" -t "$IMAGE" "$ctx"
    "${BUILDAH[@]}" tag "$IMAGE" localhost/bedside:latest
    "${BUILDAH[@]}" images --format '{{.Name}}:{{.Tag}} {{.Size}}' | grep -E '^localhost/bedside' || true
fi

[[ $RUN == 1 ]] || exit 0

# --- 3. start it and probe it --------------------------------------------------------------------
need podman podman
run=$WORK/run
step "run: throwaway TLS files, a token and a state folder in $run"
rm -rf "$run"
mkdir -p "$run/state" "$run/models"
if [[ -n $MODELS ]]; then cp -a "$MODELS"/. "$run/models/"; fi
# the image's own bedside makes them, as the image's user (uid 10001), so they are owned as it expects
uid=10001
chown -R "$uid:$uid" "$run"
# open files: as the systemd unit's LimitNOFILE, or this shell's hard limit when lower (podman asks
# for more by default, which a sandboxed root may be refused: "setrlimit RLIMIT_NOFILE")
hard=$(ulimit -Hn)
nofile=65536
if [[ $hard != unlimited && $hard -lt $nofile ]]; then nofile=$hard; fi
# and processes (threads count): 4096, as systemd's usual TasksMax (podman's 32768 was refused here)
limits=(--ulimit "nofile=$nofile:$nofile" --ulimit nproc=4096:4096)
if [[ -n $RUNTIME ]]; then PODMAN+=(--runtime "$RUNTIME"); fi
once=("${PODMAN[@]}" run --rm --network none --no-healthcheck "${limits[@]}" --user "$uid:$uid")
"${once[@]}" -v "$run:/work:Z" "$IMAGE" certs init /work/tls --host 127.0.0.1 >/dev/null
"${once[@]}" -v "$run/state:/var/lib/bedside/state:Z" "$IMAGE" \
    tokens add probe --tenant default --role infer --role monitor --role admin >"$run/probe.token"
name=bedside-probe-$$
cleanup() { "${PODMAN[@]}" rm -f -t 15 "$name" >/dev/null 2>&1 || true; }
trap cleanup EXIT
step "run: podman run $IMAGE (REST on 127.0.0.1:$HTTP_PORT, gRPC on 127.0.0.1:$GRPC_PORT)"
# --health-interval=disable: podman runs health checks from systemd timers, and there may be no
# systemd; the check itself stays in the image and is run below with `podman healthcheck run`
"${PODMAN[@]}" run -d --name "$name" --health-interval=disable "${limits[@]}" \
    -p "127.0.0.1:$HTTP_PORT:8000" -p "127.0.0.1:$GRPC_PORT:8001" \
    -v "$run/models:/var/lib/bedside/models:Z" -v "$run/state:/var/lib/bedside/state:Z" \
    -v "$run/tls:/etc/bedside/tls:ro,Z" "$IMAGE" >/dev/null
# the image's HEALTHCHECK, by hand, until it passes
for _ in $(seq 60); do
    if "${PODMAN[@]}" healthcheck run "$name" >/dev/null 2>&1; then break; fi
    if [[ $("${PODMAN[@]}" inspect -f '{{.State.Running}}' "$name") != true ]]; then
        "${PODMAN[@]}" logs "$name" >&2
        echo "the container stopped before it was ready" >&2
        exit 1
    fi
    sleep 2
done
"${PODMAN[@]}" healthcheck run "$name" && step "run: HEALTHCHECK healthy"
"${PODMAN[@]}" logs "$name" 2>&1 | tail -n 5
ca=$run/tls/ca.pem
step "run: from the host, through the published port"
python3 - "$HTTP_PORT" "$GRPC_PORT" "$ca" "$run/probe.token" <<'EOF'
import json, socket, ssl, sys, urllib.error, urllib.request

http_port, grpc_port, ca, token_file = sys.argv[1:5]
context = ssl.create_default_context(cafile=ca)
base = f"https://127.0.0.1:{http_port}"
token = {"Authorization": "Bearer " + open(token_file).read().strip()}


def call(path, body=None, headers=token):
    data = json.dumps(body).encode() if body is not None else None
    with urllib.request.urlopen(urllib.request.Request(base + path, data, headers), context=context, timeout=10) as r:
        return json.load(r)


with urllib.request.urlopen(f"{base}/v2/health/ready", context=context, timeout=5) as answer:
    print("GET /v2/health/ready ->", answer.status)
try:
    call("/v2/models/stats", headers={})
    sys.exit("an anonymous caller was let in")
except urllib.error.HTTPError as exc:
    print("GET /v2/models/stats without a token ->", exc.code)
rows = call("/v2/repository/index", {})
print("POST /v2/repository/index with the token ->", [(r["name"], r.get("state")) for r in rows])
for row in rows:  # the first ready model with numeric inputs, fed zeros
    if row.get("state") != "READY":
        continue
    meta = call(f"/v2/models/{row['name']}")
    if any(i["datatype"] == "BYTES" for i in meta["inputs"]):
        continue
    inputs = []
    for spec in meta["inputs"]:
        shape = [1 if d < 0 else d for d in spec["shape"]]
        count = 1
        for d in shape:
            count *= d
        inputs.append({"name": spec["name"], "datatype": spec["datatype"], "shape": shape, "data": [0] * count})
    outputs = call(f"/v2/models/{row['name']}/infer", {"inputs": inputs})["outputs"]
    print(f"POST /v2/models/{row['name']}/infer ->", [(o["name"], o["shape"]) for o in outputs])
    break
grpc_context = ssl.create_default_context(cafile=ca)
grpc_context.set_alpn_protocols(["h2"])
with socket.create_connection(("127.0.0.1", int(grpc_port)), timeout=5) as raw:
    with grpc_context.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
        print("gRPC port: TLS handshake, certificate verified, ALPN", tls.selected_alpn_protocol())
EOF
step "run: podman stop (SIGTERM; the server shuts down in order)"
"${PODMAN[@]}" stop -t 30 "$name" >/dev/null
echo "exit code: $("${PODMAN[@]}" inspect -f '{{.State.ExitCode}}' "$name")"
"${PODMAN[@]}" logs "$name" 2>&1 | tail -n 3
