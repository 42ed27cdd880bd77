#!/usr/bin/env python3
"""Records HLL test vectors from a real redis-server (7.0.15) for hll.rs's ignored test.

Usage: hll_vectors.py PORT basic|crafted|big OUT [SEED] [ITERATIONS]
Start the server with --enable-debug-command yes (crafted uses DEBUG RELOAD). Each line of OUT is
the command's arguments in hex (- for empty) and, after a tab, its reply. Then:
HLL_VECTORS=OUT[,OUT...] cargo test -p capdb-data --lib hll -- --ignored --nocapture
"""
import socket
class Client:
    def __init__(self, port):
        self.s = socket.create_connection(('127.0.0.1', port))
        self.f = self.s.makefile('rb')
    def cmd(self, *args):
        args = [a if isinstance(a, bytes) else str(a).encode() for a in args]
        out = b'*%d\r\n' % len(args) + b''.join(b'$%d\r\n%s\r\n' % (len(a), a) for a in args)
        self.s.sendall(out)
        return self.read()
    def read(self):
        line = self.f.readline()[:-2]
        t, rest = line[:1], line[1:]
        if t == b'+': return ('s', rest.decode())
        if t == b'-': return ('e', rest.decode())
        if t == b':': return ('i', int(rest))
        if t == b'$':
            n = int(rest)
            if n < 0: return ('n', None)
            d = self.f.read(n + 2)[:-2]
            return ('b', d)
        if t == b'*':
            n = int(rest)
            if n < 0: return ('n', None)
            return ('a', [self.read() for _ in range(n)])
        raise Exception(line)
def render(r):
    t, v = r
    if t == 'b': return 'b:' + v.hex()
    if t == 'n': return 'n'
    if t == 'a': return 'a:' + ','.join(render(x) for x in v)
    return f'{t}:{v}'


import random, sys

PORT = int(sys.argv[1])
MODE = sys.argv[2]
sys.argv = [sys.argv[0]] + sys.argv[3:]


def basic():
    c = Client(PORT)
    c.cmd('flushall')
    out = open(sys.argv[1], 'w')
    rnd = random.Random(int(sys.argv[2]) if len(sys.argv) > 2 else 1)
    def run(*args):
        args = [a if isinstance(a, bytes) else str(a).encode() for a in args]
        r = c.cmd(*args)
        out.write(' '.join(a.hex() if a else '-' for a in args) + '\t' + render(r) + '\n')
        return r
    def elem():
        k = rnd.random()
        if k < 0.3: return str(rnd.randrange(100000)).encode()
        if k < 0.4: return b''
        return bytes(rnd.randrange(256) for _ in range(rnd.randrange(1, 34)))

    # 1. empty and single
    run('pfadd', 'e'); run('get', 'e'); run('pfcount', 'e'); run('get', 'e'); run('pfadd', 'e'); run('get', 'e')
    run('pfadd', 'one', 'x'); run('get', 'one'); run('pfcount', 'one'); run('get', 'one')
    run('pfadd', 'one', 'x'); run('get', 'one'); run('pfadd', 'one', 'y'); run('get', 'one'); run('pfcount', 'one')
    run('pfcount', 'missing'); run('pfcount', 'missing', 'e'); run('pfcount', 'one', 'one')
    # 2. growth through promotion, several keys
    for key, total in (('a', 4000), ('b', 1500), ('c', 300), ('d', 20000)):
        pool = []
        added = 0
        while added < total:
            n = rnd.randrange(1, 30) if total < 10000 else rnd.randrange(1, 400)
            batch = []
            for _ in range(n):
                if pool and rnd.random() < 0.2: batch.append(rnd.choice(pool))
                else:
                    e = elem(); pool.append(e); batch.append(e)
            run('pfadd', key, *batch)
            added += n
            if total < 10000 or rnd.random() < 0.1:
                run('get', key)
                if rnd.random() < 0.5:
                    run('pfcount', key); run('get', key)
        run('pfcount', key); run('get', key)
    run('pfcount', 'a', 'b'); run('pfcount', 'a', 'b', 'c', 'd', 'missing'); run('pfcount', 'c', 'c')
    # 3. merges
    run('pfmerge', 'm1', 'c'); run('get', 'm1'); run('pfcount', 'm1'); run('get', 'm1')
    run('pfmerge', 'm2', 'c', 'b'); run('get', 'm2')
    run('pfmerge', 'm3', 'a', 'c'); run('get', 'm3'); run('pfcount', 'm3')
    run('pfmerge', 'c', 'one'); run('get', 'c')
    run('pfmerge', 'one', 'd'); run('get', 'one'); run('pfcount', 'one'); run('get', 'one')
    run('pfmerge', 'm4'); run('get', 'm4'); run('pfmerge', 'm4'); run('get', 'm4')
    run('pfmerge', 'm5', 'missing'); run('get', 'm5')
    # 4. debug
    for k in ('b', 'c', 'e', 'a', 'm1'):
        run('pfdebug', 'encoding', k); run('pfdebug', 'decode', k)
    run('pfdebug', 'getreg', 'c'); run('get', 'c'); run('pfdebug', 'todense', 'm1'); run('get', 'm1'); run('pfdebug', 'todense', 'm1')
    run('pfdebug', 'GETREG', 'a'); run('pfdebug', 'nope', 'a'); run('pfdebug', 'nope', 'missing')
    # 5. errors
    run('set', 's', 'hello'); run('rpush', 'l', 'x')
    for k in ('s', 'l'):
        run('pfadd', k, 'a'); run('pfadd', k); run('pfcount', k); run('pfcount', 'a', k); run('pfcount', k, 'l'); run('pfmerge', k, 'a'); run('pfmerge', 'a', k); run('pfdebug', 'encoding', k)
    run('pfadd'); run('pfcount'); run('pfmerge'); run('pfdebug', 'x')
    out.close()


def crafted():
    c = Client(PORT)
    c.cmd('flushall')
    out = open(sys.argv[1], 'w')
    rnd = random.Random(int(sys.argv[2]))
    truncated = set()
    def run(*args):
        args = [a if isinstance(a, bytes) else str(a).encode() for a in args]
        r = c.cmd(*args)
        if any(a in truncated for a in args[1:]):
            # Redis keeps a byte written past the end of a truncated sparse string in memory
            # until the string is rewritten; a reload (like capdb, which stores exactly the
            # value's bytes) forgets it.
            assert c.cmd('debug', 'reload') == ('s', 'OK')
        out.write(' '.join(a.hex() if a else '-' for a in args) + '\t' + render(r) + '\n')
        return r
    def elem():
        return bytes(rnd.randrange(256) for _ in range(rnd.randrange(0, 20)))
    def header(enc, card=None, notused=b'\0\0\0'):
        if card is None:
            card = bytes(7) + b'\x80' if rnd.random() < 0.7 else rnd.randrange(1 << 63).to_bytes(8, 'little')
        return b'HYLL' + bytes([enc]) + notused + card
    def zeros(n):
        l = n - 1
        if n > 64 or (n <= 16384 and rnd.random() < 0.2): return bytes([0x40 | (l >> 8), l & 0xff])
        return bytes([l])
    def sparse_body(total=16384, density=0.05, maxval=32):
        b = bytearray(); left = total
        while left > 0:
            if rnd.random() < density:
                ln = min(left, rnd.randrange(1, 5)); v = rnd.randrange(1, maxval + 1)
                b.append(0x80 | (v - 1) << 2 | (ln - 1)); left -= ln
            else:
                ln = min(left, rnd.choice([1, 2, rnd.randrange(1, 65), rnd.randrange(1, 16385)]))
                b += zeros(ln); left -= ln
        return bytes(b)
    def dense_body(vals):
        b = bytearray(12288 + 1)
        for i, v in enumerate(vals):
            byte = i * 6 // 8; fb = i * 6 & 7
            b[byte] |= (v << fb) & 0xff
            b[byte + 1] |= v >> (8 - fb)
        return bytes(b[:12288])
    def geo(scale):
        # register values like an HLL of cardinality ~ scale
        vals = []
        for _ in range(16384):
            v = 0
            k = rnd.expovariate(1) * 16384 / max(scale, 1)
            # simplistic: pick from distribution
            x = rnd.random()
            vals.append(min(63, max(0, int(rnd.gauss(__import__('math').log2(max(scale,1)/16384+1)+1, 1.2)))) if rnd.random() > 16384/(scale+16384) else 0)
        return vals
    for it in range(int(sys.argv[3])):
        kind = rnd.randrange(7)
        k = 'k%d' % it
        if kind == 0:  # valid sparse, non-canonical, possibly big
            body = sparse_body(density=rnd.choice([0.01, 0.1, 0.5, 0.9]), maxval=rnd.choice([3, 32]))
            run('set', k, header(1) + body)
        elif kind == 1:  # corrupt sparse
            tot = rnd.choice([16383, 16385, 100, 20000, 16384 + 3])
            body = sparse_body(total=tot, density=0.1)
            if rnd.random() < 0.3 and body: body = body[:-1]
            truncated.add(k.encode())
            run('set', k, header(1) + body)
        elif kind == 2:  # dense random
            mode = rnd.randrange(4)
            if mode == 0: vals = [rnd.randrange(64) for _ in range(16384)]
            elif mode == 1: vals = [rnd.randrange(3) for _ in range(16384)]
            elif mode == 2: vals = [rnd.choice([0, 0, 0, 1, 2, 40, 50, 51, 52]) for _ in range(16384)]
            else: vals = geo(rnd.choice([10, 1000, 10**5, 10**7, 10**9, 10**12, 10**15]))
            run('set', k, header(0, notused=bytes(rnd.randrange(256) for _ in range(3))) + dense_body(vals))
        elif kind == 3:  # bad headers
            choice = rnd.randrange(5)
            if choice == 0: v = header(0) + bytes(12287)
            elif choice == 1: v = header(2) + b'\x7f\xff'
            elif choice == 2: v = b'HYLX' + header(1)[4:] + b'\x7f\xff'
            elif choice == 3: v = b'HYLL\x01' + bytes(10)
            else: v = header(0) + bytes(12289)
            run('set', k, v)
        elif kind == 4:  # normal build up with pfadd
            run('pfadd', k, *[elem() for _ in range(rnd.randrange(0, 300))])
        elif kind == 5:  # sparse near the size limit: many isolated vals
            b = bytearray(); left = 16384
            while left > 0:
                if rnd.random() < 0.5 and left >= 1:
                    b.append(0x80 | rnd.randrange(0, 32) << 2); left -= 1
                else:
                    n = min(left, rnd.randrange(1, 8)); b.append(n - 1); left -= n
                if len(b) > rnd.choice([2950, 2980, 2990, 2995, 3000, 3100]): break
            if left > 0:
                while left > 0:
                    n = min(left, 16384); b += bytes([0x40 | ((n - 1) >> 8), (n - 1) & 0xff]); left -= n
            run('set', k, header(1) + bytes(b))
        else:  # truncated final xzero
            body = sparse_body(total=16384 - 257, density=0.2) + b'\x41'
            truncated.add(k.encode())
            run('set', k, header(1) + body)
        run('get', k)
        ops = rnd.randrange(1, 6)
        for _ in range(ops):
            o = rnd.randrange(8)
            if o < 3:
                run('pfadd', k, *[elem() for _ in range(rnd.choice([1, 5, 50, 500]))])
            elif o == 3: run('pfcount', k)
            elif o == 4:
                other = 'k%d' % rnd.randrange(it + 1)
                run('pfcount', k, other)
            elif o == 5:
                other = 'k%d' % rnd.randrange(it + 1)
                run('pfmerge', k, other)
            elif o == 6:
                run('pfdebug', rnd.choice(['decode', 'encoding', 'getreg', 'todense']), k)
            else:
                other = 'k%d' % rnd.randrange(it + 1)
                run('pfmerge', 'dst%d' % it, k, other); run('get', 'dst%d' % it)
            run('get', k)
        run('pfcount', k); run('get', k)
    out.close()


def big():
    c = Client(PORT)
    c.cmd('flushall')
    out = open(sys.argv[1], 'w')
    rnd = random.Random(5)
    def run(*args):
        args = [a if isinstance(a, bytes) else str(a).encode() for a in args]
        r = c.cmd(*args)
        out.write(' '.join(a.hex() if a else '-' for a in args) + '\t' + render(r) + '\n')
        return r
    n = 0
    for step in range(300):
        batch = [b'e%d' % (n + i) for i in range(rnd.choice([100, 1000, 5000]))]
        n += len(batch)
        run('pfadd', 'big', *batch)
        run('pfcount', 'big')
        run('pfcount', 'big', 'small')
        if step % 50 == 0: run('get', 'big')
        run('pfadd', 'small', *batch[:3])
    run('get', 'big'); run('pfmerge', 'm', 'small', 'big'); run('get', 'm'); run('pfcount', 'm')
    print(n)


{'basic': basic, 'crafted': crafted, 'big': big}[MODE]()
