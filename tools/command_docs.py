#!/usr/bin/env python3
"""Regenerates crates/server/src/resp/commands/command_docs.resp, what COMMAND DOCS answers.

The documentation of every command capdb shares with Redis is Redis's own: this script asks a
local redis-server for `COMMAND DOCS` (in RESP3) of the commands a running capdb lists in
`COMMAND LIST`, keeps only the subcommands capdb answers (SUBCOMMANDS below), adds capdb's own
commands and those newer than Redis 7.0 (CAPDB_ONLY, in our words) and writes the result as one RESP3 map, exactly the reply to a bare
`COMMAND DOCS`. The server answers from it, converting maps and sets to arrays for RESP2.

Attribution: the command documentation comes from Redis (https://github.com/redis/redis,
src/commands/*.json, as served by redis-server 7.0.15), Copyright (c) 2006-2022, Salvatore
Sanfilippo and Redis contributors, under the BSD 3-Clause licence.

Usage (a capdb built from this tree listening on 6379, redis-server 7.0.15 on PATH):

    python3 tools/command_docs.py --capdb 127.0.0.1:6379

It starts and stops its own redis-server on a free port.
"""

import argparse
import os
import socket
import subprocess
import sys
import time

OUT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "crates", "server", "src", "resp",
                   "commands", "command_docs.resp")

# The subcommands capdb answers, per container command; others are left out of the docs.
SUBCOMMANDS = {
    "client": {"setname", "getname", "id", "setinfo", "info", "list"},
    "cluster": {"keyslot", "myid", "slots", "shards", "nodes", "info"},
    "command": {"count", "list", "info", "getkeys", "docs"},
    "config": {"get", "set", "resetstat", "rewrite", "help"},
    "object": {"encoding", "freq", "idletime", "refcount", "help"},
    "pubsub": {"channels", "shardchannels", "numsub", "shardnumsub", "numpat"},
    "xgroup": {"create", "setid", "destroy", "createconsumer", "delconsumer"},
    "xinfo": {"stream", "groups", "consumers"},
}


class Simple(str):
    """A RESP simple string (flags), as opposed to a bulk string."""


class Set(list):
    """A RESP3 set (in RESP2, an array)."""


def doc(summary, since, group, complexity, arguments=None):
    d = {"summary": summary, "since": since, "group": group, "complexity": complexity}
    if arguments:
        d["arguments"] = arguments
    return d


def arg(name, type_, token=None, flags=(), arguments=None):
    a = {"name": name, "type": type_}
    if token:
        a["token"] = token
    if flags:
        a["flags"] = Set(Simple(f) for f in flags)
    if arguments:
        a["arguments"] = arguments
    return a


# capdb's own commands and subcommands ("since" is the capdb version that added them), and
# commands newer than the Redis that generates the file ("since" is Redis's).
CAPDB_ONLY = {
    "changes": doc(
        "Turns a cp keyspace's change streams on or off (with their retention), lists its shard stream keys or their last IDs (capdb)",
        "0.1.0", "stream", "O(shards)",
        [arg("subcommand", "oneof", arguments=[
            arg("config", "block", arguments=[
                arg("config", "pure-token", "CONFIG"),
                arg("keyspace", "string"),
                arg("state", "oneof", arguments=[
                    arg("on", "pure-token", "ON"),
                    arg("off", "pure-token", "OFF"),
                ]),
                arg("retention", "integer", "RETENTION-MS", flags=["optional"]),
            ]),
            arg("shards", "block", arguments=[
                arg("shards", "pure-token", "SHARDS"),
                arg("keyspace", "string"),
            ]),
            arg("last", "block", arguments=[
                arg("last", "pure-token", "LAST"),
                arg("keyspace", "string"),
            ]),
        ])]),
    "job": doc(
        "Submits a MapReduce job over a cp keyspace (its spec as JSON), shows its status, reads its result, cancels it or lists jobs (capdb)",
        "0.1.0", "server", "O(1) to submit; the job runs where the data is",
        [arg("subcommand", "oneof", arguments=[
            arg("submit", "block", arguments=[
                arg("submit", "pure-token", "SUBMIT"),
                arg("spec", "string"),
            ]),
            arg("status", "block", arguments=[
                arg("status", "pure-token", "STATUS"),
                arg("id", "string"),
            ]),
            arg("result", "block", arguments=[
                arg("result", "pure-token", "RESULT"),
                arg("id", "string"),
            ]),
            arg("tasks", "block", arguments=[
                arg("tasks", "pure-token", "TASKS"),
                arg("id", "string"),
            ]),
            arg("cancel", "block", arguments=[
                arg("cancel", "pure-token", "CANCEL"),
                arg("id", "string"),
            ]),
            arg("list", "pure-token", "LIST"),
        ])]),
    "view": doc(
        "Creates, reads, verifies, lists or drops an incremental view of the connection's cp keyspace, kept current by every write (capdb)",
        "0.1.0", "server", "O(shards) to create; O(groups read) to get; O(keys) to verify",
        [arg("subcommand", "oneof", arguments=[
            arg("create", "block", arguments=[
                arg("create", "pure-token", "CREATE"),
                arg("name", "string"),
                arg("spec", "string"),
            ]),
            arg("get", "block", arguments=[
                arg("get", "pure-token", "GET"),
                arg("name", "string"),
                arg("group", "string", "GROUP", flags=["optional", "multiple", "multiple_token"]),
                arg("cursor", "string", "AFTER", flags=["optional"]),
                arg("count", "integer", "COUNT", flags=["optional"]),
            ]),
            arg("info", "block", arguments=[
                arg("info", "pure-token", "INFO"),
                arg("name", "string"),
            ]),
            arg("verify", "block", arguments=[
                arg("verify", "pure-token", "VERIFY"),
                arg("name", "string"),
            ]),
            arg("drop", "block", arguments=[
                arg("drop", "pure-token", "DROP"),
                arg("name", "string"),
            ]),
            arg("list", "pure-token", "LIST"),
        ])]),
    "consistency": doc(
        "Shows or sets the consistency level of ap reads and writes on the connection (capdb)",
        "0.1.0", "connection", "O(1)",
        [arg("operation", "oneof", flags=["optional"], arguments=[
            arg("read", "pure-token", "READ"),
            arg("write", "pure-token", "WRITE"),
        ]),
         arg("level", "oneof", flags=["optional"], arguments=[
            arg("one", "pure-token", "ONE"),
            arg("quorum", "pure-token", "QUORUM"),
            arg("all", "pure-token", "ALL"),
        ])]),
    "cluster|redirect": doc(
        "Turns -MOVED redirections on or off for the connection (capdb)", "0.1.0", "cluster",
        "O(1)",
        [arg("mode", "oneof", arguments=[
            arg("on", "pure-token", "ON"),
            arg("off", "pure-token", "OFF"),
        ])]),
}


def key_arg():
    return {"name": "key", "type": "key", "key_spec_index": 0}


def fields_arg():
    return arg("fields", "block", "FIELDS", arguments=[
        arg("numfields", "integer"),
        arg("field", "string", flags=["multiple"]),
    ])


def hash_field_expiry_docs():
    """Redis 7.4's hash field expiry commands, which Redis 7.0 cannot document (our wording)."""
    condition = arg("condition", "oneof", flags=["optional"], arguments=[
        arg(c, "pure-token", c.upper()) for c in ("nx", "xx", "gt", "lt")])
    fields_n = "O(N) where N is the number of specified fields"
    out = {}
    for name, what, time_name, time_type in [
        ("hexpire", "a number of seconds from now", "seconds", "integer"),
        ("hpexpire", "a number of milliseconds from now", "milliseconds", "integer"),
        ("hexpireat", "a Unix time in seconds", "unix-time-seconds", "unix-time"),
        ("hpexpireat", "a Unix time in milliseconds", "unix-time-milliseconds", "unix-time"),
    ]:
        out[name] = doc(f"Sets the expiration of hash fields to {what}", "7.4.0", "hash",
                        fields_n, [key_arg(), arg(time_name, time_type), condition, fields_arg()])
    for name, what in [
        ("httl", "Returns the remaining time to live of hash fields, in seconds"),
        ("hpttl", "Returns the remaining time to live of hash fields, in milliseconds"),
        ("hexpiretime", "Returns the expiration time of hash fields as a Unix time in seconds"),
        ("hpexpiretime",
         "Returns the expiration time of hash fields as a Unix time in milliseconds"),
        ("hpersist", "Removes the expiration of hash fields"),
    ]:
        out[name] = doc(what, "7.4.0", "hash", fields_n, [key_arg(), fields_arg()])
    return out


CAPDB_ONLY.update(hash_field_expiry_docs())


def command(sock, *args):
    out = b"*%d\r\n" % len(args)
    for a in args:
        a = a.encode() if isinstance(a, str) else a
        out += b"$%d\r\n%s\r\n" % (len(a), a)
    sock.sendall(out)


class Reader:
    def __init__(self, sock):
        self.sock, self.buf = sock, b""

    def line(self):
        while b"\r\n" not in self.buf:
            chunk = self.sock.recv(1 << 16)
            if not chunk:
                raise EOFError("connection closed")
            self.buf += chunk
        line, self.buf = self.buf.split(b"\r\n", 1)
        return line

    def exact(self, n):
        while len(self.buf) < n + 2:
            chunk = self.sock.recv(1 << 16)
            if not chunk:
                raise EOFError("connection closed")
            self.buf += chunk
        data, self.buf = self.buf[:n], self.buf[n + 2:]
        return data

    def value(self):
        line = self.line()
        t, rest = line[:1], line[1:]
        if t == b"+":
            return Simple(rest.decode())
        if t == b"-":
            raise RuntimeError(rest.decode())
        if t == b":":
            return int(rest)
        if t == b"$":
            return self.exact(int(rest)).decode()
        if t == b"=":  # verbatim text (INFO): "txt:" then the text
            return self.exact(int(rest))[4:].decode()
        if t == b"*":
            return [self.value() for _ in range(int(rest))]
        if t == b"~":
            return Set(self.value() for _ in range(int(rest)))
        if t == b"%":
            return {self.value(): self.value() for _ in range(int(rest))}
        if t == b"_":
            return None
        raise RuntimeError(f"unexpected RESP type {line!r}")


def encode(v):
    if isinstance(v, bool):
        raise TypeError("no booleans in command docs")
    if isinstance(v, int):
        return b":%d\r\n" % v
    if isinstance(v, Simple):
        return b"+%s\r\n" % v.encode()
    if isinstance(v, str):
        b = v.encode()
        return b"$%d\r\n%s\r\n" % (len(b), b)
    if isinstance(v, dict):
        return b"%%%d\r\n" % len(v) + b"".join(encode(k) + encode(x) for k, x in v.items())
    if isinstance(v, Set):
        return b"~%d\r\n" % len(v) + b"".join(encode(x) for x in v)
    if isinstance(v, list):
        return b"*%d\r\n" % len(v) + b"".join(encode(x) for x in v)
    raise TypeError(type(v))


def connect(addr):
    host, port = addr.rsplit(":", 1)
    s = socket.create_connection((host, int(port)), timeout=10)
    r = Reader(s)
    command(s, "HELLO", "3")
    r.value()
    return s, r


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--capdb", required=True, help="host:port of a running capdb (RESP)")
    p.add_argument("--redis-server", default="redis-server")
    p.add_argument("--out", default=OUT)
    a = p.parse_args()

    s, r = connect(a.capdb)
    command(s, "COMMAND", "LIST")
    names = sorted(r.value())
    s.close()

    port = free_port()
    redis = subprocess.Popen([a.redis_server, "--port", str(port), "--save", "", "--appendonly",
                              "no"], stdout=subprocess.DEVNULL)
    try:
        for _ in range(100):
            try:
                s, r = connect(f"127.0.0.1:{port}")
                break
            except OSError:
                time.sleep(0.05)
        else:
            sys.exit("redis-server did not start")
        command(s, "INFO", "server")
        version = next(l for l in r.value().splitlines() if l.startswith("redis_version:"))
        command(s, "COMMAND", "DOCS", *names)
        docs = r.value()
        s.close()
    finally:
        redis.terminate()
        redis.wait()

    for name, d in docs.items():
        if name in SUBCOMMANDS:
            subs = d.get("subcommands", {})
            d["subcommands"] = {k: v for k, v in subs.items()
                                if k.split("|", 1)[1] in SUBCOMMANDS[name]}
    for name, d in CAPDB_ONLY.items():
        parent, _, sub = name.partition("|")
        if sub:
            docs[parent]["subcommands"][name] = d
        else:
            docs[name] = d
    missing = [n for n in names if n not in docs]
    if missing:
        sys.exit(f"no documentation for {missing}: add them to CAPDB_ONLY")
    # Sorted, so that the file changes only when the docs do (Redis's own order varies).
    for d in docs.values():
        if "subcommands" in d:
            d["subcommands"] = {k: d["subcommands"][k] for k in sorted(d["subcommands"])}
    out = {n: docs[n] for n in sorted(docs)}
    with open(a.out, "wb") as f:
        f.write(encode(out))
    print(f"{len(out)} commands from {version}, {os.path.getsize(a.out)} bytes -> {a.out}")


if __name__ == "__main__":
    main()
