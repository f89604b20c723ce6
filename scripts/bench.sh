#!/usr/bin/env bash
# The benchmark (BENCHMARKS.md), in one command: the data path (direct, tproxy-sidecar in tproxy and
# redirect mode, HAProxy and nginx as transparent proxies) and the plugin at scale.
#
#   sudo ./scripts/bench.sh            # full run, about 21 min (with the 60 s churn cells)
#   sudo ./scripts/bench.sh --quick    # about 3 min (after the first build); asserts correctness
#   --churn-seconds N                  # length of each churn cell (default 60, quick 5)
#
# It installs wrk, haproxy and nginx, builds the release binaries, makes a client netns and a pod
# netns joined by a veth (10.77.0.1 <-> 10.77.0.2, addresses only inside those namespaces), and
# runs every row interleaved over several repetitions. It prints the table (medians, ratio to
# `direct` from the same run) and exits non-zero when a correctness check fails: the app saw the
# client's real address (127.0.0.6 in redirect mode) and no connection bypassed the proxy.
# Everything it creates is removed on exit, Ctrl-C included. Results stay in
# ${CARGO_TARGET_DIR:-target}/bench/.
#
# Knobs for development (environment): BENCH_ROWS="direct haproxy" runs a subset;
# BENCH_SKIP_PLUGIN=1 skips the plugin benchmark; BENCH_SKIP_BUILD=1 uses the built binaries;
# BENCH_SKIP_MAIN=1 / BENCH_SKIP_CHURN=1 skip the main rows / the churn cells;
# BENCH_CHURN_ROWS="direct sidecar-tproxy", BENCH_CHURN_RATE=2000, BENCH_CHURN_TS="1 0" and
# BENCH_CHURN_CLOSE="client app" choose the churn cells; BENCH_REPS=N overrides the repetitions;
# BENCH_PROFILE=1 adds, in the last repetition of sidecar-tproxy, haproxy and haproxy-istio,
# `strace -c` (syscalls per request) and `perf record` (kernel vs user share, top symbols) of the
# proxy under keep-alive and Connection: close load, kept in ${CARGO_TARGET_DIR:-target}/bench/;
# BENCH_RULES=nft applies the pod's ruleset with `nft -f` instead of the plugin (only to develop
# the harness while the plugin is unfinished: real figures come from the plugin's own rules).
# BENCH_HOLD="1000 10000" holds that many idle connections in turn (RSS and descriptors of the
# proxy with each; default 1000); BENCH_OLD_SIDECAR=PATH adds the row sidecar-old, that binary
# on the same rules, for same-run ratios against an earlier build.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

usage() { sed -n '2,25p' "$0" | sed 's/^# \{0,1\}//'; }
die() { echo "bench: $*" >&2; exit 1; }
log() { printf '[%(%H:%M:%S)T] %s\n' -1 "$*" >&2; }

QUICK=0 CHURN_S=
while (($#)); do
  case $1 in
    --quick) QUICK=1 ;;
    --churn-seconds) CHURN_S=${2:-}; shift ;;
    -h | --help) usage; exit 0 ;;
    *) usage >&2; exit 2 ;;
  esac
  shift
done
[[ -z $CHURN_S || $CHURN_S =~ ^[1-9][0-9]*$ ]] || die "--churn-seconds wants a positive number"
[[ $(id -u) -eq 0 ]] || die "needs root (network namespaces, nftables); run with sudo"

if ((QUICK)); then
  REPS=2 DUR=2 DUR1=1 BULK_MIB=256 PLUGIN_ARGS=(--quick) CHURN_S=${CHURN_S:-5}
else
  REPS=5 DUR=5 DUR1=3 BULK_MIB=1024 PLUGIN_ARGS=() CHURN_S=${CHURN_S:-60}
fi
REPS=${BENCH_REPS:-$REPS}
HOLD_N=1000 PROBE_N=200 PROBE_S=5
HOLD_SIZES=(${BENCH_HOLD:-$HOLD_N})
ROWS=(${BENCH_ROWS:-direct sidecar-tproxy sidecar-redirect sidecar-w2 sidecar-1cpu haproxy haproxy-istio nginx})
[[ -z ${BENCH_SKIP_MAIN:-} ]] || ROWS=()
CHURN_ROWS=(${BENCH_CHURN_ROWS:-direct sidecar-tproxy})
[[ -z ${BENCH_SKIP_CHURN:-} ]] || CHURN_ROWS=()
CHURN_RATE=${BENCH_CHURN_RATE:-2000}

# Fixed numbers, the same as crates/policy/src/consts.rs (the harness reads no Rust).
MARK=0x1000 INBOUND_PORT=15006 APP_PORT=8080
CLIENT_IP=10.77.0.1 POD_IP=10.77.0.2
SIDECAR_UID=1337 HAPROXY_UID=1338 NGINX_UID=1339
# The haproxy-istio row: Istio's mark and routing table, and a uid of its own (not marked by
# the tpbench peers_mark chain, which serves the rows on the plugin's rules).
ISTIO_MARK=1337 ISTIO_TABLE=133 ISTIO_UID=1340

TGT=${CARGO_TARGET_DIR:-$ROOT/target}
BIN=$TGT/release
OUT=$TGT/bench
RUN=$(mktemp -d /tmp/tpbench.XXXXXX)
C=tpb-c-$$ P=tpb-p-$$
RESULTS=$RUN/results.tsv
PROXY_PID=
APP_PID=
CNI_MODE=

# ---------------------------------------------------------------------------------- cleanup
stop_pid() {
  local pid=$1
  [[ -n $pid ]] && kill -0 "$pid" 2>/dev/null || return 0
  kill "$pid" 2>/dev/null || true
  for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || return 0; sleep 0.1; done
  kill -9 "$pid" 2>/dev/null || true
}
cleanup() {
  local rc=$?
  trap - EXIT INT TERM
  stop_pid "$PROXY_PID"
  stop_pid "$APP_PID"
  [[ -n $CNI_MODE ]] && cni DEL "$CNI_MODE" || true
  ip netns del "$C" 2>/dev/null || true
  ip netns del "$P" 2>/dev/null || true
  # The plugin benchmark's netns, should it have been killed before its own cleanup.
  ip netns list | awk -v p="tpbp-$$-" 'index($1, p) == 1 {print "netns del " $1}' |
    ip -force -batch - 2>/dev/null || true
  rm -rf "$RUN"
  exit "$rc"
}
trap cleanup EXIT
trap 'echo "bench: interrupted" >&2; exit 130' INT TERM

# ---------------------------------------------------------------------------------- setup
log "installing what is missing (wrk, haproxy, nginx)"
./scripts/setup.sh wrk haproxy nginx-light libnginx-mod-stream
if [[ -z ${BENCH_SKIP_BUILD:-} ]]; then
  log "building release binaries"
  cargo build --release --bins --quiet
  cargo build --release --example churn --quiet
  # The plugin benchmark's own binary too, so the timed part below compiles nothing.
  [[ -n ${BENCH_SKIP_PLUGIN:-} ]] || cargo bench --no-run --quiet --bench plugin 2>/dev/null
fi
for b in tproxy-cni tproxy-sidecar examples/churn; do [[ -x $BIN/$b ]] || die "$BIN/$b missing"; done
mkdir -p "$OUT"
# The proxies hold 2 fds per connection (the sidecar before its pipe pool: up to 6); root may
# raise the hard limit, so 10,000 idle connections fit every proxy.
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"

in_c() { ip netns exec "$C" "$@"; }
in_p() { ip netns exec "$P" "$@"; }
# Runs a proxy in the pod netns as UID with only CAP_NET_RAW, the way a pod runs it: bounding set
# NET_RAW, no ambient set (Kubernetes sets none), no_new_privs, and the binary carries the file
# capability cap_net_raw+ep (a copy under $RUN, as the image's tproxy-sidecar does).
# Meant for `as_proxy ... &`: exec keeps $! the proxy's own pid.
as_proxy() {
  local uid=$1 bin=$2; shift 2
  local capped=$RUN/capbin/$uid-${bin##*/}
  mkdir -p "$RUN/capbin" && chmod 755 "$RUN/capbin"
  cp "$(command -v "$bin")" "$capped" && chmod 755 "$capped"
  setcap cap_net_raw+ep "$capped"
  exec ip netns exec "$P" setpriv --reuid "$uid" --regid "$uid" --clear-groups \
    --inh-caps -all --bounding-set -all,+net_raw --no-new-privs -- "$capped" "$@"
}
subst() { sed "s|@RUN@|$RUN|g" "$1" >"$2"; }

log "topology: netns $C ($CLIENT_IP) <-veth-> netns $P ($POD_IP)"
ip netns add "$C"
ip netns add "$P"
ip link add eth0 netns "$C" type veth peer name eth0 netns "$P"
ip -n "$C" addr add "$CLIENT_IP/24" dev eth0
ip -n "$P" addr add "$POD_IP/24" dev eth0
for ns in "$C" "$P"; do ip -n "$ns" link set lo up; ip -n "$ns" link set eth0 up; done
# Client and proxies share one kernel here, so they draw ephemeral ports from the same hashed
# sequence for the same (10.77.0.1 -> 10.77.0.2:8080) triple: a proxy's upstream socket, bound to
# the client's address, can systematically pick a port a live client connection uses (the tuple
# clash of docs/ARCHITECTURE.md, pitfall 12), which a remote client hits only by chance. For the
# figures the
# client uses ports no proxy dials from (HAProxy and nginx: the pod's ephemeral range, set to
# 50000-65535; the sidecar: its --upstream-ports, 1024-32767 by default); the clash probes
# measure the clash on purpose with a client in either range. wrk closes first on
# `Connection: close`, so the client reuses TIME_WAIT ports (tcp_tw_reuse=1) as busy clients do.
POD_PORTS="50000 65535" CLIENT_PORTS="32768 49999" LOW_PORTS="1024 32767"
ip netns exec "$P" sysctl -qw net.ipv4.ip_local_port_range="$POD_PORTS"
ip netns exec "$C" sysctl -qw net.ipv4.ip_local_port_range="$CLIENT_PORTS"
ip netns exec "$C" sysctl -qw net.ipv4.tcp_tw_reuse=1

chmod 755 "$RUN"
mkdir -p "$RUN/tmp" "$RUN/www/bulk" "$RUN/haproxy" "$RUN/nginx-proxy"
chown "$NGINX_UID:$NGINX_UID" "$RUN/nginx-proxy"
truncate -s "${BULK_MIB}M" "$RUN/www/bulk/blob"
subst scripts/bench/app-nginx.conf "$RUN/app.conf"
subst scripts/bench/haproxy.cfg "$RUN/haproxy.cfg"
sed "s|@RUN@|$RUN/nginx-proxy|g" scripts/bench/nginx-proxy.conf >"$RUN/nginx-proxy.conf"

# Counters (and the uid marks of the peers) live in our own table, apart from the plugin's.
#  client_syn: SYNs from the client to the app port (raw priority, before any rewrite);
#  bypass: such SYNs that open a new flow and after mangle (tproxy) and dstnat (redirect) still
#          go to the app port unmarked, i.e. reach the app without the proxy. Must stay 0;
#  clash: unmarked SYNs that conntrack already knows: the client reused a tuple the proxy's
#         upstream leg holds (docs/ARCHITECTURE.md, pitfall 12): not a bypass, a stalled connect;
#  app_leg: SYNs the proxy sends to the app over lo (proof that the proxy carried the traffic).
# HAProxy and nginx cannot set SO_MARK on their upstream sockets: their packets in the original
# direction (the proxy->app leg) get the mark by uid here, in a route chain so they are rerouted.
in_p nft -f - <<EOF
table inet tpbench {
  counter client_syn {}
  counter bypass {}
  counter clash {}
  counter app_leg {}
  chain raw { type filter hook prerouting priority raw; policy accept;
    iifname "eth0" tcp dport $APP_PORT tcp flags & (syn | ack) == syn counter name client_syn
  }
  chain after_capture { type filter hook prerouting priority -90; policy accept;
    iifname "eth0" tcp dport $APP_PORT tcp flags & (syn | ack) == syn meta mark 0 ct state new counter name bypass
    iifname "eth0" tcp dport $APP_PORT tcp flags & (syn | ack) == syn meta mark 0 ct state != new counter name clash
    iifname "lo" tcp dport $APP_PORT tcp flags & (syn | ack) == syn counter name app_leg
  }
  chain peers_mark { type route hook output priority mangle + 1; policy accept;
    meta skuid { $HAPROXY_UID, $NGINX_UID } ct direction original meta mark set $MARK
  }
}
EOF
counter() { in_p nft -j list counter inet tpbench "$1" | python3 -c \
  'import json,sys; print(next(o["counter"]["packets"] for o in json.load(sys.stdin)["nftables"] if "counter" in o))'; }
reset_counters() { in_p nft reset counters table inet tpbench >/dev/null; }

log "starting the app (nginx) in the pod"
(exec ip netns exec "$P" nginx -e "$RUN/app.err" -c "$RUN/app.conf" -p "$RUN" >"$RUN/app.log" 2>&1) &
APP_PID=$!
for _ in $(seq 100); do in_c curl -s -m 1 "http://$POD_IP:$APP_PORT/ip" >/dev/null && break; sleep 0.1; done
in_c curl -s -m 10 -o /dev/null "http://$POD_IP:$APP_PORT/bulk/blob" || die "app does not serve"

# ---------------------------------------------------------------------------------- rules
cni_conf() {
  printf '{"cniVersion":"1.0.0","name":"bench","type":"tproxy-cni","runtimeConfig":{"io.kubernetes.cri.pod-annotations":{"tproxy-cni.io/mode":"%s"}},"prevResult":{"cniVersion":"1.0.0","ips":[{"address":"%s/24"}]}}' "$1" "$POD_IP"
}
# Drives the plugin the way a runtime does: env + stdin. With BENCH_RULES=nft, the same ruleset
# by hand (development only).
cni() {
  local cmd=$1 mode=$2
  if [[ ${BENCH_RULES:-} == nft ]]; then nft_rules "$cmd" "$mode"; return; fi
  cni_conf "$mode" | CNI_COMMAND=$cmd CNI_CONTAINERID=bench-$$ CNI_NETNS=/var/run/netns/$P \
    CNI_IFNAME=eth0 CNI_PATH=/usr/lib/cni CNI_ARGS="K8S_POD_NAMESPACE=bench;K8S_POD_NAME=pod" \
    "$BIN/tproxy-cni" >"$RUN/cni.out" 2>"$RUN/cni.err" || {
    cat "$RUN/cni.out" "$RUN/cni.err" >&2
    die "tproxy-cni $cmd ($mode) failed"
  }
}
nft_rules() {
  local cmd=$1 mode=$2
  if [[ $cmd == DEL ]]; then
    in_p nft delete table inet tproxy_cni 2>/dev/null || true
    in_p ip rule del fwmark "$MARK" lookup 29808 priority 29808 2>/dev/null || true
    in_p ip route flush table 29808 2>/dev/null || true
    return
  fi
  if [[ $mode == tproxy ]]; then
    in_p nft -f - <<EOF
table inet tproxy_cni {
  chain prerouting { type filter hook prerouting priority mangle; policy accept;
    iifname "lo" meta mark $MARK ct mark set $MARK
    iifname "lo" accept
    ct direction reply accept
    tcp dport { 15006, 15001, 15021 } accept
    meta l4proto tcp tproxy to :$INBOUND_PORT meta mark set $MARK accept
  }
  chain output { type route hook output priority mangle; policy accept;
    ct mark $MARK meta mark set ct mark
  }
}
EOF
    in_p ip rule add fwmark "$MARK" lookup 29808 priority 29808
    in_p ip route add local 0.0.0.0/0 dev lo table 29808
  else
    in_p nft -f - <<EOF
table inet tproxy_cni {
  chain prerouting_nat { type nat hook prerouting priority dstnat; policy accept;
    iifname "lo" accept
    tcp dport { 15006, 15001, 15021 } accept
    meta l4proto tcp redirect to :$INBOUND_PORT
  }
}
EOF
  fi
}

# ---------------------------------------------------------------------------------- rows
row_mode() { case $1 in direct | haproxy-istio) echo none ;; sidecar-redirect) echo redirect ;; *) echo tproxy ;; esac; }
expected_ip() { [[ $1 == sidecar-redirect ]] && echo 127.0.0.6 || echo "$CLIENT_IP"; }

start_row() {
  local row=$1 mode
  mode=$(row_mode "$row")
  if [[ $mode != none ]]; then cni ADD "$mode"; CNI_MODE=$mode; fi
  case $row in
    direct) return 0 ;;
    sidecar-fastpath)
      # Experiment (not a default row): the established-flow fast path before the tproxy rule.
      local h
      h=$(in_p nft -a list chain inet tproxy_cni prerouting | awk '/tproxy to/ {print $NF; exit}')
      in_p nft insert rule inet tproxy_cni prerouting position "$h" \
        ct state established ct direction original tcp flags \& syn == 0 accept
      as_proxy "$SIDECAR_UID" "$BIN/tproxy-sidecar" --mode "$mode" --access-log off \
        >"$RUN/sidecar.log" 2>&1 &
      ;;
    sidecar-w2)
      # As many workers as CPUs (auto: 2 here).
      as_proxy "$SIDECAR_UID" "$BIN/tproxy-sidecar" --mode "$mode" --access-log off \
        --workers auto >"$RUN/sidecar.log" 2>&1 &
      ;;
    sidecar-1cpu)
      # Confined to one CPU: auto then means one worker.
      as_proxy "$SIDECAR_UID" taskset -c 0 "$BIN/tproxy-sidecar" --mode "$mode" \
        --access-log off --workers auto >"$RUN/sidecar.log" 2>&1 &
      ;;
    sidecar-old)
      [[ -x ${BENCH_OLD_SIDECAR:-} ]] || die "sidecar-old needs BENCH_OLD_SIDECAR=PATH"
      as_proxy "$SIDECAR_UID" "$BENCH_OLD_SIDECAR" --mode "$mode" --access-log off \
        --workers 1 --max-connections 20000 >"$RUN/sidecar.log" 2>&1 &
      ;;
    sidecar-*)
      # One worker, like the peers' one thread; defaults but the access log (the peers log
      # nothing either).
      as_proxy "$SIDECAR_UID" "$BIN/tproxy-sidecar" --mode "$mode" --access-log off \
        --workers 1 --max-connections 20000 >"$RUN/sidecar.log" 2>&1 &
      ;;
    haproxy-istio)
      # HAProxy on the rules its users would write: Istio's TPROXY recipe (connmark return
      # path, mark by the proxy's uid, established flows diverted by conntrack), expressed in
      # nftables here, with its own mark and table. No plugin rules in this row.
      in_p nft -f - <<EOF
table inet tpbench_istio {
  chain prerouting { type filter hook prerouting priority mangle; policy accept;
    meta l4proto tcp meta mark $ISTIO_MARK ct mark set $ISTIO_MARK accept
    meta l4proto tcp ct state established,related meta mark set $ISTIO_MARK accept
    meta nfproto ipv4 meta l4proto tcp ip daddr != 127.0.0.1 tproxy ip to :$INBOUND_PORT meta mark set $ISTIO_MARK accept
  }
  chain output { type route hook output priority mangle; policy accept;
    meta l4proto tcp oifname "lo" meta mark $ISTIO_MARK return
    meta nfproto ipv4 meta l4proto tcp oifname "lo" meta skuid $ISTIO_UID ip daddr != 127.0.0.1 meta mark set $ISTIO_MARK
    meta l4proto tcp ct mark $ISTIO_MARK meta mark set ct mark
  }
}
EOF
      in_p ip rule add fwmark "$ISTIO_MARK" lookup "$ISTIO_TABLE"
      in_p ip route add local 0.0.0.0/0 dev lo table "$ISTIO_TABLE"
      as_proxy "$ISTIO_UID" haproxy -db -f "$RUN/haproxy.cfg" >"$RUN/haproxy.log" 2>&1 &
      ;;
    haproxy)
      as_proxy "$HAPROXY_UID" haproxy -db -f "$RUN/haproxy.cfg" >"$RUN/haproxy.log" 2>&1 &
      ;;
    nginx)
      # nginx cannot listen with IP_TRANSPARENT: REDIRECT the client leg to its listener, before
      # the plugin's mangle chain (whose tproxy statement then finds no transparent socket and
      # falls through, and whose exclusion of port 15006 accepts the packet).
      in_p nft -f - <<EOF
table ip tpbench_nginx {
  chain prerouting { type nat hook prerouting priority -160; policy accept;
    iifname "eth0" tcp dport $APP_PORT redirect to :$INBOUND_PORT
  }
}
EOF
      as_proxy "$NGINX_UID" nginx -e "$RUN/nginx-proxy/err.log" -c "$RUN/nginx-proxy.conf" \
        -p "$RUN/nginx-proxy" >"$RUN/nginx-proxy.log" 2>&1 &
      ;;
  esac
  PROXY_PID=$!
  # TPROXY is fail-open: wait for the listener, or the first requests would go straight through.
  for _ in $(seq 100); do
    [[ -n $(in_p ss -Hltn "sport = :$INBOUND_PORT") ]] && return 0
    kill -0 "$PROXY_PID" 2>/dev/null || break
    sleep 0.1
  done
  cat "$RUN"/*.log >&2 || true
  die "$row: no listener on :$INBOUND_PORT"
}

stop_row() {
  local row=$1
  stop_pid "$PROXY_PID"
  PROXY_PID=
  [[ $row == nginx ]] && in_p nft delete table ip tpbench_nginx
  if [[ $row == haproxy-istio ]]; then
    in_p nft delete table inet tpbench_istio
    in_p ip rule del fwmark "$ISTIO_MARK" lookup "$ISTIO_TABLE"
    in_p ip route flush table "$ISTIO_TABLE"
  fi
  if [[ -n $CNI_MODE ]]; then cni DEL "$CNI_MODE"; CNI_MODE=; fi
}

# The proxy's processes: the pid and its children (nginx's worker).
proxy_pids() { [[ -z $PROXY_PID ]] || { echo "$PROXY_PID"; pgrep -P "$PROXY_PID" || true; }; }
# The app's processes (nginx master and worker).
app_pids() { echo "$APP_PID"; pgrep -P "$APP_PID" || true; }
cpu_ticks() {
  local t=0 p v
  for p in $(proxy_pids) ${1:+$(app_pids)}; do
    v=$(awk '{sub(/^.*\) /, ""); print $12 + $13}' "/proc/$p/stat" 2>/dev/null || echo 0)
    t=$((t + v))
  done
  echo "$t"
}
rss_kib() {
  local t=0 p v
  for p in $(proxy_pids); do
    v=$(awk '/^VmRSS:/ {print $2}' "/proc/$p/status" 2>/dev/null || echo 0)
    t=$((t + ${v:-0}))
  done
  echo "$t"
}

# Descriptors the proxy's processes hold.
fds_n() {
  local t=0 p
  for p in $(proxy_pids); do t=$((t + $(ls "/proc/$p/fd" 2>/dev/null | wc -l))); done
  echo "$t"
}

rep=0
rec() { printf '%s\t%s\t%s\t%s\n' "$rep" "$1" "$2" "$3" >>"$RESULTS"; }

# wrk run: records req/s, p50, p99, max (ms) and socket errors under the given prefix.
to_ms='function ms(v){ if (v ~ /us$/) return v/1000; if (v ~ /ms$/) return v+0; if (v ~ /m$/) return v*60000; if (v ~ /s$/) return v*1000; return v }'
run_wrk() {
  local row=$1 prefix=$2; shift 2
  local c0 c1
  c0=$(cpu_ticks app)
  in_c wrk "$@" --latency "http://$POD_IP:$APP_PORT/" >"$RUN/wrk.out" 2>&1 || true
  c1=$(cpu_ticks app)
  local rps p50 p99 max errs
  rps=$(awk '/^Requests\/sec:/ {print $2}' "$RUN/wrk.out")
  p50=$(awk "$to_ms"' $1 == "50%" {print ms($2)}' "$RUN/wrk.out")
  p99=$(awk "$to_ms"' $1 == "99%" {print ms($2)}' "$RUN/wrk.out")
  max=$(awk "$to_ms"' $1 == "Latency" && NF == 5 {print ms($4)}' "$RUN/wrk.out")
  errs=$(awk '/Socket errors/ {gsub(",", ""); s += $4 + $6 + $8 + $10} /Non-2xx/ {s += $NF}
    END {print s + 0}' "$RUN/wrk.out")
  [[ -n $rps ]] || { cat "$RUN/wrk.out" >&2; die "$row: wrk failed"; }
  rec "$row" "${prefix}_rps" "$rps"
  rec "$row" "${prefix}_p50_ms" "$p50"
  rec "$row" "${prefix}_p99_ms" "$p99"
  rec "$row" "${prefix}_max_ms" "$max"
  rec "$row" "${prefix}_errors" "${errs:-0}"
  # CPU of the proxy and the app per request (the kernel's receive work on lo and veth runs in
  # the sender's context, so this holds most of the per-request kernel cost of the pod).
  local reqs
  reqs=$(awk '/requests in/ {print $1}' "$RUN/wrk.out")
  [[ -z $reqs || $reqs == 0 ]] || rec "$row" "${prefix}_cpu_us" \
    "$(awk -v d=$((c1 - c0)) -v hz="$(getconf CLK_TCK)" -v n="$reqs" 'BEGIN {printf "%.2f", d / hz * 1e6 / n}')"
}

measure_row() {
  local row=$1 seen
  # 0. RSS as started, before any connection: the proxy's own idle cost (`rss_start_kib`; for
  # the sidecar mostly its code and libc's, mapped in, docs/ARCHITECTURE.md, pitfall 91).
  [[ $row == direct ]] || { sleep 1; rec "$row" rss_start_kib "$(rss_kib)"; }
  # 1. Correctness: the address the app sees as its caller.
  seen=$(in_c curl -s -m 5 "http://$POD_IP:$APP_PORT/ip" || echo "curl-failed")
  rec "$row" ip_seen "$seen"
  rec "$row" ip_expected "$(expected_ip "$row")"
  [[ $row == direct ]] || rec "$row" rss_idle_kib "$(rss_kib)"
  [[ $row == direct ]] || rec "$row" fds_idle "$(fds_n)"
  reset_counters
  # 2. Keep-alive (c=50), one connection, new connections (Connection: close).
  run_wrk "$row" ka -t1 -c50 -d"${DUR}s"
  run_wrk "$row" single -t1 -c1 -d"${DUR1}s"
  run_wrk "$row" close -t1 -c50 -d"${DUR}s" -H "Connection: close"
  # 3. Bulk: one transfer of BULK_MIB; the proxy's CPU over it.
  local t0 t1 speed
  t0=$(cpu_ticks)
  speed=$(in_c curl -s -m 120 -o /dev/null -w '%{speed_download}' "http://$POD_IP:$APP_PORT/bulk/blob")
  t1=$(cpu_ticks)
  rec "$row" bulk_mib_s "$(awk -v s="$speed" 'BEGIN {printf "%.1f", s / 1048576}')"
  [[ $row == direct ]] || rec "$row" cpu_s_per_gib \
    "$(awk -v d=$((t1 - t0)) -v hz="$(getconf CLK_TCK)" -v m="$BULK_MIB" 'BEGIN {printf "%.3f", d / hz * 1024 / m}')"
  # 4. RSS and descriptors with N open connections (each did one request through the proxy),
  # for each N of BENCH_HOLD; `rss_1k_kib` / `hold_failed` are the 1,000 row of the report.
  local n sfx
  for n in "${HOLD_SIZES[@]}"; do
    sfx=$([[ $n == 1000 ]] && echo 1k || echo "$n")
    rm -f "$RUN/hold.ready" "$RUN/hold.stop"
    in_c python3 scripts/bench/hold.py "$POD_IP" "$APP_PORT" "$n" "$RUN/hold.ready" "$RUN/hold.stop" 60 5 120 &
    local hold=$!
    for _ in $(seq 1300); do [[ -e $RUN/hold.ready ]] && break; sleep 0.1; done
    sleep 0.3
    [[ $row == direct ]] || rec "$row" "rss_${sfx}_kib" "$(rss_kib)"
    [[ $row == direct ]] || rec "$row" "fds_${sfx}" "$(fds_n)"
    rec "$row" "$([[ $n == 1000 ]] && echo hold_failed || echo "hold_${sfx}_failed")" \
      "$(awk '{print $2}' "$RUN/hold.ready" 2>/dev/null || echo "$n")"
    touch "$RUN/hold.stop"
    wait "$hold" || true
  done
  # 5. Clash probes: the client holds PROBE_N connections open with ports from the range HAProxy
  # and nginx dial from (the pod's ephemeral range), then from 1024-32767 (where the sidecar
  # dials from); a proxy whose upstream leg takes a tuple a live client flow uses stalls.
  if [[ $row != direct ]]; then
    local probe range
    for probe in probe_pod:POD_PORTS probe_low:LOW_PORTS; do
      range=${probe#*:}
      ip netns exec "$C" sysctl -qw net.ipv4.ip_local_port_range="${!range}"
      rm -f "$RUN/hold.ready" "$RUN/hold.stop"
      in_c python3 scripts/bench/hold.py "$POD_IP" "$APP_PORT" "$PROBE_N" "$RUN/hold.ready" \
        "$RUN/hold.stop" 0 1.5 "$PROBE_S" || true
      rec "$row" probe_n "$PROBE_N"
      rec "$row" "${probe%%:*}_failed" \
        "$(awk '{print $2}' "$RUN/hold.ready" 2>/dev/null || echo "$PROBE_N")"
    done
    ip netns exec "$C" sysctl -qw net.ipv4.ip_local_port_range="$CLIENT_PORTS"
  fi
  # Profiles (BENCH_PROFILE=1), last repetition only: the proxy under each load, traced and
  # sampled in separate runs (strace slows it down; the counts per request are what matter).
  if [[ -n ${BENCH_PROFILE:-} && $rep == "$REPS" ]] && [[ $row =~ ^(sidecar-tproxy|haproxy|haproxy-istio)$ ]]; then
    local kind hdr pids reqs calls
    pids=$(proxy_pids | paste -sd,)
    for kind in ka close; do
      hdr=(); [[ $kind == close ]] && hdr=(-H "Connection: close")
      strace -c -f -qq -o "$RUN/strace.txt" -p "$pids" &
      local sp=$!
      sleep 0.5
      in_c wrk -t1 -c50 -d2s "${hdr[@]}" "http://$POD_IP:$APP_PORT/" >"$RUN/wrk-prof.out" 2>&1 || true
      kill -INT "$sp" 2>/dev/null || true
      wait "$sp" 2>/dev/null || true
      reqs=$(awk '/requests in/ {print $1}' "$RUN/wrk-prof.out")
      calls=$(awk '$NF == "total" {print $(NF-2) ~ /^[0-9]+$/ ? $(NF-2) : $(NF-1)}' "$RUN/strace.txt")
      cp "$RUN/strace.txt" "$OUT/strace-$row-$kind-$$.txt"
      [[ -z $reqs || -z $calls ]] || rec "$row" "${kind}_syscalls_per_req" \
        "$(awk -v c="$calls" -v n="$reqs" 'BEGIN {printf "%.2f", c / n}')"
      perf record -q -g -o "$RUN/perf.data" -p "$pids" -- sleep 2 >/dev/null 2>&1 &
      sp=$!
      in_c wrk -t1 -c50 -d2s "${hdr[@]}" "http://$POD_IP:$APP_PORT/" >/dev/null 2>&1 || true
      wait "$sp" 2>/dev/null || true
      perf report -q -i "$RUN/perf.data" --no-children --sort dso --stdio -g none 2>/dev/null |
        grep -v '^$' | head -8 >"$OUT/perf-$row-$kind-$$.txt" || true
      perf report -q -i "$RUN/perf.data" --no-children --sort sym --stdio -g none 2>/dev/null |
        grep -v '^$' | head -25 >>"$OUT/perf-$row-$kind-$$.txt" || true
    done
  fi
  # 6. Counters over the whole row.
  rec "$row" client_syn "$(counter client_syn)"
  rec "$row" clash_syn "$(counter clash)"
  rec "$row" app_leg_syn "$(counter app_leg)"
  [[ $row == direct ]] || rec "$row" bypassed "$(counter bypass)"
}

# ---------------------------------------------------------------------------------- run
: >"$RESULTS"
for rep in $(seq "$REPS"); do
  # Rotate the order each repetition so no row always runs first (or after the same one).
  n=${#ROWS[@]}
  for i in $(seq 0 $((n - 1))); do
    row=${ROWS[$(((i + rep - 1) % n))]}
    log "rep $rep/$REPS: $row"
    start_row "$row"
    measure_row "$row"
    stop_row "$row"
  done
done

# ---------------------------------------------------------------------------------- churn
# Churn (docs/ARCHITECTURE.md, pitfalls 12 and 54): one client IP -> one app port, one request per connection, at CHURN_RATE new
# connections/s for CHURN_S seconds (open loop: a stall shows as a slow connect, not as a lower
# rate), with the client closing first (keep-alive request, the client closes once it has the
# response) and the app closing first (`Connection: close`), TCP timestamps on and off in the
# pod netns. The client takes the ports of the Linux default ephemeral range in turn (explicit
# bind: once most of the range is in TIME_WAIT, the kernel's own port search makes every
# connect() slow and the client would be the limit), and reuses its TIME_WAIT ports when
# timestamps allow it (tcp_tw_reuse=1). One thing no server can change: with timestamps off and
# the client closing first, the client's own TIME_WAIT (60 s, not reusable without timestamps)
# caps it at its port count / 60 s, so that cell runs at 90 % of that cap and `direct` shows it
# holds.
# Every cell starts clean: TIME_WAIT sockets (ss -K) and conntrack entries of the previous cell
# are dropped, so no cell inherits another's tuples.
CHURN_CLIENT_PORTS="32768 60999"
churn_clean() {
  in_p ss -K -H state time-wait >/dev/null 2>&1 || true
  in_c ss -K -H state time-wait >/dev/null 2>&1 || true
  in_p conntrack -F >/dev/null 2>&1 || true
}
# Sampled every 0.5 s into churn-gauge-*.txt: the pod's conntrack entries, TIME_WAIT sockets,
# the sidecar's accept queue (all its listeners) and the machine's load average.
# nstat counters of the pod netns that explain failures; printed as name=delta.
CHURN_NSTAT="TcpExtTW TcpExtTWRecycled TcpExtTCPTimeWaitOverflow TcpExtListenOverflows TcpExtListenDrops TcpAttemptFails TcpEstabResets TcpExtTCPAbortOnData TcpExtTCPAbortOnClose TcpOutRsts TcpExtTCPChallengeACK TcpExtPAWSEstab TcpExtTWKilled"
run_churn_cell() {
  local row=$1 ts=$2 close=$3 rate=$CHURN_RATE lo hi cap cell
  cell="churn|$row|ts$ts|$close"
  read -r lo hi <<<"$CHURN_CLIENT_PORTS"
  cap=$(((hi - lo + 1) * 9 / 10 / 60))
  if [[ $ts == 0 && $close == client ]] && ((rate > cap)); then rate=$cap; fi
  in_p sysctl -qw net.ipv4.tcp_timestamps="$ts"
  churn_clean
  start_row "$row"
  reset_counters
  in_p env NSTAT_HISTORY="$RUN/nstat.hist" nstat -n >/dev/null
  log "churn: $row, timestamps $ts, $close closes first, $rate/s for ${CHURN_S}s"
  local conntrack_max=0 tw_max=0 t
  (
    while sleep 0.5; do
      printf '%s %s %s\n' "$(in_p conntrack -C 2>/dev/null || echo 0)" \
        "$(in_p ss -Htan state time-wait 2>/dev/null | wc -l)" \
        "$(in_p ss -Hltn "sport = :$INBOUND_PORT" 2>/dev/null | awk '{q += $2} END {print q + 0}')" \
        "$(cut -d' ' -f1 /proc/loadavg)"
    done
  ) >"$RUN/churn.gauge" &
  local gauge=$!
  in_c "$BIN/examples/churn" --target "$POD_IP:$APP_PORT" --rate "$rate" --seconds "$CHURN_S" \
    --close "$close" --ports "$lo-$hi" >"$RUN/churn.out" 2>&1 || true
  kill "$gauge" 2>/dev/null || true
  wait "$gauge" 2>/dev/null || true
  local acceptq_max
  read -r conntrack_max tw_max acceptq_max < <(awk '$1 > c {c = $1} $2 > w {w = $2} $3 > a {a = $3}
    END {print c + 0, w + 0, a + 0}' "$RUN/churn.gauge")
  cp "$RUN/churn.gauge" "$OUT/churn-gauge-${row}-ts$ts-$close-$$.txt"
  rec "$cell" acceptq_max "$acceptq_max"
  cat "$RUN/churn.out" >&2
  local line k v
  line=$(head -n1 "$RUN/churn.out")
  [[ $line == started=* ]] || die "churn client failed: $(cat "$RUN/churn.out")"
  rec "$cell" rate_asked "$rate"
  for kv in $line; do k=${kv%%=*} v=${kv#*=}; rec "$cell" "$k" "$v"; done
  rec "$cell" fail_seconds "$(grep -c "^second [0-9]*: [1-9]" "$RUN/churn.out" || true)"
  rec "$cell" conntrack_max "$conntrack_max"
  rec "$cell" tw_max "$tw_max"
  in_p env NSTAT_HISTORY="$RUN/nstat.hist" nstat -sz >"$RUN/nstat.out"
  for t in $CHURN_NSTAT; do
    rec "$cell" "nstat_$t" "$(awk -v t="$t" '$1 == t {print $2}' "$RUN/nstat.out")"
  done
  rec "$cell" client_syn "$(counter client_syn)"
  rec "$cell" clash_syn "$(counter clash)"
  rec "$cell" app_leg_syn "$(counter app_leg)"
  [[ $row == direct ]] || rec "$cell" bypassed "$(counter bypass)"
  stop_row "$row"
}
if ((${#CHURN_ROWS[@]})); then
  rep=1
  in_c sysctl -qw net.ipv4.ip_local_port_range="$CHURN_CLIENT_PORTS"
  for ts in ${BENCH_CHURN_TS:-1 0}; do
    for close in ${BENCH_CHURN_CLOSE:-client app}; do
      for row in "${CHURN_ROWS[@]}"; do run_churn_cell "$row" "$ts" "$close"; done
    done
  done
  in_p sysctl -qw net.ipv4.tcp_timestamps=1
  in_c sysctl -qw net.ipv4.ip_local_port_range="$CLIENT_PORTS"
fi

PLUGIN_TSV=$RUN/plugin.tsv
if [[ -z ${BENCH_SKIP_PLUGIN:-} ]]; then
  log "plugin benchmark"
  TPROXY_CNI_BIN=$BIN/tproxy-cni BENCH_OUT=$PLUGIN_TSV BENCH_NS_PREFIX=tpbp-$$ \
    cargo bench --quiet --bench plugin -- "${PLUGIN_ARGS[@]}" || log "plugin benchmark failed"
fi

[[ -n ${BENCH_SKIP_NORTHSOUTH:-} ]] || ./scripts/bench/northsouth.sh $([[ $QUICK == 1 ]] && echo --quick) | tee "$RUN/northsouth.md" || log "north-south rows failed"
stamp=$(date +%Y%m%d-%H%M%S)
cp "$RESULTS" "$OUT/results-$stamp.tsv"
[[ -e $PLUGIN_TSV ]] && cp "$PLUGIN_TSV" "$OUT/plugin-$stamp.tsv"
{
  echo "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ //'), Linux $(uname -r)"
  echo "mode: $([[ $QUICK == 1 ]] && echo quick || echo full), $REPS repetitions, wrk ${DUR}s (single ${DUR1}s), bulk ${BULK_MIB} MiB, $HOLD_N held connections"
  echo
} >"$OUT/report-$stamp.md"
python3 scripts/bench/report.py "$RESULTS" "$PLUGIN_TSV" >>"$OUT/report-$stamp.md" && ok=0 || ok=$?
cat "$OUT/report-$stamp.md"
ln -sf "report-$stamp.md" "$OUT/latest.md"
log "kept: $OUT/report-$stamp.md"
exit "$ok"
