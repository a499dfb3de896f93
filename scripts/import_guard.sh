#!/usr/bin/env bash
# comfy-import-guard against one test host: does every comfy.* name the pack uses exist there, and does every call
# bind? The tool resolves against a git clone; the host's own tree is committed into a private one (offline).
#   import_guard.sh VENV_PYTHON HOST_DIR
set -euo pipefail
vpy=$1 host=$2
guard_dir=.cache/import-guard/$(basename "$(dirname "$host")")
if [[ ! -d $guard_dir/ComfyUI/.git || $host/comfyui_version.py -nt $guard_dir/ComfyUI/.git ]]; then
  rm -rf "$guard_dir" && mkdir -p "$guard_dir/ComfyUI"
  tar -C "$host" --exclude=./custom_nodes --exclude=./models --exclude=./output --exclude=./input --exclude=./user \
      --exclude=__pycache__ -cf - . | tar -C "$guard_dir/ComfyUI" -xf -
  git -C "$guard_dir/ComfyUI" init -q
  git -C "$guard_dir/ComfyUI" add -A
  git -C "$guard_dir/ComfyUI" -c user.name=retrace -c user.email=retrace@localhost commit -q -m "host $host"
fi
"$(dirname "$vpy")/comfy-import-guard" --cache-dir "$guard_dir" --offline --quiet check --comfy-dir "$host" \
  --target HEAD --pack retrace --no-update --strict
