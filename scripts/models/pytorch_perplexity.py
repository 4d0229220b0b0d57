#!/usr/bin/env python3
"""The PyTorch side of the perplexity check: pre-tokenised blocks, and their perplexity in PyTorch.

    pytorch_perplexity.py HF_DIR DATA.json --seq-len 512 --blocks 64 --out blocks.json

tokenizes the documents of DATA.json (a JSON list of strings or of {"text": ...} objects) with HF_DIR's tokenizer, appends EOS to
each, packs the stream into blocks of --seq-len tokens (the remainder dropped; nbl-onnx packs text the
same way), writes the first --blocks of them to --out as `{"input_ids": [...]}` records, and prints
the perplexity of HF_DIR's model (float32, eager attention) over them: every position but each
block's first is predicted. `nbl-onnx eval MODEL --data blocks.json --seq-len 512` takes the records
as they are and must agree.
"""

import argparse
import json
import math

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("hf_dir")
    parser.add_argument("data")
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--blocks", type=int, default=64)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()

    tokenizer = AutoTokenizer.from_pretrained(args.hf_dir)
    eos = tokenizer.eos_token_id
    stream = []
    for doc in json.load(open(args.data)):
        text = doc["text"] if isinstance(doc, dict) else doc
        stream += tokenizer(text, add_special_tokens=False)["input_ids"] + [eos]
    blocks = [stream[i:i + args.seq_len] for i in range(0, len(stream) - args.seq_len + 1, args.seq_len)]
    blocks = blocks[: args.blocks]
    with open(args.out, "w") as f:
        json.dump([{"input_ids": b} for b in blocks], f)

    model = AutoModelForCausalLM.from_pretrained(args.hf_dir, torch_dtype=torch.float32,
                                                 attn_implementation="eager").eval()
    nll, count = 0.0, 0
    with torch.no_grad():
        for block in blocks:
            ids = torch.tensor([block])
            logits = model(ids).logits[0, :-1].double()
            nll += torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum").item()
            count += len(block) - 1
    print(json.dumps({"blocks": len(blocks), "seq_len": args.seq_len, "tokens": count,
                      "perplexity": math.exp(nll / count)}))


if __name__ == "__main__":
    main()
