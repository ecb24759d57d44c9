#!/usr/bin/env bash
# The python runtime's GPU check: the in-process runtime tests (families, scaled rotary, sliding windows, padded
# vocabularies, eos sets, sampling, beam search, pipeline stages, GGUF sources) with every shard directory loaded
# on CUDA (tests/conftest.py FT_TEST_DEVICE), against HF transformers on the CPU. Needs a CUDA GPU, torch and transformers;
# the project's other pure-python dependencies may come as wheels in .whl/ (installed to /tmp/site, offline).
set -uo pipefail
cd "$(dirname "$0")/.."
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || exit 1
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, transformers; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(),
'transformers', transformers.__version__)"
FT_TEST_DEVICE=cuda python3 -m pytest -q -p no:cacheprovider -m "not triton and not slow and not slurm" "$@" \
  tests/test_families.py tests/test_rope_scaling.py tests/test_padded_vocab.py tests/test_generation_config.py \
  tests/test_runtime_inprocess.py tests/test_generate.py tests/test_pipeline.py tests/test_sources.py \
  tests/test_gguf.py tests/test_gguf_qwen2.py tests/test_gguf_sentencepiece.py
