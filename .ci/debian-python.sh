#!/usr/bin/env bash
# Provides a Python interpreter of the given version (3.13 or 3.14) on Debian 12 from Debian's
# own packages (the sid suite), unpacked into a cache folder outside the checkout, and prints
# its path:  bash .ci/debian-python.sh 3.14
#
# The mirror is read from this machine's apt sources, never written here. apt state and the
# download cache are private (-o Dir::State / Dir::Cache), so the system's apt is untouched.
set -euo pipefail

version="${1:?usage: debian-python.sh 3.13|3.14}"
case "$version" in
    3.13|3.14) ;;
    *) echo "debian-python: version '$version' is not one of 3.13, 3.14" >&2; exit 2 ;;
esac
tag="py${version//./}"
cache_var="ASYNCTRACE_${tag^^}_CACHE"
cache="${!cache_var:-${XDG_CACHE_HOME:-$HOME/.cache}/asynctrace/$tag}"
root="$cache/root"
py="$root/usr/bin/python$version"
libdir="$root/usr/lib/x86_64-linux-gnu"
check="import sys, venv; assert sys.version_info[:2] == (${version/./, })"

# Debian's include/python3.x/pyconfig.h includes <x86_64-linux-gnu/python3.x/pyconfig.h>, found
# under /usr/include on a real install: point it at the unpacked copy, so C extensions (the
# optional accelerator) build against this interpreter.
fix_headers() {
    local arch_config="$root/usr/include/x86_64-linux-gnu/python$version/pyconfig.h"
    [ -f "$arch_config" ] && cp "$arch_config" "$root/usr/include/python$version/pyconfig.h"
    return 0
}

if [ -x "$py" ] && "$py" -c "$check" 2>/dev/null; then
    fix_headers
    echo "$py"
    exit 0
fi

log() { echo "debian-python $version: $*" >&2; }

command -v patchelf >/dev/null || { log "installing patchelf"; apt-get install -y -qq patchelf >&2 || { apt-get update -qq >&2; apt-get install -y -qq patchelf >&2; }; }

mirror=""
for f in /etc/apt/sources.list.d/*.sources; do
    [ -f "$f" ] || continue
    mirror=$(awk '/^URIs:/ {print $2; exit}' "$f")
    [ -n "$mirror" ] && break
done
if [ -z "$mirror" ] && [ -f /etc/apt/sources.list ]; then
    mirror=$(awk '$1 == "deb" && $0 !~ /security/ {print $2; exit}' /etc/apt/sources.list)
fi
[ -n "$mirror" ] || { log "no Debian mirror found in the apt sources"; exit 1; }

rm -rf "$cache"
mkdir -p "$cache/state/lists/partial" "$cache/archives/partial" "$root"
echo "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] $mirror sid main" > "$cache/sid.list"
apt_opts=(
    -o "Dir::Etc::SourceList=$cache/sid.list"
    -o "Dir::Etc::SourceParts=/dev/null"
    -o "Dir::State=$cache/state"
    -o "Dir::State::status=$cache/state/status"
    -o "Dir::Cache=$cache"
    -o "Dir::Cache::archives=$cache/archives"
    -o "APT::Get::AllowUnauthenticated=false"
    -o "Debug::NoLocking=1"
)
: > "$cache/state/status"
log "fetching python$version from sid (about 35 MB)"
apt-get "${apt_opts[@]}" update -qq >&2
apt-get "${apt_opts[@]}" install -y -qq --download-only "python$version-venv" "python$version-dev" >&2
for deb in "$cache"/archives/*.deb; do
    dpkg -x "$deb" "$root"
done
fix_headers
patchelf --set-interpreter "$libdir/ld-linux-x86-64.so.2" --force-rpath --set-rpath "$libdir" "$py"
"$py" -c "import ssl, sqlite3; $check" >&2
echo "$py"
