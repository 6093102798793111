"""Kiln vs TRL per post-training stage on the same machine, the two alternating: TRL's CPU
benchmarks (../shared/bench/trl/: SFT full and LoRA, RewardTrainer, TRL 1.12's PPOTrainer on the
`tiny` shape), then Kiln's `kiln bench --what stages` and `--what ppo_trl` on the same shapes, each
round's ratios and, over several rounds, their medians.

    cargo build --release
    export TRL_BENCH_OUT=/tmp/trlbench   # after ../shared/bench/trl/setup_assets.py (and
                                         # setup_trl112.sh for PPO: TRL 1.12 in $TRL_BENCH_OUT/trl112)
    python bench/compare_trl.py [--stages sft_full,sft_lora,reward,ppo] [--rounds N] [--bf16]

--bf16 adds Kiln at `--precision bf16` against the same f32 TRL figures. Kiln's PPO is given
twice: recomputing the old log-probabilities in a scoring pass (its default) and taking them from
the sampler as TRL does (`--ppo-old-logprobs generation`), each with its parts beside TRL's
(generate, score, update: the medians both benchmarks report). The run closes with issue 9's
target for each stage (>= 2x TRL at f32, by the median of the rounds), met or NOT met. Needs
torch, transformers and trl (never CI).
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
ap.add_argument("--stages", default="sft_full,sft_lora,reward,ppo")
ap.add_argument("--rounds", type=int, default=1)
ap.add_argument("--bf16", action="store_true", help="also run Kiln at bf16 matmul precision")
ap.add_argument("--trl-dir", default=os.path.join(root, "..", "shared", "bench", "trl"))
ap.add_argument("--kiln", default=os.path.join(root, "target", "release", "kiln"))
a = ap.parse_args()
stages = a.stages.split(",")
if not os.environ.get("TRL_BENCH_OUT"):
    sys.exit("TRL_BENCH_OUT is not set: run ../shared/bench/trl/setup_assets.py first (see its header)")

# TRL's script, its arguments, the key of its RESULT line, and whether more is better.
TRL = {
    "sft_full": (["bench_sft.py", "--mode", "full", "--steps", "50", "--warmup", "10"], "tokens_per_s_median", True),
    "sft_lora": (["bench_sft.py", "--mode", "lora", "--steps", "50", "--warmup", "10"], "tokens_per_s_median", True),
    "reward": (["bench_reward.py", "--steps", "30", "--warmup", "5"], "pairs_per_s_median", True),
    "ppo": (["bench_ppo.py", "--iters", "4"], "median_step_s", False),
}
# Kiln's key for each stage (in `--what stages` or `--what ppo_trl`).
KILN = {"sft_full": "sft_full_tok_s", "sft_lora": "sft_lora_tok_s", "reward": "reward_pairs_s", "ppo": "ppo_trl_iteration_s"}
UNITS = {"sft_full": "tokens/s", "sft_lora": "tokens/s", "reward": "pairs/s", "ppo": "s an iteration"}


def run_trl(stage):
    """The RESULT record of TRL's benchmark of `stage`."""
    args = TRL[stage][0]
    env = dict(os.environ)
    if stage == "ppo":
        # PPOTrainer left TRL in 1.13: the PPO benchmark runs TRL 1.12 (setup_trl112.sh).
        env["PYTHONPATH"] = os.path.join(env["TRL_BENCH_OUT"], "trl112") + os.pathsep + env.get("PYTHONPATH", "")
    out = subprocess.run([sys.executable, *args], cwd=a.trl_dir, env=env, capture_output=True, text=True, check=True).stdout
    for line in out.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    raise SystemExit(f"TRL's {args[0]} printed no RESULT line")


def run_kiln(*extra):
    out = subprocess.run([a.kiln, "bench", "--preset", "tiny", "--json", *extra], capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


# A PPO iteration's parts: Kiln's key and TRL's (bench_ppo.py's medians).
PPO_PARTS = [("generate", "ppo_trl_generate_s", "generate_s_median"),
             ("score", "ppo_trl_score_s", "rollout_score_s_median"),
             ("update", "ppo_trl_update_s", "update_s_median")]


def kiln_round(precision):
    """Kiln's `kiln bench` records at `precision`: (stage, label, record) for each stage asked
    for (PPO twice at f32)."""
    p = ["--precision", precision]
    figures = []
    if any(s != "ppo" for s in stages):
        r = run_kiln("--what", "stages", "--steps", "10", *p)
        figures += [(s, s, r) for s in stages if s != "ppo"]
    if "ppo" in stages:
        ppo = ["--what", "ppo_trl", "--ppo-iters", "3", *p]
        figures.append(("ppo", "ppo", run_kiln(*ppo)))
        if precision == "f32":
            label = "ppo (old log-probs from generation)"
            figures.append(("ppo", label, run_kiln(*ppo, "--ppo-old-logprobs", "generation")))
    return figures


precisions = ["f32"] + (["bf16"] if a.bf16 else [])
ratios = {}
for rnd in range(a.rounds):
    trl = {s: run_trl(s) for s in stages}
    print(f"round {rnd + 1}")
    for precision in precisions:
        for stage, label, record in kiln_round(precision):
            k, t = record[KILN[stage]], trl[stage][TRL[stage][1]]
            # PPO is a time (less is better): its ratio is TRL's time over Kiln's.
            r = k / t if TRL[stage][2] else t / k
            ratios.setdefault((precision, label), []).append(r)
            print(f"  {label:<40} {precision}: Kiln {k:10.2f}  TRL {t:10.2f} {UNITS[stage]:<15} {r:5.2f}x")
            if stage == "ppo":
                # Where the two iterations differ: each part's time and TRL's over Kiln's.
                parts = []
                for name, kk, tk in PPO_PARTS:
                    kv, tv = record.get(kk), trl["ppo"].get(tk)
                    if kv and tv:
                        parts.append(f"{name} {kv:.2f} / {tv:.2f} s ({tv / kv:.2f}x)")
                if parts:
                    print(f"    {'parts, Kiln / TRL':<38} {', '.join(parts)}")
medians = {key: statistics.median(rs) for key, rs in ratios.items()}
if a.rounds > 1:
    print(f"\nmedians over {a.rounds} rounds (Kiln / TRL, PPO as TRL's time / Kiln's):")
    for (precision, label), rs in ratios.items():
        print(f"  {label:<40} {precision}: {medians[precision, label]:.2f}x (range {min(rs):.2f}-{max(rs):.2f}x)")

# Issue 9's targets against this run: each stage >= 2x TRL at f32 (over several rounds, by the
# median of the rounds' ratios). Both PPO rows are checked: Kiln's default (recomputing the old
# log-probabilities) and the one that does what TRL 1.12 does (taking the sampler's).
# Three decimals, so that a ratio just under its target (1.997x) does not print as 2.00x.
print("\nissue 9's targets in this run (f32, each stage >= 2x TRL):")
for (precision, label), r in medians.items():
    if precision == "f32":
        print(f"  {'met' if r >= 2.0 else 'NOT met':<8} {r:>7.3f}x  {label}")
