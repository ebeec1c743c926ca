#!/usr/bin/env bash
# The GPU check of `cli.py plan` (issue 32), for a lent H100/H200 (no internet, no weights there): the 7B plan of
# configs/em/insecure_conscience.yaml, made on the meta device, against the same step run on the GPU with random
# weights of the real shape (`plan --device cuda`), phase by phase: the peak the tracker counts, the CUDA
# allocator's max_memory_allocated and max_memory_reserved, and what the process holds beyond torch's allocator
# (the CUDA context). This is what a CPU cannot check: the context, the allocator's rounding and fragmentation,
# kernel workspaces, and that the emulated autocast and attention kernels are CUDA's. About 3 minutes.
# Carried: .whl (the wheels the image lacks, as for bench/gpu_profile.sh) and .gpu/tokenizer (SmolLM2's tokenizer,
# saved by `python -c "from emalign.models.policy import load_tokenizer as t; t('smollm2-135m-instruct')
# .save_pretrained('.gpu/tokenizer')"`): the plan's token ids are made up, so any tokenizer with a chat template
# serves. Results: $OUT/plan_7b_cuda.json (both sides' plans and the comparison) and its log.
#   bash bench/plan_gpu.sh        # on the GPU machine, from the repository root
source bench/_gpu_env.sh
python3 bench/plan_check.py --device cuda --config configs/em/insecure_conscience.yaml --variants shipped,no-conscience \
  --set=--model.policy.init_args.model=.gpu/tokenizer \
  --set=--model_config=emalign/resources/model_configs/Qwen--Qwen2.5-Coder-7B-Instruct.json \
  --workdir /tmp/plan-work --json "$OUT/plan_7b_cuda.json" 2>&1 | tee "$OUT/plan_7b_cuda.log"
