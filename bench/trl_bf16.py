"""Runs one of TRL's CPU benchmarks (../shared/bench/trl/bench_*.py) with bf16 mixed precision
(TrainingArguments bf16=True: accelerate's torch.autocast("cpu", torch.bfloat16)), to compare
with `kiln bench --precision bf16` like for like. The scripts themselves stay untouched: this
patches their shared `common_args` before running one.

    export TRL_BENCH_OUT=/tmp/trlbench   # after setup_assets.py (and setup_trl112.sh for PPO)
    PYTHONPATH=$TRL_BENCH_OUT/trl112 python bench/trl_bf16.py bench_ppo.py --iters 5
    python bench/trl_bf16.py bench_sft.py --mode full --steps 60 --warmup 10

Needs torch, transformers and trl (never CI). --trl-dir points at the scripts' folder.
"""
import os
import runpy
import sys

here = os.path.dirname(os.path.abspath(__file__))
trl_dir = os.path.join(here, "..", "..", "shared", "bench", "trl")
argv = sys.argv[1:]
if argv[:1] == ["--trl-dir"]:
    trl_dir, argv = argv[1], argv[2:]
if not argv:
    sys.exit(__doc__)
script = os.path.join(trl_dir, argv[0])
sys.path.insert(0, trl_dir)

import common  # noqa: E402  (the scripts' shared module; sets threads and offline mode)

_args = common.common_args


def bf16_args(out, **kw):
    a = _args(out + "_bf16", **kw)
    a["bf16"] = True
    return a


common.common_args = bf16_args
sys.argv = [script, *argv[1:]]
runpy.run_path(script, run_name="__main__")
