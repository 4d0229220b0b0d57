#!/usr/bin/env python3
"""Regenerate the ONNX test fixtures under ``fixtures/``.

Every fixture is a tiny, randomly initialised decoder-only LLM (3 layers, hidden size 64, 4 query heads,
2 key/value heads) exported to ONNX by one real-world exporter, together with reference activations
computed in PyTorch:

* ``model.onnx`` (+ its external data file, where the exporter writes one) exactly as the exporter wrote it;
* ``reference.safetensors``: ``inputs.<graph input>`` (the tensors fed to the graph), ``layers.<i>.x``
  (input of layer i's ``input_layernorm``: the residual stream before normalisation), ``layers.<i>.y``
  (output of layer i's self-attention block, before the residual add) and ``logits``. For the int4
  fixture (``llama-genai-int4``) PyTorch runs with the graph's dequantised int4 weights in place of the
  ones it quantised, so that the reference is what the quantised graph computes, up to float rounding;
* ``fixture.json``: what the fixture is (exporter, opset, attention kind, ...) and the measured
  ONNX-vs-PyTorch logits difference;
* the tokenizer (``tokenizer.json``, ``tokenizer_config.json``, ``special_tokens_map.json``),
  ``generation_config.json`` and the Hugging Face ``config.json`` of the model.

Everything is deterministic: the tokenizer is trained on documents 0-199 of ``shared/data/c4_demo.json``
(BPE, 512 tokens), the weights come from ``torch.manual_seed(seed)`` (seed 0 for Llama, 1-3 for the other
architectures) and the reference input from a fixed seed; a rerun from the same paths reproduces every file
byte for byte (torch.onnx records source file paths in its node metadata). The script finishes by running
every ``model.onnx`` with ONNX Runtime (CPU) and checking its logits against PyTorch's.

Environment
-----------
Optimum needs ``transformers < 4.58`` while the ONNX Runtime GenAI model builder needs
``transformers 5.x``, so two virtualenvs are used, both outside the repository. The first runs this
script; the second only runs the GenAI builder (``--genai-python``)::

    python3 -m venv /root/.cache/nbl-fixtures/export
    /root/.cache/nbl-fixtures/export/bin/pip install -r scripts/fixture-requirements.txt

    python3 -m venv /root/.cache/nbl-fixtures/genai
    /root/.cache/nbl-fixtures/genai/bin/pip install -r scripts/fixture-genai-requirements.txt

The pins (Python 3.11) are: export venv torch 2.15.0, transformers 4.57.6, optimum 2.1.0,
optimum-onnx 0.1.0, onnx 1.23.2, onnxscript 0.7.2, onnxruntime 1.32.0, safetensors 0.8.0; GenAI venv
torch 2.15.0, transformers 5.23.0, onnxruntime-genai 0.18.0 (+ onnx-ir 1.1.0, which its builder imports
without declaring it).

``pip install torch`` from PyPI pulls the CUDA runtime wheels (several GB); everything runs on the CPU.
No network access is needed once the packages are installed (nothing is downloaded from a model hub).

Usage (from the repository root; about a minute on two cores)::

    nice -n 10 /root/.cache/nbl-fixtures/export/bin/python scripts/make-fixtures.py
    nice -n 10 /root/.cache/nbl-fixtures/export/bin/python scripts/make-fixtures.py --only llama-dynamo

``--only`` regenerates some fixtures and leaves the others alone. Every run records why an exporter could
not make a fixture in ``fixtures/unsupported.json`` and rewrites ``fixtures/README.md`` from the
``fixture.json`` files and it (``--readme-only`` does only that).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import tempfile
import traceback
from collections import Counter
from pathlib import Path
from typing import Callable

# Everything is local: never let transformers or optimum reach for a model hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import onnx
import onnxruntime
import torch
import transformers
from safetensors.numpy import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    AutoModelForCausalLM,
    CohereConfig,
    CohereForCausalLM,
    Gemma2Config,
    Gemma2ForCausalLM,
    GPT2Config,
    GPT2LMHeadModel,
    GPTNeoXConfig,
    GPTNeoXForCausalLM,
    GraniteConfig,
    GraniteForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    GptOssConfig,
    GptOssForCausalLM,
    MixtralConfig,
    MixtralForCausalLM,
    Olmo2Config,
    Olmo2ForCausalLM,
    Phi3Config,
    Phi3ForCausalLM,
    PhiConfig,
    PhiForCausalLM,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

REPO = Path(__file__).resolve().parent.parent
DEFAULT_CORPUS = REPO.parent / "shared" / "data" / "c4_demo.json"
DEFAULT_GENAI_PYTHON = Path("/root/.cache/nbl-fixtures/genai/bin/python")

# ---------------------------------------------------------------------------------------------------------
# Model shape, shared by every architecture.
# ---------------------------------------------------------------------------------------------------------
VOCAB = 512
HIDDEN = 64
LAYERS = 3
HEADS = 4
KV_HEADS = 2
HEAD_DIM = HIDDEN // HEADS
INTERMEDIATE = 128
MAX_POSITIONS = 256

# Special tokens come first, so their ids are fixed: <|endoftext|> = 0 is both BOS and EOS, <|pad|> = 1.
EOS_TOKEN, PAD_TOKEN = "<|endoftext|>", "<|pad|>"
EOS_ID, PAD_ID = 0, 1

# The random init of transformers (N(0, 0.02) weights, unit norm weights, zero biases) gives activations
# so small that almost any numerical mistake would pass a tolerance test. A larger init range gives O(1)
# activations and non-trivial softmax distributions; norm weights and biases are randomised too (see
# `randomise_norms_and_biases`) so that a tool that ignores them is caught.
INIT_RANGE = 0.2

# Reference input: batch 2, sequence 7, ids drawn (from the non-special tokens) with a fixed seed.
BATCH, SEQ = 2, 7
INPUT_SEED = 1234
# One weight seed per architecture: Llama and Mistral have identical parameter shapes, so a shared seed
# would give them identical weights and a test could not tell the fixtures apart.
WEIGHT_SEEDS = {"llama": 0, "mistral": 1, "qwen2": 2, "phi3": 3, "gpt_neox": 4, "gpt2": 5, "gemma2": 6, "phi": 7,
                "qwen3": 8, "granite": 9, "olmo2": 10, "cohere": 11, "mistral_sw": 12, "mixtral": 13,
                "phi_rotary": 14, "gpt_oss": 15, "llama_tied": 16}

# Files copied from the Hugging Face checkpoint into every fixture directory.
HF_FILES = ["config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
            "special_tokens_map.json"]
# Files an exporter may write that are kept; anything else it leaves behind is deleted.
KEEP_FILES = {"model.onnx", "model.onnx_data", "model.onnx.data", "genai_config.json", *HF_FILES}

# ONNX op types that say how attention is expressed; counted into fixture.json.
ATTENTION_OPS = ["Softmax", "MatMul", "Attention", "GroupQueryAttention", "MultiHeadAttention",
                 "RotaryEmbedding", "MatMulNBits", "SimplifiedLayerNormalization",
                 "SkipSimplifiedLayerNormalization", "RMSNormalization", "LayerNormalization"]


# ---------------------------------------------------------------------------------------------------------
# Tokenizer and checkpoints
# ---------------------------------------------------------------------------------------------------------
def train_tokenizer(corpus: Path) -> PreTrainedTokenizerFast:
    """Byte-level BPE (GPT-2 style, no BOS added) trained on the calibration documents 0-199."""
    docs = json.loads(corpus.read_text(encoding="utf-8"))[:200]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB,
        special_tokens=[EOS_TOKEN, PAD_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator((d["text"] for d in docs), trainer=trainer)
    assert tok.get_vocab_size() == VOCAB, tok.get_vocab_size()
    assert tok.token_to_id(EOS_TOKEN) == EOS_ID and tok.token_to_id(PAD_TOKEN) == PAD_ID
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=EOS_TOKEN,
        eos_token=EOS_TOKEN,
        unk_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        model_max_length=MAX_POSITIONS,
    )


def common_config() -> dict:
    return dict(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS,
        intermediate_size=INTERMEDIATE,
        max_position_embeddings=MAX_POSITIONS,
        tie_word_embeddings=False,
        initializer_range=INIT_RANGE,
        bos_token_id=EOS_ID,
        eos_token_id=EOS_ID,
        pad_token_id=PAD_ID,
        use_cache=True,
    )


def no_gqa_config() -> dict:
    """common_config() for families without grouped key/value heads (GPT-2, GPT-NeoX, Phi-2)."""
    config = common_config()
    config["num_key_value_heads"] = HEADS
    return config


# Architecture name -> function building the randomly initialised model.
ARCHITECTURES: dict[str, Callable[[], torch.nn.Module]] = {
    "llama": lambda: LlamaForCausalLM(LlamaConfig(**common_config())),
    # sliding_window=None: plain causal attention (the default 4096 is larger than any sequence anyway).
    "mistral": lambda: MistralForCausalLM(MistralConfig(**common_config(), sliding_window=None)),
    # Qwen2 has biases on q/k/v_proj.
    "qwen2": lambda: Qwen2ForCausalLM(Qwen2Config(**common_config())),
    # Phi-3 fuses q/k/v into qkv_proj and gate/up into gate_up_proj.
    "phi3": lambda: Phi3ForCausalLM(
        Phi3Config(**common_config(), original_max_position_embeddings=MAX_POSITIONS)),
    # Parallel residual (attention and MLP read the same stream, both added), partial rotary (25%).
    "gpt_neox": lambda: GPTNeoXForCausalLM(GPTNeoXConfig(
        **{k: v for k, v in no_gqa_config().items() if k != "num_key_value_heads"},
        rotary_pct=0.25, use_parallel_residual=True)),
    # Learned position embeddings added to the token embedding, LayerNorm with bias, fused c_attn
    # (Conv1D), tied embeddings.
    "gpt2": lambda: GPT2LMHeadModel(GPT2Config(
        vocab_size=VOCAB, n_positions=MAX_POSITIONS, n_embd=HIDDEN, n_layer=LAYERS, n_head=HEADS,
        n_inner=INTERMEDIATE, initializer_range=INIT_RANGE, bos_token_id=EOS_ID, eos_token_id=EOS_ID,
        pad_token_id=PAD_ID, use_cache=True, tie_word_embeddings=True)),
    # Embedding scaled by sqrt(d), sandwich norms (pre- and post-attention), final logit soft-capping,
    # sliding-window layers (window 4 < the 7-token reference) alternating with global ones. Attention
    # soft-capping is off: Optimum exports Gemma2 with SDPA attention, which drops it (logits 0.27 off).
    "gemma2": lambda: Gemma2ForCausalLM(Gemma2Config(
        **common_config(), head_dim=HEAD_DIM, sliding_window=4, query_pre_attn_scalar=HEAD_DIM,
        attn_logit_softcapping=None, final_logit_softcapping=30.0)),
    # Phi-2: parallel residual with one shared input norm, partial rotary (50%).
    "phi": lambda: PhiForCausalLM(PhiConfig(
        **{k: v for k, v in no_gqa_config().items() if k != "num_key_value_heads"},
        partial_rotary_factor=0.5)),
    # Llama with tied embeddings (the token embedding is the LM head's matrix), as small models ship.
    "llama_tied": lambda: LlamaForCausalLM(LlamaConfig(**{**common_config(), "tie_word_embeddings": True})),
    # Mixture of experts (4 experts, 2 per token) with attention sinks and alternating sliding-window
    # (window 4) and global layers.
    "gpt_oss": lambda: GptOssForCausalLM(GptOssConfig(
        **common_config(), head_dim=HEAD_DIM, num_local_experts=4, num_experts_per_tok=2, sliding_window=4)),
    # Phi-2 with rotary embeddings on the whole head: the GenAI builder's GroupQueryAttention needs a
    # rotary width that is a multiple of 16, which 50% of a 16-wide head is not.
    "phi_rotary": lambda: PhiForCausalLM(PhiConfig(
        **{k: v for k, v in no_gqa_config().items() if k != "num_key_value_heads"},
        partial_rotary_factor=1.0)),
    # RMSNorm on q and k per head.
    "qwen3": lambda: Qwen3ForCausalLM(Qwen3Config(**common_config(), head_dim=HEAD_DIM)),
    # Multipliers on the embedding, the residual branches, the attention scores and the logits.
    "granite": lambda: GraniteForCausalLM(GraniteConfig(
        **common_config(), embedding_multiplier=2.0, residual_multiplier=0.5, attention_multiplier=0.3,
        logits_scaling=4.0)),
    # No input norms: norms after attention and after the MLP, inside the branches.
    "olmo2": lambda: Olmo2ForCausalLM(Olmo2Config(**common_config())),
    # Parallel residual written as one Add chain: h + attn(norm(h)) + mlp(norm(h)).
    "cohere": lambda: CohereForCausalLM(CohereConfig(**common_config(), logit_scale=0.5)),
    # Sliding-window attention (window 4 < the 7-token reference) in every layer.
    "mistral_sw": lambda: MistralForCausalLM(MistralConfig(**common_config(), sliding_window=4)),
    # Mixture of experts: the MLP branch routes each token to 2 of 4 experts; attention as Mistral's.
    "mixtral": lambda: MixtralForCausalLM(MixtralConfig(
        **common_config(), num_local_experts=4, num_experts_per_tok=2, sliding_window=None)),
}


@dataclasses.dataclass
class Taps:
    """Where X and Y of a family's decoder layers are read in PyTorch.

    X is always the decoder layer's input (the residual stream). Y is the output of `y_module` (a path
    below the layer) times `y_scale`: the attention term as it is added to the stream.
    """
    layers: str = "model.layers"
    attention: str = "self_attn"
    y_module: str | None = None  # default: the attention module itself
    y_scale: Callable[[object], float] = lambda config: 1.0


TAPS: dict[str, Taps] = {
    "gpt_neox": Taps(layers="gpt_neox.layers", attention="attention"),
    "gpt2": Taps(layers="transformer.h", attention="attn"),
    # Sandwich norms belong to the branch: Y is the post-attention norm's output.
    "gemma2": Taps(y_module="post_attention_layernorm"),
    "olmo2": Taps(y_module="post_attention_layernorm"),
    "granite": Taps(y_scale=lambda config: config.residual_multiplier),
}


def taps(arch: str) -> Taps:
    return TAPS.get(arch, Taps())


def attribute(obj: object, path: str) -> object:
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


def weight_counts(hf_dir: Path, arch: str) -> dict:
    """Multiply-adds per token of every weight matrix (Linear and GPT-2's Conv1D, the LM head included,
    embedding lookups not), and of one layer's attention projections: what a graph-side count must find."""
    from transformers.pytorch_utils import Conv1D

    model = load_reference_model(hf_dir)

    def matrices(module: torch.nn.Module) -> int:
        return sum(m.weight.numel() for m in module.modules() if isinstance(m, (torch.nn.Linear, Conv1D)))

    tap = taps(arch)
    layers = attribute(model, tap.layers)
    # Weights used outside Linear modules (stacked experts of a mixture of experts) have no per-token
    # count: a token runs through a data-dependent share of them.
    in_linears = {id(m.weight) for m in model.modules() if isinstance(m, (torch.nn.Linear, Conv1D))}
    moe = any(p.dim() >= 3 and id(p) not in in_linears for p in model.parameters())
    heads = model.config.num_attention_heads if hasattr(model.config, "num_attention_heads") else model.config.n_head
    return {
        "weight_macs_per_token": None if moe else matrices(model),
        "attention_weights_per_layer": matrices(attribute(layers[0], tap.attention)),
        "attention_width": heads * kv_shape(model.config)[1],
    }


def kv_shape(config) -> tuple[int, int]:
    """(key/value heads, head size) of a checkpoint's config."""
    heads = getattr(config, "num_attention_heads", None) or config.n_head
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or HIDDEN // heads
    return kv_heads, head_dim


def randomise_norms_and_biases(model: torch.nn.Module, seed: int) -> None:
    """RMSNorm weights ~ 1 + N(0, 0.1²), biases ~ N(0, 0.1²) (transformers initialises them to 1 and 0)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            # Norm scales: *norm.weight in most families, ln_1/ln_2/ln_f in GPT-2 (1-D either way).
            if name.endswith("norm.weight") or (".ln_" in name and name.endswith(".weight")):
                param.copy_(1.0 + 0.1 * torch.randn(param.shape, generator=gen))
            elif name.endswith(".bias"):
                param.copy_(0.1 * torch.randn(param.shape, generator=gen))


def make_checkpoint(arch: str, tokenizer: PreTrainedTokenizerFast, hf_dir: Path) -> None:
    """Save a seeded random model of `arch` plus the tokenizer as a Hugging Face checkpoint."""
    seed = WEIGHT_SEEDS[arch]
    torch.manual_seed(seed)
    model = ARCHITECTURES[arch]().eval()
    randomise_norms_and_biases(model, seed + 100)
    model.save_pretrained(hf_dir)  # also writes generation_config.json with bos/eos/pad ids
    tokenizer.save_pretrained(hf_dir)


# ---------------------------------------------------------------------------------------------------------
# PyTorch reference
# ---------------------------------------------------------------------------------------------------------
def reference_input_ids() -> np.ndarray:
    gen = torch.Generator().manual_seed(INPUT_SEED)
    return torch.randint(2, VOCAB, (BATCH, SEQ), generator=gen, dtype=torch.int64).numpy()


def load_reference_model(hf_dir: Path) -> torch.nn.Module:
    """The checkpoint as the reference runs it: float32, eager attention, eval mode (a fresh copy)."""
    model = AutoModelForCausalLM.from_pretrained(hf_dir, attn_implementation="eager", dtype=torch.float32)
    return model.eval()


def torch_reference(hf_dir: Path, input_ids: np.ndarray, arch: str = "llama") -> dict[str, np.ndarray]:
    """Reference activations of the checkpoint (see `model_reference`), and the logits of the model with
    one layer's attention replaced by a linear map (see `patched_reference`)."""
    model = load_reference_model(hf_dir)
    return {**model_reference(model, input_ids, taps(arch)), **patched_reference(model, input_ids, taps(arch))}


# Tokens generated greedily from the first reference row, by PyTorch, for generation checks.
GENERATED = 8


def greedy_tokens(model: torch.nn.Module, input_ids: np.ndarray, hooks: Callable[[], list]) -> np.ndarray:
    """GENERATED tokens that `model` (with `hooks()` registered meanwhile) picks greedily after the first
    row of `input_ids`, with its KV cache."""
    handles = hooks()
    with torch.no_grad():
        out = model.generate(torch.from_numpy(input_ids[:1]), max_new_tokens=GENERATED, min_new_tokens=GENERATED,
                             do_sample=False, eos_token_id=None, pad_token_id=PAD_ID)
    for h in handles:
        h.remove()
    return out[0, input_ids.shape[1]:].numpy().astype(np.int64)


# The layer whose attention term `patched_reference` replaces, and the seed of its map.
PATCHED_LAYER, PATCH_SEED = 1, 4321


def patched_reference(model: torch.nn.Module, input_ids: np.ndarray, tap: Taps) -> dict[str, np.ndarray]:
    """What a rewrite must compute, in PyTorch terms: `model` with layer PATCHED_LAYER's attention term
    (as `Taps` defines it) replaced by `h W^T + b` of the layer's input `h`, for a seeded random W, b.

    patched.layer: the layer; patched.weight [d, d] and patched.bias [d]: W and b; patched.logits.
    For a parallel block this is `h + mlp(norm(h)) + W h + b`; the attention still runs, its term is
    overwritten.
    """
    gen = torch.Generator().manual_seed(PATCH_SEED)
    weight = 0.1 * torch.randn(HIDDEN, HIDDEN, generator=gen)
    bias = 0.1 * torch.randn(HIDDEN, generator=gen)
    layer = attribute(model, tap.layers)[PATCHED_LAYER]
    scale = tap.y_scale(model.config)
    stream: dict[str, torch.Tensor] = {}

    def take_input(_module, args, kwargs):
        stream["h"] = args[0] if args else kwargs["hidden_states"]

    def replace_term(_module, _args, output):
        term = (stream["h"] @ weight.T + bias) / scale
        return (term, *output[1:]) if isinstance(output, tuple) else term

    hooks = [layer.register_forward_pre_hook(take_input, with_kwargs=True),
             attribute(layer, tap.y_module or tap.attention).register_forward_hook(replace_term)]
    ids = torch.from_numpy(input_ids)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=torch.ones_like(ids),
                       position_ids=torch.arange(SEQ).expand(BATCH, SEQ), use_cache=False).logits
    for h in hooks:
        h.remove()
    generated = greedy_tokens(model, input_ids, hooks=lambda: [
        layer.register_forward_pre_hook(take_input, with_kwargs=True),
        attribute(layer, tap.y_module or tap.attention).register_forward_hook(replace_term)])
    return {
        "patched.generated": generated,
        "generated": greedy_tokens(model, input_ids, hooks=list),
        "patched.layer": np.array([PATCHED_LAYER], dtype=np.int64),
        "patched.weight": weight.numpy(),
        "patched.bias": bias.numpy(),
        "patched.logits": logits.detach().float().numpy().copy(),
    }


def model_reference(model: torch.nn.Module, input_ids: np.ndarray, tap: Taps = Taps()) -> dict[str, np.ndarray]:
    """Per-layer attention input/output and logits of `model`, in float32.

    layers.<i>.x: the input of decoder layer i (forward pre-hook): the residual stream, [batch, seq, hidden]
                  (for the Llama family, the argument of its input_layernorm);
    layers.<i>.y: the attention term layer i adds to the stream (see `Taps`), [batch, seq, hidden]. For
                  Phi-3 the decoder layer applies resid_attn_dropout to it, an identity in eval mode.
    """
    captured: dict[str, np.ndarray] = {}
    hooks = []
    scale = tap.y_scale(model.config)
    for i, layer in enumerate(attribute(model, tap.layers)):
        def pre_hook(_module, args, kwargs, i=i):
            x = args[0] if args else kwargs["hidden_states"]
            captured[f"layers.{i}.x"] = x.detach().float().numpy().copy()

        def post_hook(_module, _args, output, i=i):
            y = output[0] if isinstance(output, tuple) else output
            captured[f"layers.{i}.y"] = (y * scale).detach().float().numpy().copy()

        hooks.append(layer.register_forward_pre_hook(pre_hook, with_kwargs=True))
        hooks.append(attribute(layer, tap.y_module or tap.attention).register_forward_hook(post_hook))
    ids = torch.from_numpy(input_ids)
    with torch.no_grad():
        out = model(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            position_ids=torch.arange(SEQ).expand(BATCH, SEQ),
            use_cache=False,
        )
    for h in hooks:
        h.remove()
    captured["logits"] = out.logits.detach().float().numpy().copy()
    for i in range(LAYERS):
        assert captured[f"layers.{i}.x"].shape == (BATCH, SEQ, HIDDEN)
        assert captured[f"layers.{i}.y"].shape == (BATCH, SEQ, HIDDEN)
    return captured


# ---------------------------------------------------------------------------------------------------------
# Int4 (com.microsoft MatMulNBits) weights read back from a graph, for a reference that the quantised graph
# matches to float rounding instead of to the quantisation error.
# ---------------------------------------------------------------------------------------------------------
def dequantise_matmulnbits(node: onnx.NodeProto, initializers: dict[str, np.ndarray]) -> np.ndarray:
    """The float32 weight W [N, K] that a MatMulNBits node multiplies by (Y = A @ W^T).

    com.microsoft MatMulNBits (onnxruntime docs/ContribOperators.md): B is uint8 [N, n_blocks, blob_size],
    each byte holding two 4-bit values, low nibble first (bits = 4), or one 8-bit value (bits = 8), K padded
    up to n_blocks * block_size; scales are [N * n_blocks] (or [N, n_blocks]); zero_points are optional,
    either uint8 packed like B ([N * ceil(n_blocks * bits / 8)]) or in the scales' dtype, and default to
    2^(bits - 1). Then
    W[n, k] = (q[n, k] - zero_point[n, k // block_size]) * scale[n, k // block_size].
    """
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    k, n, bits, block = attrs["K"], attrs["N"], attrs.get("bits", 4), attrs["block_size"]
    if bits not in (4, 8):
        raise NotImplementedError(f"{node.name}: MatMulNBits with bits={bits}")
    if any(node.input[4:]):  # g_idx (act-order) and bias are not produced by the GenAI builder
        raise NotImplementedError(f"{node.name}: MatMulNBits with g_idx or bias inputs")
    packed = initializers[node.input[1]]
    n_blocks = (k + block - 1) // block
    assert packed.dtype == np.uint8 and packed.shape == (n, n_blocks, block * bits // 8), (node.name, packed.shape)
    unpack = (lambda b: np.stack([b & 0x0F, b >> 4], axis=-1)) if bits == 4 else (lambda b: b)
    q = unpack(packed).reshape(n, n_blocks, block).astype(np.float32)
    scales = initializers[node.input[2]].astype(np.float32).reshape(n, n_blocks)
    zero_points: np.ndarray | float = float(2 ** (bits - 1))
    if len(node.input) > 3 and node.input[3]:
        zp = initializers[node.input[3]]
        if zp.dtype == np.uint8:  # packed like B, each row padded to whole bytes
            zp = unpack(zp).reshape(n, -1)[:, :n_blocks]
        zero_points = zp.astype(np.float32).reshape(n, n_blocks, 1)
    weight = (q - zero_points) * scales[:, :, None]
    return weight.reshape(n, n_blocks * block)[:, :k]


def genai_hf_linears(model: torch.nn.Module, node_name: str) -> list[torch.nn.Linear]:
    """The Hugging Face Linear modules whose stacked weights a GenAI builder MatMul node computes with.

    Builder node names follow the module path: `/model/layers.<i>/attn/<proj>/MatMul[_Q4]` (attn is
    self_attn; qkv_proj is q, k and v stacked along the output dimension), `/model/layers.<i>/mlp/<proj>/...`
    (gate_up_proj, if fused, is gate then up) and `/lm_head/MatMul[_Q4]`.
    """
    parts = node_name.strip("/").split("/")
    if parts[0] == "lm_head":
        return [model.lm_head]
    if parts[0] == "model" and parts[1].startswith("layers."):
        layer = model.model.layers[int(parts[1].split(".")[1])]
        block, proj = parts[2], parts[3]
        if block == "attn":
            attn = layer.self_attn
            if proj == "qkv_proj":
                return [attn.q_proj, attn.k_proj, attn.v_proj]
            return [getattr(attn, proj)]
        if block == "mlp":
            if proj == "gate_up_proj" and not hasattr(layer.mlp, proj):
                return [layer.mlp.gate_proj, layer.mlp.up_proj]
            return [getattr(layer.mlp, proj)]
    raise ValueError(f"no Hugging Face module known for ONNX node {node_name!r}")


def load_dequantised_weights(model: torch.nn.Module, onnx_path: Path) -> list[str]:
    """Replace, in `model`, every weight that the graph quantised by its dequantised value from the graph.

    Returns the names of the replaced parameters. Weights that the graph keeps in float (e.g. the embedding
    table of the GenAI builder's int4 models) are left alone.
    """
    graph = onnx.load(onnx_path)  # with the external data
    nodes = [n for n in graph.graph.node if n.op_type == "MatMulNBits"]
    tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
    if tied and not any(n.op_type == "GatherBlockQuantized" for n in graph.graph.node):
        # The builder quantised the LM head but kept the embedding table in float (its int8 path):
        # the graph unties them, and so must the reference.
        model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone())
    needed = {name for n in nodes for name in n.input[1:4] if name}
    initializers = {i.name: onnx.numpy_helper.to_array(i) for i in graph.graph.initializer if i.name in needed}
    params = {id(p): name for name, p in model.named_parameters()}
    replaced = []
    with torch.no_grad():
        for node in nodes:
            weight = torch.from_numpy(dequantise_matmulnbits(node, initializers))
            linears = genai_hf_linears(model, node.name)
            rows = [lin.out_features for lin in linears]
            assert weight.shape == (sum(rows), linears[0].in_features), (node.name, weight.shape, rows)
            for lin, part in zip(linears, torch.split(weight, rows, dim=0)):
                assert lin.bias is None, f"{node.name}: Linear with bias"
                lin.weight.copy_(part)
                replaced.append(params[id(lin.weight)])
    assert len(set(replaced)) == len(replaced), replaced
    return replaced


def genai_layer_outputs(onnx_path: Path) -> dict[str, str]:
    """Reference tensor name -> the GenAI builder graph value holding the same activation.

    layers.<i>.x: the embedding for layer 0 (a Gather, or a GatherBlockQuantized of tied int4 weights);
    for later layers the residual-stream output (index 3) of the SkipSimplifiedLayerNormalization that
    adds the previous layer's MLP output and normalises.
    layers.<i>.y: the o_proj output.
    """
    graph = onnx.load(onnx_path, load_external_data=False).graph
    embedding = next(n.output[0] for n in graph.node
                     if n.name.startswith("/model/embed_tokens/") and n.op_type in ("Gather", "GatherBlockQuantized"))
    names = {}
    for i in range(LAYERS):
        names[f"layers.{i}.x"] = (embedding if i == 0 else f"/model/layers.{i}/input_layernorm/output_3")
        names[f"layers.{i}.y"] = f"/model/layers.{i}/attn/o_proj/MatMul/output_0"
    return names


# ---------------------------------------------------------------------------------------------------------
# Exporters. Each writes model.onnx (+ data) into `out` and returns (exporter name, exporter version).
# ---------------------------------------------------------------------------------------------------------
def export_optimum(hf_dir: Path, out: Path, with_past: bool, dtype: str = "fp32") -> tuple[str, str]:
    """Equivalent of `optimum-cli export onnx -m HF_DIR --task text-generation[-with-past] --dtype DTYPE OUT`."""
    from importlib.metadata import version

    from optimum.exporters.onnx import main_export

    task = "text-generation-with-past" if with_past else "text-generation"
    main_export(str(hf_dir), output=str(out), task=task, device="cpu", dtype=dtype)
    return "optimum-onnx", f"optimum-onnx {version('optimum-onnx')} (optimum {version('optimum')})"


def resave_external(src: Path, out: Path) -> None:
    """Re-save a model with every initializer in one external file, named as Optimum names it."""
    model = onnx.load(src / "model.onnx")
    onnx.save_model(model, out / "model.onnx", save_as_external_data=True, all_tensors_to_one_file=True,
                    location="model.onnx_data", size_threshold=0)


class LogitsOnly(torch.nn.Module):
    """input_ids, attention_mask -> logits, without KV cache (for torch.onnx.export).

    Position ids are 0..seq-1 for every row, expanded to [batch, seq] explicitly. Left to transformers
    they would be [1, seq], and at opset 23 the exporter feeds the resulting [1, seq, head_dim / 2] cos/sin
    caches to the standard RotaryEmbedding op, which ONNX Runtime rejects for batch > 1 ("Inputs
    'cos_cache' and 'sin_cache' are expected to have the same shape as input 'x'").
    """

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        batch, seq = input_ids.shape
        position_ids = torch.arange(seq, device=input_ids.device).unsqueeze(0).expand(batch, seq)
        return self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                          use_cache=False).logits


def export_dynamo(hf_dir: Path, out: Path, opset: int | None) -> tuple[str, str]:
    """torch.onnx.export(dynamo=True) with dynamic batch and sequence axes; default opset unless given."""
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    ids = torch.from_numpy(reference_input_ids())
    batch, seq = torch.export.Dim("batch"), torch.export.Dim("sequence")
    kwargs = {} if opset is None else {"opset_version": opset}
    torch.onnx.export(
        LogitsOnly(model).eval(),
        (ids, torch.ones_like(ids)),
        str(out / "model.onnx"),
        dynamo=True,
        input_names=["input_ids", "attention_mask"],
        output_names=["logits"],
        dynamic_shapes={"input_ids": {0: batch, 1: seq}, "attention_mask": {0: batch, 1: seq}},
        **kwargs,
    )
    return "torch.onnx (dynamo)", f"torch {torch.__version__}"


def export_genai(hf_dir: Path, out: Path, precision: str, provider: str, genai_python: Path,
                 extra_options: list[str]) -> tuple[str, str]:
    """`python -m onnxruntime_genai.models.builder`, run with the interpreter of the GenAI virtualenv."""
    if not genai_python.exists():
        raise FileNotFoundError(f"{genai_python} not found: create the GenAI virtualenv (see the docstring) "
                                "or pass --genai-python")
    with tempfile.TemporaryDirectory() as cache:
        cmd = [str(genai_python), "-m", "onnxruntime_genai.models.builder", "-i", str(hf_dir), "-o", str(out),
               "-p", precision, "-e", provider, "-c", cache]
        if extra_options:
            cmd += ["--extra_options", *extra_options]
        print("  $", " ".join(cmd), flush=True)
        run = subprocess.run(cmd, capture_output=True, text=True)
        print(run.stdout + run.stderr, flush=True)
        if run.returncode != 0:  # the builder's own reason, e.g. "The ... model is not currently supported."
            lines = [line for line in run.stderr.splitlines() if "Error" in line] or ["exit status"]
            raise RuntimeError(f"the builder failed: {lines[-1].split('Error: ')[-1].strip()}")
    ver = subprocess.run(
        [str(genai_python), "-c",
         "from importlib.metadata import version as v; "
         "print(f\"onnxruntime-genai {v('onnxruntime-genai')} (transformers {v('transformers')})\")"],
        check=True, capture_output=True, text=True).stdout.strip()
    return "onnxruntime-genai builder", ver


# ---------------------------------------------------------------------------------------------------------
# Fixture list
# ---------------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Fixture:
    name: str
    arch: str
    # (hf_dir, out_dir, args) -> (exporter, exporter version)
    export: Callable[[Path, Path, argparse.Namespace], tuple[str, str]]
    dtype: str = "float32"
    # Maximum |logits_onnx - logits_torch| accepted; None: only reported (quantised weights).
    tolerance: float | None = 1e-4
    # A fixture whose export may legitimately fail with this toolchain; the failure is reported, not raised.
    optional: bool = False
    # Quantised graph (MatMulNBits): the reference runs the checkpoint with the graph's dequantised weights
    # instead of the original float32 ones (see `load_dequantised_weights`).
    dequantised_reference: bool = False
    notes: str = ""


def _optimum_extdata(hf_dir: Path, out: Path, _args: argparse.Namespace) -> tuple[str, str]:
    with tempfile.TemporaryDirectory() as tmp:
        exporter = export_optimum(hf_dir, Path(tmp), with_past=True)
        resave_external(Path(tmp), out)
        for name in HF_FILES:
            if (Path(tmp) / name).exists():
                shutil.copy(Path(tmp) / name, out / name)
    return exporter


def _optimum_dynamic_int8(hf_dir: Path, out: Path, _args: argparse.Namespace) -> tuple[str, str]:
    """The Optimum export quantised by ONNX Runtime's `quantize_dynamic` (int8 weights)."""
    from importlib.metadata import version

    from onnxruntime.quantization import QuantType, quantize_dynamic

    with tempfile.TemporaryDirectory() as tmp:
        _, exporter_version = export_optimum(hf_dir, Path(tmp), with_past=True)
        quantize_dynamic(Path(tmp) / "model.onnx", out / "model.onnx", weight_type=QuantType.QInt8)
        for name in HF_FILES:
            if (Path(tmp) / name).exists():
                shutil.copy(Path(tmp) / name, out / name)
    return "onnxruntime.quantization", f"quantize_dynamic (onnxruntime {version('onnxruntime')}) of {exporter_version}"


def _optimum_dynamic_int8_optimised(hf_dir: Path, out: Path, args: argparse.Namespace) -> tuple[str, str]:
    """`_optimum_dynamic_int8`, then saved by ONNX Runtime at its extended optimisation level, as its
    `optimized_model_filepath` writes it: fused MatMulIntegerToFloat, and a DequantizeLinear of the
    int8 embedding for each of its consumers."""
    with tempfile.TemporaryDirectory() as tmp:
        _, exporter_version = _optimum_dynamic_int8(hf_dir, Path(tmp), args)
        options = onnxruntime.SessionOptions()
        options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        options.optimized_model_filepath = str(out / "model.onnx")
        onnxruntime.InferenceSession(str(Path(tmp) / "model.onnx"), options, providers=["CPUExecutionProvider"])
        for name in HF_FILES:
            if (Path(tmp) / name).exists():
                shutil.copy(Path(tmp) / name, out / name)
    return "onnxruntime", f"ORT_ENABLE_EXTENDED (onnxruntime {onnxruntime.__version__}) of {exporter_version}"


def _optimum_qdq(hf_dir: Path, out: Path, _args: argparse.Namespace) -> tuple[str, str]:
    """The Optimum export quantised by ONNX Runtime's `quantize_static` in QDQ format: MatMul inputs
    (per-channel int8 weights, uint8 activations calibrated on random token ids) as
    QuantizeLinear/DequantizeLinear pairs."""
    from importlib.metadata import version

    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    with tempfile.TemporaryDirectory() as tmp:
        _, exporter_version = export_optimum(hf_dir, Path(tmp), with_past=True)
        graph = onnx.load(Path(tmp) / "model.onnx").graph
        names = [i.name for i in graph.input]
        rng = np.random.default_rng(0)
        feeds = []
        for _ in range(8):
            feed = {"input_ids": rng.integers(2, VOCAB, (1, SEQ)).astype(np.int64),
                    "attention_mask": np.ones((1, SEQ), np.int64)}
            if "position_ids" in names:
                feed["position_ids"] = np.arange(SEQ, dtype=np.int64)[None]
            for name in names:
                if name.startswith("past_key_values"):
                    feed[name] = np.zeros((1, KV_HEADS, 0, HEAD_DIM), np.float32)
            feeds.append(feed)

        class Reader(CalibrationDataReader):
            def __init__(self):
                self.feeds = iter(feeds)

            def get_next(self):
                return next(self.feeds, None)

        quantize_static(Path(tmp) / "model.onnx", out / "model.onnx", Reader(), quant_format=QuantFormat.QDQ,
                        op_types_to_quantize=["MatMul"], activation_type=QuantType.QUInt8,
                        weight_type=QuantType.QInt8, per_channel=True)
        for name in HF_FILES:
            if (Path(tmp) / name).exists():
                shutil.copy(Path(tmp) / name, out / name)
    return "onnxruntime.quantization", f"quantize_static QDQ (onnxruntime {version('onnxruntime')}) of {exporter_version}"


def _optimum(notes: str = "", **kwargs) -> dict:
    return dict(export=lambda h, o, a: export_optimum(h, o, with_past=True), notes=notes, optional=True,
                **kwargs)


FIXTURES = [
    Fixture("llama-optimum-past", "llama", lambda h, o, a: export_optimum(h, o, with_past=True),
            notes="KV cache inputs past_key_values.N.key/value, outputs present.N.key/value."),
    Fixture("llama-optimum-nopast", "llama", lambda h, o, a: export_optimum(h, o, with_past=False)),
    # Exported on the CPU; the same export on CUDA (--device cuda) writes a byte-identical graph.
    Fixture("llama-optimum-fp16", "llama", lambda h, o, a: export_optimum(h, o, with_past=True, dtype="fp16"),
            dtype="float16", tolerance=5e-2,
            notes="--dtype fp16: float16 weights, KV cache and logits. The branches compute in float16, but the residual sums run in float32 (the "
                  "f16 embedding is cast up before layer 0's Add), the attention's softmax and o_proj run in "
                  "float32 (the mask is float32), and the norms compute in float32."),
    Fixture("llama-optimum-extdata", "llama", _optimum_extdata,
            notes="llama-optimum-past re-saved by onnx.save_model with every initializer in "
                  "model.onnx_data."),
    # Activations are quantised at run time, so no tolerance: the tests compare X and Y with PyTorch's
    # float32 ones by direction (cosine), not value.
    Fixture("llama-optimum-dynamic-int8", "llama", _optimum_dynamic_int8,
            dtype="int8 weights, activations quantised at run time (dynamic)", tolerance=None,
            notes="llama-optimum-past quantised by onnxruntime.quantization.quantize_dynamic (QInt8): every "
                  "MatMul is DynamicQuantizeLinear + MatMulInteger + scale Mul, and the embedding table is "
                  "int8, its gathered rows dequantised (DequantizeLinear)."),
    Fixture("llama-optimum-dynamic-int8-optimised", "llama", _optimum_dynamic_int8_optimised,
            dtype="int8 weights, activations quantised at run time (dynamic)", tolerance=None,
            notes="llama-optimum-dynamic-int8 as ONNX Runtime saves it optimised (ORT_ENABLE_EXTENDED): "
                  "com.microsoft MatMulIntegerToFloat, and one DequantizeLinear copy of the int8 embedding "
                  "per consumer."),
    Fixture("llama-optimum-qdq", "llama", _optimum_qdq,
            dtype="int8 weights, uint8 activations quantised statically (QDQ)", tolerance=None,
            notes="llama-optimum-past quantised by onnxruntime.quantization.quantize_static in QDQ format, "
                  "MatMuls only (per-channel int8 weights, uint8 activations): each MatMul reads "
                  "DequantizeLinear(QuantizeLinear(x)) and DequantizeLinear(w), and its output is "
                  "quantised and dequantised again. The residual stream itself stays float32."),
    Fixture("mistral-optimum-past", "mistral", lambda h, o, a: export_optimum(h, o, with_past=True),
            notes="sliding_window=None."),
    Fixture("qwen2-optimum-past", "qwen2", lambda h, o, a: export_optimum(h, o, with_past=True),
            notes="q/k/v_proj have biases (Add after MatMul)."),
    Fixture("phi3-optimum-past", "phi3", lambda h, o, a: export_optimum(h, o, with_past=True),
            notes="Fused qkv_proj (one MatMul, then Slice into q/k/v) and fused gate_up_proj."),
    Fixture("llama-dynamo", "llama", lambda h, o, a: export_dynamo(h, o, opset=None),
            notes="No KV cache; inputs input_ids, attention_mask; dynamic batch/sequence. Node names are "
                  "generic (node_linear_3); the module path is in the node metadata_props "
                  "(pkg.torch.onnx.name_scopes)."),
    Fixture("llama-dynamo-opset23", "llama", lambda h, o, a: export_dynamo(h, o, opset=23), optional=True,
            notes="As llama-dynamo with opset_version=23: standard Attention, RotaryEmbedding and "
                  "RMSNormalization ops."),
    Fixture("llama-genai-fp32", "llama",
            lambda h, o, a: export_genai(h, o, "fp32", "cpu", a.genai_python, []),
            notes="Fused qkv_proj MatMul feeding GroupQueryAttention (rotary inside, cos/sin_cache "
                  "initializers); residual adds fused into SkipSimplifiedLayerNormalization."),
    Fixture("llama-genai-int4", "llama",
            lambda h, o, a: export_genai(h, o, "int4", "cpu", a.genai_python, ["int4_block_size=32"]),
            dtype="int4 weights (MatMulNBits), float32 activations", optional=True, dequantised_reference=True,
            notes="Built with --extra_options int4_block_size=32 (symmetric, no zero points; embedding kept "
                  "float32). The reference uses the DEQUANTISED int4 weights read back from model.onnx, not "
                  "the fp32 checkpoint; the logits diff is measured with MatMulNBits accuracy_level=1 "
                  "(float32 compute), since the builder's accuracy_level=4 lets ONNX Runtime quantise the "
                  "activations to int8 (logits_max_abs_diff_onnx_as_written_vs_torch)."),
    Fixture("llama-genai-int4-zp", "llama",
            lambda h, o, a: export_genai(h, o, "int4", "cpu", a.genai_python,
                                         ["int4_block_size=32", "is_symmetric=false"]),
            dtype="int4 weights (MatMulNBits, zero points), float32 activations", optional=True,
            dequantised_reference=True,
            notes="As llama-genai-int4, built with --extra_options is_symmetric=false: uint4 weights with a "
                  "packed 4-bit zero point per block (MatMulNBits input 3)."),
    Fixture("llama-tied-genai-int8", "llama_tied",
            lambda h, o, a: export_genai(h, o, "int8", "cpu", a.genai_python, ["int4_block_size=32"]),
            dtype="int8 weights (MatMulNBits bits=8), float32 activations", optional=True,
            dequantised_reference=True,
            notes="Tied embeddings, -p int8: unlike its int4 path, the builder quantises only the LM head "
                  "(MatMulNBits bits=8) and keeps the token embedding a float Gather, so the graph unties "
                  "them (and the reference with it)."),
    Fixture("llama-genai-int8", "llama",
            lambda h, o, a: export_genai(h, o, "int8", "cpu", a.genai_python, ["int4_block_size=32"]),
            dtype="int8 weights (MatMulNBits bits=8), float32 activations", optional=True,
            dequantised_reference=True,
            notes="-p int8 -e cpu, block size 32: MatMulNBits with bits=8 (symmetric, no zero points)."),
    # The builder lists FP16 CPU as unsupported but still writes a graph: with -e cpu it uses
    # com.microsoft MultiHeadAttention + RotaryEmbedding and takes position_ids, instead of GQA.
    # With tied embeddings the builder quantises the shared matrix once: the LM head reads it as
    # MatMulNBits and the token embedding as GatherBlockQuantized.
    Fixture("llama-tied-genai-int4", "llama_tied",
            lambda h, o, a: export_genai(h, o, "int4", "cpu", a.genai_python, ["int4_block_size=32"]),
            dtype="int4 weights (MatMulNBits), float32 activations", optional=True, dequantised_reference=True,
            notes="Tied embeddings, built with --extra_options int4_block_size=32: the shared int4 matrix is "
                  "the LM head (MatMulNBits) and the token embedding (GatherBlockQuantized). The reference "
                  "uses the dequantised weights, the embedding included (it is the LM head's)."),
    Fixture("llama-genai-fp16", "llama",
            lambda h, o, a: export_genai(h, o, "fp16", "cpu", a.genai_python, []),
            dtype="float16", tolerance=5e-2, optional=True,
            notes="-p fp16 -e cpu (not in the builder's list of valid combinations, built anyway): "
                  "MultiHeadAttention instead of GQA, position_ids input, float16 KV cache and logits."),
    # -e cuda only changes the graph the builder writes; building needs no GPU, and ONNX Runtime's CPU
    # provider runs the float16 GroupQueryAttention.
    Fixture("llama-genai-fp16-cuda", "llama",
            lambda h, o, a: export_genai(h, o, "fp16", "cuda", a.genai_python, []),
            dtype="float16", tolerance=5e-2, optional=True,
            notes="-p fp16 -e cuda (graph only; runs on the CPU provider): float16 GroupQueryAttention, "
                  "float16 KV cache and logits."),
    # Other decoder families, each as Optimum exports it (see ARCHITECTURES for what each one adds).
    Fixture("gptneox-optimum-past", "gpt_neox", **_optimum(
        "Parallel residual: h + attn(ln1(h)) + mlp(ln2(h)); partial rotary (25%); 4 KV heads.")),
    Fixture("gpt2-optimum-past", "gpt2", **_optimum(
        "Learned position embeddings added to the token embedding; LayerNorm with bias; fused c_attn "
        "(Conv1D); tied embeddings; 4 KV heads.")),
    Fixture("gemma2-optimum-past", "gemma2", **_optimum(
        "Embedding scaled by sqrt(d); sandwich norms (Y is the post-attention norm's output); final logit "
        "soft-capping; sliding-window layers (window 4) alternate with global ones. Attention soft-capping "
        "off: the export (SDPA attention) drops it.")),
    Fixture("phi2-optimum-past", "phi", **_optimum(
        "Phi-2: parallel residual with one shared LayerNorm; partial rotary (50%); 4 KV heads.")),
    Fixture("qwen3-optimum-past", "qwen3", **_optimum("RMSNorm on q and k per head.")),
    Fixture("granite-optimum-past", "granite", **_optimum(
        "Multipliers: embedding 2.0, residual 0.5 (Y is the attention output times 0.5), attention 0.3, "
        "logits 1/4.")),
    Fixture("olmo2-optimum-past", "olmo2", **_optimum(
        "No input norms; norms after attention and MLP inside the branches (Y is the post-attention "
        "norm's output).")),
    Fixture("cohere-optimum-past", "cohere", **_optimum(
        "Parallel residual as one Add chain: h + attn(ln(h)) + mlp(ln(h)); tied embeddings; logit scale.")),
    Fixture("mistral-sw-optimum-past", "mistral_sw", **_optimum("sliding_window=4 in every layer.")),
    Fixture("gptoss-optimum-past", "gpt_oss", **_optimum(
        "GPT-OSS: mixture of experts (4 experts, 2 per token) in the MLP branch, attention sinks, sliding "
        "window 4 on every other layer.")),
    Fixture("gptneox-dynamo", "gpt_neox", lambda h, o, a: export_dynamo(h, o, opset=None), optional=True,
            notes="As gptneox-optimum-past, exported by torch.onnx (dynamo), no KV cache."),
    Fixture("mixtral-dynamo", "mixtral", lambda h, o, a: export_dynamo(h, o, opset=None), optional=True,
            notes="Mixture of experts (4 experts, 2 per token) in the MLP branch; no KV cache."),
    *[Fixture(f"{name}-genai-fp32", arch,
              lambda h, o, a: export_genai(h, o, "fp32", "cpu", a.genai_python, []), optional=True,
              tolerance=1e-3 if arch == "phi_rotary" else 1e-4,
              notes=f"Built by the ONNX Runtime GenAI builder (fp32, CPU)." + (
                  " Logits within 1e-3 of PyTorch (its GELU differs slightly)." if arch == "phi_rotary" else ""))
      for name, arch in [("gemma2", "gemma2"), ("qwen3", "qwen3"), ("phi2", "phi"), ("granite", "granite"),
                         ("olmo2", "olmo2"), ("mistral-sw", "mistral_sw"), ("gptneox", "gpt_neox"),
                         ("gpt2", "gpt2"), ("cohere", "cohere"), ("phi2-rotary", "phi_rotary"),
                         ("mixtral", "mixtral")]],
]


# ---------------------------------------------------------------------------------------------------------
# ONNX inspection, feeds, verification
# ---------------------------------------------------------------------------------------------------------
def value_infos(values) -> list[dict]:
    """Name, numpy dtype name and shape (ints or symbolic names) of graph inputs/outputs."""
    result = []
    for v in values:
        t = v.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in t.shape.dim]
        dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(t.elem_type)).name
        result.append({"name": v.name, "dtype": dtype, "shape": dims})
    return result


def inspect_graph(path: Path) -> dict:
    model = onnx.load(path, load_external_data=False)
    windows = [a.i for n in model.graph.node if n.op_type == "GroupQueryAttention" for a in n.attribute
               if a.name == "local_window_size" and a.i > 0]
    initializers = {i.name for i in model.graph.initializer}
    nodes = list(model.graph.node)
    for function in model.functions:  # count nodes of local functions too (none expected)
        nodes.extend(function.node)
    counts = Counter(n.op_type for n in nodes)
    domains = Counter(f"{n.domain}::{n.op_type}" for n in nodes if n.domain not in ("", "ai.onnx"))
    opsets = {imp.domain or "ai.onnx": imp.version for imp in model.opset_import}
    return {
        "inputs": [v for v in value_infos(model.graph.input) if v["name"] not in initializers],
        "outputs": value_infos(model.graph.output),
        "opsets": opsets,
        "op_counts": {op: counts[op] for op in ATTENTION_OPS if counts[op]},
        "non_standard_ops": dict(sorted(domains.items())),
        "num_nodes": len(nodes),
        # A GroupQueryAttention with a sliding window takes a static cache at least that long.
        "static_cache": max(windows) if windows else None,
        "num_functions": len(model.functions),
    }


def attention_kind(graph: dict) -> str:
    ops = graph["op_counts"]
    if ops.get("GroupQueryAttention"):
        return "GroupQueryAttention"
    if ops.get("MultiHeadAttention"):
        return "MultiHeadAttention"
    if ops.get("Attention"):
        return "Attention"
    return "decomposed"


def make_feeds(graph: dict, input_ids: np.ndarray, kv: tuple[int, int] = (KV_HEADS, HEAD_DIM)
               ) -> tuple[dict[str, np.ndarray], int]:
    """Feeds for a prompt of SEQ tokens with an empty KV cache; returns (feeds, past length)."""
    kv_heads, head_dim = kv
    past = 0
    # A static cache (see inspect_graph) is a buffer of capacity max(window, tokens), empty or not.
    capacity = max(graph["static_cache"], SEQ) if graph["static_cache"] else past
    feeds = {}
    for inp in graph["inputs"]:
        name, dtype = inp["name"], np.dtype(inp["dtype"])
        if name == "input_ids":
            feeds[name] = input_ids.astype(dtype)
        elif name == "attention_mask":  # covers past + current tokens
            feeds[name] = np.ones((BATCH, past + SEQ), dtype=dtype)
        elif name == "position_ids":
            feeds[name] = np.broadcast_to(np.arange(past, past + SEQ, dtype=dtype), (BATCH, SEQ)).copy()
        elif name.startswith("past_key_values."):
            # [batch, kv_heads, past, head_dim]; a dimension is either the expected number or symbolic.
            shape = inp["shape"]
            assert len(shape) == 4, (name, shape)
            for dim, expected in ((shape[1], kv_heads), (shape[3], head_dim)):
                assert dim == expected or isinstance(dim, str), (name, shape)
            feeds[name] = np.zeros((BATCH, kv_heads, capacity, head_dim), dtype=dtype)
        else:
            raise ValueError(f"unexpected graph input {name!r}")
    return feeds, past


def run_onnx(path: Path, feeds: dict[str, np.ndarray]) -> np.ndarray:
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = 1
    session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    (logits,) = session.run(["logits"], feeds)
    return logits.astype(np.float32)


def run_onnx_float_matmulnbits(path: Path, feeds: dict[str, np.ndarray],
                               extra_outputs: list[str]) -> dict[str, np.ndarray]:
    """Logits and the intermediate values `extra_outputs` of a copy of the graph whose MatMulNBits nodes
    compute in float32.

    accuracy_level is the lowest precision MatMulNBits may use for its input A; the GenAI builder writes 4
    (int8), with which ONNX Runtime's CPU kernels quantise the activations to int8 blockwise where the CPU
    supports it, an error on the order of the weight quantisation. accuracy_level=1 (float32) leaves only
    float rounding against a reference that uses the dequantised weights. The copy lives only in memory.
    """
    model = onnx.load(path)
    for node in model.graph.node:
        if node.op_type == "MatMulNBits":
            for attr in node.attribute:
                if attr.name == "accuracy_level":
                    attr.i = 1
    for name in extra_outputs:
        model.graph.output.append(onnx.helper.make_empty_tensor_value_info(name))
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = 1
    session = onnxruntime.InferenceSession(model.SerializeToString(), options,
                                           providers=["CPUExecutionProvider"])
    names = ["logits", *extra_outputs]
    return {name: value.astype(np.float32) for name, value in zip(names, session.run(names, feeds))}


# ---------------------------------------------------------------------------------------------------------
# Building one fixture
# ---------------------------------------------------------------------------------------------------------
def build_fixture(fx: Fixture, hf_dir: Path, reference: dict[str, np.ndarray], input_ids: np.ndarray,
                  out_root: Path, args: argparse.Namespace) -> dict:
    out = out_root / fx.name
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    print(f"[{fx.name}] exporting", flush=True)
    exporter, exporter_version = fx.export(hf_dir, out, args)

    # Keep only the model and its data; the canonical config/tokenizer files replace the exporter's
    # copies so that every fixture carries identical ones.
    for path in sorted(out.iterdir()):
        if path.name not in KEEP_FILES or path.is_dir():
            print(f"  removing exporter output {path.name}")
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    for name in HF_FILES:
        shutil.copy(hf_dir / name, out / name)

    graph = inspect_graph(out / "model.onnx")
    config = transformers.AutoConfig.from_pretrained(hf_dir)
    kv = kv_shape(config)
    feeds, _past = make_feeds(graph, input_ids, kv)
    logits = run_onnx(out / "model.onnx", feeds)
    # Keys added to fixture.json for a dequantised reference only (the other fixtures' files stay as before).
    extra_info: dict = {}
    if fx.dequantised_reference:
        # A fresh copy of the checkpoint (the float32 reference shared by the other fixtures is untouched)
        # with every weight that the graph quantised replaced by the graph's dequantised value.
        model = load_reference_model(hf_dir)
        replaced = load_dequantised_weights(model, out / "model.onnx")
        reference = {**model_reference(model, input_ids, taps(fx.arch)),
                     **patched_reference(model, input_ids, taps(fx.arch))}
        del model
        as_written_diff = float(np.max(np.abs(logits - reference["logits"])))
        # Compare with ONNX Runtime computing MatMulNBits in float32, logits and per-layer x / y.
        layer_names = genai_layer_outputs(out / "model.onnx")
        ort = run_onnx_float_matmulnbits(out / "model.onnx", feeds, list(layer_names.values()))
        logits = ort["logits"]
        layer_diffs = {}
        for key, value_name in layer_names.items():
            layer_diffs[key] = float(np.max(np.abs(ort[value_name] - reference[key])))
            scale = float(np.max(np.abs(reference[key])))
            if not layer_diffs[key] <= 1e-4 * scale:
                raise AssertionError(f"{fx.name}: ONNX {value_name} differs from PyTorch {key} by "
                                     f"{layer_diffs[key]:.3g} (max |{key}| {scale:.3g})")
        print(f"  reference with dequantised weights: {', '.join(replaced)}")
        print(f"  per-layer max|diff| (MatMulNBits in float32): "
              + ", ".join(f"{k} {v:.3g}" for k, v in layer_diffs.items()))
        print(f"  logits max|diff| of the graph as written (accuracy_level=4): {as_written_diff:.3g}")
        extra_info = {
            "reference_weights": "dequantised: every weight that model.onnx stores as MatMulNBits int4 is "
                                 "replaced, in the PyTorch model, by its dequantised value read back from "
                                 "the graph (dequantised_weights); the others are the checkpoint's float32",
            "dequantised_weights": replaced,
            "onnx_matmulnbits_accuracy_level": 1,
            "logits_max_abs_diff_onnx_as_written_vs_torch": as_written_diff,
            "layers_max_abs_diff_onnx_vs_torch": layer_diffs,
        }
    assert logits.shape == reference["logits"].shape, (logits.shape, reference["logits"].shape)
    diff = float(np.max(np.abs(logits - reference["logits"])))
    if fx.tolerance is not None and not diff <= fx.tolerance:
        raise AssertionError(f"{fx.name}: ONNX logits differ from PyTorch by {diff:.3g} > {fx.tolerance}")

    # safetensors stores zero-size tensors (the empty KV cache) fine, so every feed is stored;
    # `empty_inputs` would list any that had to be left out.
    tensors = {f"inputs.{k}": v for k, v in feeds.items()}
    empty_inputs: dict[str, list[int]] = {}
    tensors.update(reference)
    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(out / "reference.safetensors"))

    external = sorted(p.name for p in out.iterdir() if p.name in ("model.onnx_data", "model.onnx.data"))
    info = {
        "name": fx.name,
        "architecture": fx.arch,
        "exporter": exporter,
        "exporter_version": exporter_version,
        "opset": graph["opsets"].get("ai.onnx"),
        "opsets": graph["opsets"],
        "num_layers": LAYERS,
        "hidden_size": HIDDEN,
        "num_heads": HEADS,
        "num_kv_heads": kv[0],
        "head_dim": kv[1],
        **weight_counts(hf_dir, fx.arch),
        "vocab_size": VOCAB,
        "has_kv_cache": any(i["name"].startswith("past_key_values.") for i in graph["inputs"]),
        "external_data": external[0] if external else False,
        "dtype": fx.dtype,
        "attention_kind": attention_kind(graph),
        "op_counts": graph["op_counts"],
        "non_standard_ops": graph["non_standard_ops"],
        "inputs": graph["inputs"],
        "outputs": graph["outputs"],
        "reference_input": {"batch": BATCH, "sequence": SEQ, "past": 0, "seed": INPUT_SEED},
        "logits_max_abs_diff_onnx_vs_torch": diff,
        "logits_tolerance": fx.tolerance,
        **extra_info,
        "empty_inputs": empty_inputs,
        "notes": fx.notes,
    }
    (out / "fixture.json").write_text(json.dumps(info, indent=2) + "\n")
    size = sum(p.stat().st_size for p in out.iterdir())
    print(f"[{fx.name}] OK  opset {info['opset']}  attention {info['attention_kind']}  "
          f"ops {graph['op_counts']}  logits max|diff| {diff:.3g}  {size / 1024:.0f} KiB", flush=True)
    return info


# ---------------------------------------------------------------------------------------------------------
# fixtures/README.md
# ---------------------------------------------------------------------------------------------------------
README_HEAD = """# Test fixtures

Generated by `scripts/make-fixtures.py` (see its docstring for the environment); do not edit by hand.
Every fixture is the same kind of tiny random model: 3 layers, hidden 64, 4 query heads, 2 KV heads
(head_dim 16), intermediate 128, vocab 512 (byte-level BPE trained on `shared/data/c4_demo.json`
documents 0-199; `<|endoftext|>` = 0 is BOS and EOS, `<|pad|>` = 1). The Llama fixtures share one
checkpoint (`torch.manual_seed(0)`); Mistral, Qwen2 and Phi-3 use seeds 1, 2, 3. Weights are float32
unless stated, drawn with init range 0.2, with random RMSNorm weights and biases, so that activations
are O(1).

Each directory holds `model.onnx` (+ external data) as the exporter wrote it, `reference.safetensors`,
`fixture.json`, `config.json`, `generation_config.json`, `tokenizer.json`, `tokenizer_config.json`,
`special_tokens_map.json` (GenAI fixtures also `genai_config.json`). The tokenizer and config files are
the checkpoint's own in every fixture: the GenAI builder's `tokenizer_config.json` (a transformers 5
`TokenizersBackend` one, same tokens) is replaced by it.

`reference.safetensors` (from PyTorch, eager attention, one input: batch 2, sequence 7, fixed-seed ids,
attention mask all ones, position ids 0..6, empty KV cache):
- `inputs.<name>`: exactly the tensors fed to each graph input, in the graph's dtype, including the
  zero-size empty KV cache `past_key_values.*` of shape `[2, 2, 0, 16]`.
- `layers.<i>.x` `[2, 7, 64]`: input of layer i's `input_layernorm` (residual stream before the norm).
- `layers.<i>.y` `[2, 7, 64]`: output of layer i's `self_attn` (o_proj output, before the residual add).
- `logits` `[2, 7, 512]`.

`fixture.json` also records `logits_max_abs_diff_onnx_vs_torch` (ONNX Runtime CPU vs PyTorch).

`llama-genai-int4` is the exception to "same weights": its reference runs the Llama checkpoint with every
weight that the graph quantised (the MatMulNBits ones: q/k/v, o, gate, up, down projections and lm_head)
replaced by the dequantised int4 value read back from `model.onnx` (`reference_weights`,
`dequantised_weights` in its `fixture.json`), so that the graph matches it to float rounding. Its logits
diff is measured with the MatMulNBits `accuracy_level` set to 1 (float32) in an in-memory copy of the graph;
the graph as written (`accuracy_level=4`) lets ONNX Runtime quantise activations to int8
(`logits_max_abs_diff_onnx_as_written_vs_torch`).

"""


def exporter_kind(name: str) -> str:
    for key, kind in (("-optimum-", "Optimum"), ("-dynamo", "torch.onnx (dynamo)"), ("-genai-", "GenAI builder")):
        if key in name:
            return kind
    raise ValueError(name)


# Families in the order of the table, by architecture key, with what each one adds to the stream.
FAMILIES = {
    "llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2", "phi3": "Phi-3", "gpt_neox": "GPT-NeoX (parallel)",
    "gpt2": "GPT-2 (learned positions)", "gemma2": "Gemma2 (scaled embedding, sandwich norms)",
    "phi": "Phi-2 (parallel, shared norm)", "qwen3": "Qwen3 (q/k norms)", "granite": "Granite (multipliers)",
    "olmo2": "OLMo2 (post-norms)", "cohere": "Cohere (parallel Add chain)",
    "mistral_sw": "Mistral, sliding window", "mixtral": "Mixtral (mixture of experts)",
    "phi_rotary": "Phi-2, full rotary", "gpt_oss": "GPT-OSS (mixture of experts, sinks)",
    "llama_tied": "Llama, tied embeddings",
}


FAMILIES_HEAD = """Every fixture below is found by `inspect` layer by layer with its PyTorch X and Y (on ONNX
Runtime, and on tract where tract runs the graph), and rewritten, it computes what PyTorch computes with
the same attention term replaced by `h W^T + b` (`patched.*`), and passes `check`; the tests assert it
for every fixture directory, so no family is named in them. Where a cell names no fixture, that exporter
could not make a graph that matches PyTorch, for the reason given: these are the exporters' limits.

"""


def family_table(out_root: Path, failures: dict[str, str]) -> str:
    """Family x exporter: the fixtures that exist, or why the exporter could not make one."""
    kinds = ["Optimum", "torch.onnx (dynamo)", "GenAI builder"]
    rows = ["| family | " + " | ".join(kinds) + " |", "|---|" + "---|" * len(kinds)]
    for arch, family in FAMILIES.items():
        cells = []
        for kind in kinds:
            names = [fx.name for fx in FIXTURES if fx.arch == arch and exporter_kind(fx.name) == kind]
            parts = []
            for name in names:
                if (out_root / name / "fixture.json").exists():
                    parts.append(f"`{name}`: ok")
                elif name in failures:
                    parts.append(f"`{name}`: the exporter made no faithful graph ({failures[name]})")
            cells.append("<br>".join(parts) or "-")
        rows.append(f"| {family} | " + " | ".join(cells) + " |")
    return "\n".join(rows) + "\n"


def write_readme(out_root: Path, failures: dict[str, str]) -> None:
    rows = ["| fixture | exporter + version | opset | attention kind | KV cache | external data | "
            "logits diff | notes |",
            "|---|---|---|---|---|---|---|---|"]
    for fx in FIXTURES:
        path = out_root / fx.name / "fixture.json"
        if fx.name in failures or not path.exists():
            continue
        info = json.loads(path.read_text())
        ms = ", ".join(f"{k.split('::')[1]} ×{v}" for k, v in info["non_standard_ops"].items()
                       if k.startswith("com.microsoft::"))
        notes = [info["notes"]] if info["notes"] else []
        if info["dtype"] != "float32":
            notes.append(f"dtype: {info['dtype']}.")
        if ms:
            notes.append(f"com.microsoft ops: {ms}.")
        ops = ", ".join(f"{k} ×{v}" for k, v in info["op_counts"].items()
                        if k in ("Softmax", "Attention", "GroupQueryAttention", "MultiHeadAttention"))
        ext = f"yes (`{info['external_data']}`)" if info["external_data"] else "no"
        rows.append(f"| `{fx.name}` | {info['exporter_version']} | {info['opset']} | "
                    f"{info['attention_kind']} ({ops}) | {'yes' if info['has_kv_cache'] else 'no'} | {ext} | "
                    f"{info['logits_max_abs_diff_onnx_vs_torch']:.2g} | {' '.join(notes)} |")
    text = README_HEAD + "## Families\n\n" + FAMILIES_HEAD + family_table(out_root, failures) + "\n## Fixtures\n\n"
    text += "\n".join(rows) + "\n"
    if failures:
        text += "\n## Fixtures that the exporters could not produce\n\n"
        for name, reason in failures.items():
            text += f"- `{name}`: {reason}\n"
    (out_root / "README.md").write_text(text)


# ---------------------------------------------------------------------------------------------------------
def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=REPO / "fixtures", help="fixtures directory")
    parser.add_argument("--corpus", type=Path, default=DEFAULT_CORPUS, help="c4_demo.json")
    parser.add_argument("--genai-python", type=Path, default=DEFAULT_GENAI_PYTHON,
                        help="python of the virtualenv with onnxruntime-genai and transformers 5")
    parser.add_argument("--only", nargs="+", metavar="NAME", help="regenerate only these fixtures")
    parser.add_argument("--keep-work", type=Path, help="keep the Hugging Face checkpoints in this directory")
    parser.add_argument("--readme-only", action="store_true",
                        help="only rewrite README.md from the fixtures and unsupported.json")
    args = parser.parse_args()
    # Why an exporter could not make a fixture, kept across partial (--only) runs.
    unsupported_path = args.out / "unsupported.json"
    unsupported: dict[str, str] = (json.loads(unsupported_path.read_text()) if unsupported_path.exists() else {})
    if args.readme_only:
        write_readme(args.out, unsupported)
        return 0

    selected = [fx for fx in FIXTURES if not args.only or fx.name in args.only]
    unknown = set(args.only or []) - {fx.name for fx in FIXTURES}
    if unknown:
        parser.error(f"unknown fixture(s): {', '.join(sorted(unknown))}")
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, onnx {onnx.__version__}, "
          f"onnxruntime {onnxruntime.__version__}", flush=True)

    work_ctx = tempfile.TemporaryDirectory(prefix="nbl-fixtures-")
    work = args.keep_work or Path(work_ctx.name)
    tokenizer = train_tokenizer(args.corpus)
    input_ids = reference_input_ids()

    failures: dict[str, str] = {}
    summary = []
    checkpoints: dict[str, tuple[Path, dict[str, np.ndarray]]] = {}
    for fx in selected:
        if fx.arch not in checkpoints:
            hf_dir = work / f"hf-{fx.arch}"
            make_checkpoint(fx.arch, tokenizer, hf_dir)
            checkpoints[fx.arch] = (hf_dir, torch_reference(hf_dir, input_ids, fx.arch))
        hf_dir, reference = checkpoints[fx.arch]
        try:
            info = build_fixture(fx, hf_dir, reference, input_ids, args.out, args)
            summary.append(f"{fx.name:24s} opset {info['opset']:>2}  {info['attention_kind']:20s} "
                           f"kv={'yes' if info['has_kv_cache'] else 'no ':3s} "
                           f"max|logits diff|={info['logits_max_abs_diff_onnx_vs_torch']:.3g}")
        except Exception as err:  # noqa: BLE001 - optional fixtures report their failure
            if not fx.optional:
                raise
            traceback.print_exc()
            shutil.rmtree(args.out / fx.name, ignore_errors=True)
            # The innermost cause says what went wrong (torch.export wraps it in a generic error).
            while err.__cause__ is not None:
                err = err.__cause__
            reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            reason = reason.replace(str(work), "WORK")  # the temporary checkpoint directory
            failures[fx.name] = f"{type(err).__name__}: {reason}"
            summary.append(f"{fx.name:24s} FAILED ({failures[fx.name]})")

    for fx in selected:
        unsupported.pop(fx.name, None)
    unsupported.update(failures)
    unsupported_path.write_text(json.dumps(dict(sorted(unsupported.items())), indent=2) + "\n")
    write_readme(args.out, unsupported)
    print("\nSummary:")
    print("\n".join(summary))
    work_ctx.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
