#!/usr/bin/env bash
# make test: the test suite on each host given as SPEC=LAYERS ("all", or a pytest marker expression such as
# "core or host or e2e"), one host after another (two cores: one torch process at a time). Every host is tried even
# if one fails; at the end one line per host gives its per-layer counts, or why it was not tested.
#   test_hosts.sh PYTHON SPEC=LAYERS [SPEC=LAYERS ...]
set -uo pipefail
py=$1; shift
summary=() status=0 start=$SECONDS
for entry in "$@"; do
  spec=${entry%%=*} layers=${entry#*=}
  if [[ $spec == *:* ]]; then name=custom-$(printf '%s' "$spec" | sha1sum | cut -c1-12); else name=$spec; fi
  log=.cache/setup-$name.log
  mkdir -p .cache
  if ! make --no-print-directory setup HOST="$spec" PY="$py" 2>&1 | tee "$log"; then
    why=$(grep -m1 "^setup: host .* unavailable" "$log" || echo "set-up failed (see $log)")
    summary+=("host $spec: NOT TESTED: ${why#setup: }")
    status=1
    continue
  fi
  layer_file=.cache/layers-$name.txt
  rm -f "$layer_file"
  args=(-q tests)
  [[ $layers == all ]] || args+=(-m "$layers")
  t0=$SECONDS
  RETRACE_HOST=.host/$name/ComfyUI RETRACE_LAYER_SUMMARY=$layer_file .host/$name/venv/bin/python -m pytest "${args[@]}"
  code=$?
  counts=$(cat "$layer_file" 2>/dev/null || echo "no results")
  summary+=("host $spec ($layers): $([[ $code -eq 0 ]] && echo passed || echo FAILED) in $((SECONDS - t0)) s; $counts")
  [[ $code -eq 0 ]] || status=1
done
echo
printf '%s\n' "${summary[@]}"
echo "make test: $((SECONDS - start)) s in all"
exit $status
