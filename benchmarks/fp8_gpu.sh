#!/usr/bin/env bash
# FP8 on one GPU (issue 26), in parts that each fit a 10-minute device call; bf16 and FP8 runs
# alternate within each part, on the same device. Results go to $OUT (or ./fp8-results).
#
#   bash benchmarks/fp8_gpu.sh tests     # GPU tests: FP8 kernels vs reference, graphs vs eager, capacity   ~4 min
#   bash benchmarks/fp8_gpu.sh offline   # 8B preset generation; offline B: bf16, FP8, FP8 + FP8 KV          ~6 min
#   bash benchmarks/fp8_gpu.sh online    # Azure conversation replay, engine-direct: bf16 vs FP8 goodput       ~7 min
#   bash benchmarks/fp8_gpu.sh profile   # step profile: 192 decodes + a 512-token chunk, bf16 vs FP8          ~4 min
#   bash benchmarks/fp8_gpu.sh quality   # teacher-forced top-1 agreement of FP8 weights / FP8 KV vs bf16      ~3 min
#   bash benchmarks/fp8_gpu.sh block     # optional: offline B on the block-FP8 checkpoint (Triton GEMM)       ~3 min
#   bash benchmarks/fp8_gpu.sh all       # every part but block, one after the other
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
OUT="${OUT:-$PWD/fp8-results}"
mkdir -p "$OUT"
MODEL=llama-3.1-8b
FP8='{"quantization": "fp8"}'
FP8KV='{"quantization": "fp8", "kv_cache_dtype": "fp8"}'

gen() {  # the 8B checkpoint(s), timed (cached after the first call on this machine)
  python - "$@" <<'EOF' 2>&1 | tee -a "$OUT/preset_generation.txt"
import sys, time
from kvray.replica.models.presets import ensure_preset, preset_cache_dir
for name in sys.argv[1:]:
    cached = (preset_cache_dir(name) / "config.json").is_file()
    t = time.time(); ensure_preset(name)
    print(f"preset {name}: {'cached' if cached else f'generated in {time.time() - t:.1f} s'}", flush=True)
EOF
}

part_tests() {
  python -m pytest -m gpu -q -s tests/kernels/test_fp8_gpu.py tests/replica/test_fp8_engine_gpu.py 2>&1 | tee "$OUT/gpu_tests.txt"
}

part_offline() {
  gen "$MODEL"
  for args in '{}' "$FP8" "$FP8KV"; do
    python benchmarks/offline_throughput.py --presets "$MODEL:B" --skip-hf --repeat 2 --engine-args "$args" \
      --out "$OUT/offline_$(echo "$args" | tr -dc 'a-z0-9_' | head -c 40).json" 2>&1 | grep -v Warning | tee -a "$OUT/offline.txt"
  done
}

part_online() {
  gen "$MODEL"
  for args in '{}' "$FP8"; do
    python benchmarks/online.py --targets engine --model "kvray:$MODEL" --engine-args "$args" \
      --rates 16,20,24,28,32 --duration 12 --warmup 8 --slo 500:50 \
      --out "$OUT/online_$(echo "$args" | tr -dc 'a-z0-9_' | head -c 40)" 2>&1 | grep -v Warning | tee -a "$OUT/online.txt"
  done
}

part_profile() {
  gen "$MODEL"
  for args in '{}' "$FP8" "$FP8KV"; do
    echo "== profile_step $args" | tee -a "$OUT/profile.txt"
    python benchmarks/profile_step.py --preset "$MODEL" --batch 192 --context 1024 --steps 10 --chunks 512 \
      --engine-args "$args" 2>&1 | grep -v Warning | tee -a "$OUT/profile.txt"
  done
}

part_quality() {
  # the real SmolLM2 preset if this kvray has it, else the 8B preset against its bf16 self
  python benchmarks/fp8_quality.py ${QUALITY_MODEL:+--model "$QUALITY_MODEL"} --variants fp8-weights,fp8-kv,fp8-weights+kv --out "$OUT/quality.json" \
    2>&1 | grep -v Warning | tee "$OUT/quality.txt" || true
}

part_block() {
  gen "$MODEL-fp8-block"
  python benchmarks/offline_throughput.py --presets "$MODEL-fp8-block:B" --skip-hf --repeat 2 \
    --out "$OUT/offline_block.json" 2>&1 | grep -v Warning | tee -a "$OUT/offline.txt"
}

case "${1:-all}" in
  tests) part_tests ;;
  offline) part_offline ;;
  online) part_online ;;
  profile) part_profile ;;
  quality) part_quality ;;
  block) part_block ;;
  all) part_tests; part_offline; part_online; part_profile; part_quality ;;
  *) echo "usage: $0 tests|offline|online|profile|quality|block|all" >&2; exit 2 ;;
esac
