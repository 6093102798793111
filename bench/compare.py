"""Kiln vs PyTorch on the same machine, in one run: the same Llama shape, the same protocol
(training = forward + backward + clip + AdamW on random tokens; generation = 16-token prompt then
128 sampled tokens with a KV cache), medians, and each ratio.

    cargo build --release && python bench/compare.py [--preset tiny|small]

Needs torch (pip install torch) and ../shared/bench/torch_llama_bench.py (or --torch-script).
Never needed by CI.
"""
import argparse
import json
import os
import subprocess
import sys

here = os.path.dirname(os.path.abspath(__file__))
root = os.path.dirname(here)
ap = argparse.ArgumentParser()
ap.add_argument("--preset", default="tiny")
ap.add_argument("--torch-script", default=os.path.join(root, "..", "shared", "bench", "torch_llama_bench.py"))
ap.add_argument("--kiln", default=os.path.join(root, "target", "release", "kiln"))
a = ap.parse_args()


def run_torch():
    out = subprocess.run([sys.executable, a.torch_script, "--preset", a.preset, "--what", "peak,train,gen"], capture_output=True, text=True, check=True).stdout
    figures = {}
    for line in out.splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        figures[rec["what"]] = rec["value"]
    return figures


def run_kiln():
    out = subprocess.run([a.kiln, "bench", "--preset", a.preset, "--json"], capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


kiln = run_kiln()
torch = run_torch()
print("kiln:", json.dumps(kiln))
print("torch:", json.dumps(torch))
rows = [
    ("matmul GFLOP/s", kiln.get("peak_gflops"), torch.get("sgemm_peak_gflops")),
    ("train tok/s", kiln.get("train_tok_s"), torch.get("torch_eager_train_tok_s")),
    ("gen tok/s b1", kiln.get("gen_tok_s_b1"), torch.get("torch_eager_gen_tok_s_b1")),
    ("gen tok/s b16", kiln.get("gen_tok_s_b16"), torch.get("torch_eager_gen_tok_s_b16")),
]
print(f"\n{'figure':<16}{'kiln':>12}{'pytorch':>12}{'kiln/pytorch':>14}")
for name, k, t in rows:
    ratio = f"{k / t:.2f}x" if k and t else "-"
    print(f"{name:<16}{k or 0:>12.0f}{t or 0:>12.0f}{ratio:>14}")
