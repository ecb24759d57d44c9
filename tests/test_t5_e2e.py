"""Encoder-decoder (T5) end to end: HF T5 checkpoint -> FT T5 shards -> model repository (preprocessing, the python
runtime's T5 model, postprocessing, ensemble) -> a real tritonserver; text in, text out equals HF transformers'
`tok.decode(model.generate(**tok(prompt))[0], skip_special_tokens=True)` with the same spiece.model read by
transformers' T5Tokenizer (the independent reference), and the LAMBADA seq2seq scoring served vs HF in process.

One tritonserver for the module: original T5 (relu, tied) at TP 1 behind `ensemble`, T5 v1.1-like (gated-gelu,
untied lm_head) at TP 2 behind `ensemble_gated`, and the original T5 exported decoupled (streaming) as `t5_stream`
behind `ensemble_stream`; all share the tokenizer, so pre/postprocessing are shared.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from family_fixtures import T5_VOCAB, build_t5

transformers = pytest.importorskip("transformers")
spm = pytest.importorskip("sentencepiece")

LAMBADA = Path(__file__).resolve().parents[1] / "exporter" / "data" / "lambada_test.jsonl"
EXTRA_IDS = 4  # sentinels <extra_id_3> .. <extra_id_0> after the pieces, as T5's tokenizer adds them
PIECES = T5_VOCAB - EXTRA_IDS  # the tokenizer's ids fill the model's vocabulary exactly
PROMPTS = ("The capital of France is", "she said, looking at the door", "He smiled")
NEW_TOKENS = 6
VARIANTS = {"t5_relu": (False, 1, "ensemble"), "t5_gated": (True, 2, "ensemble_gated")}  # gated, TP, ensemble
STREAM_MODEL, STREAM_ENSEMBLE = "t5_stream", "ensemble_stream"  # t5_relu exported with decoupled=true


def train_spiece(directory: Path) -> Path:
    """A tiny T5-style SentencePiece Unigram model (pad 0, eos 1, unk 2, no bos) trained on LAMBADA lines, with the
    tokenizer_config.json transformers reads (T5Tokenizer, extra_ids)."""
    directory.mkdir(parents=True, exist_ok=True)
    lines = [json.loads(line)["text"] for line in LAMBADA.read_text(encoding="utf-8").splitlines()[:400]]
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_prefix=str(directory / "spiece"),
                                   vocab_size=PIECES, model_type="unigram", pad_id=0, eos_id=1, unk_id=2, bos_id=-1,
                                   character_coverage=1.0, minloglevel=2)
    (directory / "spiece.vocab").unlink()
    (directory / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "T5Tokenizer",
                                                                 "extra_ids": EXTRA_IDS}))
    return directory


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory) -> Path:
    return train_spiece(tmp_path_factory.mktemp("t5-tokenizer"))


def input_sensitive(directory: Path) -> Path:
    """A random tiny T5 answers one token whatever its input (the decoder start token's embedding dominates the
    decoder output): the start / pad row shrunk and the encoder's output projections scaled up make its first
    answers differ between LAMBADA contexts, so equal served and reference predictions mean something."""
    from safetensors.torch import load_file, save_file

    weights = load_file(directory / "model.safetensors")
    weights["shared.weight"][0] *= 0.05
    for name in weights:
        if name.startswith("encoder.") and name.endswith("o.weight"):  # attention `o` and feed-forward `wo`
            weights[name] = weights[name] * 3
    save_file(weights, directory / "model.safetensors", metadata={"format": "pt"})
    return directory


@pytest.fixture(scope="module")
def checkpoints(tokenizer_dir, tmp_path_factory) -> dict[str, Path]:
    found = {}
    for name, (gated, _, _) in VARIANTS.items():
        directory = input_sensitive(build_t5(tmp_path_factory.mktemp(name), gated=gated))
        for file in tokenizer_dir.iterdir():
            shutil.copy2(file, directory / file.name)
        found[name] = directory
    return found


def reference_tokenizer(checkpoint: Path):
    return transformers.AutoTokenizer.from_pretrained(str(checkpoint))


def test_served_tokenizer_encodes_and_decodes_as_t5_tokenizer(checkpoints, tmp_path):
    """The served tokenizer.json rebuilt from spiece.model gives transformers' T5Tokenizer ids (</s> appended, no
    bos, sentinels last) and its decode(skip_special_tokens=True), on LAMBADA lines and odd text."""
    from exporter.tokenizer import load_tokenizer

    checkpoint = checkpoints["t5_relu"]
    ours, reference = load_tokenizer(checkpoint), reference_tokenizer(checkpoint)
    assert type(reference).__name__ == "T5Tokenizer" and len(reference) == T5_VOCAB
    texts = [json.loads(line)["text"] for line in LAMBADA.read_text(encoding="utf-8").splitlines()[2000:2200]]
    texts += ["  two  spaces <extra_id_0> and é ü 日本 </s> end", "", "<pad>x"]
    for text in texts:
        ids = reference(text).input_ids
        assert ours.encode(text).ids == ids, text
        assert ours.decode(ids, skip_special_tokens=True) == reference.decode(ids, skip_special_tokens=True), text


@pytest.fixture(scope="module")
def served(checkpoints, tmp_path_factory):
    """(repository, TritonServer): both variants, and t5_relu exported decoupled, by the pipeline into one
    repository and served."""
    pytest.importorskip("tritonclient.http")
    from exporter.parallel import ParallelLayout
    from exporter.runtimes import ModelSettings
    from exporter.serve.tritonserver import TritonServer
    from exporter.stages.export import build_repository
    from exporter.triton import render
    from serving_fixtures import tritonserver_or_skip

    install = tritonserver_or_skip()
    root = tmp_path_factory.mktemp("t5-served")
    repositories = {}
    for name, (_, tp, _) in VARIANTS.items():
        settings = ModelSettings(name=name, runtime="python", max_batch_size=4, layout=ParallelLayout(tp, 1),
                                 data_type="fp32", device="cpu", max_beam_width=4)
        repositories[name] = build_repository(root / f"repo_{name}", checkpoints[name], settings, "fp32")
    settings = ModelSettings(name=STREAM_MODEL, runtime="python", max_batch_size=4, layout=ParallelLayout(1, 1),
                             data_type="fp32", device="cpu", max_beam_width=4, decoupled=True)
    streaming = build_repository(root / "repo_stream", checkpoints["t5_relu"], settings, "fp32")
    repo = repositories["t5_relu"]
    shutil.copytree(repositories["t5_gated"] / "t5_gated", repo / "t5_gated")
    shutil.copytree(streaming / STREAM_MODEL, repo / STREAM_MODEL)
    for text_model in ("preprocessing", "postprocessing"):  # one pair serves the plain and the streaming ensembles
        assert ((streaming / text_model / "config.pbtxt").read_text()
                == (repo / text_model / "config.pbtxt").read_text()), text_model
    (repo / STREAM_ENSEMBLE / "1").mkdir(parents=True)
    (repo / STREAM_ENSEMBLE / "config.pbtxt").write_text(
        (streaming / "ensemble" / "config.pbtxt").read_text().replace('name: "ensemble"', f'name: "{STREAM_ENSEMBLE}"',
                                                                      1))
    ensemble = render.encoder_decoder_ensemble_config("t5_gated", 4)
    ensemble.name = "ensemble_gated"
    (repo / "ensemble_gated" / "1").mkdir(parents=True)
    render.write_config(ensemble, repo / "ensemble_gated")
    with TritonServer(repo, root / "tritonserver.log", install=install, startup_timeout_s=240) as server:
        yield repo, server


def infer_text(url: str, ensemble: str, prompts, new_tokens: int, beam_width: int = 1):
    from exporter.clients import common

    arrays = {"INPUT_0": np.array([[p.encode()] for p in prompts], dtype=object),
              "INPUT_1": np.full((len(prompts), 1), new_tokens, dtype=np.uint32),
              "beam_width": np.full((len(prompts), 1), beam_width, dtype=np.uint32)}
    return common.infer(url, "http", ensemble, arrays)


def hf_texts(checkpoint: Path, prompts, new_tokens: int, beams: int = 1) -> list[str]:
    import torch

    tokenizer = reference_tokenizer(checkpoint)
    model = transformers.T5ForConditionalGeneration.from_pretrained(str(checkpoint)).eval()
    texts = []
    with torch.inference_mode():
        for prompt in prompts:  # one prompt at a time, unpadded, as people run it
            out = model.generate(**tokenizer(prompt, return_tensors="pt"), max_new_tokens=new_tokens,
                                 do_sample=False, num_beams=beams, length_penalty=1.0)
            texts.append(tokenizer.decode(out[0], skip_special_tokens=True))
    return texts


@pytest.mark.triton
@pytest.mark.parametrize("beams", [1, 3], ids=["greedy", "beam3"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_ensemble_text_equals_hf_generate(served, checkpoints, variant, beams):
    """Text in -> text out through preprocessing (T5Tokenizer's ids, </s> appended), the T5 model (TP 1 relu, TP 2
    gated) and postprocessing (generated tokens only, special tokens skipped) equals HF generate's decoded text."""
    _, server = served
    result = infer_text(server.http_url, VARIANTS[variant][2], PROMPTS, NEW_TOKENS, beams)
    expected = hf_texts(checkpoints[variant], PROMPTS, NEW_TOKENS, beams)
    assert [result["OUTPUT_0"][row, 0].decode() for row in range(len(PROMPTS))] == expected
    assert any(expected), "every reference text is empty: the comparison would prove nothing"


@pytest.mark.triton
def test_streamed_text_grows_to_hf_generate_text_and_ends_as_the_plain_result(served, checkpoints):
    """The decoupled T5 export streams: the model answers once per decoding step (is_final false, prompt_lengths 0,
    its generated tokens so far) and its final response is the plain model's result; the streaming ensemble's
    text only grows (each piece appended to the text so far) and ends with HF generate's greedy text."""
    from exporter.clients import common

    _, server = served
    tokenizer = reference_tokenizer(checkpoints["t5_relu"])
    expected = hf_texts(checkpoints["t5_relu"], PROMPTS, NEW_TOKENS)
    assert any(expected), "every reference text is empty: the comparison would prove nothing"
    for prompt, text in zip(PROMPTS, expected):
        ids = tokenizer(prompt).input_ids
        arrays = {"input_ids": np.array([ids], dtype=np.uint32),
                  "sequence_length": np.array([[len(ids)]], dtype=np.uint32),
                  "max_output_len": np.array([[NEW_TOKENS]], dtype=np.uint32)}
        names = ["output_ids", "sequence_length", "cum_log_probs", "output_log_probs"]
        plain = common.infer(server.http_url, "http", "t5_relu", arrays, output_names=names)
        *partial, final = common.stream(server.grpc_url, STREAM_MODEL, arrays,
                                        output_names=names + ["prompt_lengths", "is_final"])
        for name in names:
            np.testing.assert_array_equal(final[name], plain[name], err_msg=name)
        assert final.final and final["is_final"].all() and not final["prompt_lengths"].any()
        assert len(partial) == int(plain["sequence_length"][0, 0])  # one response per generated token
        for step, response in enumerate(partial, start=1):
            assert not response.final and not response["is_final"].any() and not response["prompt_lengths"].any()
            assert response["output_ids"].shape == (1, 1, step)
            np.testing.assert_array_equal(response["output_ids"][0, 0], plain["output_ids"][0, 0, :step])

        texts = [response["OUTPUT_0"][0, 0].decode() for response in common.stream(
            server.grpc_url, STREAM_ENSEMBLE, {"INPUT_0": np.array([[prompt.encode()]], dtype=object),
                                               "INPUT_1": np.array([[NEW_TOKENS]], dtype=np.uint32)},
            output_names=["OUTPUT_0"])]
        assert len(texts) > 1, "the ensemble did not stream"
        # each response's text is the previous one plus its new piece, and the pieces add up to HF's text
        assert all(after.startswith(before) for before, after in zip(texts, texts[1:])), texts
        assert texts[-1] == text, (texts, text)


@pytest.mark.triton
@pytest.mark.parametrize("variant, mode_token", [("t5_relu", None), ("t5_gated", "[NLG]")])
def test_lambada_seq2seq_served_equals_hf(served, checkpoints, variant, mode_token, tmp_path):
    """The accuracy sub-stage on an encoder-decoder: LAMBADA as seq2seq (context + </s> into the encoder, the last
    word answered by the decoder; UL2's mode token before the context when set), served through tritonserver vs HF
    transformers' T5 in process on its own tokenizer's ids: same ids, same predictions, parity passed, results JSON."""
    from test_config import composed

    from exporter.config import validate
    from exporter.stages.export import accuracy

    repo, server = served
    overrides = [f"base_results_dir={tmp_path}", f"export.model.checkpoint_path={checkpoints[variant]}",
                 f"export.triton_deployment.triton_model_dir={repo / variant}",
                 f"export.model.tensor_model_parallel_size={VARIANTS[variant][1]}",
                 "export.triton_deployment.max_batch_size=4", "export.accuracy.limit=8",
                 "export.accuracy.batch_size=4", f"export.accuracy.output_path={tmp_path}/eval.json"]
    if mode_token:
        overrides.append(f"export.accuracy.mode_token='{mode_token}'")
    results = accuracy(validate(composed(*overrides)), server_url=f"http://{server.http_url}",
                       server_grpc_url=server.grpc_url)
    assert json.loads((tmp_path / "eval.json").read_text()) == results
    assert results["task"] == {"kind": "seq2seq", "mode_token": mode_token or ""}
    assert (results["parity"], results["passed"], results["reference_ids"]) == ("passed", True, "its own tokenizer's")
    for metric, entry in results["metrics"].items():
        assert entry["same_ids_as_reference"] == 1.0, metric
        assert entry["served_predictions"] == entry["reference_predictions"], metric
        assert len({tuple(row) for row in entry["served_predictions"]}) > 1, f"{metric}: one answer for every example"


def test_seq2seq_examples_put_the_context_in_the_encoder(checkpoints):
    """LAMBADA's seq2seq rule with T5's own tokenizer: encoder ids = tok(mode token + context) (</s> last), label =
    tok(last word) without special tokens; truncation drops the context's oldest tokens, never the </s>."""
    from exporter.evaluate import lambada

    tokenizer = reference_tokenizer(checkpoints["t5_relu"])
    encoder = lambada.Encoder(lambda text, special: tokenizer(text, add_special_tokens=special).input_ids)
    text = "she opened the door and saw her old friend john"
    [example] = lambada.build_examples([text], encoder, "last_word", 512, lambada.Seq2Seq("[NLG]"))
    assert example.context == tokenizer("[NLG] she opened the door and saw her old friend").input_ids
    assert example.label == tokenizer("john", add_special_tokens=False).input_ids
    [short] = lambada.build_examples([text], encoder, "last_word", 4, lambada.Seq2Seq())
    assert short.context == tokenizer("she opened the door and saw her old friend").input_ids[-4:]
    assert short.context[-1] == tokenizer.eos_token_id


@pytest.mark.slow
@pytest.mark.triton
def test_main_exports_and_scores_a_t5_checkpoint(checkpoints, tmp_path):
    """`python main.py export.model.checkpoint_path=<t5 dir>`: convert (shards, the T5 model, the text ensemble),
    then the accuracy sub-stage's own tritonserver, LAMBADA as seq2seq with parity against HF (before, the run
    stopped after the shards)."""
    import subprocess
    import sys

    from serving_fixtures import tritonserver_or_skip

    tritonserver_or_skip()
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run(
        [sys.executable, "main.py", f"base_results_dir={tmp_path}",
         f"export.model.checkpoint_path={checkpoints['t5_relu']}", "export.run.model_train_name=t5tiny",
         "export.triton_deployment.device=cpu", "export.accuracy.limit=4", "export.accuracy.batch_size=4"],
        cwd=root, capture_output=True, text=True, timeout=900,
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-3000:]
    [results_file] = tmp_path.glob("t5tiny/*/eval_output.json")
    results = json.loads(results_file.read_text())
    assert (results["task"]["kind"], results["parity"], results["examples"]) == ("seq2seq", "passed", 4)


def test_plan_refuses_what_an_encoder_decoder_repository_cannot_do(checkpoints, tmp_path):
    """Refused when planning, before any job or file exists: the OpenAI front end (decoder models only), a T5
    checkpoint without a tokenizer. A streaming (decoupled) T5 export is planned (it was refused before streaming
    for T5 existed)."""
    from test_config import composed

    from exporter.config import ConfigError, validate
    from exporter.stages.export import plan
    from exporter.tokenizer import TokenizerError

    def planned(checkpoint, *overrides):
        return plan(validate(composed(f"base_results_dir={tmp_path}", f"export.model.checkpoint_path={checkpoint}",
                                      *overrides)))

    assert [stage.name for stage in planned(checkpoints["t5_relu"])] == ["convert", "accuracy"]
    assert [stage.name for stage in planned(checkpoints["t5_relu"], "export.triton_deployment.decoupled=true",
                                            "export.accuracy.enabled=false")] == ["convert"]
    with pytest.raises(ConfigError, match="export.openai.enabled"):
        planned(checkpoints["t5_relu"], "export.openai.enabled=true")
    bare = shutil.copytree(checkpoints["t5_relu"], tmp_path / "bare")
    for name in ("spiece.model", "tokenizer_config.json"):
        (bare / name).unlink()
    with pytest.raises(TokenizerError, match="spiece.model"):
        planned(bare)
    assert not list(tmp_path.glob("*/*/model_repo"))


def test_slurm_dry_run_of_t5_follows_the_multi_node_rules(checkpoints, tmp_path, monkeypatch):
    """Issue 13 item 6: the launchers plan an encoder-decoder as they plan a GPT. FT's backend at TP 4 x PP 2 on
    4-GPU nodes: a one-task CPU convert job, a two-node accuracy job with one tritonserver per node in one MPI world
    and the client on the first node, the world-size rule written out; nothing converted by a dry run."""
    from test_launch import commands, directives, dry_run

    # FT's backend computes relative attention with a max distance of 128 only (the fixtures use 16): a copy that
    # says 128, which the FT runtime accepts.
    checkpoint = tmp_path / "t5_relu_128"
    shutil.copytree(checkpoints["t5_relu"], checkpoint)
    config = json.loads((checkpoint / "config.json").read_text())
    config["relative_attention_max_distance"] = 128
    (checkpoint / "config.json").write_text(json.dumps(config))
    results = dry_run(tmp_path, monkeypatch, "cluster_type=bcm", f"export.model.checkpoint_path={checkpoint}",
                      "export.run.model_train_name=t5tiny", "export.model.tensor_model_parallel_size=4",
                      "export.triton_deployment.pipeline_model_parallel_size=2",
                      "export.triton_deployment.runtime=fastertransformer", "cluster.gpus_per_node=4")
    convert = directives(results / "convert" / "launcher.sh")
    assert convert["--nodes"] == "1" and "--gpus-per-node" not in convert
    accuracy_script = results / "accuracy" / "launcher.sh"
    accuracy = directives(accuracy_script)
    assert (accuracy["--nodes"], accuracy["--ntasks-per-node"], accuracy["--gpus-per-node"]) == ("2", "1", "4")
    server, client = commands(accuracy_script, "srun")
    assert "--mpi=pmix" in server and server[-1] == "&" and "tritonserver" in server
    entry = client.index("exporter.run_substage")
    assert client[entry + 2:entry + 4] == ["export", "accuracy"] and client[-1] != "&"
    assert "NCCL world size = TP*PP = 4*2 = 8 = 2 nodes x 4 GPUs" in accuracy_script.read_text()
    assert not (results / "model_repo").exists()
