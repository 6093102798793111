"""Kiln vs PyTorch on the same machine, in one run: the same Llama shape, the same protocol
(training = forward + backward + clip + AdamW on random tokens; generation = 16-token prompt then
128 sampled tokens with a KV cache), medians, and each ratio.

    cargo build --release && python bench/compare.py [--preset tiny|small] [--bf16] [--rounds N]

--bf16 adds training at bf16 matmul precision on both sides: Kiln's `--precision bf16` and PyTorch
eager under `torch.autocast("cpu", dtype=torch.bfloat16)` (the same model and protocol), each
ratio printed against both PyTorch figures; and generation at bf16: Kiln's `--precision bf16`
(weights read as bf16, activations f32) against PyTorch f32 and PyTorch with the model in bf16.

--rounds N (default 1) adds N - 1 more rounds of f32 training alone, Kiln then PyTorch, and prints
each round's ratio and their median: on a shared machine either side moves by 10-15% between runs,
so the median of alternating rounds says more than one pair.

The run closes with issue 9's targets (f32 training >= 1.5x PyTorch eager by that median,
generation >= 2x at batch 1 and >= 1.5x at batch 16), each met or NOT met, and the share of the
CPU's f32 peak Kiln would need for 1.5x against that run's PyTorch.

--vocab V runs f32 training alone at a vocabulary of V tokens (the preset's shape otherwise; a Llama
tokenizer's 32000, say), --rounds rounds alternating, and prints each side's tokens/s and peak
resident memory (Kiln's `peak_rss_mb`, PyTorch's `ru_maxrss`, each process training alone): what
holding the (N, V) logits costs PyTorch's `F.cross_entropy` against Kiln's chunked head.
--ctx T and --batch B do the same at a context of T tokens and B rows per step (with or without
--vocab): what attention costs both sides at a long context, in time and memory (PyTorch's
`scaled_dot_product_attention` against Kiln's attention, which past a budget computes its
probabilities again in the backward pass rather than keeping them).

Needs torch (pip install torch) and ../shared/bench/torch_llama_bench.py (or --torch-script).
Never needed by CI.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys

here = os.path.dirname(os.path.abspath(__file__))
root = os.path.dirname(here)
ap = argparse.ArgumentParser()
ap.add_argument("--preset", default="tiny")
ap.add_argument("--torch-script", default=os.path.join(root, "..", "shared", "bench", "torch_llama_bench.py"))
ap.add_argument("--kiln", default=os.path.join(root, "target", "release", "kiln"))
ap.add_argument("--bf16", action="store_true", help="also train at bf16 matmul precision on both sides")
ap.add_argument("--rounds", type=int, default=1, help="rounds of f32 training, Kiln and PyTorch alternating")
ap.add_argument("--vocab", type=int, help="f32 training alone at this vocabulary: tokens/s and peak memory")
ap.add_argument("--ctx", type=int, help="f32 training alone at this context: tokens/s and peak memory")
ap.add_argument("--batch", type=int, help="f32 training alone at this many rows per step: tokens/s and peak memory")
a = ap.parse_args()


def run_torch(what="peak,train,gen"):
    out = subprocess.run([sys.executable, a.torch_script, "--preset", a.preset, "--what", what], capture_output=True, text=True, check=True).stdout
    figures = {}
    for line in out.splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        figures[rec["what"]] = rec["value"]
    return figures


def run_torch_snippet(body):
    """Runs `body` in a fresh Python with the shared script imported as `tb`, 2 threads, seed 0 and
    the preset's config as `c`; returns the JSON value of its last line."""
    code = (
        "import sys, json, torch\n"
        f"sys.path.insert(0, {os.path.dirname(os.path.abspath(a.torch_script))!r})\n"
        "import torch_llama_bench as tb\n"
        "torch.manual_seed(0); torch.set_num_threads(2)\n"
        f"c = tb.PRESETS[{a.preset!r}]\n" + body
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def run_torch_autocast():
    """PyTorch eager training under bf16 autocast, with the shared script's model and protocol."""
    return float(run_torch_snippet(
        "with torch.autocast('cpu', dtype=torch.bfloat16):\n"
        "    print(json.dumps(round(tb.bench_train(tb.Llama(c), c, 10))))\n"
    ))


def run_torch_bf16_gen():
    """PyTorch eager generation with the model's weights in bf16 (`model.to(torch.bfloat16)`:
    half the bytes a decoding step streams, as Kiln's `--precision bf16` decoding), batch 1 and 16."""
    figures = run_torch_snippet(
        "m = tb.Llama(c).to(torch.bfloat16).eval()\n"
        "print(json.dumps({b: round(tb.bench_gen(m, c, b)) for b in (1, 16)}))\n"
    )
    return {int(b): v for b, v in figures.items()}


def run_kiln(*extra):
    out = subprocess.run([a.kiln, "bench", "--preset", a.preset, "--json", *extra], capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


shape = {k: v for k, v in (("vocab", a.vocab), ("ctx", a.ctx), ("batch", a.batch)) if v}
if shape:
    # Training alone at another shape, alternating: speed and each process's peak memory.
    def kiln_train():
        r = run_kiln("--what", "train", *[x for k, v in shape.items() for x in (f"--{k}", str(v))])
        return r["train_tok_s"], r["peak_rss_mb"]

    def torch_train():
        return tuple(run_torch_snippet(
            "import resource\n"
            f"c = dict(c, **{shape!r})\n"
            "tps = tb.bench_train(tb.Llama(c), c, 10)\n"
            "print(json.dumps([tps, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024]))\n"
        ))

    rounds = [(kiln_train(), torch_train()) for _ in range(max(a.rounds, 1))]
    at = ", ".join(f"{k} {v}" for k, v in shape.items())
    print(f"f32 training, {a.preset} at {at}, {len(rounds)} rounds alternating:")
    print(f"{'':<10}{'kiln tok/s':>12}{'pytorch':>10}{'ratio':>8}{'kiln MB':>10}{'pytorch MB':>12}")
    for i, ((k, km), (t, tm)) in enumerate(rounds):
        print(f"round {i + 1:<4}{k:>12.0f}{t:>10.0f}{k / t:>7.2f}x{km:>10.0f}{tm:>12.0f}")
    ratios = [k / t for (k, _), (t, _) in rounds]
    print(f"median ratio {statistics.median(ratios):.2f}x (range {min(ratios):.2f}-{max(ratios):.2f}x)")
    sys.exit(0)

kiln = run_kiln()
torch = run_torch()
if a.bf16:
    kiln_bf16 = run_kiln("--precision", "bf16", "--what", "train,gen")
    torch["torch_autocast_bf16_train_tok_s"] = run_torch_autocast()
    for b, v in run_torch_bf16_gen().items():
        torch[f"torch_bf16_gen_tok_s_b{b}"] = v
    print("kiln bf16:", json.dumps(kiln_bf16))
print("kiln:", json.dumps(kiln))
print("torch:", json.dumps(torch))
rows = [
    ("matmul GFLOP/s", kiln.get("peak_gflops"), torch.get("sgemm_peak_gflops")),
    ("train tok/s", kiln.get("train_tok_s"), torch.get("torch_eager_train_tok_s")),
    ("gen tok/s b1", kiln.get("gen_tok_s_b1"), torch.get("torch_eager_gen_tok_s_b1")),
    ("gen tok/s b16", kiln.get("gen_tok_s_b16"), torch.get("torch_eager_gen_tok_s_b16")),
]
if a.bf16:
    rows += [
        ("train bf16 tok/s", kiln_bf16.get("train_tok_s"), torch.get("torch_eager_train_tok_s")),
        ("  vs autocast", kiln_bf16.get("train_tok_s"), torch.get("torch_autocast_bf16_train_tok_s")),
        ("gen bf16 b1", kiln_bf16.get("gen_tok_s_b1"), torch.get("torch_eager_gen_tok_s_b1")),
        ("  vs bf16 model", kiln_bf16.get("gen_tok_s_b1"), torch.get("torch_bf16_gen_tok_s_b1")),
        ("gen bf16 b16", kiln_bf16.get("gen_tok_s_b16"), torch.get("torch_eager_gen_tok_s_b16")),
        ("  vs bf16 model", kiln_bf16.get("gen_tok_s_b16"), torch.get("torch_bf16_gen_tok_s_b16")),
    ]
print(f"\n{'figure':<18}{'kiln':>12}{'pytorch':>12}{'kiln/pytorch':>14}")
for name, k, t in rows:
    ratio = f"{k / t:.2f}x" if k and t else "-"
    print(f"{name:<18}{k or 0:>12.0f}{t or 0:>12.0f}{ratio:>14}")

# The CPU's own limit (`kiln bench`'s fma_peak_gflops, bf16_dot_peak_gflops: the multiply-add
# instruction from registers on every thread). Both sides do the same arithmetic
# (train_flops_per_token), so peak / PyTorch's rate bounds what any implementation can reach
# against this PyTorch run on this machine.
fpt = kiln.get("train_flops_per_token")


def gflops(tok_s):
    """Training tokens/s as GFLOP/s (the same arithmetic on both sides)."""
    return tok_s * fpt / 1e9


bounds = [("f32", kiln.get("fma_peak_gflops"), kiln.get("hw_peak_isa"), kiln.get("train_tok_s"), torch.get("torch_eager_train_tok_s"), "eager")]
if a.bf16:
    bounds.append(("bf16", kiln.get("bf16_dot_peak_gflops"), "avx512bf16", kiln_bf16.get("train_tok_s"), torch.get("torch_autocast_bf16_train_tok_s"), "autocast"))
for precision, peak, isa, k, t, how in bounds:
    if not (fpt and peak and k and t):
        continue
    kr, tr = gflops(k), gflops(t)
    print(f"\n{precision} training against the CPU's peak ({isa}, {peak:.0f} GFLOP/s):")
    print(f"  Kiln {kr:.0f} GFLOP/s ({kr / peak:.0%} of it), PyTorch {how} {tr:.0f} ({tr / peak:.0%})")
    print(f"  the most any implementation can be here: {peak / tr:.2f}x this PyTorch run")

# More rounds of f32 training alone, alternating, for the median ratio.
pairs = [(kiln.get("train_tok_s"), torch.get("torch_eager_train_tok_s"))]
for _ in range(a.rounds - 1):
    pairs.append((run_kiln("--what", "train").get("train_tok_s"), run_torch("train").get("torch_eager_train_tok_s")))
ratios = [k / t for k, t in pairs] if all(k and t for k, t in pairs) else []
if a.rounds > 1 and ratios:
    print(f"\nf32 training, {a.rounds} rounds alternating (Kiln, PyTorch tok/s, ratio):")
    for i, ((k, t), r) in enumerate(zip(pairs, ratios)):
        print(f"  round {i + 1}: {k:.0f}  {t:.0f}  {r:.2f}x")
    print(f"  median ratio {statistics.median(ratios):.2f}x (range {min(ratios):.2f}-{max(ratios):.2f}x)")

# Issue 9's targets against this run, at f32: training by the median of the rounds' ratios,
# generation by the one pair above. Where training falls short, the share of the CPU's f32 peak
# Kiln would need against this PyTorch (its median tokens/s) says how far the target is from the
# wall: a share above Kiln's products' own (about 92% inside a step) is out of reach.
# Three decimals, so that a ratio just under its target (1.497x) does not print as 1.50x.
print("\nissue 9's targets in this run (f32):")
targets = []
if ratios:
    peak = kiln.get("fma_peak_gflops")
    where = ""
    if fpt and peak:
        kiln_share = gflops(statistics.median(k for k, _ in pairs)) / peak
        torch_share = gflops(statistics.median(t for _, t in pairs)) / peak
        where = f" (Kiln at {kiln_share:.0%} of the peak, PyTorch at {torch_share:.0%}: 1.5x needs Kiln at {1.5 * torch_share:.0%})"
    targets.append((f"training >= 1.5x PyTorch eager{where}", statistics.median(ratios), 1.5))
for name, k, t, at_least in [("generation, batch 1, >= 2x", kiln.get("gen_tok_s_b1"), torch.get("torch_eager_gen_tok_s_b1"), 2.0),
                             ("generation, batch 16, >= 1.5x", kiln.get("gen_tok_s_b16"), torch.get("torch_eager_gen_tok_s_b16"), 1.5)]:
    if k and t:
        targets.append((name, k / t, at_least))
for name, ratio, at_least in targets:
    print(f"  {'met' if ratio >= at_least else 'NOT met':<8} {ratio:>7.3f}x  {name}")
