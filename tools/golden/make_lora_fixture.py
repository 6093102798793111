"""Writes a LoRA adapter made by `peft` on the `llama_gqa` fixture model, for Kiln's test that
reads adapters `peft` wrote (crates/model/tests/fixtures/lora_peft/).

The adapter targets q_proj, v_proj and up_proj with r=4, alpha=8; its B matrices are set to
random values (a fresh adapter has B = 0 and would test nothing). `expected.safetensors` holds
token ids and the logits `PeftModel` computes for them.

Run: pip install torch transformers peft safetensors && python tools/golden/make_lora_fixture.py
"""
import os

import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM

HERE = os.path.dirname(__file__)
FIX = os.path.join(HERE, "..", "..", "crates", "model", "tests", "fixtures")
torch.manual_seed(0)
base = AutoModelForCausalLM.from_pretrained(os.path.join(FIX, "llama_gqa")).float().eval()
cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"], lora_dropout=0.0)
model = get_peft_model(base, cfg)
with torch.no_grad():
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.copy_(torch.randn_like(p) * 0.2)
model.eval()
ids = torch.tensor([[1, 5, 9, 3, 7, 11, 2, 30]])
with torch.no_grad():
    logits = model(input_ids=ids).logits
out = os.path.join(FIX, "lora_peft")
model.save_pretrained(out)
save_file({"input_ids": ids.to(torch.int64), "logits": logits.contiguous()}, os.path.join(out, "expected.safetensors"))
print("wrote", out, "logits[0,0,:4] =", logits[0, 0, :4].tolist())
