#!/usr/bin/env bash
# The real-runtime end-to-end run: a private containerd (Debian's 1.6) in its own network
# namespace, the image from scripts/image.sh, and a CRI client (examples/cri_e2e.rs) that does
# what kubelet does on a node: runs the installer as the DaemonSet would, then pods with the
# security contexts of manifests/examples/native, checks what the apps see, and tears everything down.
# Ends with `N passed, M failed`. Needs root. Leaves no process, mount, netns, veth or file
# behind, also on failure and Ctrl-C.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

[[ $(id -u) -eq 0 ]] || { echo "runtime-e2e: needs root" >&2; exit 1; }
for tool in containerd containerd-shim-runc-v2 runc ctr ip nft; do
  command -v "$tool" >/dev/null || { echo "runtime-e2e: $tool missing: run scripts/setup.sh" >&2; exit 1; }
done

TAG=tprt$$
NODE=$TAG-node
WORK=$(mktemp -d /tmp/tproxy-rt.XXXXXX)
SOCK=$WORK/containerd.sock
CTRD_PID=
SUMMARY=
TGT=$(realpath -m "${CARGO_TARGET_DIR:-target}")
CLIENT=$TGT/debug/examples/cri_e2e
START=$(date +%s)

ctr_() { ctr --address "$SOCK" "$@"; }

cleanup() {
  local rc=$?
  set +e
  trap - EXIT INT TERM
  local pids=()
  if [[ -n $CTRD_PID ]] && kill -0 "$CTRD_PID" 2>/dev/null; then
    # Whatever the client left (it removes its pods itself when it gets that far): first as
    # kubelet would (StopPodSandbox runs DEL: netns, veth, IP and libcni cache released), then
    # by force.
    [[ -x $CLIENT ]] && timeout 120 nsenter --net="/var/run/netns/$NODE" "$CLIENT" --cleanup "$SOCK"
    pids=($(ctr_ -n k8s.io tasks ls 2>/dev/null | awk 'NR > 1 {print $2}'))
    for t in $(ctr_ -n k8s.io tasks ls -q 2>/dev/null); do ctr_ -n k8s.io tasks kill -s SIGKILL "$t" >/dev/null 2>&1; done
    kill "$CTRD_PID" 2>/dev/null
    for _ in $(seq 100); do kill -0 "$CTRD_PID" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$CTRD_PID" 2>/dev/null
    wait "$CTRD_PID" 2>/dev/null
  fi
  # Shims outlive containerd by design; ours are the ones whose -address is our socket. And the
  # container processes a killed shim would orphan.
  for pid in $(pgrep -f "containerd-shim-runc-v2 .*-address $SOCK" 2>/dev/null) "${pids[@]}"; do
    kill -9 "$pid" 2>/dev/null
  done
  # A container whose task containerd never listed (interrupted while it was being started)
  # is still known to runc under our root: kill what is left of it. (A sidecar orphaned that
  # way was found still running hours after an interrupted run.)
  for root in "$WORK"/runc/*/; do
    [[ -d $root ]] || continue
    for id in $(runc --root "$root" list -q 2>/dev/null); do
      runc --root "$root" delete --force "$id" >/dev/null 2>&1
    done
  done
  # libcni's cache entries of our sandboxes, if a DEL never ran.
  for sb in "$WORK"/root/io.containerd.grpc.v1.cri/sandboxes/*; do
    [[ -e $sb ]] && rm -f /var/lib/cni/results/*-"${sb##*/}"-*
  done
  # Mounts under our dir (rootfs overlays, netns bind mounts, shm), deepest first.
  for _ in 1 2 3; do
    awk -v w="$WORK" 'index($5, w) == 1 {print $5}' /proc/self/mountinfo | sort -r | while read -r m; do
      umount -l "$m" 2>/dev/null
    done
  done
  # Shim sockets containerd 1.6 always puts under /run/containerd/s: remove the ones that
  # appeared during this run (and the dirs if this run created them).
  if [[ -d /run/containerd/s ]]; then
    for s in /run/containerd/s/*; do
      [[ -e $s ]] || continue
      grep -qxF "${s##*/}" "$WORK.shims-before" 2>/dev/null || rm -f "$s"
    done
  fi
  if [[ $RUN_CONTAINERD_EXISTED == 0 ]]; then rmdir /run/containerd/s /run/containerd 2>/dev/null; fi
  rm -f "$WORK.shims-before"
  # libcni in containerd keeps its result cache in /var/lib/cni/results (not configurable in
  # 1.6); DEL empties it: remove the dirs if this run created them.
  if [[ $VAR_LIB_CNI_EXISTED == 0 ]]; then rmdir /var/lib/cni/results /var/lib/cni 2>/dev/null; fi
  ip netns del "$NODE" 2>/dev/null
  rm -rf "$WORK"
  if ((rc == 130)); then echo "runtime-e2e: interrupted" >&2; fi
  echo "runtime-e2e: $(( $(date +%s) - START )) s, cleaned up" >&2
  # The count line comes last, also when a step before the client failed.
  if [[ -n $SUMMARY ]]; then echo "$SUMMARY"
  elif ((rc != 0)); then echo "0 passed, 1 failed"; fi
  exit "$rc"
}
VAR_LIB_CNI_EXISTED=0
[[ -d /var/lib/cni ]] && VAR_LIB_CNI_EXISTED=1
RUN_CONTAINERD_EXISTED=0
[[ -d /run/containerd ]] && RUN_CONTAINERD_EXISTED=1
ls /run/containerd/s 2>/dev/null >"$WORK.shims-before" || true
trap cleanup EXIT
trap 'exit 130' INT TERM

echo "== image (scripts/image.sh)" >&2
IMAGE_OUT=$TGT/image ./scripts/image.sh >&2
cargo build --locked --quiet --example cri_e2e

echo "== node netns $NODE, private containerd under $WORK" >&2
mkdir -p "$WORK"/{root,state,opt,cni/bin,cni/net.d,ipam,logs}
ip netns add "$NODE"
ip -n "$NODE" link set lo up

# The primary network, as a cluster network would install it: bridge + host-local + portmap.
# Binaries from Debian's containernetworking-plugins, copied into the node's (temp) CNI bin dir.
for p in bridge host-local portmap loopback; do install -m 0755 "/usr/lib/cni/$p" "$WORK/cni/bin/$p"; done
cat >"$WORK/cni/net.d/10-primary.conflist" <<JSON
{
  "cniVersion": "1.0.0",
  "name": "primary",
  "plugins": [
    {
      "type": "bridge",
      "bridge": "cni0",
      "isGateway": true,
      "ipMasq": false,
      "ipam": {
        "type": "host-local",
        "dataDir": "$WORK/ipam",
        "ranges": [[{"subnet": "10.88.0.0/24"}]],
        "routes": [{"dst": "0.0.0.0/0"}]
      }
    },
    {"type": "portmap", "capabilities": {"portMappings": true}}
  ]
}
JSON

cat >"$WORK/config.toml" <<TOML
version = 2
root = "$WORK/root"
state = "$WORK/state"
disabled_plugins = ["io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs",
  "io.containerd.snapshotter.v1.devmapper", "io.containerd.snapshotter.v1.aufs",
  "io.containerd.tracing.processor.v1.otlp", "io.containerd.internal.v1.tracing"]
[grpc]
  address = "$SOCK"
[ttrpc]
  address = "$SOCK.ttrpc"
[debug]
  level = "info"
[plugins."io.containerd.internal.v1.opt"]
  path = "$WORK/opt"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "docker.io/library/tproxy-cni-testbox:local"
  # This VM's root lacks CAP_SYS_RESOURCE: runc fails on oom_score_adj otherwise.
  restrict_oom_score_adj = true
  # Pod netns under our state dir, not /var/run/netns.
  netns_mounts_under_state_dir = true
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  enable_selinux = false
  disable_apparmor = true
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "$WORK/cni/bin"
    conf_dir = "$WORK/cni/net.d"
    max_conf_num = 1
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        # runc's state dir (default /run/containerd/runc) under ours.
        Root = "$WORK/runc"
TOML

# The installer mounts the pod netns dir (under the state dir) with HostToContainer
# propagation, which containerd allows only from a shared or slave mount; this machine's / is
# private. A shared bind mount of the state dir over itself (removed by the cleanup's umount).
mount --bind "$WORK/state" "$WORK/state"
mount --make-shared "$WORK/state"

# nsenter, not `ip netns exec`: the latter also remounts /sys in a new mount namespace, which
# hides the cgroup mounts from runc ("no cgroup mount found in mountinfo").
# setsid: its own session, so a Ctrl-C on the terminal reaches the script (whose cleanup stops
# the pods through containerd), not containerd itself.
setsid nsenter --net="/var/run/netns/$NODE" containerd --config "$WORK/config.toml" >"$WORK/containerd.log" 2>&1 &
CTRD_PID=$!
for _ in $(seq 150); do
  [[ -S $SOCK ]] && ctr_ version >/dev/null 2>&1 && break
  kill -0 "$CTRD_PID" 2>/dev/null || { tail -20 "$WORK/containerd.log" >&2; exit 1; }
  sleep 0.2
done
ctr_ version >/dev/null || { echo "runtime-e2e: containerd did not come up" >&2; tail -20 "$WORK/containerd.log" >&2; exit 1; }

echo "== import the images (no registry)" >&2
ctr_ -n k8s.io images import "$TGT/image/tproxy-cni.oci.tar" >&2
ctr_ -n k8s.io images import "$TGT/image/testbox.oci.tar" >&2

echo "== CRI client" >&2
set +e
timeout 300 nsenter --net="/var/run/netns/$NODE" "$CLIENT" --socket "$SOCK" --work "$WORK" --repo "$ROOT" --target-dir "$TGT" \
  --image "docker.io/library/tproxy-cni:$(sed -n 's/^version = "\(.*\)"$/\1/p' Cargo.toml | head -n1)" \
  --testbox docker.io/library/tproxy-cni-testbox:local | tee "$WORK/client.out" |
  grep --line-buffered -Ev '^[0-9]+ passed, [0-9]+ failed$' # printed last, after the cleanup
rc=${PIPESTATUS[0]}
set -e
SUMMARY=$(grep -E '^[0-9]+ passed, [0-9]+ failed$' "$WORK/client.out" | tail -n1)
[[ -n $SUMMARY ]] || SUMMARY="0 passed, 1 failed"
if ((rc != 0)); then
  echo "runtime-e2e: client exited $rc; containerd log tail:" >&2
  tail -30 "$WORK/containerd.log" >&2
fi
exit "$rc"
