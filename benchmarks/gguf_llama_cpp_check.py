"""Loads a run's GGUF export in llama.cpp itself (llama-cpp-python) and compares its greedy replies with the merged
model's in transformers. Not part of the test suite: `pip install llama-cpp-python` compiles llama.cpp (minutes).

    python benchmarks/gguf_llama_cpp_check.py outputs/<run> [--type q8_0] [--tokens 16]

Prints, per prompt, whether the first N greedy tokens agree, and exits 1 if any prompt differs.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

PROMPTS = ["e2e4", "Which square does the knight on g1 reach with Nf3?", "日本語で答えてください: 2+2?"]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("run", type=Path)
    parser.add_argument("--type", default="q8_0", choices=["bf16", "f16", "q8_0"])
    parser.add_argument("--tokens", type=int, default=16)
    args = parser.parse_args()

    import torch
    from llama_cpp import Llama
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from gemma_ft.export import export_gguf, export_merged

    merged_dir = export_merged(args.run, output="merged_llama_cpp_check", dtype="float32")
    gguf_file = export_gguf(args.run, output=f"gguf_llama_cpp_check_{args.type}", gguf_type=args.type)
    tokenizer = AutoTokenizer.from_pretrained(str(merged_dir))
    merged = AutoModelForCausalLM.from_pretrained(str(merged_dir), dtype=torch.float32)
    llama = Llama(model_path=str(gguf_file), n_ctx=512, verbose=False)
    differ = 0
    for prompt in PROMPTS:
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True)
        ids = tokenizer(text, add_special_tokens=False).input_ids
        llama_ids = llama.tokenize(text.encode(), add_bos=False, special=True)
        with torch.inference_mode():
            out = merged.generate(torch.tensor([ids]), max_new_tokens=args.tokens, do_sample=False,
                                  eos_token_id=None, pad_token_id=0)[0, len(ids):].tolist()
        llama.reset()
        got = []
        for token in llama.generate(ids, top_k=1, temp=0.0, repeat_penalty=1.0):
            got.append(token)
            if len(got) == len(out):
                break
        same = got == out
        differ += not same
        print(f"{'same' if same else 'DIFFERENT'}: {prompt!r} tokenised alike={llama_ids == ids} "
              f"transformers={out} llama.cpp={got}")
    sys.exit(1 if differ else 0)


if __name__ == "__main__":
    main()
