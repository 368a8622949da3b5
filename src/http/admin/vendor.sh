#!/usr/bin/env bash
# Copies the dashboard's chart library from the npm registry into vendor/,
# at the exact version package-lock.json pins (npm ci checks the tarball
# against the lock's sha512 integrity). The files are committed, so neither
# building nor running the server needs npm.
#
#   ./vendor.sh                  refresh vendor/ from the lock
#   ./vendor.sh --upgrade 1.6.33 pin another version first, then refresh
#   ./vendor.sh --into DIR       write the files into DIR instead (the
#                                dashboard test compares DIR with vendor/)
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
out="$here/vendor"

while [ $# -gt 0 ]; do
  case "$1" in
    --upgrade)
      (cd "$here" && npm install --save-exact --package-lock-only --ignore-scripts --no-audit --no-fund "uplot@$2")
      shift 2 ;;
    --into)
      out="$2"
      shift 2 ;;
    *)
      echo "usage: $0 [--upgrade VERSION] [--into DIR]" >&2
      exit 2 ;;
  esac
done

# Install beside the sources, never in them: no node_modules to clean up,
# and concurrent runs (parallel tests) do not share one.
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
cp "$here/package.json" "$here/package-lock.json" "$work/"
(cd "$work" && npm ci --ignore-scripts --no-audit --no-fund --prefer-offline --loglevel=error)

package="$work/node_modules/uplot"
mkdir -p "$out"
cp "$package/dist/uPlot.iife.min.js" "$package/dist/uPlot.min.css" "$out/"
# The MIT licence asks that its notice travel with the copies.
cp "$package/LICENSE" "$out/LICENSE"
echo "vendored uplot $(node -p "require('$package/package.json').version") into $out"
