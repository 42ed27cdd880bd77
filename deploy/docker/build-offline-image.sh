#!/usr/bin/env bash
# Builds a capdb container image from an already-built binary, without pulling anything:
# FROM scratch + the binary + exactly the shared libraries `ldd` says it loads (and the dynamic
# loader), at the same paths as on this machine, + minimal /etc files, /tmp and /data.
#
#   deploy/docker/build-offline-image.sh [BINARY] [TAG]
#     BINARY  default target/release/capdb (build it with: cargo build --release -p capdb-cli)
#     TAG     default $CAPDB_IMAGE or capdb:dev
#
# The image runs as uid/gid 10001, keeps data in /data (a VOLUME), ENTRYPOINT ["capdb"], and by
# default runs one node listening on all interfaces (same CMD as deploy/docker/Dockerfile).
# It has no shell: debug with `docker run --rm IMAGE version`, `docker logs`, or the HTTP API.
set -euo pipefail

BIN=${1:-target/release/capdb}
TAG=${2:-${CAPDB_IMAGE:-capdb:dev}}
UID_GID=10001

die() { echo "build-offline-image: $*" >&2; exit 1; }

[ -f "$BIN" ] || die "no binary at '$BIN' (build it: cargo build --release -p capdb-cli)"
[ -x "$BIN" ] || die "'$BIN' is not executable"
command -v docker >/dev/null || die "docker is not installed"
command -v ldd >/dev/null || die "ldd is not installed (Debian: libc-bin)"
[ "$(head -c 4 "$BIN" | od -An -c | tr -d ' ')" = '177ELF' ] || die "'$BIN' is not an ELF executable"

STAGE=$(mktemp -d "${TMPDIR:-/tmp}/capdb-image.XXXXXX")
trap 'rm -rf "$STAGE"' EXIT
ROOT="$STAGE/rootfs"
mkdir -p "$ROOT/usr/local/bin" "$ROOT/etc" "$ROOT/tmp" "$STAGE/data"
chmod 1777 "$ROOT/tmp"
chmod 0755 "$STAGE/data"
install -m 0755 "$BIN" "$ROOT/usr/local/bin/capdb"

# Copies FILE (following symlinks) into the root at the same absolute path.
stage_file() {
  local f=$1
  [ -e "$f" ] || die "ldd names '$f', which does not exist"
  mkdir -p "$ROOT$(dirname "$f")"
  cp -L "$f" "$ROOT$f"
  echo "  + $f"
}

# `ldd` output lines:  libm.so.6 => /lib/x86_64-linux-gnu/libm.so.6 (0x...)
#                      /lib64/ld-linux-x86-64.so.2 (0x...)      <- the loader (PT_INTERP)
#                      linux-vdso.so.1 (0x...)                  <- in the kernel, nothing to copy
LDD_OUT=$(ldd "$BIN" 2>&1) || die "ldd failed (a static binary needs no libraries, but this script expects a dynamic one):
$LDD_OUT"
if grep -q 'not found' <<<"$LDD_OUT"; then
  die "missing libraries:
$LDD_OUT"
fi
echo "== libraries of $BIN"
LIBS=$(awk '
  $2 == "=>" && $3 ~ /^\// { print $3; next }   # name => /path (addr)
  $1 ~ /^\// { print $1 }                       # /path/to/loader (addr)
' <<<"$LDD_OUT" | sort -u)
[ -n "$LIBS" ] || die "ldd listed no libraries:
$LDD_OUT"
grep -q 'ld-linux' <<<"$LIBS" || die "no dynamic loader in the ldd output:
$LDD_OUT"
for lib in $LIBS; do stage_file "$lib"; done

# Name resolution (peer addresses may be DNS names): glibc >= 2.34 has the `files` and `dns`
# NSS modules built into libc.so.6; older glibc loads them with dlopen, which ldd cannot see.
GLIBC=$(getconf GNU_LIBC_VERSION 2>/dev/null | awk '{print $2}')
if [ -n "$GLIBC" ] && [ "$(printf '%s\n2.34\n' "$GLIBC" | sort -V | head -1)" != "2.34" ]; then
  LIBC_DIR=$(dirname "$(grep -m1 '/libc\.so' <<<"$LIBS")")
  for extra in libnss_files.so.2 libnss_dns.so.2 libresolv.so.2; do
    [ -e "$LIBC_DIR/$extra" ] && stage_file "$LIBC_DIR/$extra"
  done
fi

# Minimal /etc: a user for uid 10001, name resolution order. Docker bind-mounts /etc/hosts,
# /etc/resolv.conf and /etc/hostname over whatever the image has.
cat >"$ROOT/etc/passwd" <<EOF
root:x:0:0:root:/root:/sbin/nologin
capdb:x:$UID_GID:$UID_GID:capdb:/data:/sbin/nologin
nobody:x:65534:65534:nobody:/nonexistent:/sbin/nologin
EOF
cat >"$ROOT/etc/group" <<EOF
root:x:0:
capdb:x:$UID_GID:
nogroup:x:65534:
EOF
echo 'hosts: files dns' >"$ROOT/etc/nsswitch.conf"

VERSION=$("$BIN" version 2>/dev/null | awk '{print $2}') || VERSION=unknown
cat >"$STAGE/Dockerfile" <<EOF
FROM scratch
COPY rootfs/ /
COPY --chown=$UID_GID:$UID_GID data /data
ENV PATH=/usr/local/bin
LABEL org.opencontainers.image.title="capdb" \\
      org.opencontainers.image.version="${VERSION:-unknown}" \\
      org.opencontainers.image.description="capdb (offline image: scratch + binary + its shared libraries)"
USER $UID_GID:$UID_GID
WORKDIR /data
EXPOSE 6380 8080 7380
VOLUME /data
ENTRYPOINT ["capdb"]
CMD ["server", "--data-dir", "/data", "--resp-addr", "0.0.0.0:6380", "--http-addr", "0.0.0.0:8080", "--peer-addr", "0.0.0.0:7380"]
EOF

echo "== docker build -t $TAG (FROM scratch: nothing is pulled)"
# (The legacy builder is enough for COPY-only Dockerfiles; its deprecation notice is not shown.)
if ! BUILD_LOG=$(docker build -t "$TAG" "$STAGE" 2>&1); then
  echo "$BUILD_LOG" >&2
  die "docker build failed"
fi
echo "== check: docker run --rm $TAG version"
OUT=$(docker run --rm --network none "$TAG" version) || die "the image does not run: docker run --rm $TAG version failed"
echo "  $OUT"
case "$OUT" in capdb\ *) ;; *) die "unexpected output from 'capdb version': $OUT" ;; esac
echo "built $TAG ($(docker image inspect -f '{{.Size}}' "$TAG" | awk '{printf "%.1f MB", $1/1e6}'))"
