"""FT's p/prompt tuning: prompt tables exported beside the shards and served by the python runtime, in process.

Independent references: HF transformers' `generate(inputs_embeds=cat[prompt_table; embed(ids)])` for a tiny seeded
GPT-2 with random tables; NeMo's own greedy tokens (the shared NeMo fixture's reference.npz) for a prompt-learning
.nemo whose tables are the embeddings of the reference prompt's first tokens (virtual tokens that must act exactly as
those tokens do).
"""

from __future__ import annotations

import io
import re
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")

from safetensors.torch import save_file  # noqa: E402

from conftest import generate  # noqa: E402
from exporter.ft.convert import convert_checkpoint  # noqa: E402
from exporter.ft.prompt_tables import load_prompt_tables  # noqa: E402
from exporter.parallel import ParallelLayout  # noqa: E402
from family_fixtures import NEMO_AVAILABLE, NEMO_FIXTURES, NEMO_MISSING  # noqa: E402
from templates.ft_python import ft_checkpoint, ft_gpt  # noqa: E402
from templates.ft_python.ft_checkpoint import CheckpointError  # noqa: E402

VOCAB, END_ID, HIDDEN = 1000, 999, 64
LENGTHS = {"summarize": 3, "translate": 5}  # prompt_length per task; task ids 0, 1 in this order


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """A tiny seeded GPT-2 with a word-level tokenizer.json (the converter requires one)."""
    from tokenizers import Tokenizer, models

    torch.manual_seed(7)
    config = transformers.GPT2Config(n_layer=2, n_embd=HIDDEN, n_head=4, n_positions=64, vocab_size=VOCAB,
                                     initializer_range=0.2, bos_token_id=0, eos_token_id=END_ID)
    path = tmp_path_factory.mktemp("hf_prompt")
    transformers.GPT2LMHeadModel(config).eval().save_pretrained(path)
    Tokenizer(models.WordLevel({f"tok{i}": i for i in range(VOCAB)}, unk_token="tok0")).save(
        str(path / "tokenizer.json"))
    return path


@pytest.fixture(scope="module")
def tables(tmp_path_factory):
    """{task: [prompt_length, hidden] float32} seeded, saved as .npy (summarize) and .safetensors (translate)."""
    generator = torch.Generator().manual_seed(3)
    values = {name: torch.randn(length, HIDDEN, generator=generator) for name, length in LENGTHS.items()}
    directory = tmp_path_factory.mktemp("tables")
    np.save(directory / "summarize.npy", values["summarize"].numpy())
    save_file({"prompt_embeddings": values["translate"]}, str(directory / "translate.safetensors"))
    return values, [{"name": "summarize", "path": str(directory / "summarize.npy")},
                    {"name": "translate", "path": str(directory / "translate.safetensors")}]


@pytest.fixture(scope="module")
def shard_dir(hf_dir, tables, tmp_path_factory):
    _, tasks = tables
    out = tmp_path_factory.mktemp("ft_prompt")
    return convert_checkpoint(hf_dir, out, ParallelLayout(2), "fp32",
                              prompt_tables=load_prompt_tables("p_prompt_tuning", tasks))


def _hf_greedy(hf_model, table, ids, new_tokens):
    """HF generate on inputs_embeds = cat[table; wte(ids)] (table None: the ids alone) -> new token ids."""
    with torch.no_grad():
        embeds = hf_model.transformer.wte(torch.tensor([ids]))
        if table is not None:
            embeds = torch.cat([table[None], embeds], dim=1)
        out = hf_model.generate(inputs_embeds=embeds, attention_mask=torch.ones(embeds.shape[:2], dtype=torch.long),
                                max_new_tokens=new_tokens, do_sample=False, pad_token_id=END_ID)
    return out[0].tolist()


def test_config_ini_and_files_follow_ft(shard_dir, tables):
    values, _ = tables
    config = ft_checkpoint.read_config(shard_dir)
    assert config.prompt_learning_type == 3 and config.prompt_learning_start_id == VOCAB
    assert config.prompt_tasks == (("summarize", 3), ("translate", 5))
    text = (shard_dir / "config.ini").read_text()
    assert "num_tasks = 2" in text and "[task_1]\ntask_name = translate\nprompt_length = 5" in text
    for name, table in values.items():  # one whole table per task in the shard directory (every rank reads it)
        stored = np.fromfile(shard_dir / f"model.prompt_table.{name}.weight.bin", dtype="<f4")
        np.testing.assert_array_equal(stored.reshape(table.shape), table.numpy())


def test_tasks_in_one_batch_match_hf_inputs_embeds(shard_dir, tables, hf_dir):
    values, _ = tables
    hf_model = transformers.GPT2LMHeadModel.from_pretrained(hf_dir, torch_dtype=torch.float32).eval()
    model = ft_gpt.FTGPT.from_shards(shard_dir, device="cpu")
    start = VOCAB
    rows = [  # (task id or -1, prompt ids, new tokens)
        (0, [5, 17, 300, 42], 12), (1, [77], 9), (-1, [1, 2, 3, 4, 5, 6], 10), (1, [640, 12, 998], 8),
        (0, [9, 9, 9], 7),
    ]
    names = list(LENGTHS)
    inputs = [([start + j for j in range(LENGTHS[names[task]])] if task >= 0 else []) + ids
              for task, ids, _ in rows]
    width = max(map(len, inputs))
    padded = torch.tensor([row + [END_ID] * (width - len(row)) for row in inputs])
    lengths = torch.tensor([len(row) for row in inputs])
    out = generate(model, padded, lengths, torch.tensor([n for *_, n in rows]),
                   prompt_task_id=torch.tensor([task for task, *_ in rows]))
    for index, (task, ids, new) in enumerate(rows):
        expected = _hf_greedy(hf_model, values[names[task]] if task >= 0 else None, ids, new)
        length = int(out.sequence_length[index, 0])
        served = out.output_ids[index, 0, len(inputs[index]):length].tolist()
        assert served == expected[:len(served)] and len(served) == len(expected), (index, served, expected)
        # output_ids hold the input as sent (virtual ids included); sequence_length counts them, as FT's does
        assert out.output_ids[index, 0, :len(inputs[index])].tolist() == inputs[index]


@pytest.mark.parametrize("task, ids, message", [
    (2, [VOCAB, 5], "name no task of the model (0=summarize, 1=translate)"),
    (-1, [VOCAB, 5], "outside [0, 1000)"),  # virtual ids in a row without a task
    (0, [VOCAB + 3, 5], "outside [1000, 1000 + prompt_length)"),  # summarize has 3 rows
])
def test_bad_task_requests_are_refused(shard_dir, task, ids, message):
    model = ft_gpt.FTGPT.from_shards(shard_dir, device="cpu")
    with pytest.raises(ValueError, match=re.escape(message)):
        generate(model, torch.tensor([ids]), torch.tensor([len(ids)]), torch.tensor([2]),
                 prompt_task_id=torch.tensor([task]))


def test_uint32_minus_one_means_no_task(shard_dir):
    """The wire's UINT32 -1 (2^32 - 1) is 'no task', as -1 is in process."""
    model = ft_gpt.FTGPT.from_shards(shard_dir, device="cpu")
    plain = generate(model, torch.tensor([[4, 5]]), torch.tensor([2]), torch.tensor([3]))
    wire = generate(model, torch.tensor([[4, 5]]), torch.tensor([2]), torch.tensor([3]),
                    prompt_task_id=np.array([2**32 - 1], dtype=np.uint32).astype(np.int64))
    assert torch.equal(plain.output_ids, wire.output_ids)


def test_task_ids_on_a_model_without_tasks_are_refused(hf_dir, tmp_path):
    shard = convert_checkpoint(hf_dir, tmp_path, ParallelLayout(1), "fp32")
    model = ft_gpt.FTGPT.from_shards(shard, device="cpu")
    with pytest.raises(ValueError, match="the model has no prompt-learning tasks"):
        generate(model, torch.tensor([[4, 5]]), torch.tensor([2]), torch.tensor([3]), prompt_task_id=torch.tensor([0]))


# -- export checks: refused before anything is written -------------------------------------------------------------

def test_hidden_size_mismatch_is_refused_before_writing(hf_dir, tmp_path):
    np.save(tmp_path / "narrow.npy", np.zeros((4, HIDDEN // 2), dtype=np.float32))
    tables = load_prompt_tables("p_prompt_tuning", [{"name": "narrow", "path": str(tmp_path / "narrow.npy")}])
    with pytest.raises(CheckpointError, match=re.escape("['narrow [4, 32]'] do not match the model's hidden size 64")):
        convert_checkpoint(hf_dir, tmp_path / "out", ParallelLayout(1), "fp32", prompt_tables=tables)
    assert not (tmp_path / "out" / "1-gpu").exists()


@pytest.mark.parametrize("learning_type, tasks, message", [
    ("soft_prompt", "one", "type: soft_prompt is not supported: FT's type 1 takes the prompt embeddings in every"),
    ("prefix_prompt", "one", "type: prefix_prompt is not supported: FT's type 2 needs per-layer key/value prefixes"),
    ("p_prompt_tuning", "twice", "task names ['a'] appear more than once"),
    ("p_prompt_tuning", "bad_name", "task names ['a/b'] must be letters"),
    ("p_prompt_tuning", "vector", "shape [4]; a [prompt_length, hidden] table expected"),
])
def test_bad_prompt_configs_name_the_problem(tmp_path, learning_type, tasks, message):
    np.save(tmp_path / "t.npy", np.ones((2, 8), dtype=np.float32))
    np.save(tmp_path / "v.npy", np.ones(4, dtype=np.float32))
    table = str(tmp_path / "t.npy")
    task_lists = {"one": [{"name": "a", "path": table}],
                  "twice": [{"name": "a", "path": table}, {"name": "a", "path": table}],
                  "bad_name": [{"name": "a/b", "path": table}],
                  "vector": [{"name": "a", "path": str(tmp_path / "v.npy")}]}
    with pytest.raises(CheckpointError, match=re.escape(message)):
        load_prompt_tables(learning_type, task_lists[tasks])


# -- a NeMo prompt-learning checkpoint --------------------------------------------------------------------------------

NEMO_STEPS = 8  # the reference's greedy steps
VIRTUAL = 4  # the first 4 reference tokens of each row become one task's virtual prompt


def _prompt_learning_nemo(path, tasks, weights=None, extra=()):
    """A MegatronGPTPromptLearningModel .nemo as FT's converter reads it: model_config.yaml with task_templates and
    model_weights.ckpt = {"prompt_table": {"prompt_table.<task>.prompt_embeddings.weight": [P, h]}} (or `weights`)."""
    lines = ["virtual_prompt_style: p-tuning", *extra, "task_templates:"]
    for name, table in tasks.items():
        lines += [f"- taskname: {name}", f"  total_virtual_tokens: {table.shape[0]}", "  prompt_template: '{text}'"]
    buffer = io.BytesIO()
    torch.save(weights if weights is not None else
               {"prompt_table": {f"prompt_table.{name}.prompt_embeddings.weight": table
                                 for name, table in tasks.items()}}, buffer)
    with tarfile.open(path, "w:") as tar:
        for name, data in (("model_config.yaml", "\n".join(lines).encode()), ("model_weights.ckpt",
                                                                             buffer.getvalue())):
            info = tarfile.TarInfo(f"./{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


@pytest.mark.skipif(not NEMO_AVAILABLE, reason=NEMO_MISSING)
def test_nemo_prompt_tables_act_as_the_tokens_they_embed(tmp_path):
    """NeMo model A with one task per reference row whose table is the embedding of the row's first 4 tokens: virtual
    ids followed by the rest of the row must give NeMo's own greedy tokens for the whole row."""
    with np.load(NEMO_FIXTURES / "gpt_tp1.reference.npz") as data:
        input_ids, greedy = data["input_ids"], data["greedy_ids"]
    plain = convert_checkpoint(NEMO_FIXTURES / "gpt_tp1.nemo", tmp_path / "plain", ParallelLayout(1))
    wte = ft_checkpoint.load_weights(plain)["model.wte"]
    tasks = {f"row{r}": wte[torch.as_tensor(input_ids[r, :VIRTUAL])].clone() for r in range(len(input_ids))}
    nemo = _prompt_learning_nemo(tmp_path / "prompts.nemo", tasks)
    prompt_tables = load_prompt_tables("p_prompt_tuning", [], nemo=str(nemo))
    shard = convert_checkpoint(NEMO_FIXTURES / "gpt_tp1.nemo", tmp_path / "prompted", ParallelLayout(2),
                               prompt_tables=prompt_tables)
    config = ft_checkpoint.read_config(shard)
    assert config.prompt_tasks == tuple((name, VIRTUAL) for name in tasks)
    start = config.prompt_learning_start_id
    assert start == config.vocab_size == 50257  # as FT's NeMo converter hard-codes it for GPT-2's vocabulary
    model = ft_gpt.FTGPT.from_shards(shard, device="cpu")
    ids = np.concatenate([np.tile(np.arange(start, start + VIRTUAL), (len(input_ids), 1)), input_ids[:, VIRTUAL:]], 1)
    width = ids.shape[1]
    out = generate(model, torch.as_tensor(ids), torch.full((len(ids),), width), torch.full((len(ids),), NEMO_STEPS),
                   prompt_task_id=torch.arange(len(ids)))
    np.testing.assert_array_equal(out.output_ids[:, 0, width:width + NEMO_STEPS].numpy(), greedy)


@pytest.mark.parametrize("cached", [False, True])
def test_nemo_p_tuning_encoder_gives_the_table(tmp_path, cached):
    """Later NeMo saves a p-tuning model's encoder ("prompt_encoder"): its cached output when filled, else the MLP
    encoder's output, computed here as torch's own nn.Sequential(Linear, ReLU, Linear) computes it."""
    torch.manual_seed(5)
    embeddings, mlp = torch.randn(4, 8), torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(),
                                                             torch.nn.Linear(16, 8))
    expected = torch.randn(4, 8) if cached else mlp(embeddings).detach()
    key = "prompt_table.qa.prompt_embeddings.weight"
    encoder = {"prompt_table": {key: expected if cached else torch.zeros(4, 8)}, "embeddings": {"weight": embeddings},
               "mlp_head": mlp.state_dict()}
    nemo = _prompt_learning_nemo(tmp_path / "p.nemo", {"qa": embeddings}, weights={"prompt_encoder": encoder},
                                 extra=["p_tuning:", "  encoder_type: mlp"])
    tables = load_prompt_tables("p_prompt_tuning", [], nemo=str(nemo))
    assert tables.names == ("qa",)
    np.testing.assert_allclose(tables.tables[0], expected.numpy(), rtol=0, atol=1e-6)


def test_nemo_task_without_a_table_is_refused(tmp_path):
    nemo = _prompt_learning_nemo(tmp_path / "p.nemo", {"qa": torch.zeros(2, 8)})
    # a template naming a task the table lacks (a p-tuning task whose encoder output never reached the table)
    with tarfile.open(nemo) as tar:
        weights = tar.extractfile("./model_weights.ckpt").read()
    config = (b"task_templates:\n- taskname: qa\n  total_virtual_tokens: 2\n"
              b"- taskname: chat\n  total_virtual_tokens: 2\n")
    with tarfile.open(nemo, "w:") as tar:
        for name, data in (("model_config.yaml", config), ("model_weights.ckpt", weights)):
            info = tarfile.TarInfo(f"./{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    with pytest.raises(CheckpointError, match="task 'chat' has no prompt_table.chat.prompt_embeddings.weight"):
        load_prompt_tables("p_prompt_tuning", [], nemo=str(nemo))


# -- served by tritonserver through the ensemble, a task picked by name ------------------------------------------------

@pytest.fixture(scope="module")
def served_prompts(tmp_path_factory, tiny_gpt2):
    """tritonserver on a repository of conftest's tiny GPT-2 (real GPT-2 tokenizer) with two random prompt tables."""
    pytest.importorskip("tritonclient.http")
    from exporter.runtimes import ModelSettings
    from exporter.serve.tritonserver import TritonServer
    from exporter.stages.export import build_repository
    from serving_fixtures import tritonserver_or_skip

    install = tritonserver_or_skip()
    root = tmp_path_factory.mktemp("served_prompts")
    generator = torch.Generator().manual_seed(11)
    values = {name: torch.randn(length, HIDDEN, generator=generator) for name, length in LENGTHS.items()}
    tasks = []
    for name, table in values.items():
        np.save(root / f"{name}.npy", table.numpy())
        tasks.append({"name": name, "path": str(root / f"{name}.npy")})
    settings = ModelSettings(name="gpt2", runtime="python", max_batch_size=4, layout=ParallelLayout(1, 1),
                             data_type="fp32", device="cpu")
    repo = build_repository(root / "model_repo", tiny_gpt2, settings, "fp32",
                            prompt_tables=load_prompt_tables("p_prompt_tuning", tasks))
    with TritonServer(repo, root / "tritonserver.log", install=install, startup_timeout_s=240) as server:
        yield server.http_url, values


@pytest.mark.triton
def test_ensemble_serves_tasks_by_name_as_hf_generates(served_prompts, tiny_gpt2, hf_model):
    """One request, three rows: two tasks and none; each row's tokens and text equal HF's inputs_embeds greedy."""
    from exporter.clients import common

    url, values = served_prompts
    tokenizer = transformers.AutoTokenizer.from_pretrained(tiny_gpt2)
    prompts, names, new = ["Hello there", "The cat sat on", "One two"], ["summarize", "translate", ""], 6
    arrays = common.ensemble_arrays(prompts, new)
    arrays["PROMPT_TASK_NAME"] = common.text_array(names)
    result = common.infer(url, "http", "ensemble", arrays).outputs
    for row, (prompt, name) in enumerate(zip(prompts, names)):
        ids = tokenizer(prompt).input_ids
        with torch.no_grad():
            embeds = hf_model.transformer.wte(torch.tensor([ids]))
            if name:
                embeds = torch.cat([values[name][None], embeds], dim=1)
            expected = hf_model.generate(inputs_embeds=embeds, attention_mask=torch.ones(embeds.shape[:2],
                                                                                         dtype=torch.long),
                                         max_new_tokens=new, do_sample=False, pad_token_id=50256)[0].tolist()
        length = int(result["sequence_length"][row, 0])
        start = len(ids) + (LENGTHS[name] if name else 0)  # the virtual ids count in the input, as in FT
        assert result["output_ids"][row, 0, start:length].tolist() == expected
        assert result["OUTPUT_0"][row].reshape(-1)[0].decode() == tokenizer.decode(expected)
        if name:  # the prompt client names the task too
            from exporter.clients import prompt as prompt_client

            args = prompt_client.parser().parse_args(["--url", url, "--protocol", "http", "--prompts", prompt,
                                                      "--output-len", str(new), "--prompt-task", name])
            assert prompt_client.run(args, out=io.StringIO()) == [[tokenizer.decode(expected)]]


@pytest.mark.triton
def test_unknown_task_name_is_a_clear_error(served_prompts):
    from exporter.clients import common

    url, _ = served_prompts
    arrays = common.ensemble_arrays(["Hello there"], 4)
    arrays["PROMPT_TASK_NAME"] = common.text_array(["poetry"])
    with pytest.raises(common.ClientError, match="PROMPT_TASK_NAME.0. 'poetry' is not a prompt-learning task of this "
                                                  "model; its tasks: summarize, translate"):
        common.infer(url, "http", "ensemble", arrays)


# -- the config keys ------------------------------------------------------------------------------------------------

def _composed(*overrides):
    from hydra import compose, initialize_config_dir

    from exporter.config import validate

    conf = str(Path(__file__).resolve().parents[1] / "conf")
    with initialize_config_dir(config_dir=conf, version_base="1.3"):
        return validate(compose("config", overrides=list(overrides)))


def test_config_keys_reach_the_tables(tables):
    from exporter.stages.export import prompt_tables_of

    values, tasks = tables
    listed = ",".join(f"{{name:{task['name']},path:'{task['path']}'}}" for task in tasks)
    prompt_tables = prompt_tables_of(_composed(f"export.prompt_learning.tasks=[{listed}]"))
    assert prompt_tables.names == ("summarize", "translate")
    np.testing.assert_array_equal(prompt_tables.tables[1], values["translate"].numpy())
    assert prompt_tables_of(_composed()) is None  # none by default


@pytest.mark.parametrize("overrides, message", [
    (["export.prompt_learning.type=soft_prompt", "export.prompt_learning.tasks=[{name:a,path:a.npy}]"],
     "export.prompt_learning.type: soft_prompt is not supported: FT's type 1"),
    (["export.prompt_learning.tasks=[{name:a,path:a.npy},{name:a,path:b.npy}]"],
     "export.prompt_learning.tasks[1].name: 'a' is listed twice"),
    (["export.prompt_learning.tasks=[{name:'a b',path:a.npy}]"], "export.prompt_learning.tasks[0].name: 'a b'"),
    (["export.prompt_learning.tasks=[{name:a,path:''}]"], "export.prompt_learning.tasks[0].path: must name"),
    (["export.prompt_learning.type=prompt"], "export.prompt_learning.type"),
])
def test_bad_config_keys_are_named(overrides, message):
    from exporter.config import ConfigError

    with pytest.raises(ConfigError, match=re.escape(message)):
        _composed(*overrides)
