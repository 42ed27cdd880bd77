#!/usr/bin/env python3
"""capdb jobs against DuckDB, polars, PySpark (local mode) and plain Python, on the same data,
in one run (issue 15's `bench/mapreduce`).

Data: N keys `u:{i}` (default 10 M) holding JSON values `{"c": <one of 100>, "a": <int>,
"g": i % 1,000,000, "t": "<five words of a 1,000-word vocabulary>"}`, made deterministically.
capdb gets them over RESP (`redis-cli --pipe`) into a `cp` keyspace of one node; the others
get the same rows as columns (a Parquet file, loaded into each engine's memory before the
clock starts), and plain Python gets the JSON texts (it decodes each, as capdb does).

Jobs:

    J1  sum(a) by c            100 groups
    J2  sum(a) by g            1,000,000 groups
    J3  word count over t      1,000 groups (50 M words)
    J4  count by key prefix    1 group (capdb decodes no value)

Reported per job and engine: seconds (median of --reps after one warm-up run), rows/s, rows/s
per core (the cores the engine was given: capdb's node and polars use the machine, DuckDB runs
with 1 and 2 threads, Spark as local[2], Python 1), capdb's time to its first partial result,
and whether each answer equals DuckDB's (every group, every number).

The baselines are not in CI: install them in a bench-only environment,

    python3 -m venv /opt/mrbench && /opt/mrbench/bin/pip install duckdb polars pyspark pyarrow redis
    /opt/mrbench/bin/python bench/mapreduce.py --keys 1000000     # a quick look (~3 min)
    /opt/mrbench/bin/python bench/mapreduce.py                    # 10 M keys (~25 min)

(PySpark needs Java 17.) A baseline whose package is missing is skipped and said so.
"""

import argparse
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from cluster_vs_etcd import Fatal, Procs, fmt_table, free_ports, http_get, log  # noqa: E402

KEYSPACE = "mr"
SHARDS = 2
GROUPS_J2 = 1_000_000
VOCABULARY = 1_000
WORDS_PER_ROW = 5

JOBS = {
    "J1": ("sum(a) by c, 100 groups",
           {"map": {"group": {"json": "$.c"}, "values": {"a": {"json": "$.a"}}},
            "reduce": {"s": {"sum": "a"}}}),
    "J2": ("sum(a) by g, 1 M groups",
           {"map": {"group": {"json": "$.g"}, "values": {"a": {"json": "$.a"}}},
            "reduce": {"s": {"sum": "a"}}, "limits": {"groups_max": 2_000_000}}),
    "J3": ("word count over t",
           {"map": {"group": {"words": {"json": "$.t"}}}, "reduce": {"s": "count"}}),
    "J4": ("count by key prefix (no decode)",
           {"map": {"group": {"key_part": {"sep": ":", "index": 0}}}, "reduce": {"s": "count"}}),
}


# ---------------------------------------------------------------------------------------------
# Data

def rows(n):
    """(key, c, a, g, t) for i in 0..n, deterministic (a multiplicative hash, no RNG state)."""
    words = [f"w{j:03d}" for j in range(VOCABULARY)]
    for i in range(n):
        h = (i * 2654435761) & 0xFFFFFFFF
        c = f"c{h % 100:02d}"
        a = (h >> 8) % 1000
        t = " ".join(words[((h >> (3 * w)) + w * 7919 + i) % VOCABULARY] for w in range(WORDS_PER_ROW))
        yield f"u:{i}", c, a, i % GROUPS_J2, t


def value_json(c, a, g, t):
    return f'{{"c":"{c}","a":{a},"g":{g},"t":"{t}"}}'


LOAD_PART_ROWS = 500_000


def make_data(n, work):
    """Writes the RESP load files (one per LOAD_PART_ROWS rows), the JSON texts and the Parquet
    file; returns their paths."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    resp_paths = []
    json_path = os.path.join(work, "values.jsonl")
    parquet_path = os.path.join(work, "rows.parquet")
    schema = pa.schema([("k", pa.string()), ("c", pa.string()), ("a", pa.int64()),
                        ("g", pa.int64()), ("t", pa.string()), ("v", pa.string())])
    writer = pq.ParquetWriter(parquet_path, schema)
    select = f"*2\r\n$6\r\nSELECT\r\n${len(KEYSPACE)}\r\n{KEYSPACE}\r\n".encode()
    resp = None
    with open(json_path, "w") as js:
        cols = ([], [], [], [], [], [])
        for i, (k, c, a, g, t) in enumerate(rows(n)):
            if i % LOAD_PART_ROWS == 0:
                if resp:
                    resp.close()
                resp_paths.append(os.path.join(work, f"load-{len(resp_paths):03d}.resp"))
                resp = open(resp_paths[-1], "wb")
                resp.write(select)
            v = value_json(c, a, g, t)
            resp.write(f"*3\r\n$3\r\nSET\r\n${len(k)}\r\n{k}\r\n${len(v)}\r\n{v}\r\n".encode())
            js.write(v)
            js.write("\n")
            for col, x in zip(cols, (k, c, a, g, t, v)):
                col.append(x)
            if len(cols[0]) == 500_000:
                writer.write_table(pa.table(list(cols), schema=schema))
                cols = ([], [], [], [], [], [])
        if cols[0]:
            writer.write_table(pa.table(list(cols), schema=schema))
    if resp:
        resp.close()
    writer.close()
    return resp_paths, json_path, parquet_path


# ---------------------------------------------------------------------------------------------
# Answers: every engine's groups and numbers, made comparable

def canonical(pairs):
    """A digest of {group: number} (groups as text, numbers as integers) and its size."""
    out = {}
    for g, v in pairs:
        if isinstance(v, float):
            if v != int(v):
                raise Fatal(f"a non-integer answer {v!r} for group {g!r}")
            v = int(v)
        out[str(g)] = int(v)
    h = hashlib.sha256()
    for g in sorted(out):
        h.update(f"{g}\t{out[g]}\n".encode())
    return h.hexdigest()[:16], len(out)


# ---------------------------------------------------------------------------------------------
# Baselines: each runs in its own process (`--baseline NAME`), prints one JSON line

def baseline_main(args):
    name, job, reps = args.baseline, args.job, args.reps
    times = []
    # "-json": the engine reads the JSON texts (as capdb does), not the columns.
    json_input = name.endswith("-json")
    name = name.removesuffix("-json")
    if name.startswith("duckdb"):
        import duckdb
        con = duckdb.connect()
        con.execute(f"SET threads = {1 if name == 'duckdb1' else 2}")
        cols = "k, v" if json_input else "k, c, a, g, t"
        con.execute(f"CREATE TABLE r AS SELECT {cols} FROM read_parquet('{args.parquet}')")
        if json_input:
            q = {
                "J1": "SELECT v->>'$.c', sum(CAST(v->>'$.a' AS BIGINT)) FROM r GROUP BY 1",
                "J2": "SELECT CAST(v->>'$.g' AS BIGINT), sum(CAST(v->>'$.a' AS BIGINT)) FROM r GROUP BY 1",
                "J3": "SELECT w, count(*) FROM (SELECT unnest(string_split(v->>'$.t', ' ')) AS w FROM r) GROUP BY w",
            }[job]
        else:
            q = {
                "J1": "SELECT c, sum(a) FROM r GROUP BY c",
                "J2": "SELECT g, sum(a) FROM r GROUP BY g",
                "J3": "SELECT w, count(*) FROM (SELECT unnest(string_split(t, ' ')) AS w FROM r) GROUP BY w",
                "J4": "SELECT split_part(k, ':', 1), count(*) FROM r GROUP BY 1",
            }[job]
        run = lambda: con.execute(q).fetchall()  # noqa: E731
    elif name == "polars" and json_input:
        import polars as pl
        df = pl.read_parquet(args.parquet, columns=["k", "v"])
        v = pl.col("v")
        run = {
            "J1": lambda: df.group_by(v.str.json_path_match("$.c").alias("c"))
                            .agg(v.str.json_path_match("$.a").cast(pl.Int64).sum()).rows(),
            "J2": lambda: df.group_by(v.str.json_path_match("$.g").alias("g"))
                            .agg(v.str.json_path_match("$.a").cast(pl.Int64).sum()).rows(),
            "J3": lambda: df.select(v.str.json_path_match("$.t").str.split(" ").explode().alias("w"))
                            .group_by("w").len().rows(),
        }[job]
    elif name == "polars":
        import polars as pl
        df = pl.read_parquet(args.parquet, columns=["k", "c", "a", "g", "t"])
        run = {
            "J1": lambda: df.group_by("c").agg(pl.col("a").sum()).rows(),
            "J2": lambda: df.group_by("g").agg(pl.col("a").sum()).rows(),
            "J3": lambda: df.select(pl.col("t").str.split(" ").explode()).group_by("t").len().rows(),
            "J4": lambda: df.group_by(pl.col("k").str.split(":").list.first()).len().rows(),
        }[job]
    elif name == "spark":
        from pyspark.sql import SparkSession, functions as F
        spark = (SparkSession.builder.master("local[2]").appName("capdb-bench")
                 .config("spark.driver.memory", "8g").config("spark.ui.enabled", "false")
                 .config("spark.sql.shuffle.partitions", "4")
                 .config("spark.ui.showConsoleProgress", "false").getOrCreate())
        spark.sparkContext.setLogLevel("ERROR")
        cols = ["k", "v"] if json_input else ["k", "c", "a", "g", "t"]
        df = spark.read.parquet(args.parquet).select(*cols).cache()
        df.count()
        j = lambda path: F.get_json_object("v", path)  # noqa: E731
        run = {
            "J1": lambda: df.groupBy(j("$.c")).agg(F.sum(j("$.a").cast("long"))).collect(),
            "J2": lambda: df.groupBy(j("$.g")).agg(F.sum(j("$.a").cast("long"))).collect(),
            "J3": lambda: df.select(F.explode(F.split(j("$.t"), " ")).alias("w")).groupBy("w").count().collect(),
        }[job] if json_input else {
            "J1": lambda: df.groupBy("c").agg(F.sum("a")).collect(),
            "J2": lambda: df.groupBy("g").agg(F.sum("a")).collect(),
            "J3": lambda: df.select(F.explode(F.split("t", " ")).alias("w")).groupBy("w").count().collect(),
            "J4": lambda: df.groupBy(F.split("k", ":").getItem(0)).count().collect(),
        }[job]
    elif name == "python":
        with open(args.jsonl) as f:
            texts = f.read().splitlines()
        n = len(texts)

        def run():
            out = {}
            if job == "J4":
                for i in range(n):
                    p = f"u:{i}".split(":", 1)[0]
                    out[p] = out.get(p, 0) + 1
                return list(out.items())
            for s in texts:
                o = json.loads(s)
                if job == "J1":
                    out[o["c"]] = out.get(o["c"], 0) + o["a"]
                elif job == "J2":
                    out[o["g"]] = out.get(o["g"], 0) + o["a"]
                else:
                    for w in o["t"].split(" "):
                        out[w] = out.get(w, 0) + 1
            return list(out.items())
    else:
        raise Fatal(f"unknown baseline {name}")
    answer = run()  # warm-up
    for _ in range(reps):
        t0 = time.perf_counter()
        answer = run()
        times.append(time.perf_counter() - t0)
    digest, groups = canonical((tuple(r)[0], tuple(r)[1]) for r in answer)
    print(json.dumps({"seconds": statistics.median(times), "digest": digest, "groups": groups}))


BASELINES = [
    # (name, label, cores given, the module it needs); "-json": over the JSON texts, as capdb
    ("duckdb1-json", "DuckDB threads=1, JSON", 1, "duckdb"),
    ("duckdb2-json", "DuckDB threads=2, JSON", 2, "duckdb"),
    ("polars-json", "polars, JSON", 2, "polars"),
    ("spark-json", "PySpark local[2], JSON", 2, "pyspark"),
    ("python", "Python json.loads + dict", 1, None),
    ("duckdb1", "DuckDB threads=1, columns", 1, "duckdb"),
    ("duckdb2", "DuckDB threads=2, columns", 2, "duckdb"),
    ("polars", "polars, columns", 2, "polars"),
    ("spark", "PySpark local[2], columns", 2, "pyspark"),
]


def run_baseline(name, job, reps, parquet, jsonl, timeout):
    cmd = [sys.executable, os.path.abspath(__file__), "--baseline", name, "--job", job,
           "--reps", str(reps), "--parquet", parquet, "--jsonl", jsonl]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if p.returncode != 0:
        raise Fatal(f"{name} {job} failed:\n{p.stderr[-3000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------------------------
# capdb

def start_node(procs, binary, work, extra=()):
    resp, http, peer = free_ports(3)
    env = {k: v for k, v in os.environ.items() if not k.startswith("CAPDB_")}
    procs.start("capdb", [
        binary, "server", "--node-id", "1", "--data-dir", os.path.join(work, "capdb"),
        "--resp-addr", f"127.0.0.1:{resp}", "--http-addr", f"127.0.0.1:{http}",
        "--peer-addr", f"127.0.0.1:{peer}", "--initial-cluster", f"1=127.0.0.1:{peer}",
        # Two tasks at once: the machine's cores, as the other engines get them.
        "--job-slots", str(os.cpu_count() or 1), *extra,
    ], os.path.join(work, "capdb.log"), env=env)
    deadline = time.time() + 60
    while http_get(f"http://127.0.0.1:{http}/readyz")[0] != 200:
        procs.check_alive()
        if time.time() > deadline:
            raise Fatal("capdb not ready after 60 s")
        time.sleep(0.1)
    body = json.dumps({"name": KEYSPACE, "mode": "cp", "shards": SHARDS}).encode()
    import urllib.request
    req = urllib.request.Request(f"http://127.0.0.1:{http}/v1/keyspaces", data=body, method="POST")
    with urllib.request.urlopen(req, timeout=30) as r:
        if r.status // 100 != 2:
            raise Fatal(f"keyspace create: HTTP {r.status}")
    return resp


def r_dbsize(port):
    p = subprocess.run(["redis-cli", "-p", str(port)], input=f"SELECT {KEYSPACE}\nDBSIZE\n",
                       capture_output=True, text=True)
    lines = p.stdout.split()
    return lines[-1] if lines and lines[-1].isdigit() else "0"


def cpu_seconds(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def connect(port):
    import redis
    r = redis.Redis(port=port, decode_responses=True, socket_timeout=600)
    deadline = time.time() + 30
    while True:
        try:
            r.execute_command("SELECT", KEYSPACE)
            r.execute_command("SET", "probe", "1")
            r.delete("probe")
            return r
        except redis.RedisError:
            if time.time() > deadline:
                raise
            time.sleep(0.2)


def capdb_job(r, pid, job, run_id):
    """Runs one job; (seconds, CPU seconds of the node, first partial after s, rows)."""
    import redis
    spec = dict(JOBS[job][1])
    spec = {"id": run_id, "input": {"keyspace": KEYSPACE, "prefix": "u:"}, **spec}
    cpu0 = cpu_seconds(pid)
    t0 = time.perf_counter()
    r.execute_command("JOB", "SUBMIT", json.dumps(spec))
    first_partial = None
    last_id = "0"
    stream = f"__job:{run_id}"
    while True:
        try:
            got = r.execute_command("XREAD", "BLOCK", "1000", "STREAMS", stream, last_id)
        except redis.exceptions.TryAgainError as e:
            # Certainly not served (a read barrier timed out while the node was busy, e.g.
            # snapshotting a freshly loaded shard): read again.
            log(f"  XREAD: {e}; reading again")
            time.sleep(0.2)
            continue
        entries = []
        if isinstance(got, dict):
            entries = next(iter(got.values()))[0] if got else []
        elif got:
            entries = got[0][1]
        ended = None
        for eid, fields in entries:
            last_id = eid
            if isinstance(fields, list):
                fields = dict(zip(fields[::2], fields[1::2]))
            kind = fields.get("type")
            if kind == "partial" and first_partial is None:
                first_partial = time.perf_counter() - t0
            if kind == "final":
                ended = fields
        if ended is not None:
            break
        # A task's error is retried; the job's own end shows in its status.
        status = r.execute_command("JOB", "STATUS", run_id)
        if isinstance(status, list):
            status = dict(zip(status[::2], status[1::2]))
        if status.get("state") not in ("queued", "running", "done", None):
            raise Fatal(f"capdb job {run_id} ended without a result: {status}")
    seconds = time.perf_counter() - t0
    cpu = cpu_seconds(pid) - cpu0
    result = r.execute_command("JOB", "RESULT", run_id)
    return seconds, cpu, first_partial, json.loads(result)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--keys", type=int, default=10_000_000)
    ap.add_argument("--reps", type=int, default=2, help="timed runs per job and engine (after a warm-up)")
    ap.add_argument("--jobs", default="J1,J2,J3,J4")
    ap.add_argument("--skip", default="", help="baselines to skip, e.g. spark,python")
    ap.add_argument("--binary", default=os.path.join(os.path.dirname(__file__), "..", "target", "release", "capdb"))
    ap.add_argument("--work-dir", help="keep data and logs here (default: a temporary directory)")
    ap.add_argument("--markdown", action="store_true")
    ap.add_argument("--json-out")
    ap.add_argument("--server-arg", action="append", default=[],
                    help="an extra argument of the capdb node, e.g. --server-arg=--job-nice=0 (repeatable)")
    # Internal: one baseline run in this process.
    ap.add_argument("--baseline", help=argparse.SUPPRESS)
    ap.add_argument("--job", help=argparse.SUPPRESS)
    ap.add_argument("--parquet", help=argparse.SUPPRESS)
    ap.add_argument("--jsonl", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.baseline:
        return baseline_main(args)
    jobs = [j for j in args.jobs.split(",") if j]
    for j in jobs:
        if j not in JOBS:
            raise Fatal(f"unknown job {j}; known: {', '.join(JOBS)}")
    if not shutil.which("redis-cli"):
        raise Fatal("redis-cli is needed to load capdb (Debian: redis-tools)")
    binary = os.path.abspath(args.binary)
    work = args.work_dir or tempfile.mkdtemp(prefix="capdb-mr-")
    os.makedirs(work, exist_ok=True)
    procs = Procs()
    try:
        t0 = time.perf_counter()
        log(f"making {args.keys:,} rows in {work} ...")
        resp_paths, jsonl, parquet = make_data(args.keys, work)
        # The files just written (GBs) are written back by the kernel over the next minute:
        # flushed now, so that their writeback does not stall capdb's fsyncs (the only engine
        # here that syncs) during its first timed jobs.
        os.sync()
        log(f"  made in {time.perf_counter() - t0:.0f} s")
        port = start_node(procs, binary, work, args.server_arg)
        pid = procs.procs[0][1].pid
        t0 = time.perf_counter()
        log(f"loading capdb (redis-cli --pipe, {len(resp_paths)} parts) ...")
        # A part answered with errors (a write refused, or UNCERTAIN: a commit past its
        # deadline under the flood) is sent again whole: SET of the same value is idempotent.
        resent = []
        for path in resp_paths:
            for attempt in range(4):
                with open(path, "rb") as f:
                    p = subprocess.run(["redis-cli", "-p", str(port), "--pipe"], stdin=f,
                                       capture_output=True, text=True)
                if p.returncode == 0 and "errors: 0" in p.stdout:
                    break
                errors = next((l for l in p.stdout.splitlines() if l.startswith("errors:")), "?")
                resent.append(f"{os.path.basename(path)} ({errors.strip()})")
                log(f"  {os.path.basename(path)}: {errors.strip()}; sending it again")
            else:
                raise Fatal(f"load failed 4 times: {p.stdout[-2000:]} {p.stderr[-2000:]}")
        load_s = time.perf_counter() - t0
        n = int(r_dbsize(port))
        if n < args.keys:
            raise Fatal(f"capdb holds {n:,} keys after the load, not {args.keys:,}")
        log(f"  loaded in {load_s:.0f} s ({args.keys / load_s:,.0f} keys/s); parts sent again: "
            f"{', '.join(resent) or 'none'}")
        r = connect(port)
        skip = set(args.skip.split(","))
        results = {}  # job -> list of (engine label, cores, seconds, digest, groups, extra)
        for job in jobs:
            out = results.setdefault(job, [])
            runs = []
            answer = None
            for rep in range(args.reps + 1):
                s, cpu, first, answer = capdb_job(r, pid, job, f"{job.lower()}-{rep}-{int(time.time())}")
                log(f"  capdb {job} run {rep}: {s:.2f} s, node CPU {cpu:.2f} s, first partial "
                    f"{'-' if first is None else f'{first:.2f} s'}")
                if rep > 0:
                    runs.append((s, cpu, first))
            digest, groups = canonical((row["group"], row["s"]) for row in answer)
            s = statistics.median(x[0] for x in runs)
            cpu = statistics.median(x[1] for x in runs)
            firsts = [x[2] for x in runs if x[2] is not None]
            out.append({"engine": f"capdb job (1 node, {SHARDS} shards, {os.cpu_count()} slots)", "cores": os.cpu_count(), "seconds": s,
                        "cpu_s": cpu, "first_partial_s": max(firsts) if firsts else None,
                        "digest": digest, "groups": groups})
            procs.check_alive()
            for name, label, cores, module in BASELINES:
                if name.removesuffix("-json") in skip or (job == "J4" and name.endswith("-json")):
                    # J4 decodes no value: the JSON and column runs would be the same.
                    continue
                if module:
                    try:
                        __import__(module)
                    except ImportError:
                        log(f"  {label}: skipped ({module} is not installed)")
                        continue
                log(f"  {label} {job} ...")
                b = run_baseline(name, job, args.reps, parquet, jsonl, timeout=3600)
                out.append({"engine": label, "cores": cores, **b})
        report(results, args, load_s)
    finally:
        procs.stop_all()
        if not args.work_dir:
            shutil.rmtree(work, ignore_errors=True)


def report(results, args, load_s):
    print(f"\n{args.keys:,} keys; capdb loaded at {args.keys / load_s:,.0f} keys/s over RESP "
          f"(redis-cli --pipe, one node, cp, {SHARDS} shards); median of {args.reps} runs after a warm-up")
    headers = ["job", "engine", "s", "rows/s", "rows/s per core", "capdb per core vs", "first partial",
               "answer = DuckDB's"]
    table = []
    for job, out in results.items():
        ref = next((o for o in out if o["engine"] == "DuckDB threads=2, columns"), None)
        capdb = out[0]
        capdb_pc = args.keys / capdb["seconds"] / capdb["cores"]
        for o in out:
            per_core = args.keys / o["seconds"] / o["cores"]
            same = "-" if ref is None else ("yes" if (o["digest"], o["groups"]) == (ref["digest"], ref["groups"])
                                           else f"NO ({o['groups']} groups)")
            vs = "" if o is capdb else f"{capdb_pc / per_core:.2f}x"
            first = "" if o is not capdb or o.get("first_partial_s") is None else f"{o['first_partial_s']:.2f} s"
            table.append([f"{job} {JOBS[job][0]}" if o is capdb else "", o["engine"], f"{o['seconds']:.2f}",
                          f"{args.keys / o['seconds']:,.0f}", f"{per_core:,.0f}", vs, first, same])
        table.append([f"  (capdb node CPU {capdb['cpu_s']:.1f} s: {args.keys / capdb['cpu_s']:,.0f} rows per CPU-second)",
                      "", "", "", "", "", "", ""])
    print(fmt_table(headers, table, args.markdown))
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump({"keys": args.keys, "load_s": load_s, "results": results}, f, indent=1)


if __name__ == "__main__":
    try:
        sys.exit(main())
    except Fatal as e:
        log(f"error: {e}")
        sys.exit(1)
