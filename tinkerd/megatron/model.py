"""A Hugging Face Llama / Qwen2 / Qwen3 checkpoint as a megatron-core GPTModel, one rank's slices.

The mapping is Megatron's standard one: embedding and lm_head split on the vocabulary, q/k/v fused
into `linear_qkv` group by group ([q heads of a KV group; k; v], groups split across ranks),
o_proj and down_proj split on their input, gate and up fused into `linear_fc1` ([gate; up] per
rank), norms copied. Each rank reads only its slices of the safetensors files.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from tinkerd.types import UserError

# megatron.core's GPTModel (an nn.Module): megatron-core ships no types, so its attributes are Any.
GPTModel = Any

SUPPORTED = ("llama", "qwen2", "qwen3")


@dataclass(frozen=True)
class Architecture:
    """What tinkerd needs of a Hugging Face config to build and map the model."""

    model_type: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    ffn_hidden_size: int
    norm_eps: float
    rope_theta: float
    tied_embeddings: bool
    qkv_bias: bool
    qk_norm: bool
    max_positions: int

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    def padded_vocab(self, tp: int) -> int:
        """The vocabulary rounded up to a multiple of `tp`: the rows past `vocab_size` are zero
        in the embedding, and their logits are masked out of every softmax."""
        return -(-self.vocab_size // tp) * tp


def architecture(config: Any) -> Architecture:
    """The Architecture of a transformers config, or a UserError naming what is not supported."""
    model_type = getattr(config, "model_type", "")
    if model_type not in SUPPORTED:
        raise UserError(
            f"the megatron backend supports {', '.join(SUPPORTED)} models, not {model_type!r}"
        )
    if getattr(config, "mlp_bias", False):
        raise UserError("the megatron backend does not support MLP biases (mlp_bias)")
    rope = getattr(config, "rope_parameters", None) or {}
    if rope.get("rope_type", "default") not in ("default", None):
        raise UserError(f"the megatron backend does not support {rope['rope_type']!r} RoPE scaling")
    theta = rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return Architecture(
        model_type=model_type,
        vocab_size=config.vocab_size,
        hidden_size=config.hidden_size,
        num_layers=config.num_hidden_layers,
        num_heads=heads,
        num_kv_heads=getattr(config, "num_key_value_heads", None) or heads,
        head_dim=head_dim,
        ffn_hidden_size=config.intermediate_size,
        norm_eps=config.rms_norm_eps,
        rope_theta=float(theta),
        tied_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
        qkv_bias=model_type == "qwen2" or bool(getattr(config, "attention_bias", False)),
        qk_norm=model_type == "qwen3",
        max_positions=getattr(config, "max_position_embeddings", None) or 4096,
    )


def check_parallel(arch: Architecture, tp: int, pp: int) -> None:
    """What the model must divide into for `tp` x `pp`, as a UserError."""
    for what, n, flag, by in (
        ("attention heads", arch.num_heads, "--tp", tp),
        ("key/value heads", arch.num_kv_heads, "--tp", tp),
        ("MLP width", arch.ffn_hidden_size, "--tp", tp),
        ("layers", arch.num_layers, "--pp", pp),
    ):
        if n % by:
            raise UserError(f"the model's {what} ({n}) do not divide by {flag} {by}")


def transformer_config(arch: Architecture, dtype: torch.dtype, tp: int, pp: int) -> Any:
    """The megatron-core TransformerConfig of `arch`: no fusions, no dropout, weights loaded
    after construction (no random initialization)."""
    import torch.nn.functional as F
    from megatron.core.transformer.transformer_config import TransformerConfig

    return TransformerConfig(
        num_layers=arch.num_layers,
        hidden_size=arch.hidden_size,
        num_attention_heads=arch.num_heads,
        num_query_groups=arch.num_kv_heads,
        kv_channels=arch.head_dim,
        ffn_hidden_size=arch.ffn_hidden_size,
        normalization="RMSNorm",
        layernorm_epsilon=arch.norm_eps,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=arch.qkv_bias,
        qk_layernorm=arch.qk_norm,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        use_cpu_initialization=True,
        perform_initialization=False,
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        persist_layer_norm=False,
        apply_rope_fusion=False,
        gradient_accumulation_fusion=False,
        attention_softmax_in_fp32=True,
    )


def build_model(arch: Architecture, dtype: torch.dtype, device: torch.device) -> GPTModel:
    """This rank's GPTModel (its pipeline stage, its tensor-parallel slices), frozen, in eval
    mode, weights not yet loaded."""
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    tp = parallel_state.get_tensor_model_parallel_world_size()
    pp = parallel_state.get_pipeline_model_parallel_world_size()
    check_parallel(arch, tp, pp)
    config = transformer_config(arch, dtype, tp, pp)
    model = GPTModel(
        config=config,
        transformer_layer_spec=get_gpt_layer_local_spec(
            qk_layernorm=arch.qk_norm, normalization="RMSNorm"
        ),
        vocab_size=arch.padded_vocab(tp),
        max_sequence_length=arch.max_positions,
        pre_process=parallel_state.is_pipeline_first_stage(),
        post_process=parallel_state.is_pipeline_last_stage(),
        parallel_output=True,
        # Tied across pipeline stages, megatron-core would all-reduce the copies on "cuda" at
        # construction; the base is frozen, so each stage simply loads its own copy.
        share_embeddings_and_output_weights=arch.tied_embeddings and pp == 1,
        position_embedding_type="rope",
        rotary_base=int(arch.rope_theta),
    )
    return model.to(device).eval().requires_grad_(False)


class _Weights:
    """Lazy reads of tensors (or slices) from a model directory's safetensors files."""

    def __init__(self, directory: Path) -> None:
        from safetensors import safe_open

        index = directory / "model.safetensors.index.json"
        if index.is_file():
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        else:
            files = [p.name for p in directory.glob("*.safetensors")]
        if not files:
            raise UserError(f"{directory} holds no safetensors weights")
        self._where: dict[str, Any] = {}
        self._handles = [safe_open(str(directory / f), framework="pt") for f in files]
        for handle in self._handles:
            for key in handle.keys():
                self._where[key] = handle

    def __contains__(self, key: str) -> bool:
        return key in self._where

    def rows(self, key: str, start: int | None = None, stop: int | None = None) -> torch.Tensor:
        return self._where[key].get_slice(key)[start:stop]

    def cols(self, key: str, start: int, stop: int) -> torch.Tensor:
        return self._where[key].get_slice(key)[:, start:stop]


def _hf_prefix(weights: _Weights) -> str:
    return "model." if "model.embed_tokens.weight" in weights else ""


def fused_qkv_rows(arch: Architecture, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
    """[q; k; v] (full, rows = output features) in Megatron's fused layout, by KV group:
    [q heads of group 0; k 0; v 0; q heads of group 1; ...]. Works on weights and biases, and on
    anything shaped like them along dim 0 (LoRA B factors, their moments)."""
    groups, d = arch.num_kv_heads, arch.head_dim
    per = arch.num_heads // groups
    tail = q.shape[1:]
    parts = (
        q.reshape(groups, per * d, *tail),
        k.reshape(groups, d, *tail),
        v.reshape(groups, d, *tail),
    )
    return torch.cat(parts, dim=1).reshape(-1, *tail)


def load_weights(model: GPTModel, arch: Architecture, directory: Path) -> None:
    """Copy this rank's slices of the HF weights in `directory` into `model`."""
    from megatron.core import parallel_state

    tp = parallel_state.get_tensor_model_parallel_world_size()
    rank = parallel_state.get_tensor_model_parallel_rank()
    weights = _Weights(directory)
    hf = _hf_prefix(weights)
    vocab = arch.padded_vocab(tp) // tp
    state: dict[str, torch.Tensor] = {}

    def part(n: int) -> tuple[int, int]:
        return rank * n // tp, (rank + 1) * n // tp

    def vocab_rows(key: str) -> torch.Tensor:
        """This rank's rows of the (padded) vocabulary; the padding rows are zero."""
        start, stop = rank * vocab, (rank + 1) * vocab
        rows = weights.rows(key, start, min(stop, arch.vocab_size))
        return torch.cat([rows, rows.new_zeros(stop - start - rows.shape[0], rows.shape[1])])

    if model.pre_process:
        state["embedding.word_embeddings.weight"] = vocab_rows(f"{hf}embed_tokens.weight")
    groups = part(arch.num_kv_heads)
    per = arch.num_heads // arch.num_kv_heads
    d = arch.head_dim
    q_rows = (groups[0] * per * d, groups[1] * per * d)
    kv_rows = (groups[0] * d, groups[1] * d)
    ffn = part(arch.ffn_hidden_size)
    for local, layer in enumerate(model.decoder.layers):
        g = layer.layer_number - 1  # global, 1-based in Megatron
        src, dst = f"{hf}layers.{g}.", f"decoder.layers.{local}."
        attn = f"{src}self_attn."
        for kind in ("weight", "bias") if arch.qkv_bias else ("weight",):
            q = weights.rows(f"{attn}q_proj.{kind}", *q_rows)
            k = weights.rows(f"{attn}k_proj.{kind}", *kv_rows)
            v = weights.rows(f"{attn}v_proj.{kind}", *kv_rows)
            state[f"{dst}self_attention.linear_qkv.{kind}"] = fused_qkv_rows(
                local_arch(arch, tp), q, k, v
            )
        hidden = part(arch.q_size)
        state[f"{dst}self_attention.linear_proj.weight"] = weights.cols(
            f"{attn}o_proj.weight", *hidden
        )
        if arch.qk_norm:
            state[f"{dst}self_attention.q_layernorm.weight"] = weights.rows(f"{attn}q_norm.weight")
            state[f"{dst}self_attention.k_layernorm.weight"] = weights.rows(f"{attn}k_norm.weight")
        state[f"{dst}input_layernorm.weight"] = weights.rows(f"{src}input_layernorm.weight")
        state[f"{dst}pre_mlp_layernorm.weight"] = weights.rows(
            f"{src}post_attention_layernorm.weight"
        )
        state[f"{dst}mlp.linear_fc1.weight"] = torch.cat(
            [weights.rows(f"{src}mlp.gate_proj.weight", *ffn),
             weights.rows(f"{src}mlp.up_proj.weight", *ffn)]
        )  # fmt: skip
        state[f"{dst}mlp.linear_fc2.weight"] = weights.cols(f"{src}mlp.down_proj.weight", *ffn)
    if model.post_process:
        state["decoder.final_layernorm.weight"] = weights.rows(f"{hf}norm.weight")
        head = "lm_head.weight"
        if arch.tied_embeddings or head not in weights:
            head = f"{hf}embed_tokens.weight"
        if not model.share_embeddings_and_output_weights:  # else it is the embedding
            state["output_layer.weight"] = vocab_rows(head)
    own = {k: v for k, v in model.state_dict().items() if not k.endswith("_extra_state")}
    missing = sorted(own.keys() - state.keys())
    if missing:
        raise UserError(f"the megatron backend cannot map {missing[:3]} from {directory}")
    with torch.no_grad():
        for key, value in state.items():
            target = own[key]
            if tuple(target.shape) != tuple(value.shape):
                raise UserError(
                    f"{directory}: {key} is {tuple(value.shape)}, the model wants "
                    f"{tuple(target.shape)}"
                )
            target.copy_(value.to(target.dtype))


def local_arch(arch: Architecture, tp: int) -> Architecture:
    """`arch` as one tensor-parallel rank sees its attention (its share of heads)."""
    from dataclasses import replace

    return replace(arch, num_heads=arch.num_heads // tp, num_kv_heads=arch.num_kv_heads // tp)
