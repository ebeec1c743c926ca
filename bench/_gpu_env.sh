# Sourced by the GPU scripts (gpu_profile.sh, plan_gpu.sh) on a lent GPU machine: $OUT made, the carried wheels
# (.whl) installed, the environment set, and the device and the versions it runs named.
set -u -o pipefail
OUT=${OUT:-runs/bench/gpu}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, transformers, peft, bitsandbytes as bnb; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__, 'bnb', bnb.__version__)"
