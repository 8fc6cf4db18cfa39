#!/usr/bin/env bash
# The GPU checks in one go, each under its own time limit, so that one slow part cannot hide the others' results:
#   1. adapter overhead on the real-size SD1.5 UNet at 64×64 latents (512 px), batch 4, bf16 — ours, PEFT, LyCORIS;
#   2. the toy demo's method comparison trained on the GPU (does the engine learn the concept under bf16 there?);
#   3. whole-engine throughput on a real-size SD1.5 pipeline at 512 px;
#   4. PEFT's BOFT, which compiles a CUDA extension on first use (kept last and alone for that reason);
#   5. train.compile on and off: the adapter overhead of compiled steps (ours; both UNet copies compiled, auto mode:
#      CUDA graphs) and the engine's throughput compiled against eager (targets: issue 15 — LoRA ≤ 1.15×, LoKr ≤
#      1.25×, OFT ≤ 1.4×, BOFT ≤ 2× the frozen step; compiled steps/s ≥ 1.3× eager).
#
#     bash bench/gpu_suite.sh RESULTS_DIR
set -u
out=${1:?usage: gpu_suite.sh RESULTS_DIR}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
here=$(cd "$(dirname "$0")/.." && pwd)
cd "$here"

part() {  # part NAME SECONDS COMMAND...: run with a time limit, log to NAME.log, never stop the suite
    local name=$1 limit=$2; shift 2
    local start=$SECONDS
    echo "=== $name (limit ${limit}s): $*"
    timeout --kill-after=10 "$limit" "$@" >"$out/$name.log" 2>&1
    local rc=$?
    echo "=== $name: exit $rc after $((SECONDS - start))s"
    tail -n 40 "$out/$name.log"
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, diffusers, transformers, peft, lycoris; print('torch', torch.__version__, 'diffusers', \
diffusers.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__)"

part overhead "${OVERHEAD_LIMIT:-200}" python3 bench/adapter_overhead.py --size sd15 --device cuda --dtype bf16 \
    --latent 64 --batch 4 --warmup 3 --repeats 10 --in-process --methods lora,dora,loha,lokr,oft,boft \
    --libraries ours,lycoris,peft --skip peft:boft --json "$out/overhead.json"

# The toy model is too small to keep a GPU busy (about 6 steps/s, bound by kernel launches): two methods suffice to
# show that training, saving and the concept score work there.
part toy_compare "${COMPARE_LIMIT:-150}" python3 -m trainer compare --config presets/toy_demo.toml \
    --methods lora,oft --set train.mixed_precision=\"bf16\" --out "$out/toy_compare"

part throughput "${THROUGHPUT_LIMIT:-120}" python3 bench/train_throughput.py --model sd15 --device cuda \
    --mixed-precision bf16 --resolution 512 --batch-size 4 --steps 20 --variants cache,no-cache+gc \
    --json "$out/throughput.json"

part peft_boft "${PEFT_BOFT_LIMIT:-90}" python3 bench/adapter_overhead.py --size sd15 --device cuda --dtype bf16 \
    --latent 64 --batch 4 --warmup 3 --repeats 10 --methods boft --libraries ours,peft --timeout 80 \
    --json "$out/peft_boft.json"

# Compiling takes minutes per model (Inductor autotunes and records CUDA graphs), hence the longer limits.
part overhead_compiled "${COMPILED_OVERHEAD_LIMIT:-900}" python3 bench/adapter_overhead.py --size sd15 --device cuda \
    --dtype bf16 --latent 64 --batch 4 --warmup 3 --repeats 10 --in-process --compile --methods lora,lokr,oft,boft \
    --libraries ours --json "$out/overhead_compiled.json"

part throughput_compiled "${COMPILED_THROUGHPUT_LIMIT:-600}" python3 bench/train_throughput.py --model sd15 \
    --device cuda --mixed-precision bf16 --resolution 512 --batch-size 4 --steps 30 --variants cache --compile both \
    --json "$out/throughput_compiled.json"
