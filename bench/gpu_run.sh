#!/usr/bin/env bash
# Run bench/edit_throughput.py on a lent GPU machine (no network there).
#
#   bash bench/gpu_run.sh [bench arguments...]        (carry .whl_bench; output under $OUT)
#   BENCH_MODULE=bench.engines bash bench/gpu_run.sh [arguments...]   (another bench module, its own arguments)
#   WHL=../.whl_bench bash bench/gpu_run.sh ...       (the wheels elsewhere than ./.whl_bench)
#
# Installs the carried wheels of `datasets` (the runner's header reads its version) into /tmp/site, prints the
# versions, checks that the runner's adapter works with the image's transformers on the GPU (tiny model), and
# only if it does not, installs the carried transformers stack (the version the project is developed with); then
# checks the CUDA-only code paths (bench/cuda_checks.py: a line each, never fatal).
#
# .whl_bench (ignored through .git/info/exclude) is made here, once, with
#   d="--no-deps --only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64
#      --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform any"
#   python3 -m pip download $d -d .whl_bench/base datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19
#   python3 -m pip download $d -d .whl_bench/tf transformers==5.24.0 tokenizers==0.23.3 safetensors==0.8.0 \
#       huggingface-hub==2.4.0 hf-xet==1.8.0 httpx2==2.16.2 httpcore2==2.16.2 truststore==0.10.5
set -uo pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/bench-out}
WHL=${WHL:-.whl_bench}
BENCH_MODULE=${BENCH_MODULE:-bench.edit_throughput}
mkdir -p "$OUT"
LOG="$OUT/log"
pip_target() { python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$@"; }
pip_target "$WHL"/base/*.whl || exit 3
export PYTHONPATH=/tmp/site:$PWD

versions() {
  python3 - <<'EOF'
import importlib, platform, torch
print("python", platform.python_version(), "| torch", torch.__version__, "| cuda", torch.version.cuda,
      "|", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU")
for name in ("transformers", "tokenizers", "huggingface_hub", "datasets", "pyarrow", "yaml", "numpy"):
    try:
        print(name, importlib.import_module(name).__version__)
    except Exception as exc:  # noqa: BLE001
        print(name, "IMPORT FAILED:", repr(exc)[:300])
EOF
}

probe() {
  python3 - <<'EOF'
import numpy as np, torch
from editors.models.qwen2_audio import Qwen2AudioAdapter
from editors.models.base import Prompt
a = Qwen2AudioAdapter.tiny(0, device="cuda")
p = Prompt(question="What is the emotion?", audio=(np.random.default_rng(0).standard_normal(16000) * 0.1).astype("float32"))
b = a.prepare([p], ["happy"])
ps = [p, p.with_system("New fact.")]
graph, eager = (a.generate(ps, settings=a.generation_settings(4, engine=e)) for e in ("graph", "eager"))
whole = a.hidden_entering(b, 1)
tail = a.tail_state(whole, b.input_ids.shape[1] - 1)  # the layers get the kept columns as their cache
assert tail.first_column > 0 and abs(float(a.loss_from(tail)) - float(a.loss_from(whole))) < 1e-3
print("probe: loss_from", float(a.loss_from(a.hidden_entering(b, -1))), "| batch_loss", float(a.batch_loss(b)),
      "| tail state loss", float(a.loss_from(tail)), "| generate (graph engine)", graph, "| same as eager:",
      graph == eager)
EOF
}

{
  versions
  nvidia-smi --query-gpu=name,memory.used,memory.total,clocks.sm,clocks.max.sm --format=csv
  if probe; then
    echo "adapter works with the image's transformers"
  else
    echo "adapter failed with the image's transformers: installing the carried transformers stack"
    pip_target "$WHL"/tf/*.whl || exit 4
    versions
    probe || exit 5
  fi
  python3 -m bench.cuda_checks || echo "a CUDA-only path failed its check (above); the bench runs on"
} 2>&1 | tee "$LOG"

if [ "$BENCH_MODULE" = bench.edit_throughput ]; then
  set -- --out "$OUT/RESULTS.md" --json "$OUT/raw.json" --workdir /tmp/bench-work "$@"
fi
python3 -m "$BENCH_MODULE" "$@" 2>&1 | tee -a "$LOG"
status=${PIPESTATUS[0]}
if [ -d /tmp/bench-work ]; then  # bench.edit_throughput's per-run timing files
  tar -C /tmp/bench-work -czf "$OUT/timing.tgz" $(cd /tmp/bench-work && ls *.timing.json 2>/dev/null) 2>/dev/null
fi
exit "$status"
