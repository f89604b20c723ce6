#!/usr/bin/env python3
"""Writes a one-layer OCI image archive from local files, offline (no base image, no Docker).

The archive is an OCI image layout (oci-layout, index.json, blobs/sha256/...) that also carries
Docker's manifest.json, so both `ctr images import` and `docker load` accept it. The layer is an
uncompressed PAX tar, reproducible (sorted, mtime 0, owner 0:0). A file's `security.capability`
xattr (set on the staged file with `setcap`) is stored as the PAX record
`SCHILY.xattr.security.capability`, which containerd and Docker apply when they unpack the layer.

usage: oci-image.py --out FILE --name REF [--file SRC:DST[:MODE]]... [--symlink TARGET:DST]...
                    [--entrypoint JSON] [--cmd JSON] [--user U] [--label K=V]...
"""

import argparse
import hashlib
import io
import json
import os
import posixpath
import sys
import tarfile

CAP_XATTR = "security.capability"


def layer_tar(files, symlinks):
    """The layer as bytes: parent directories, files (mode, xattr), symlinks."""
    entries = {}

    def add_dirs(path):
        parent = posixpath.dirname(path)
        while parent and parent not in entries:
            entries[parent] = ("dir", None, 0o755)
            parent = posixpath.dirname(parent)

    for src, dst, mode in files:
        dst = dst.lstrip("/")
        add_dirs(dst)
        entries[dst] = ("file", src, mode)
    for target, dst in symlinks:
        dst = dst.lstrip("/")
        add_dirs(dst)
        entries[dst] = ("symlink", target, 0o777)

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for path in sorted(entries):
            kind, src, mode = entries[path]
            ti = tarfile.TarInfo(path)
            ti.mtime = 0
            ti.uid = ti.gid = 0
            ti.uname = ti.gname = "root"
            ti.mode = mode
            if kind == "dir":
                ti.type = tarfile.DIRTYPE
                tar.addfile(ti)
            elif kind == "symlink":
                ti.type = tarfile.SYMTYPE
                ti.linkname = src
                tar.addfile(ti)
            else:
                st = os.stat(src)
                ti.size = st.st_size
                if mode is None:
                    ti.mode = st.st_mode & 0o7777
                try:
                    cap = os.getxattr(src, CAP_XATTR)
                except OSError:
                    cap = None
                if cap is not None:
                    # tarfile writes str values as UTF-8, or with hdrcharset=BINARY when they are
                    # not valid UTF-8: surrogateescape round-trips every byte either way.
                    ti.pax_headers = {
                        "SCHILY.xattr." + CAP_XATTR: cap.decode("utf-8", "surrogateescape")
                    }
                with open(src, "rb") as f:
                    tar.addfile(ti, f)
    return buf.getvalue()


def blob(data):
    return "sha256:" + hashlib.sha256(data).hexdigest(), data


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--name", required=True, help="image reference, e.g. docker.io/library/x:1")
    ap.add_argument("--file", action="append", default=[], help="SRC:DST[:OCTAL_MODE]")
    ap.add_argument("--symlink", action="append", default=[], help="TARGET:DST")
    ap.add_argument("--entrypoint", default=None)
    ap.add_argument("--cmd", default=None)
    ap.add_argument("--user", default=None)
    ap.add_argument("--label", action="append", default=[])
    a = ap.parse_args()

    files = []
    for spec in a.file:
        parts = spec.split(":")
        if len(parts) not in (2, 3):
            sys.exit(f"oci-image: --file {spec!r}: want SRC:DST[:MODE]")
        mode = int(parts[2], 8) if len(parts) == 3 else None
        files.append((parts[0], parts[1], mode))
    symlinks = []
    for spec in a.symlink:
        target, _, dst = spec.partition(":")
        if not dst:
            sys.exit(f"oci-image: --symlink {spec!r}: want TARGET:DST")
        symlinks.append((target, dst))

    layer_digest, layer = blob(layer_tar(files, symlinks))
    cfg = {
        "Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],
        "Labels": dict(kv.split("=", 1) for kv in a.label),
    }
    if a.entrypoint:
        cfg["Entrypoint"] = json.loads(a.entrypoint)
    if a.cmd:
        cfg["Cmd"] = json.loads(a.cmd)
    if a.user:
        cfg["User"] = a.user
    config = {
        "created": "1970-01-01T00:00:00Z",
        "architecture": "amd64",
        "os": "linux",
        "config": cfg,
        "rootfs": {"type": "layers", "diff_ids": [layer_digest]},
        "history": [{"created": "1970-01-01T00:00:00Z", "created_by": "scripts/oci-image.py"}],
    }
    config_digest, config_bytes = blob(json.dumps(config, sort_keys=True).encode())
    manifest = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            "digest": config_digest,
            "size": len(config_bytes),
        },
        "layers": [
            {
                "mediaType": "application/vnd.oci.image.layer.v1.tar",
                "digest": layer_digest,
                "size": len(layer),
            }
        ],
    }
    manifest_digest, manifest_bytes = blob(json.dumps(manifest, sort_keys=True).encode())
    # Short form for Docker's RepoTags ("docker.io/library/x:1" -> "x:1").
    short = a.name
    for prefix in ("docker.io/library/", "docker.io/"):
        if short.startswith(prefix):
            short = short[len(prefix):]
            break
    index = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [
            {
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "digest": manifest_digest,
                "size": len(manifest_bytes),
                "annotations": {
                    "io.containerd.image.name": a.name,
                    "org.opencontainers.image.ref.name": a.name.rsplit(":", 1)[-1],
                },
            }
        ],
    }
    path = lambda d: "blobs/sha256/" + d.split(":", 1)[1]
    docker_manifest = [
        {"Config": path(config_digest), "RepoTags": [short], "Layers": [path(layer_digest)]}
    ]
    members = [
        ("oci-layout", json.dumps({"imageLayoutVersion": "1.0.0"}).encode()),
        ("index.json", json.dumps(index, sort_keys=True).encode()),
        ("manifest.json", json.dumps(docker_manifest).encode()),
        (path(config_digest), config_bytes),
        (path(manifest_digest), manifest_bytes),
        (path(layer_digest), layer),
    ]
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    tmp = a.out + ".tmp"
    with tarfile.open(tmp, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for d in ("blobs", "blobs/sha256"):
            ti = tarfile.TarInfo(d)
            ti.type, ti.mode, ti.mtime = tarfile.DIRTYPE, 0o755, 0
            tar.addfile(ti)
        for name, data in members:
            ti = tarfile.TarInfo(name)
            ti.size, ti.mode, ti.mtime = len(data), 0o644, 0
            tar.addfile(ti, io.BytesIO(data))
    os.replace(tmp, a.out)
    print(f"{a.out}: {a.name} ({len(layer)} byte layer, manifest {manifest_digest})")


if __name__ == "__main__":
    main()
