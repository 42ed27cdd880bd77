#!/usr/bin/env python3
"""Point commands on big `ap` collections: one capdb build against another, in one run.

For each binary given, starts `capdb playground` (3 nodes, keyspace `ap`, level quorum), fills
a hash, a set and a sorted set of --size elements, then times commands that name one element
(HSET, HGET, SADD, SISMEMBER, ZADD, ZSCORE: they read only that element of a big collection)
and HLEN (it reads the collection whole), one client, --ops each. A build from before point
reads (2026-12-05) reads the whole collection for every command.

  python3 bench/ap_point_reads.py --binary target/release/capdb [--binary OTHER] [--size 20000]

Needs redis-py (Debian: python3-redis).
"""

import argparse
import os
import signal
import subprocess
import sys
import time

import redis


def measure(binary, size, ops, port):
    pg = subprocess.Popen([binary, "playground", "--base-port", str(port)],
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                          start_new_session=True)
    try:
        deadline = time.time() + 30
        while True:
            try:
                r = redis.Redis(port=port + 1)
                r.execute_command("SELECT", "ap")
                r.execute_command("CONSISTENCY", "quorum")
                break
            except Exception:
                if time.time() > deadline:
                    raise
                time.sleep(0.3)
        for start in range(0, size, 500):
            end = min(size, start + 500)
            r.hset("bh", mapping={f"f{i:06}": "v" * 20 for i in range(start, end)})
            r.sadd("bs", *[f"m{i:06}" for i in range(start, end)])
            r.zadd("bz", {f"m{i:06}": i for i in range(start, end)})
        cases = [
            ("HSET", lambda i: r.hset("bh", f"new{i}", "x"), ops),
            ("HGET", lambda i: r.hget("bh", f"f{i:06}"), ops),
            ("SADD", lambda i: r.sadd("bs", f"new{i}"), ops),
            ("SISMEMBER", lambda i: r.sismember("bs", f"m{i:06}"), ops),
            ("ZADD", lambda i: r.zadd("bz", {f"new{i}": i}), ops),
            ("ZSCORE", lambda i: r.zscore("bz", f"m{i:06}"), ops),
            ("HLEN", lambda i: r.hlen("bh"), max(5, ops // 20)),
        ]
        out = {}
        for name, f, n in cases:
            t = time.perf_counter()
            for i in range(n):
                f(i)
            out[name] = n / (time.perf_counter() - t)
        assert r.hlen("bh") == size + ops
        return out
    finally:
        os.killpg(pg.pid, signal.SIGTERM)
        pg.wait(timeout=30)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--binary", action="append", required=True)
    ap.add_argument("--size", type=int, default=20000)
    ap.add_argument("--ops", type=int, default=300)
    ap.add_argument("--base-port", type=int, default=9400)
    args = ap.parse_args()
    results = [measure(b, args.size, args.ops, args.base_port) for b in args.binary]
    print(f"ops/s, one client, collections of {args.size} elements, 3 nodes, quorum")
    print("| command | " + " | ".join(args.binary) + " |")
    print("|---|" + "---:|" * len(args.binary))
    for name in results[0]:
        print(f"| {name} | " + " | ".join(f"{r[name]:.0f}" for r in results) + " |")


if __name__ == "__main__":
    sys.exit(main())
