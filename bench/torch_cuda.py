"""PyTorch eager on a CUDA GPU, with the model and protocol of ../shared/bench/torch_llama_bench.py
(the CPU anchor): the same Llama shape, training = forward + backward + clip + AdamW on random
tokens, generation = 16-token prompt then 128 sampled tokens with a KV cache. Only the device
differs, and each timing ends with torch.cuda.synchronize(). Prints one JSON line per figure,
keys as the CPU script's.

    python bench/torch_cuda.py [--preset tiny|small] [--torch-script PATH] [--steps 10]

Compare with a `kiln` built with `--features kiln-model/cuda` running
`kiln bench --preset P --what train,forward,gen --json` on the same GPU (docs/performance.md, "On
a GPU"). Never needed by CI.
"""
import argparse
import json
import os
import sys
import time

here = os.path.dirname(os.path.abspath(__file__))
ap = argparse.ArgumentParser()
ap.add_argument("--preset", default="tiny")
ap.add_argument("--steps", type=int, default=10)
ap.add_argument("--torch-script", default=os.path.join(here, "..", "..", "shared", "bench", "torch_llama_bench.py"))
a = ap.parse_args()
sys.path.insert(0, os.path.dirname(os.path.abspath(a.torch_script)))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import torch_llama_bench as tb  # noqa: E402

dev = torch.device("cuda")
torch.manual_seed(0)
c = tb.PRESETS[a.preset]
base = dict(preset=a.preset, device=torch.cuda.get_device_name(0), torch=torch.__version__)


def emit(**kw):
    print(json.dumps({**base, **kw}), flush=True)


def median(v):
    v = sorted(v)
    return v[len(v) // 2]


def train_tok_s(steps, warm=3):
    model = tb.Llama(c).to(dev)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4, weight_decay=0.1, foreach=True)
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, c["vocab"], (c["batch"], c["ctx"] + 1), generator=g).to(dev)
    times = []
    for i in range(warm + steps):
        torch.cuda.synchronize()
        t = time.perf_counter()
        logits = model(x[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, c["vocab"]), x[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        torch.cuda.synchronize()
        if i >= warm:
            times.append(time.perf_counter() - t)
    return c["batch"] * c["ctx"] / median(times)


@torch.no_grad()
def forward_tok_s(steps):
    model = tb.Llama(c).to(dev).eval()
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, c["vocab"], (c["batch"], c["ctx"]), generator=g).to(dev)
    times = []
    for i in range(steps + 1):
        torch.cuda.synchronize()
        t = time.perf_counter()
        model(x)
        torch.cuda.synchronize()
        if i >= 1:
            times.append(time.perf_counter() - t)
    return c["batch"] * c["ctx"] / median(times)


@torch.no_grad()
def gen_tok_s(batch, prompt=16, new=128, reps=3):
    model = tb.Llama(c).to(dev).eval()
    g = torch.Generator().manual_seed(0)
    idx = torch.randint(0, c["vocab"], (batch, prompt), generator=g).to(dev)
    times = []
    for _ in range(reps + 1):
        torch.cuda.synchronize()
        t = time.perf_counter()
        caches = [[None, None] for _ in range(c["layers"])]
        logits = model(idx, caches, 0)
        pos = prompt
        for _ in range(new):
            nxt = torch.multinomial(F.softmax(logits[:, -1], -1), 1)
            logits = model(nxt, caches, pos)
            pos += 1
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return batch * new / median(times[1:])


emit(what="torch_eager_train_tok_s", value=round(train_tok_s(a.steps)))
emit(what="torch_eager_forward_tok_s", value=round(forward_tok_s(a.steps)))
for b in (1, 16):
    emit(what=f"torch_eager_gen_tok_s_b{b}", value=round(gen_tok_s(b)))
