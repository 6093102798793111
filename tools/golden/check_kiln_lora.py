"""Checks that `peft` loads a LoRA adapter directory Kiln wrote and computes the same logits.

Kiln's test `lora_dir_for_peft` (run with KILN_EXPORT_DIR=DIR) writes DIR/base (a plain model
directory) and DIR/lora (adapter_config.json, adapter_model.safetensors, expected.json with
token ids and Kiln's logits with and without the adapter). This script loads the base with
`AutoModelForCausalLM`, applies the adapter with `PeftModel.from_pretrained`, and prints the max
abs difference of the logits, then does the same after `merge_and_unload()`.

Run: KILN_EXPORT_DIR=/tmp/x cargo test -p kiln-model --test peft -- --ignored lora_dir_for_peft
     python tools/golden/check_kiln_lora.py /tmp/x
"""
import json
import sys

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

d = sys.argv[1]
base = AutoModelForCausalLM.from_pretrained(f"{d}/base").float().eval()
exp = json.load(open(f"{d}/lora/expected.json"))
ids = torch.tensor(exp["input_ids"])
with torch.no_grad():
    base_logits = base(input_ids=ids).logits.flatten()
diff_base = (base_logits - torch.tensor(exp["base_logits"])).abs().max().item()
model = PeftModel.from_pretrained(base, f"{d}/lora").eval()
with torch.no_grad():
    logits = model(input_ids=ids).logits.flatten()
want = torch.tensor(exp["logits"])
diff = (logits - want).abs().max().item()
moved = (want - torch.tensor(exp["base_logits"])).abs().max().item()
merged = model.merge_and_unload()
with torch.no_grad():
    diff_merged = (merged(input_ids=ids).logits.flatten() - want).abs().max().item()
print(f"base: max abs diff {diff_base:.3e}")
print(f"base + LoRA (peft): max abs diff vs Kiln {diff:.3e} (the adapter moves logits by {moved:.3e})")
print(f"merged (peft merge_and_unload): max abs diff vs Kiln {diff_merged:.3e}")
assert diff < 1e-4 and diff_merged < 1e-4 and moved > 1e-2, (diff, diff_merged, moved)
print("OK")
