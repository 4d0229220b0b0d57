"""Greedy generation with Optimum's ORTModelForCausalLM, as a Hub user would load a rewritten model.

    python optimum_generate.py REPO_DIR SUBFOLDER FILE_NAME IDS_JSON NEW_TOKENS   # prints the new ids as JSON

SUBFOLDER is "" for a flat folder (Optimum's own exports), "onnx" for the onnx-community layout.

Needs optimum-onnx (and its torch). Exactly NEW_TOKENS are generated (EOS does not stop it), on the CPU.
"""

import json
import sys

import torch
from optimum.onnxruntime import ORTModelForCausalLM


def main() -> None:
    repo, subfolder, file_name, ids_json, new_tokens = sys.argv[1:6]
    model = ORTModelForCausalLM.from_pretrained(repo, subfolder=subfolder, file_name=file_name, use_cache=True,
                                                provider="CPUExecutionProvider")
    new_tokens = int(new_tokens)
    ids = torch.tensor([json.loads(open(ids_json).read())], dtype=torch.long)
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                         min_new_tokens=new_tokens, do_sample=False, num_beams=1)
    print(json.dumps(out[0, ids.shape[1]:].tolist()))


if __name__ == "__main__":
    main()
