"""Checks that transformers loads a model directory Kiln wrote and computes the same logits.

Kiln's ignored test `kiln_dir_for_transformers` (run with KILN_EXPORT_DIR=DIR cargo test -p kiln-model
--test golden -- --ignored kiln_dir_for_transformers) writes DIR with a model
and `expected.json` (token ids and Kiln's logits). This script loads DIR with
`AutoModelForCausalLM` / `AutoTokenizer` and prints the max abs difference.

Run: python tools/golden/check_kiln_dir.py DIR
"""
import json
import sys

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

d = sys.argv[1]
model = AutoModelForCausalLM.from_pretrained(d).float().eval()
exp = json.load(open(f"{d}/expected.json"))
ids = torch.tensor(exp["input_ids"])
with torch.no_grad():
    logits = model(input_ids=ids).logits
diff = (logits - torch.tensor(exp["logits"])).abs().max().item()
print(f"max abs diff vs Kiln: {diff:.3e}")
try:
    tok = AutoTokenizer.from_pretrained(d)
    text = "hello world"
    print("tokenizer loads; encode(hello world) =", tok(text)["input_ids"])
    if tok.chat_template:
        print(repr(tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)))
except Exception as e:  # the model may have been saved without a tokenizer
    print("tokenizer:", e)
assert diff < 1e-4, diff
print("OK")
