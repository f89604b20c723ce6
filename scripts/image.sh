#!/usr/bin/env bash
# Builds the tproxy-cni image offline, without Docker or a base image:
#   target/image/tproxy-cni.oci.tar   tproxy-cni, tproxy-sidecar, tproxy-cni-install in
#                                     /usr/local/bin, statically linked (glibc, crt-static);
#                                     tproxy-sidecar carries the file capability cap_net_raw+p
#   target/image/testbox.oci.tar      busybox (static, from Debian's busybox-static): the pause
#                                     image of the real-runtime test and its app/client image
# Both are OCI image layouts with Docker's manifest.json: `ctr images import FILE` and
# `docker load -i FILE` accept them. Needs root only for setcap (a file capability is an xattr in
# the security namespace).
#
# Why the file capability: Kubernetes puts capabilities.add in the bounding, permitted and
# effective sets of the runtime's process but sets no ambient ones, so a non-root sidecar keeps
# CAP_NET_RAW across exec only when its binary carries it (docs/ARCHITECTURE.md, pitfall 13).
set -euo pipefail
cd "$(dirname "$0")/.."

TRIPLE=x86_64-unknown-linux-gnu
TGT=${CARGO_TARGET_DIR:-target}
OUT=${IMAGE_OUT:-$TGT/image}
VERSION=$(sed -n 's/^version = "\(.*\)"$/\1/p' Cargo.toml | head -n1)
NAME=docker.io/library/tproxy-cni:$VERSION
TESTBOX=docker.io/library/tproxy-cni-testbox:local
BINS=(tproxy-cni tproxy-sidecar tproxy-cni-install)

for tool in setcap python3 busybox; do
  command -v "$tool" >/dev/null || { echo "image: $tool missing: run scripts/setup.sh" >&2; exit 1; }
done

# Static glibc binaries: the plugin runs on the host, whatever libc (or none) the host ships.
RUSTFLAGS='-C target-feature=+crt-static' cargo build --release --locked --quiet \
  --target "$TRIPLE" $(printf -- '--bin %s ' "${BINS[@]}")

STAGE=$(mktemp -d "${TMPDIR:-/tmp}/tproxy-image.XXXXXX")
trap 'rm -rf "$STAGE"' EXIT
files=()
for b in "${BINS[@]}"; do
  src=$TGT/$TRIPLE/release/$b
  if ldd "$src" 2>&1 | grep -q "=>"; then  # static(-pie): "not a dynamic executable" / "statically linked"
    echo "image: $src is dynamically linked" >&2; exit 1
  fi
  install -m 0755 "$src" "$STAGE/$b"
  files+=(--file "$STAGE/$b:/usr/local/bin/$b:0755")
done
setcap cap_net_raw+p "$STAGE/tproxy-sidecar"

# /etc/passwd and /etc/group: root for the installer, 1337 for the sidecar (names for tools;
# Kubernetes itself uses the numeric ids).
printf 'root:x:0:0:root:/:/sbin/nologin\ntproxy:x:1337:1337:tproxy-sidecar:/:/sbin/nologin\n' >"$STAGE/passwd"
printf 'root:x:0:\ntproxy:x:1337:\n' >"$STAGE/group"
mkdir -p "$OUT"
python3 scripts/oci-image.py --out "$OUT/tproxy-cni.oci.tar" --name "$NAME" \
  "${files[@]}" --file "$STAGE/passwd:/etc/passwd:0644" --file "$STAGE/group:/etc/group:0644" \
  --entrypoint '["/usr/local/bin/tproxy-cni-install"]' --user 1337:1337 \
  --label org.opencontainers.image.title=tproxy-cni \
  --label org.opencontainers.image.licenses=Apache-2.0

# The test box: busybox and the applets the real-runtime test uses; its default command sleeps
# (the sandbox "pause" process). The CGI script answers with the peer address the app saw.
if ldd "$(command -v busybox)" 2>&1 | grep -q "=>"; then
  echo "image: $(command -v busybox) is dynamically linked: install busybox-static" >&2; exit 1
fi
cp "$(command -v busybox)" "$STAGE/busybox"
printf '#!/bin/sh\nprintf "Content-Type: text/plain\\r\\n\\r\\n%%s\\n" "$REMOTE_ADDR"\n' >"$STAGE/ip"
links=()
for applet in sh sleep nc httpd cat printf ip ls; do links+=(--symlink "busybox:/bin/$applet"); done
python3 scripts/oci-image.py --out "$OUT/testbox.oci.tar" --name "$TESTBOX" \
  --file "$STAGE/busybox:/bin/busybox:0755" --file "$STAGE/ip:/www/cgi-bin/ip:0755" \
  --file "$STAGE/passwd:/etc/passwd:0644" --file "$STAGE/group:/etc/group:0644" \
  "${links[@]}" --entrypoint '["/bin/busybox", "sleep", "2147483647"]'
