#!/usr/bin/env bash
# Issue 27 on one GPU, in one command: (a) the step-time fit of the 8B shape, then (b) simulator
# fidelity and (c) overload, both from one load program per policy through HAProxy and the Router.
#
#   bash benchmarks/slo_gpu.sh OUT [POLICIES...]       (default policies: slo_aware p2c least_load)
#
# Writes into OUT: step_coeffs_llama-3.1-8b.json, step_records_llama-3.1-8b.json (a), and
# routing_program.json (every request's outcome, per policy; written after each policy),
# fidelity.{md,json,png} (measured vs simulated, the overload verdict), log.txt.
# COEFFS=path skips (a) and uses that fit; GOODPUT=x fixes G (default: the simulator's, from the fit);
# run further policies later with the same GOODPUT (and the fit copied to kvray/step_coeffs/) and
# merge the measurements on a CPU: python benchmarks/overload_sim.py --measured A.json B.json ...
# On a machine without Ray, .carry/raybundle.tar.xz (../shared/tools/device-ray-bundle.sh) and the
# wheels in .carry/whl are unpacked to /tmp/site; the Azure traces are read from .carry/traces
# unless KVRAY_AZURE_TRACES says otherwise.
set -euo pipefail
OUT=${1:?usage: bash benchmarks/slo_gpu.sh OUT [POLICIES...]}
shift
POLICIES=${*:-slo_aware p2c least_load}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if [ -z "${KVRAY_AZURE_TRACES:-}" ] && [ -d .carry/traces ]; then export KVRAY_AZURE_TRACES=$PWD/.carry/traces; fi
if ! python3 -c "import ray" 2>/dev/null; then
  mkdir -p /tmp/site
  tar -xJf .carry/raybundle.tar.xz -C /tmp/site
  if ls .carry/whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .carry/whl/*.whl
  fi
  export PATH=/tmp/site/bin:$PATH PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-}
exec > >(tee -a "$OUT/log.txt") 2>&1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
start=$(date +%s)
if [ -z "${COEFFS:-}" ]; then
  python3 benchmarks/step_records.py --preset llama-3.1-8b --out-dir "$OUT" --install
  COEFFS=$OUT/step_coeffs_llama-3.1-8b.json
fi
echo "== (a) done after $(( $(date +%s) - start )) s; coefficients: $COEFFS"
# shellcheck disable=SC2086
python3 benchmarks/routing_gpu.py --program --replicas 1 --gpus-per-replica 1 --model kvray:llama-3.1-8b \
  --max-model-len 8192 --coeffs "$COEFFS" --goodput "${GOODPUT:-auto}" --policies $POLICIES --compare-sim --out "$OUT"
echo "== done after $(( $(date +%s) - start )) s"
