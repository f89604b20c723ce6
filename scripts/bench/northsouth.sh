#!/usr/bin/env bash
# North-south rows, called by scripts/bench.sh or alone:
#
#   sudo ./scripts/bench/northsouth.sh [--quick]
#
# 1. HTTP keep-alive (wrk -c50): the sidecar on an X-Forwarded-For port (every request head
#    parsed and rewritten) against the sidecar's own byte relay on a plain port and HAProxy
#    `mode http` + `option forwardfor` doing the same job in the pod.
# 2. New connections (wrk with `Connection: close`) through a balancer (HAProxy, mode tcp, in
#    the client netns, as a cloud balancer would be): plain to the sidecar, with `send-proxy` to
#    the sidecar's PROXY-protocol port, and with `send-proxy` to HAProxy `accept-proxy`.
# Rows run interleaved over repetitions; the table gives medians and the ratios the issue sets
# goals for (XFF >= 1.0x HAProxy http and >= 0.85x byte relay; PROXY port within 5 % of plain).
# The sidecar runs as uid 1337 with NET_RAW from a file capability (as in a pod), with the
# plugin's own rules (tproxy mode). Needs the release binaries (bench.sh builds them).
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD
die() { echo "northsouth: $*" >&2; exit 1; }
log() { printf '[%(%H:%M:%S)T] northsouth: %s\n' -1 "$*" >&2; }

QUICK=0
[[ ${1:-} == --quick ]] && QUICK=1
[[ $(id -u) -eq 0 ]] || die "needs root"
if ((QUICK)); then REPS=2 DUR=2; else REPS=5 DUR=5; fi
# Development knobs: NS_REPS, NS_DUR (seconds), NS_ROWS (subset), NS_BIN (binaries' dir).
REPS=${NS_REPS:-$REPS} DUR=${NS_DUR:-$DUR}
ROWS=(${NS_ROWS:-xff relay haproxy-http pp-plain pp-sidecar pp-haproxy})

TGT=${CARGO_TARGET_DIR:-$ROOT/target}
BIN=${NS_BIN:-$TGT/release}
for b in tproxy-cni tproxy-sidecar; do [[ -x $BIN/$b ]] || die "$BIN/$b missing (cargo build --release)"; done
command -v wrk >/dev/null && command -v haproxy >/dev/null && command -v nginx >/dev/null ||
  die "needs wrk, haproxy and nginx (scripts/setup.sh wrk haproxy nginx-light)"

CLIENT_IP=10.79.0.1 POD_IP=10.79.0.2
# App ports: XFF port (sidecar HTTP relay), plain port (sidecar byte relay), PROXY-protocol port.
APP_PORT=8080 RELAY_PORT=8082 PP_PORT=8083
# HAProxy in the pod (excluded from capture): http + forwardfor, tcp + accept-proxy.
HAPROXY_PORT=8090 HAPROXY_PP_PORT=8091
LB_PORT=9000
RUN=$(mktemp -d /tmp/tpns.XXXXXX)
C=tpns-c-$$ P=tpns-p-$$
RESULTS=$RUN/results.tsv
PIDS=()
CNI_ON=0

cleanup() {
  local rc=$?
  trap - EXIT INT TERM
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${PIDS[@]}"; do wait "$p" 2>/dev/null || true; done
  ((CNI_ON)) && cni DEL || true
  ip netns del "$C" 2>/dev/null || true
  ip netns del "$P" 2>/dev/null || true
  rm -rf "$RUN"
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

in_c() { ip netns exec "$C" "$@"; }
in_p() { ip netns exec "$P" "$@"; }

ip netns add "$C"
ip netns add "$P"
ip link add eth0 netns "$C" type veth peer name eth0 netns "$P"
ip -n "$C" addr add "$CLIENT_IP/24" dev eth0
ip -n "$P" addr add "$POD_IP/24" dev eth0
for ns in "$C" "$P"; do ip -n "$ns" link set lo up; ip -n "$ns" link set eth0 up; done
# Keep client ports out of the sidecar's upstream range (see scripts/bench.sh).
in_c sysctl -qw net.ipv4.ip_local_port_range="32768 60999"
in_c sysctl -qw net.ipv4.tcp_tw_reuse=1
chmod 755 "$RUN"

# The app: nginx answering a small body, keep-alive.
cat >"$RUN/app.conf" <<EOF
worker_processes 1;
pid $RUN/app.pid;
error_log $RUN/app.err;
events { worker_connections 4096; }
http {
  access_log off;
  keepalive_requests 1000000;
  server { listen $APP_PORT; listen $RELAY_PORT; listen $PP_PORT; location / { return 200 "ok\n"; } }
}
EOF
# Started with `ip netns exec` directly (not through a function) so $! is the process itself.
ip netns exec "$P" nginx -c "$RUN/app.conf" -p "$RUN" -g 'daemon off;' &
PIDS+=($!)
for _ in $(seq 100); do in_p curl -s -m 1 "http://127.0.0.1:$APP_PORT/" >/dev/null && break; sleep 0.1; done

# The sidecar binary as an image ships it: cap_net_raw+ep, run as uid 1337, bounding set NET_RAW.
install -m 0755 "$BIN/tproxy-sidecar" "$RUN/tproxy-sidecar"
setcap cap_net_raw+ep "$RUN/tproxy-sidecar"

cni() {
  printf '{"cniVersion":"1.0.0","name":"bench","type":"tproxy-cni","runtimeConfig":{"io.kubernetes.cri.pod-annotations":{"tproxy-cni.io/mode":"tproxy","tproxy-cni.io/exclude-inbound-ports":"%s-%s"}},"prevResult":{"cniVersion":"1.0.0","ips":[{"address":"%s/24"}]}}' \
    "$HAPROXY_PORT" "$HAPROXY_PP_PORT" "$POD_IP" |
    CNI_COMMAND=$1 CNI_CONTAINERID=ns-$$ CNI_NETNS=/var/run/netns/$P CNI_IFNAME=eth0 \
      CNI_PATH=/usr/lib/cni CNI_ARGS="K8S_POD_NAMESPACE=bench;K8S_POD_NAME=ns" \
      "$BIN/tproxy-cni" >"$RUN/cni.out" 2>&1 || { cat "$RUN/cni.out" >&2; die "tproxy-cni $1"; }
}
cni ADD
CNI_ON=1

# HAProxy in the pod (not transparent: the app's own front here), on ports excluded from capture.
cat >"$RUN/pod-haproxy.cfg" <<EOF
global
  nbthread 1
  maxconn 9000
defaults
  timeout connect 5s
  timeout client 60s
  timeout server 60s
  maxconn 9000
frontend http_in
  mode http
  option http-keep-alive
  option forwardfor
  bind $POD_IP:$HAPROXY_PORT
  default_backend app
frontend pp_in
  mode tcp
  bind $POD_IP:$HAPROXY_PP_PORT accept-proxy
  default_backend app_tcp
backend app
  mode http
  server app 127.0.0.1:$APP_PORT
backend app_tcp
  mode tcp
  server app 127.0.0.1:$APP_PORT
EOF
# The balancer in the client netns, mode tcp: plain, send-proxy to the sidecar, send-proxy to
# HAProxy accept-proxy.
cat >"$RUN/lb.cfg" <<EOF
global
  nbthread 1
  maxconn 9000
defaults
  mode tcp
  timeout connect 5s
  timeout client 60s
  timeout server 60s
  maxconn 9000
listen plain
  bind 127.0.0.1:$LB_PORT
  server s $POD_IP:$APP_PORT
listen pp_sidecar
  bind 127.0.0.1:$((LB_PORT + 1))
  server s $POD_IP:$PP_PORT send-proxy
listen pp_haproxy
  bind 127.0.0.1:$((LB_PORT + 2))
  server s $POD_IP:$HAPROXY_PP_PORT send-proxy
EOF
ip netns exec "$P" haproxy -db -f "$RUN/pod-haproxy.cfg" >"$RUN/pod-haproxy.log" 2>&1 &
PIDS+=($!)
ip netns exec "$C" haproxy -db -f "$RUN/lb.cfg" >"$RUN/lb.log" 2>&1 &
PIDS+=($!)

SIDECAR_PID=
start_sidecar() {
  ip netns exec "$P" setpriv --reuid 1337 --regid 1337 --clear-groups --inh-caps=-all \
    --bounding-set=-all,+net_raw "$RUN/tproxy-sidecar" --mode tproxy --access-log off \
    --xff-ports "$APP_PORT" --xff-num-trusted-proxies 1 \
    --proxy-protocol-ports "$PP_PORT" --proxy-protocol-trusted-cidrs "$CLIENT_IP/32" \
    >"$RUN/sidecar.log" 2>&1 &
  SIDECAR_PID=$!
  PIDS+=("$SIDECAR_PID")
  for _ in $(seq 100); do
    [[ -n $(in_p ss -Hltn "sport = :15006") ]] && return 0
    sleep 0.1
  done
  cat "$RUN/sidecar.log" >&2
  die "sidecar did not start"
}
start_sidecar

rec() { printf '%s\t%s\t%s\n' "$1" "$2" "$3" >>"$RESULTS"; }
wrk_rps() { in_c wrk "$@" 2>&1 | awk '/^Requests\/sec:/ {print $2}'; }
row_url() {
  case $1 in
    xff) echo "http://$POD_IP:$APP_PORT/" ;;
    relay) echo "http://$POD_IP:$RELAY_PORT/" ;;
    haproxy-http) echo "http://$POD_IP:$HAPROXY_PORT/" ;;
    pp-plain) echo "http://127.0.0.1:$LB_PORT/" ;;
    pp-sidecar) echo "http://127.0.0.1:$((LB_PORT + 1))/" ;;
    pp-haproxy) echo "http://127.0.0.1:$((LB_PORT + 2))/" ;;
  esac
}
# Correctness first: every row answers 200 (HAProxy needs a moment to bind).
for _ in $(seq 50); do [[ -n $(in_c ss -Hltn "sport = :$((LB_PORT + 2))") ]] && break; sleep 0.1; done
for row in "${ROWS[@]}"; do
  in_c curl -s -m 5 -o /dev/null -w '%{http_code}' "$(row_url "$row")" | grep -q 200 || die "$row: no 200"
done

: >"$RESULTS"
for rep in $(seq "$REPS"); do
  n=${#ROWS[@]}
  for i in $(seq 0 $((n - 1))); do
    row=${ROWS[$(((i + rep - 1) % n))]}
    case $row in
      pp-*) args=(-t1 -c50 -d"${DUR}s" -H "Connection: close") ;;
      *) args=(-t1 -c50 -d"${DUR}s") ;;
    esac
    rps=$(wrk_rps "${args[@]}" "$(row_url "$row")")
    [[ -n $rps ]] || die "$row: wrk failed"
    log "rep $rep/$REPS $row: $rps req/s"
    rec "$row" rps "$rps"
  done
done

python3 - "$RESULTS" <<'EOF'
import statistics, sys
rows = {}
for line in open(sys.argv[1]):
    row, _, v = line.rstrip("\n").split("\t")
    rows.setdefault(row, []).append(float(v))
med = {r: statistics.median(v) for r, v in rows.items()}
print("| row | what | req/s (median) |")
print("|---|---|---|")
what = {
    "xff": "sidecar, XFF port, keep-alive",
    "relay": "sidecar, byte relay, keep-alive",
    "haproxy-http": "HAProxy mode http + forwardfor, keep-alive",
    "pp-plain": "balancer -> sidecar plain port, new connections",
    "pp-sidecar": "balancer send-proxy -> sidecar PROXY port, new connections",
    "pp-haproxy": "balancer send-proxy -> HAProxy accept-proxy, new connections",
}
for r in what:
    if r in med:
        print(f"| {r} | {what[r]} | {med[r]:.0f} |")
def ratio(a, b, goal):
    if a in med and b in med and med[b]:
        print(f"- {a} / {b}: {med[a] / med[b]:.2f} (goal {goal})")
print()
ratio("xff", "haproxy-http", ">= 1.0")
ratio("xff", "relay", ">= 0.85")
ratio("pp-sidecar", "pp-plain", ">= 0.95")
ratio("pp-sidecar", "pp-haproxy", "-")
EOF
