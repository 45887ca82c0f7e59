#!/usr/bin/env bash
# The one fastnets wheel against several torch releases: for each, a fresh venv with that torch (plain pip),
# the wheel installed with --no-deps, and the smoke test run from outside the source tree: import, every op
# registered with its schema, fastnets.info, opcheck on the fake kernels (meta tensors; no GPU needed).
# Prints a Markdown table; FASTNETS_MATRIX_WRITE=1 also puts it between the wheel-matrix markers of docs/install.md
# (FASTNETS_MATRIX_PAGE=PATH: that page instead). Not part of CI: each torch is a multi-GB download.
#
#   tools/wheel_matrix.sh [WHEEL] [TORCH_VERSION...]
#   default: the newest dist/fastnets-*-abi3-*.whl; torch 2.10.0 2.11.0 2.14.1 2.15.0
#   FASTNETS_MATRIX_DIR  where the venvs go (default: a temporary folder, removed at the end)
#   FASTNETS_MATRIX_SYSTEM_TORCH=1  the leg whose version matches the running torch reuses it
#                                   (--system-site-packages) instead of downloading it again
set -uo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
wheel="${1:-$(ls -t "$repo"/dist/fastnets-*-abi3-*.whl 2>/dev/null | head -1)}"
[ -n "$wheel" ] && [ -f "$wheel" ] || { echo "no wheel: run \`pip wheel --no-build-isolation --no-deps -w dist .\` first" >&2; exit 2; }
shift || true
versions=("$@")
[ ${#versions[@]} -gt 0 ] || versions=(2.10.0 2.11.0 2.14.1 2.15.0)
work="${FASTNETS_MATRIX_DIR:-$(mktemp -d)}"
[ -n "${FASTNETS_MATRIX_DIR:-}" ] || trap 'rm -rf "$work"' EXIT
python="${FASTNETS_PYTHON:-python3}"
system_torch="$("$python" -c 'import torch; print(torch.__version__.split("+")[0])' 2>/dev/null || true)"
smoke="$repo/tools/wheel_smoke.py"

rows=()
for v in "${versions[@]}"; do
  venv="$work/torch-$v"
  log="$work/torch-$v.log"
  if [ "${FASTNETS_MATRIX_SYSTEM_TORCH:-0}" = 1 ] && [ "$v" = "$system_torch" ]; then
    "$python" -m venv --system-site-packages "$venv" >"$log" 2>&1
  else
    "$python" -m venv "$venv" >"$log" 2>&1 && "$venv/bin/pip" install -q "torch==$v" numpy >>"$log" 2>&1
  fi
  if [ $? -ne 0 ]; then
    rows+=("| $v | - | install of torch $v failed (see $log) |")
    continue
  fi
  "$venv/bin/pip" install -q --no-deps --force-reinstall "$wheel" >>"$log" 2>&1 || { rows+=("| $v | - | wheel install failed |"); continue; }
  # from a neutral folder, so that `import fastnets` is the installed wheel, not the source tree
  result="$(cd "$work" && "$venv/bin/python" "$smoke" 2>>"$log")"
  rc=$?
  [ -n "$result" ] || result="| $v | FAIL | smoke test crashed (see $log) |"
  [ $rc -eq 0 ] || echo "torch $v: FAILED, log in $log" >&2
  rows+=("$result")
done
table="$(echo "| torch | result | details |"; echo "|---|---|---|"; printf '%s\n' "${rows[@]}")"
echo "wheel: $(basename "$wheel")"
echo
echo "$table"
if [ "${FASTNETS_MATRIX_WRITE:-0}" = 1 ]; then
  echo "$table" | "$python" "$repo/tools/docs_block.py" wheel-matrix ${FASTNETS_MATRIX_PAGE:+--page "$FASTNETS_MATRIX_PAGE"} || exit 1
fi
