#!/usr/bin/env python3
"""Greedy generation with onnxruntime-genai, as its users run a model: prints, as a JSON list, the token
ids generated after a prompt of token ids. The tests use it to run rewritten GenAI models.

    genai_generate.py MODEL_DIR --prompt 5,6,7 --tokens 8
"""

import argparse
import json

import onnxruntime_genai as og


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model_dir", help="directory with genai_config.json and the model")
    parser.add_argument("--prompt", required=True, help="comma-separated token ids")
    parser.add_argument("--tokens", type=int, required=True, help="tokens to generate")
    args = parser.parse_args()
    prompt = [int(t) for t in args.prompt.split(",")]
    model = og.Model(args.model_dir)
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(prompt) + args.tokens, do_sample=False)
    generator = og.Generator(model, params)
    generator.append_tokens([prompt])
    generated = []
    while not generator.is_done():
        generator.generate_next_token()
        generated.append(int(generator.get_next_tokens()[0]))
    print(json.dumps(generated))


if __name__ == "__main__":
    main()
