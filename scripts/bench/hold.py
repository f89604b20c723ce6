#!/usr/bin/env python3
"""Opens N keep-alive HTTP connections to HOST:PORT, does one request on each, holds them open.

Usage: hold.py HOST PORT N READY_FILE STOP_FILE HOLD_SECONDS [TIMEOUT DEADLINE]
Writes "opened failed seconds" to READY_FILE once all are tried (so the caller can read the
proxy's RSS), then waits until STOP_FILE exists or HOLD_SECONDS pass, and closes everything.
A connection fails when it takes over TIMEOUT seconds (default 5); those not tried before
DEADLINE seconds (default 60) count as failed. Exits 1 if any failed.
"""
import os
import socket
import sys
import time


def main() -> int:
    host, port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    ready_file, stop_file, hold = sys.argv[4], sys.argv[5], float(sys.argv[6])
    timeout = float(sys.argv[7]) if len(sys.argv) > 7 else 5.0
    deadline = time.monotonic() + (float(sys.argv[8]) if len(sys.argv) > 8 else 60.0)
    start = time.monotonic()
    req = b"GET / HTTP/1.1\r\nHost: bench\r\n\r\n"
    socks, failed = [], 0
    for _ in range(n):
        if time.monotonic() > deadline:
            failed += 1
            continue
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.settimeout(timeout)
        try:
            s.connect((host, port))
            s.sendall(req)
            got = b""
            while not got.endswith(b"hello\n"):
                chunk = s.recv(4096)
                if not chunk:
                    raise ConnectionError("closed")
                got += chunk
            socks.append(s)
        except OSError:
            failed += 1
            s.close()
    with open(ready_file, "w") as f:
        f.write(f"{len(socks)} {failed} {time.monotonic() - start:.2f}\n")
    deadline = time.monotonic() + hold
    while time.monotonic() < deadline and not os.path.exists(stop_file):
        time.sleep(0.05)
    for s in socks:
        s.close()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
