#!/usr/bin/env bash
# Create benchmarks/kvcache/.venv-kvpress: kvpress 0.5.5 with the transformers it accepts (>=4.56,<5.3, here 5.2.0),
# beside longkit's own venv (transformers 5.24). torch is pinned and installed first: an unpinned torch pulls a
# multi-GB CUDA build. Idempotent: an existing venv with kvpress importable is left alone.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
VENV="${KVPRESS_VENV:-$HERE/.venv-kvpress}"
PYTHON="${PYTHON:-python3}"

if [ -x "$VENV/bin/python" ] && "$VENV/bin/python" -c "import kvpress" 2>/dev/null; then
    "$VENV/bin/python" -c "import kvpress, transformers, torch; print('kvpress venv ready:', transformers.__version__, torch.__version__)"
    exit 0
fi
"$PYTHON" -m venv "$VENV"
"$VENV/bin/pip" install --quiet torch==2.13.0
"$VENV/bin/pip" install --quiet "transformers==5.2.0" "kvpress==0.5.5"
"$VENV/bin/python" -c "import kvpress, transformers, torch; print('kvpress venv ready:', transformers.__version__, torch.__version__)"
