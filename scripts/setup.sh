#!/usr/bin/env bash
# Installs what the demo, the tests and the benchmarks need on a fresh Debian/Ubuntu machine.
# Idempotent and quiet when everything is already there. Needs root (apt-get).
set -euo pipefail

need=(nft:nftables ip:iproute2 /usr/lib/cni/bridge:containernetworking-plugins
      curl:curl python3:python3 setpriv:util-linux ps:procps haproxy:haproxy setcap:libcap2-bin
      containerd:containerd runc:runc busybox:busybox-static protoc:protobuf-compiler)
missing=()
for pair in "${need[@]}"; do
  probe=${pair%%:*} pkg=${pair#*:}
  if [[ $probe == /* ]]; then [[ -e $probe ]] || missing+=("$pkg")
  else command -v "$probe" >/dev/null 2>&1 || missing+=("$pkg"); fi
done
# Extra packages a caller asks for (the benchmark adds wrk, haproxy, nginx).
for pkg in "$@"; do dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg"); done

if ((${#missing[@]})); then
  if [[ $(id -u) -ne 0 ]]; then
    echo "setup: missing packages ${missing[*]}; run as root to install them" >&2
    exit 1
  fi
  echo "setup: installing ${missing[*]}" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >/dev/null
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# kubectl (with its built-in kustomize) renders the manifests in tests/manifests.rs. It comes
# with this project's machine image (the `kubectl` package of Google's apt repository, which is
# not one this project's machines can reach; Debian 12's own kubernetes-client is kubectl 1.20,
# far older and not tried), so it is checked, not installed: without it those tests print SKIP,
# and fail when CI is set.
if ! command -v kubectl >/dev/null 2>&1; then
  echo "setup: kubectl not found: tests/manifests.rs cannot render the kustomizations" >&2
fi

if ! command -v cargo >/dev/null 2>&1; then
  echo "setup: cargo not found: install a Rust toolchain >= 1.85 (rustup) and retry" >&2
  exit 1
fi
# TPROXY and nf_tables modules (built in on many kernels; modprobe is best effort).
for m in nf_tables nft_tproxy nf_tproxy_ipv4 nf_tproxy_ipv6 nft_reject_inet nft_redir nft_ct nft_nat; do
  modprobe -q "$m" 2>/dev/null || true
done
