"""Writes crates/model/tests/fixtures/reward_seqcls/: a tiny random LlamaForSequenceClassification
(num_labels=1, pad_token_id=0) saved by transformers, and golden.safetensors with a right-padded
batch of token ids and the scores transformers computes for it (read at the last non-pad token).

Run: python tools/golden/make_reward_fixture.py
"""
import os

import torch
from safetensors.torch import save_file
from transformers import LlamaConfig, LlamaForSequenceClassification

torch.manual_seed(0)
cfg = LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=8, max_position_embeddings=64, rms_norm_eps=1e-5, num_labels=1,
                  pad_token_id=0, tie_word_embeddings=False)
model = LlamaForSequenceClassification(cfg).float().eval()
with torch.no_grad():
    model.score.weight.normal_(0, 0.5)
d = os.path.join(os.path.dirname(__file__), "..", "..", "crates", "model", "tests", "fixtures", "reward_seqcls")
model.save_pretrained(d, safe_serialization=True)
g = torch.Generator().manual_seed(3)
ids = torch.randint(1, 96, (3, 10), generator=g)
lengths = [10, 7, 4]
mask = torch.zeros(3, 10, dtype=torch.int64)
for i, n in enumerate(lengths):
    mask[i, :n] = 1
    ids[i, n:] = 0
with torch.no_grad():
    scores = model(input_ids=ids, attention_mask=mask).logits[:, 0]
save_file({"input_ids": ids, "attention_mask": mask, "scores": scores.contiguous()}, os.path.join(d, "golden.safetensors"))
print("scores", scores.tolist())
