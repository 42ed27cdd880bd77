#!/usr/bin/env python3
"""The physical floor of a durable, networked write on this machine, measured in seconds.

Two numbers bound what one durable write through a socket can cost here:

  fdatasync  of a 4 KiB write on the disk the data dirs live on, both as an overwrite of
             initialized blocks (a pre-zeroed file: no metadata to journal, what a WAL that
             recycles segments pays) and as an append that grows a new file (block allocation
             and a size change to journal, what a naive WAL pays);
  loopback   TCP round trip of 1 byte over 127.0.0.1 with TCP_NODELAY.

A single-client durable write cannot be faster than RTT + fsync, so the bench scripts report
single-client write latency as a multiple of that sum. This disk's fdatasync is bimodal (a fast
mode of tens to a few hundred µs and a slow mode in ~4 ms steps, which depends on other
tenants' I/O), so the scripts measure the floor right before and right after their measurements
and `describe` says which mode the disk was in.

Stdlib only. Usage: python3 bench/floor.py [--dir DIR] [--count 300] [--json]
"""

import argparse
import json
import os
import shutil
import socket
import statistics
import sys
import tempfile
import threading
import time

BLOCK = 4096
PREFILL_BYTES = 4 << 20
SLOW_SYNC_US = 2000  # a sync at or above this counts as slow-mode
FAST_MODE_BELOW_US = 1000  # overwrite p50 below this: the disk is in its fast mode


def percentile(sorted_vals, p):
    """Nearest-rank percentile of an ascending list (p in 0..100)."""
    if not sorted_vals:
        return float("nan")
    k = max(0, min(len(sorted_vals) - 1, -(-len(sorted_vals) * p // 100) - 1))
    return sorted_vals[int(k)]


def _summary(lat_ns):
    us = sorted(x / 1000 for x in lat_ns)
    return {
        "count": len(us),
        "p50_us": percentile(us, 50),
        "p99_us": percentile(us, 99),
        "max_us": us[-1] if us else float("nan"),
        "share_ge_2ms": sum(1 for x in us if x >= SLOW_SYNC_US) / len(us) if us else 0.0,
    }


def _fsync_dir(d):
    fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_floor(dir, count=300):
    """fdatasync latency of a 4 KiB write in `dir`, as an overwrite and as an append.

    Overwrite: a file pre-filled with 4 MiB of zeros (fsynced), then `count` iterations of
    os.pwrite of 4 KiB at successive 4 KiB offsets (wrapping at 4 MiB) + os.fdatasync. Append:
    `count` iterations of writing 4 KiB at the end of a new file + os.fdatasync. Each iteration
    is timed as a whole (the pwrite into the page cache is a few µs of it). Both files are
    removed afterwards.

    Returns {"overwrite": {...}, "append": {...}, "mode": "fast"|"slow", ...}, where each of
    overwrite/append has p50_us, p99_us, max_us and share_ge_2ms (the fraction of iterations
    that took >= 2 ms), and mode is "fast" if the overwrite p50 is below 1 ms, else "slow".
    """
    tag = f"{os.getpid()}-{threading.get_ident()}"
    ow_path = os.path.join(dir, f".floor-overwrite-{tag}.dat")
    ap_path = os.path.join(dir, f".floor-append-{tag}.dat")
    block = b"\xa5" * BLOCK
    ow_lat, ap_lat = [], []
    fds = []
    try:
        fd = os.open(ow_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        fds.append(fd)
        zeros = bytes(1 << 20)
        for _ in range(PREFILL_BYTES // len(zeros)):
            os.write(fd, zeros)
        os.fsync(fd)
        ap = os.open(ap_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        fds.append(ap)
        _fsync_dir(dir)

        wrap = PREFILL_BYTES // BLOCK
        clock = time.perf_counter_ns
        for i in range(count):
            t = clock()
            os.pwrite(fd, block, (i % wrap) * BLOCK)
            os.fdatasync(fd)
            ow_lat.append(clock() - t)
        for i in range(count):
            t = clock()
            os.pwrite(ap, block, i * BLOCK)
            os.fdatasync(ap)
            ap_lat.append(clock() - t)
    finally:
        for fd in fds:
            os.close(fd)
        for p in (ow_path, ap_path):
            try:
                os.unlink(p)
            except OSError:
                pass
    overwrite, append = _summary(ow_lat), _summary(ap_lat)
    return {
        "dir": os.path.abspath(dir),
        "block_bytes": BLOCK,
        "overwrite": overwrite,
        "append": append,
        "mode": "fast" if overwrite["p50_us"] < FAST_MODE_BELOW_US else "slow",
    }


def loopback_rtt(count=2000, warmup=200):
    """Round-trip time of 1 byte over TCP on 127.0.0.1 (TCP_NODELAY on both ends).

    The main thread sends one byte and waits for it to come back from an echo thread in the
    same process, `count` times after `warmup` untimed rounds. Returns p50_us and p99_us.

    This is a Python ping-pong: each round trip also pays the interpreter's own overhead
    (socket method calls, the GIL handoff between the two threads), so it overestimates the
    kernel's loopback RTT slightly (by a few µs on an idle machine; sockperf measured ~3.9 µs
    where this style of ping-pong gave ~4.5 µs). That makes RTT + fsync a little larger than
    the true floor, i.e. the "multiple of the floor" ratios a little kinder to the systems
    measured; on this machine the fsync term dominates anyway.
    """
    srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    errors = []

    def echo():
        try:
            conn, _ = srv.accept()
        except OSError as e:
            errors.append(e)
            return
        with conn:
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            try:
                while True:
                    b = conn.recv(1)
                    if not b:
                        return
                    conn.sendall(b)
            except OSError:
                return

    t = threading.Thread(target=echo, name="floor-echo", daemon=True)
    t.start()
    lat = []
    try:
        with socket.create_connection(srv.getsockname(), timeout=10) as c:
            c.settimeout(None)  # plain blocking recv: no poll() per call
            c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            clock = time.perf_counter_ns
            for i in range(warmup + count):
                t0 = clock()
                c.sendall(b"x")
                if c.recv(1) != b"x":
                    raise OSError("loopback echo closed early")
                if i >= warmup:
                    lat.append(clock() - t0)
    finally:
        srv.close()
        t.join(timeout=5)
    us = sorted(x / 1000 for x in lat)
    return {"count": len(us), "p50_us": percentile(us, 50), "p99_us": percentile(us, 99),
            "method": "Python ping-pong between two threads (overestimates kernel RTT slightly)"}


def floor_us(fsync, rtt):
    """RTT p50 + fdatasync overwrite p50, in µs: the floor of one single-client durable write."""
    return rtt["p50_us"] + fsync["overwrite"]["p50_us"]


def measure(dir, when=None, count=300, rtt_count=2000):
    """fsync_floor + loopback_rtt, as one JSON-able dict (with the describe() line in it)."""
    fs = fsync_floor(dir, count)
    rtt = loopback_rtt(rtt_count)
    return {"when": when, "at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "fsync": fs, "rtt": rtt,
            "rtt_plus_fsync_us": floor_us(fs, rtt), "line": describe(fs, rtt, when)}


def mean_floor_us(measures):
    """Mean of RTT + fsync over several measure() results (before/after a run)."""
    return statistics.mean(m["rtt_plus_fsync_us"] for m in measures)


def modes_note(measures):
    """'' if every measure() saw the same fsync mode, else a warning sentence."""
    modes = [m["fsync"]["mode"] for m in measures]
    if len(set(modes)) <= 1:
        return ""
    seq = ", ".join(f"{m['when'] or '?'} {m['fsync']['mode']}" for m in measures)
    return (f"NOTE: the disk changed fsync mode during the run ({seq}): the mean floor mixes the "
            f"two modes, so the multiples below are rough.")


def _us(x):
    return f"{x:,.0f} µs"


def describe(floor, rtt, when=None):
    """One line: both fdatasync figures with the disk's mode, the loopback RTT, and the sum."""
    ow, ap = floor["overwrite"], floor["append"]
    label = f"physical floor ({when})" if when else "physical floor"
    return (f"{label}: fdatasync 4 KiB overwrite p50 {_us(ow['p50_us'])} p99 {_us(ow['p99_us'])} "
            f"({floor['mode']} mode, {ow['share_ge_2ms']:.0%} >= 2 ms), append p50 "
            f"{_us(ap['p50_us'])} p99 {_us(ap['p99_us'])} ({ap['share_ge_2ms']:.0%} >= 2 ms); "
            f"loopback RTT p50 {_us(rtt['p50_us'])} p99 {_us(rtt['p99_us'])} (Python ping-pong, "
            f"a little above the kernel's RTT, which makes the floor slightly larger and the "
            f"multiples slightly kinder); RTT + fsync = {_us(floor_us(floor, rtt))}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dir", help="measure fsync in this directory (default: a temp dir under /tmp)")
    ap.add_argument("--count", type=int, default=300, help="fdatasyncs per kind (default 300)")
    ap.add_argument("--json", action="store_true", help="print the measurement as JSON too")
    args = ap.parse_args()
    d = args.dir or tempfile.mkdtemp(prefix="capdb-floor-", dir="/tmp")
    try:
        m = measure(d, count=args.count)
    finally:
        if not args.dir:
            shutil.rmtree(d, ignore_errors=True)
    print(m["line"])
    if args.json:
        json.dump(m, sys.stdout, indent=1)
        print()


if __name__ == "__main__":
    main()
