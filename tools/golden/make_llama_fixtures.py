"""Writes the golden fixtures Kiln's model tests compare against (crates/model/tests/fixtures/).

For each variant (GQA untied, tied embeddings, attention bias) it builds a tiny random
`LlamaForCausalLM` with transformers, saves it with `save_pretrained` (the directory Kiln must
load), and writes `golden.safetensors` with fixed token ids, the logits and loss transformers
computes for them, the gradient of that loss for a few parameters, and a left-padded batch with
its attention mask and logits.

Run: pip install torch transformers safetensors && python tools/golden/make_llama_fixtures.py
"""
import json
import os
import sys

import torch
from safetensors.torch import save_file
from transformers import LlamaConfig, LlamaForCausalLM

OUT = os.path.join(os.path.dirname(__file__), "..", "..", "crates", "model", "tests", "fixtures")

VARIANTS = {
    "llama_gqa": dict(tie_word_embeddings=False, attention_bias=False),
    "llama_tied": dict(tie_word_embeddings=True, attention_bias=False),
    "llama_bias": dict(tie_word_embeddings=False, attention_bias=True),
}

GRAD_PARAMS = [
    "model.embed_tokens.weight",
    "model.layers.0.self_attn.q_proj.weight",
    "model.layers.0.self_attn.k_proj.weight",
    "model.layers.1.mlp.down_proj.weight",
    "model.layers.1.input_layernorm.weight",
    "model.norm.weight",
]


def main():
    torch.manual_seed(0)
    for name, extra in VARIANTS.items():
        config = LlamaConfig(
            vocab_size=96,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=8,
            max_position_embeddings=64,
            rms_norm_eps=1e-5,
            rope_theta=10000.0,
            **extra,
        )
        model = LlamaForCausalLM(config).float()
        # Random norms and biases too, so that a missed weight shows in the logits.
        with torch.no_grad():
            for pname, p in model.named_parameters():
                if "norm" in pname:
                    p.copy_(1.0 + 0.1 * torch.randn_like(p))
                elif pname.endswith("bias"):
                    p.copy_(0.1 * torch.randn_like(p))
        model.eval()
        d = os.path.join(OUT, name)
        model.save_pretrained(d, safe_serialization=True)

        g = torch.Generator().manual_seed(1)
        ids = torch.randint(0, 96, (2, 12), generator=g)
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        tensors = {
            "input_ids": ids.to(torch.int64),
            "logits": out.logits.detach().contiguous(),
            "loss": out.loss.detach().reshape(1),
        }
        params = dict(model.named_parameters())
        for p in GRAD_PARAMS:
            if p in params:
                tensors["grad." + p] = params[p].grad.detach().contiguous()
        # A left-padded batch: row 0 has 3 pads, row 1 none; positions count real tokens only.
        mask = torch.ones(2, 12, dtype=torch.int64)
        mask[0, :3] = 0
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        with torch.no_grad():
            padded = model(input_ids=ids, attention_mask=mask, position_ids=pos).logits
        tensors["pad_mask"] = mask
        tensors["pad_logits"] = padded.contiguous()
        save_file(tensors, os.path.join(d, "golden.safetensors"))
        print(name, "loss", out.loss.item(), "logits[0,0,:4]", out.logits[0, 0, :4].tolist())
    print("transformers", __import__("transformers").__version__, "torch", torch.__version__, file=sys.stderr)


if __name__ == "__main__":
    main()
