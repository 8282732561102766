#!/usr/bin/env bash
# Refresh tests/oracle/ from an oracle folder (default: ../shared/oracle beside the checkout).
#
# The tests read ComfyUI's reference outputs, workflows and the model generators from tests/oracle/,
# so a clone runs every test with nothing beside it. Run this when the oracle changes, then commit
# tests/oracle/ (PROVENANCE lists every file's sha256, so `git diff` shows what changed).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
src="$(cd "${1:-$root/../shared/oracle}" && pwd)"
dest="$root/tests/oracle"
[ -f "$src/README.md" ] || { echo "no oracle at $src (expected its README.md)" >&2; exit 1; }
tmp="$(mktemp -d "$root/tests/.oracle.XXXXXX")"
trap 'rm -rf "$tmp"' EXIT
# Everything but caches: the generators must stay beside the refs they describe.
tar -C "$src" --exclude=__pycache__ --exclude='*.pyc' -cf - . | tar -C "$tmp" -xf -
{
  echo "A copy of the oracle: ComfyUI's reference outputs, workflows and the scripts that generate"
  echo "the random-weight mini models. Refreshed by scripts/refresh_oracle.sh; do not edit by hand."
  echo "source: $src"
  echo "copied: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  commit="$(git -C "$src" log -1 --format='%H %cI' -- . 2>/dev/null || true)"
  [ -z "$commit" ] || echo "source commit: $commit"
  echo "files (sha256, path):"
  (cd "$tmp" && find . -type f -print0 | sort -z | xargs -0 sha256sum)
} > "$root/tests/.oracle.PROVENANCE"
mv "$root/tests/.oracle.PROVENANCE" "$tmp/PROVENANCE"
rm -rf "$dest"
mv "$tmp" "$dest"
trap - EXIT
echo "tests/oracle/ refreshed from $src ($(find "$dest" -type f | wc -l) files)"
