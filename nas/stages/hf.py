"""Ecosystem configs for an ArchSpec: Hugging Face ``transformers`` (Llama family) and litgpt.

A spec that a family can express gets that family's config, and for Hugging Face also its
weights (safetensors, HF naming), so ``LlamaForCausalLM.from_pretrained(folder)`` runs the same
function as ``nas.stages.model`` (checked in tests/test_export_winner.py). A spec it cannot express gets
the list of reasons instead, never a config that would load and compute something else.

What ``LlamaConfig`` (transformers 4.45-5.x) fixes, checked against ``modeling_llama.py``:

- ``LlamaMLP`` is always gated: ``down(act(gate(x)) * up(x))``; ``mlp_bias`` and
  ``attention_bias`` exist and stay False here (our linears have no bias).
- ``LlamaRMSNorm`` everywhere (``rms_norm_eps``), pre-norm, no LayerNorm option.
- One K/V projection per KV head (``num_key_value_heads``: MHA, GQA, MQA); no latent attention.
- One set of weights per layer: no block-wise sharing. Unrolling a repeated block into copies
  would load and run, but store each shared block ``share_repeat`` times and untie the copies in
  any further training, so it is refused rather than done silently.
- Rotary embedding in rotate-half form over the whole head (``rope_theta``), as ``nas.stages.model``.
- ``hidden_act`` through ``ACT2FN``: "silu", "gelu" (exact erf, as ``F.gelu``), "relu".
- transformers 5 validates ``hidden_size % num_attention_heads == 0`` even when ``head_dim`` is
  given, so a spec whose width is not a multiple of its head count cannot be loaded there.

litgpt (``litgpt/config.py``, read, not run): ``n_query_groups`` covers MHA/GQA/MQA,
``norm_class_name`` RMSNorm or LayerNorm (with its bias, as ours), ``mlp_class_name`` LLaMAMLP
(gated SiLU), GemmaMLP (gated GELU) or GptNeoxMLP (plain GELU), rotate-half RoPE; no layer
sharing, no ReLU MLP, our MLA is not its DeepSeek MLA, and no tied lm_head (its checkpoint holds
the table twice). Only the config is written for litgpt.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from nas.spec.arch import ArchSpec
from nas.spec.errors import NasError
from nas.stages.model import Decoder

HF_DIR = "hf"
# Hugging Face's rotary, norm and attention code computes in fp32 here; the weights we trained
# are fp32 too. A quantized deployment is the ONNX model, not this folder.
HF_DTYPE = "float32"


class EcosystemError(NasError):
    """A spec that a family's config cannot express, asked for anyway."""


# --- Hugging Face: what fits --------------------------------------------------------------------


def llama_incompatibilities(spec: ArchSpec) -> list[str]:
    """Why ``LlamaConfig`` cannot express ``spec``, one reason per feature; empty when it can."""
    reasons = []
    if spec.attention == "mla":
        reasons.append("MLA (latent attention): LlamaAttention has one K and V projection per KV head, "
                       "no compressed latent or decoupled rotary key")
    if spec.layer_sharing != "none":
        reasons.append(f"layer sharing ({spec.layer_sharing} x{spec.share_repeat}): Llama has one set of "
                       "weights per layer; unrolling would store each shared block "
                       f"{spec.share_repeat} times and untie the copies in further training")
    if spec.norm != "rmsnorm":
        reasons.append(f"{spec.norm}: Llama uses RMSNorm only (no mean subtraction, no bias)")
    if spec.ffn != "gated":
        reasons.append(f"{spec.ffn} (non-gated) FFN: LlamaMLP is always gated, down(act(gate(x)) * up(x))")
    if spec.d_model % spec.n_heads:
        reasons.append(f"d_model {spec.d_model} is not a multiple of n_heads {spec.n_heads}: transformers 5's "
                       "LlamaConfig rejects it even with an explicit head_dim")
    return reasons


def llama_config(spec: ArchSpec, *, eos_token_id: int | None = None) -> dict[str, Any]:
    """The ``config.json`` of a ``LlamaForCausalLM`` computing the same function as ``spec``.

    Written as a plain mapping (no transformers import), readable by transformers 4.45+ (top-level
    ``rope_theta``) and 5.x (``rope_parameters``). Our corpora separate documents with one EOS
    token and prepend nothing, so BOS and EOS are that token (GPT-2's convention).
    """
    reasons = llama_incompatibilities(spec)
    if reasons:
        raise EcosystemError(f"{spec.summary()} has no Llama config: {'; '.join(reasons)}")
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": spec.vocab_size,
        "hidden_size": spec.d_model,
        "intermediate_size": spec.ffn_hidden,
        "num_hidden_layers": spec.n_layers,
        "num_attention_heads": spec.n_heads,
        "num_key_value_heads": spec.n_kv_heads,  # = n_heads (MHA), 1 (MQA), in between (GQA)
        "head_dim": spec.head_dim,
        "hidden_act": spec.activation,
        "rms_norm_eps": 1e-6,  # nas.stages.model.RMSNorm(eps=1e-6)
        "tie_word_embeddings": spec.tied_embeddings,
        "rope_theta": spec.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": spec.rope_theta},
        "max_position_embeddings": spec.context_length,  # trained at this length; RoPE runs beyond it
        "attention_bias": False,
        "mlp_bias": False,
        "attention_dropout": 0.0,
        "initializer_range": 0.02,
        "pretraining_tp": 1,
        "use_cache": True,
        "bos_token_id": eos_token_id,
        "eos_token_id": eos_token_id,
        "pad_token_id": None,
        "torch_dtype": HF_DTYPE,
    }


def llama_state_dict(model: Decoder) -> dict[str, Tensor]:
    """``model``'s weights under ``LlamaForCausalLM``'s names (contiguous fp32 CPU copies).

    A tied lm_head is left out: Hugging Face ties it to ``model.embed_tokens`` on load, as
    ``tie_word_embeddings`` says, and safetensors refuses two names for one storage.
    """
    spec = model.spec
    reasons = llama_incompatibilities(spec)
    if reasons:
        raise EcosystemError(f"{spec.summary()} has no Llama weights: {'; '.join(reasons)}")

    def t(x: Tensor) -> Tensor:
        return x.detach().to(device="cpu", dtype=torch.float32).contiguous().clone()

    out = {"model.embed_tokens.weight": t(model.tok_emb.weight)}
    for i, block in enumerate(model.blocks):
        p = f"model.layers.{i}."
        out[p + "self_attn.q_proj.weight"] = t(block.attn.wq.weight)
        out[p + "self_attn.k_proj.weight"] = t(block.attn.wk.weight)
        out[p + "self_attn.v_proj.weight"] = t(block.attn.wv.weight)
        out[p + "self_attn.o_proj.weight"] = t(block.attn.wo.weight)
        out[p + "mlp.gate_proj.weight"] = t(block.ffn.w_gate.weight)
        out[p + "mlp.up_proj.weight"] = t(block.ffn.w_up.weight)
        out[p + "mlp.down_proj.weight"] = t(block.ffn.w_down.weight)
        out[p + "input_layernorm.weight"] = t(block.attn_norm.weight)
        out[p + "post_attention_layernorm.weight"] = t(block.ffn_norm.weight)
    out["model.norm.weight"] = t(model.norm.weight)
    if not spec.tied_embeddings:
        out["lm_head.weight"] = t(model.lm_head.weight)
    return out


def save_hf(model: Decoder, out_dir: Path, *, tokenizer_json: Path | None = None,
            eos_token: str | None = None, eos_token_id: int | None = None) -> Path:
    """Write a Hugging Face folder: ``config.json``, ``model.safetensors`` and, given a tokenizer,
    ``tokenizer.json`` with a ``tokenizer_config.json`` so ``AutoTokenizer`` loads it (the
    onnxruntime-genai model builder needs one: docs/dependencies.md)."""
    from safetensors.torch import save_file

    spec = model.spec
    config = llama_config(spec, eos_token_id=eos_token_id)
    weights = llama_state_dict(model)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    (out_dir / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": eos_token_id, "eos_token_id": eos_token_id, "pad_token_id": eos_token_id}, indent=2) + "\n")
    save_file(weights, str(out_dir / "model.safetensors"), metadata={"format": "pt", "nas_arch_id": spec.arch_id})
    if tokenizer_json is not None:
        shutil.copy2(tokenizer_json, out_dir / "tokenizer.json")
        (out_dir / "tokenizer_config.json").write_text(json.dumps({
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": eos_token, "eos_token": eos_token, "unk_token": None, "pad_token": None,
            "add_bos_token": False, "add_eos_token": False, "clean_up_tokenization_spaces": False,
            "model_max_length": spec.context_length,
        }, indent=2) + "\n")
    return out_dir


# --- litgpt ---------------------------------------------------------------------------------------

# (ffn, activation) -> litgpt's MLP class: LLaMAMLP is silu(fc_1 x) * fc_2 x, GemmaMLP the same with
# gelu (approximate "none" = exact, as F.gelu), GptNeoxMLP proj(gelu(fc x)).
_LITGPT_MLP = {("gated", "silu"): "LLaMAMLP", ("gated", "gelu"): "GemmaMLP", ("plain", "gelu"): "GptNeoxMLP"}
LITGPT_CONFIG = "model_config.yaml"  # the name litgpt's Config.from_checkpoint looks for


def litgpt_incompatibilities(spec: ArchSpec) -> list[str]:
    """Why a litgpt ``Config`` cannot express ``spec``; empty when it can."""
    reasons = []
    if spec.attention == "mla":
        reasons.append("MLA: litgpt's latent attention (DeepSeek's) compresses queries too and is not ours")
    if spec.layer_sharing != "none":
        reasons.append("layer sharing: litgpt has one block per layer")
    if (spec.ffn, spec.activation) not in _LITGPT_MLP:
        reasons.append(f"{spec.ffn} FFN with {spec.activation}: litgpt has gated SiLU (LLaMAMLP), gated GELU "
                       "(GemmaMLP) and plain GELU (GptNeoxMLP) only")
    return reasons


def litgpt_notes(spec: ArchSpec) -> list[str]:
    """What a user converting weights for litgpt must know beyond the config."""
    notes = ["config only: convert weights from the hf/ folder with litgpt's convert_hf_checkpoint where it "
             "exists, or map the names by hand; checked by reading litgpt/config.py and model.py, not by "
             "loading it in litgpt (not a dependency)"]
    if spec.tied_embeddings:
        notes.append("litgpt has no tied lm_head: its checkpoint holds the embedding table twice (lm_head = wte)")
    return notes


def litgpt_config(spec: ArchSpec) -> dict[str, Any]:
    """Keyword arguments of ``litgpt.Config`` for ``spec`` (``Config.from_file`` reads them).

    ``bias`` is False for every linear (ours have none); litgpt's LayerNorm is ``torch.nn.LayerNorm``
    with its bias, as ours. The name must not contain "Gemma" or "OLMo": litgpt switches its norms
    on those substrings.
    """
    reasons = litgpt_incompatibilities(spec)
    if reasons:
        raise EcosystemError(f"{spec.summary()} has no litgpt config: {'; '.join(reasons)}")
    theta = spec.rope_theta
    return {
        "name": f"nas-{spec.arch_id}",
        "block_size": spec.context_length,
        "vocab_size": spec.vocab_size,
        "padded_vocab_size": spec.vocab_size,
        "n_layer": spec.n_layers,
        "n_embd": spec.d_model,
        "n_head": spec.n_heads,
        "head_size": spec.head_dim,
        "n_query_groups": spec.n_kv_heads,
        "rotary_percentage": 1.0,
        "rope_base": int(theta) if theta.is_integer() else theta,
        "parallel_residual": False,
        "bias": False,
        "norm_class_name": "RMSNorm" if spec.norm == "rmsnorm" else "LayerNorm",
        "norm_eps": 1e-6 if spec.norm == "rmsnorm" else 1e-5,  # nas.stages.model's eps for each
        "mlp_class_name": _LITGPT_MLP[(spec.ffn, spec.activation)],
        "gelu_approximate": "none",
        "intermediate_size": spec.ffn_hidden,
    }
