#!/usr/bin/env bash
# Create (once) the vLLM CPU server venv used by the annotate tests and benchmark, and print its path.
#
#   scripts/install_vllm.sh            # -> ~/.cache/facemllm/vllm-<hash>/  (FACEMLLM_CACHE overrides)
#
# The folder is keyed by a hash of scripts/vllm-requirements.txt, so changing a pin builds a new venv
# and an unchanged pin costs one `test -f`. The venv is built under a temporary name, its broken
# extras (torchvision, torchaudio, torchcodec: they fail to load beside this torch) removed, an import
# checked, a marker written, and only then renamed into place: a killed install never leaves a
# half-built venv under the final name.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
requirements="$here/vllm-requirements.txt"
cache="${FACEMLLM_CACHE:-$HOME/.cache/facemllm}"
hash="$(cat "$requirements" "$0" | sha256sum | cut -c1-12)"
target="$cache/vllm-$hash"
marker="$target/.facemllm-complete"
if [[ -f "$marker" ]]; then
  echo "$target"
  exit 0
fi
python="${PYTHON:-python3.11}"
command -v uv >/dev/null 2>&1 || "$python" -m pip install -q uv
# torch 2.13.0+cpu may come from a local wheel folder (pip's configured find-links)
find_links="$(pip config get global.find-links 2>/dev/null || true)"
find_links="${find_links:-/opt/wheels}"
extra=()
[[ -d "$find_links" ]] && extra=(--find-links "$find_links")
mkdir -p "$cache"
staging="$(mktemp -d "$cache/.vllm-tmp-XXXXXX")"
trap 'rm -rf "$staging"' EXIT
started=$(date +%s)
uv venv -q --python 3.11 "$staging" >&2
# built under a temporary name and renamed when complete: its bin/ scripts keep the temporary path
# in their shebangs, which is harmless because the project only ever runs `bin/python -m ...`
uv pip install -q --python "$staging/bin/python" "${extra[@]}" -r "$requirements" >&2
uv pip uninstall -q --python "$staging/bin/python" torchvision torchaudio torchcodec >&2 || true
"$staging/bin/python" -c "import vllm, transformers, tokenizers, torch; assert torch.__version__.startswith('2.13.0')" >&2
echo "$hash built in $(( $(date +%s) - started )) s" > "$staging/.facemllm-complete"
rm -rf "$target"
mv "$staging" "$target"
trap - EXIT
echo "$target"
