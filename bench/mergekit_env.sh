#!/usr/bin/env bash
# Create the venv holding the real mergekit, used by tests/test_mergekit_parity.py as the reference.
#
#   bench/mergekit_env.sh            # creates <repo>/.venv-mergekit (gitignored); exits 0 at once if it works
#
# mergekit gets its own venv because its pins (pydantic~=2.10.6, safetensors~=0.5.2, accelerate~=1.6.0)
# clash with evomerge's. torch is installed first, pinned, so that mergekit's dependency resolution never
# pulls a CUDA build: on this machine pip finds a local CPU wheel (torch==2.13.0+cpu). Elsewhere set
# MERGEKIT_TORCH_INDEX=https://download.pytorch.org/whl/cpu to fetch the CPU wheel from PyTorch's index.
#
# mergekit==0.1.4 is the default: its merge-method code (merge_methods/, sparsify.py, plan.py, config.py)
# is identical to upstream commit a6e4028, whose semantics evomerge/recipe/mergekit.py reproduces. 0.1.5 (a refactor)
# changes semantics, e.g. it drops the breadcrumbs whole-tensor zeroing and lets ties keep >= 1 element
# at tiny densities. PyPI's 0.1.4 predates mergekit's transformers-5 port and fails with transformers 5
# ("ConfiguredModuleArchitecture is not fully defined"), so it gets transformers<5 (4.57.x); mergekit only
# reads config.json with it, and the checkpoints evomerge's tiny zoo writes with transformers 5 load fine.
#
# Environment: MERGEKIT_VENV (venv path), MERGEKIT_VERSION (0.1.4), MERGEKIT_TORCH (2.13.0),
#              MERGEKIT_EXTRA (extra requirement; "transformers<5" for 0.1.4, else none),
#              MERGEKIT_TORCH_INDEX (extra index for torch), PYTHON (python3).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${MERGEKIT_VENV:-$ROOT/.venv-mergekit}"
VERSION="${MERGEKIT_VERSION:-0.1.4}"
TORCH="${MERGEKIT_TORCH:-2.13.0}"
PYTHON="${PYTHON:-python3}"
if [ "$VERSION" = "0.1.4" ]; then EXTRA="${MERGEKIT_EXTRA-transformers<5}"; else EXTRA="${MERGEKIT_EXTRA-}"; fi
start=$(date +%s)

works() {
    [ -x "$VENV/bin/mergekit-yaml" ] || return 1
    local have
    have="$("$VENV/bin/python" -c 'import importlib.metadata as m; print(m.version("mergekit"))' 2>/dev/null)" \
        || return 1
    [ "$have" = "$VERSION" ] || return 1
    # --help alone passes even when merging fails; the architecture models must also be complete.
    "$VENV/bin/python" -W ignore -c '
import mergekit.scripts.run_yaml, mergekit.merge
from mergekit.architecture.base import ConfiguredModuleArchitecture as C
assert C.__pydantic_complete__, "mergekit cannot plan merges with this transformers"' >/dev/null 2>&1
}

if works; then
    echo "mergekit $VERSION already works in $VENV ($(( $(date +%s) - start ))s)"
    exit 0
fi

if [ -e "$VENV" ]; then
    echo "removing the broken or outdated $VENV"
    rm -rf "$VENV"
fi
echo "creating $VENV with torch==$TORCH (CPU) and mergekit==$VERSION"
"$PYTHON" -m venv "$VENV"
PIP=("$VENV/bin/pip" install --quiet --disable-pip-version-check)
torch_index=()
if [ -n "${MERGEKIT_TORCH_INDEX:-}" ]; then
    torch_index=(--extra-index-url "$MERGEKIT_TORCH_INDEX")
fi
"${PIP[@]}" "${torch_index[@]}" "torch==$TORCH" 2>&1 | grep -v "^WARNING: Location" || true
"$VENV/bin/python" -W ignore -c 'import torch; assert torch.version.cuda is None, "got a CUDA torch build: " + torch.__version__' \
    || echo "warning: $VENV has a CUDA torch build; set MERGEKIT_TORCH_INDEX to use the CPU wheel" >&2
# Repeating the torch pin keeps the resolver from replacing it.
"${PIP[@]}" "mergekit==$VERSION" "torch==$TORCH" ${EXTRA:+"$EXTRA"} 2>&1 | grep -v "^WARNING: Location" || true
# torchvision / torchaudio built for another torch break imports; mergekit needs neither.
for pkg in torchvision torchaudio; do
    if "$VENV/bin/pip" show --quiet "$pkg" >/dev/null 2>&1; then
        "$VENV/bin/pip" uninstall --yes --quiet "$pkg"
    fi
done

if ! works || ! "$VENV/bin/mergekit-yaml" --help >/dev/null 2>&1; then
    echo "error: mergekit-yaml does not run in $VENV" >&2
    "$VENV/bin/mergekit-yaml" --help >&2 || true
    exit 1
fi
"$VENV/bin/python" -W ignore -c 'import torch, transformers, importlib.metadata as m; print("torch", torch.__version__, "transformers", transformers.__version__, "mergekit", m.version("mergekit"))'
echo "created $VENV in $(( $(date +%s) - start ))s"
