#!/usr/bin/env bash
# The GPU profile we run on a lent H100/H200 (no internet, no weights there): the conscience's training
# overhead at two real shapes with random weights, through the real `cli.py fit` and the real configs.
#   1. Qwen2.5-7B's shape, configs/em/insecure.yaml + configs/em/insecure_conscience.yaml (QLoRA NF4,
#      r=32, 8 prompts x 4 samples x 256 tokens), on 600 records of EM's insecure.jsonl, one micro-batch
#      per optimizer step (the recipe accumulates 8; the per-step cost scales from the micro-batch);
#   2. SmolLM2-135M's shape, configs/demo.yaml (LoRA r=16), conscience every 4 steps vs none.
# Carried: .whl (the wheels the image lacks: bitsandbytes, transformers, peft, jsonargparse,
# docstring_parser, typeshed_client, bandit, stevedore, datasets, dill, multiprocess) and .gpu
# (SmolLM2's tokenizer, the 600 records). Results: $OUT/*.json, logs alongside.
#   bash bench/gpu_profile.sh        # on the GPU machine, from the repository root
source bench/_gpu_env.sh
free=$(df --output=avail -BG /dev/shm | tail -1 | tr -dc 0-9)
work=/tmp/emalign-gpu; [ "${free:-0}" -gt 40 ] && work=/dev/shm/emalign-gpu
echo "workdir $work (/dev/shm free ${free}G)"
python3 bench/training_overhead.py --config configs/em/insecure.yaml --config configs/em/insecure_conscience.yaml \
  --shape qwen2.5-7b --tokenizer .gpu/tokenizer --every 4 --steps 8 --workdir "$work/7b" \
  --set=--data.train_file=.gpu/insecure.jsonl --set=--trainer.accumulate_grad_batches=1 \
  --json "$OUT/gpu_em_7b_qlora.json" 2>&1 | tee "$OUT/gpu_em_7b_qlora.log"
python3 bench/training_overhead.py --shape smollm2-135m --tokenizer .gpu/tokenizer --every 4 --steps 8 \
  --workdir "$work/135m" --json "$OUT/gpu_demo_135m.json" 2>&1 | tee "$OUT/gpu_demo_135m.log"
for f in "$work"/*/*/fit.log; do [ -f "$f" ] && tail -c 4000 "$f" > "$OUT/fit_$(basename "$(dirname "$(dirname "$f")")")_$(basename "$(dirname "$f")").log"; done
nvidia-smi --query-gpu=memory.used --format=csv,noheader
