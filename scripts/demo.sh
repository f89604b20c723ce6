#!/usr/bin/env bash
# The seeds' experiment on one Linux machine: a node made of network namespaces, the reference
# bridge + host-local plugins as the cluster network, tproxy-cni chained after them from a real
# conflist, an httpbin-like app with tproxy-sidecar, and a sleep client.
#   redirect mode -> the app sees 127.0.0.6 (what meshes do by default)
#   tproxy mode   -> the app sees the sleep pod's real IP
# Builds everything, installs what is missing, cleans up after itself (also on Ctrl-C).
set -euo pipefail
cd "$(dirname "$0")/.."

if [[ $(id -u) -ne 0 ]]; then
  echo "demo: needs root (network namespaces, nftables); try: sudo $0" >&2
  exit 1
fi
./scripts/setup.sh
echo "== building (release)" >&2
cargo build --release --quiet --bins
BIN=$PWD/target/release
CNI_PATH=/usr/lib/cni:$BIN

TAG=tpdemo$$
NODE=$TAG-node
WORK=$(mktemp -d /tmp/tproxy-demo.XXXXXX)
chmod 755 "$WORK" # the sidecar runs as uid 1337 and appends to its access log here
PIDS=()
PODS=()

cleanup() {
  set +e
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null; done
  wait 2>/dev/null
  for pod in "${PODS[@]}"; do [[ -n $pod ]] && pod_del "$pod" >/dev/null 2>&1; done
  for ns in $(ip netns list | awk -v t="$TAG-" 'index($1, t) == 1 {print $1}'); do ip netns del "$ns"; done
  rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM
# The sidecar's copy with the file capability cap_net_raw+p, as the image ships it.
install -m 0755 "$BIN/tproxy-sidecar" "$WORK/tproxy-sidecar"
setcap cap_net_raw+p "$WORK/tproxy-sidecar"

cat >"$WORK/10-demo.conflist" <<JSON
{
  "cniVersion": "1.0.0",
  "name": "demo-pod-network",
  "plugins": [
    {
      "type": "bridge", "bridge": "tpdemo0", "isGateway": true, "ipMasq": false, "hairpinMode": true,
      "ipam": {
        "type": "host-local",
        "ranges": [[{"subnet": "10.244.7.0/24"}], [{"subnet": "fd00:7::/64"}]],
        "dataDir": "$WORK/ipam"
      }
    },
    {
      "type": "tproxy-cni",
      "capabilities": {"io.kubernetes.cri.pod-annotations": true},
      "logFile": "$WORK/tproxy-cni.log"
    }
  ]
}
JSON
cat >"$WORK/99-loopback.conflist" <<JSON
{"cniVersion": "1.0.0", "name": "lo", "plugins": [{"type": "loopback"}]}
JSON

ip netns add "$NODE"
ip -n "$NODE" link set lo up

# pod_add NAME [annotation K=V ...]: a pod sandbox the way kubelet + containerd make one.
pod_add() {
  local name=$1; shift
  local ns=$TAG-$name anns=()
  for a in "$@"; do anns+=(--annotation "$a"); done
  ip netns add "$ns"
  PODS+=("$name")
  ip netns exec "$NODE" "$BIN/tproxy-cni-run" add --conflist "$WORK/99-loopback.conflist" \
    --netns "/var/run/netns/$ns" --id "$ns" --ifname lo --cni-path "$CNI_PATH" >/dev/null
  ip netns exec "$NODE" "$BIN/tproxy-cni-run" add --conflist "$WORK/10-demo.conflist" \
    --netns "/var/run/netns/$ns" --id "$ns" --ifname eth0 --cni-path "$CNI_PATH" \
    --arg IgnoreUnknown=1 --arg K8S_POD_NAMESPACE=default --arg "K8S_POD_NAME=$name" "${anns[@]}" >"$WORK/$name.result.json"
}
pod_del() {
  local name=$1 ns=$TAG-$1
  ip netns exec "$NODE" "$BIN/tproxy-cni-run" del --conflist "$WORK/10-demo.conflist" \
    --netns "/var/run/netns/$ns" --id "$ns" --ifname eth0 --cni-path "$CNI_PATH" \
    --prev-result "$WORK/$name.result.json"
  ip netns del "$ns" 2>/dev/null || true
}
pod_ip() { # pod_ip NAME 4|6
  python3 - "$WORK/$1.result.json" "$2" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
want = sys.argv[2]
for ip in r.get("ips", []):
    a = ip["address"].split("/")[0]
    if (":" in a) == (want == "6"):
        print(a); break
PY
}
wait_port() { # wait_port NS PORT
  for _ in $(seq 100); do
    ip netns exec "$1" ss -Hltn "sport = :$2" | grep -q . && return 0
    sleep 0.05
  done
  echo "demo: nothing listens on :$2 in $1" >&2; return 1
}

# start_httpbin MODE: the app and its sidecar; the sidecar runs as uid 1337 with CAP_NET_RAW only.
start_httpbin() {
  local mode=$1 ns=$TAG-httpbin
  ip netns exec "$ns" python3 scripts/httpbin.py 8000 &
  PIDS+=($!)
  : >"$WORK/access-$mode.log"
  chmod 666 "$WORK/access-$mode.log"
  # As a pod runs it: bounding set NET_RAW only, no ambient set, no_new_privs, and the binary
  # carries the file capability cap_net_raw+p, as the image's does (scripts/image.sh).
  ip netns exec "$ns" setpriv --reuid 1337 --regid 1337 --clear-groups \
    --inh-caps -all --bounding-set -all,+net_raw --no-new-privs \
    "$WORK/tproxy-sidecar" --mode "$mode" --access-log "$WORK/access-$mode.log" \
    2>>"$WORK/sidecar-$mode.err" &
  PIDS+=($!)
  wait_port "$ns" 8000
  wait_port "$ns" 15006 || { cat "$WORK/sidecar-$mode.err" >&2; return 1; }
}
stop_httpbin() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  PIDS=()
}

echo "== node: bridge + host-local, tproxy-cni chained ($WORK/10-demo.conflist)" >&2
pod_add sleep
SLEEP4=$(pod_ip sleep 4) SLEEP6=$(pod_ip sleep 6)

declare -a ROWS
run_mode() {
  local mode=$1
  pod_add httpbin "tproxy-cni.io/mode=$mode"
  local h4 h6
  h4=$(pod_ip httpbin 4) h6=$(pod_ip httpbin 6)
  start_httpbin "$mode"
  echo "== $mode: rules the plugin programmed in the httpbin pod" >&2
  ip netns exec "$TAG-httpbin" nft list table inet tproxy_cni | sed 's/^/   /' >&2
  local o4 o6
  o4=$(ip netns exec "$TAG-sleep" curl -sS --max-time 5 "http://$h4:8000/ip")
  o6=$(ip netns exec "$TAG-sleep" curl -sS --max-time 5 -g "http://[$h6]:8000/ip")
  echo "   curl http://$h4:8000/ip      -> $o4" >&2
  echo "   curl http://[$h6]:8000/ip -> $o6" >&2
  sleep 0.2
  echo "   sidecar access log:" >&2
  sed 's/^/     /' "$WORK/access-$mode.log" >&2
  ROWS+=("$mode|$SLEEP4|$(python3 -c 'import json,sys; print(json.loads(sys.argv[1])["origin"])' "$o4")")
  ROWS+=("$mode|$SLEEP6|$(python3 -c 'import json,sys; print(json.loads(sys.argv[1])["origin"])' "$o6")")
  stop_httpbin
  pod_del httpbin
  PODS=("${PODS[@]/httpbin}")
}

run_mode redirect
run_mode tproxy

echo
printf '%-10s %-26s %-26s %s\n' "mode" "client (sleep pod)" "app saw (origin)" "verdict"
for row in "${ROWS[@]}"; do
  IFS='|' read -r mode client origin <<<"$row"
  verdict="client IP lost"
  [[ $origin == "$client" ]] && verdict="real client IP"
  printf '%-10s %-26s %-26s %s\n' "$mode" "$client" "$origin" "$verdict"
done
