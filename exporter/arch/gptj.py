"""HF GPT-J (`GPTJForCausalLM`) -> FT's GPT-J layout (section [gptj]).

Quirks: separate q/k/v projections without bias fused into [h, 3, h]; attention output without bias; attention and
MLP run in parallel off one layernorm (`ln_1`; no post_attention_layernorm files); rotary over the first
`rotary_dim` dims of each head, interleaved pairs (GPT-J style); an untied `lm_head` with a bias.
"""

from __future__ import annotations

from templates.ft_python.ft_checkpoint import FTConfig

from ..parallel import Split
from .base import LinearArchitecture
from .gpt2 import gelu_approximation
from .registry import register


@register("GPTJForCausalLM", "GPTJModel")
class GPTJ(LinearArchitecture):
    section = "gptj"
    ft_model_type = "GPT-J"
    prefixes = ("transformer.", "")
    global_tensors = {
        "model.wte": ("wte.weight", Split.REPLICATED),
        "model.final_layernorm.weight": ("ln_f.weight", Split.REPLICATED),
        "model.final_layernorm.bias": ("ln_f.bias", Split.REPLICATED),
        "model.lm_head.weight": ("lm_head.weight", Split.REPLICATED),
        "model.lm_head.bias": ("lm_head.bias", Split.REPLICATED),
    }
    layer_tensors = {
        "input_layernorm.weight": ("h.{i}.ln_1.weight", Split.REPLICATED),
        "input_layernorm.bias": ("h.{i}.ln_1.bias", Split.REPLICATED),
        "attention.query_key_value.weight": (tuple(f"h.{{i}}.attn.{p}_proj.weight" for p in "qkv"), Split.QKV),
        "attention.dense.weight": ("h.{i}.attn.out_proj.weight", Split.ROW),
        "mlp.dense_h_to_4h.weight": ("h.{i}.mlp.fc_in.weight", Split.COLUMN),
        "mlp.dense_h_to_4h.bias": ("h.{i}.mlp.fc_in.bias", Split.COLUMN),
        "mlp.dense_4h_to_h.weight": ("h.{i}.mlp.fc_out.weight", Split.ROW),
        "mlp.dense_4h_to_h.bias": ("h.{i}.mlp.fc_out.bias", Split.REPLICATED),
    }
    # Causal-mask buffers that old checkpoints saved alongside the weights.
    ignored = (r"h\.\d+\.attn\.bias", r"h\.\d+\.attn\.masked_bias")

    def params(self) -> FTConfig:
        config = self.config
        approximation = gelu_approximation(config.get("activation_function", "gelu_new"), "activation_function")
        hidden, heads, head_dim = self.head_shape("n_embd", "n_head")
        rotary = config.get("rotary_dim") or head_dim
        return FTConfig(
            model_name=config.get("model_type", "gptj"),
            gelu_approximation=approximation,
            head_num=heads,
            size_per_head=head_dim,
            inter_size=config.get("n_inner") or 4 * hidden,
            num_layer=config["n_layer"],
            max_pos_seq_len=config["n_positions"],
            vocab_size=config["vocab_size"],
            start_id=config.get("bos_token_id", 50256),
            end_id=config.get("eos_token_id", 50256),
            layernorm_eps=config.get("layer_norm_epsilon", 1e-5),
            has_positional_encoding=False,
            rotary_embedding=rotary,
            rotary_style="gptj",
            use_gptj_residual=True,
            attention_bias=False,
            lm_head_bias=True,
        )
