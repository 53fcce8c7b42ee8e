#!/bin/sh
# `make deb`: build otad's Debian packages from a clean copy of the tree.
#
#   tests/deb/build-debs.sh [OUT_DIR]      (default build/deb)
#
# The working tree's files that git knows or would add (tracked plus untracked,
# not ignored) are copied into OUT_DIR/otad/ and built there with
# `dpkg-buildpackage -us -uc -b`, so debhelper's files never land in the
# shared source tree. The .debs, .buildinfo and .changes end up in OUT_DIR.
# Missing build dependencies are installed with apt-get (as root), so a fresh
# machine works. lintian runs last and fails the build on any error.
set -eu
cd "$(dirname "$0")/../.."
out=${1:-build/deb}
src=$out/otad

rm -rf "$out"
mkdir -p "$src"
src=$(cd "$src" && pwd)  # absolute: apt-get build-dep takes a folder only as /path or ./path
# --ignore-failed-read: a tracked file deleted in the working tree is not copied.
git ls-files -z --cached --others --exclude-standard \
    | tar --null -T - --ignore-failed-read -cf - 2>/dev/null \
    | tar -C "$src" -xf -

if ! (cd "$src" && dpkg-checkbuilddeps >/dev/null 2>&1); then
    if [ "$(id -u)" != 0 ]; then
        echo "make deb: build dependencies are missing; install them as root:" >&2
        (cd "$src" && dpkg-checkbuilddeps) || true
        echo "  apt-get build-dep $src" >&2
        exit 1
    fi
    echo "make deb: installing the missing build dependencies with apt-get"
    apt-get update -q || true
    DEBIAN_FRONTEND=noninteractive apt-get build-dep -y -q "$src"
fi

# Debian's own tools and interpreter only (no pyenv or /usr/local shims).
(cd "$src" && env PATH=/usr/sbin:/usr/bin:/sbin:/bin dpkg-buildpackage -us -uc -b)

echo "make deb: lintian"
if ! PATH=/usr/sbin:/usr/bin:/sbin:/bin command -v lintian >/dev/null; then
    if [ "$(id -u)" != 0 ]; then
        echo "make deb: lintian is missing; install it as root: apt-get install lintian" >&2
        exit 1
    fi
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends lintian
fi
env PATH=/usr/sbin:/usr/bin:/sbin:/bin lintian --fail-on error "$out"/otad_*.changes || {
    echo "make deb: lintian reports errors (above)" >&2
    exit 1
}
ls -l "$out"/*.deb
