//! `kiln bench`: training, forward and generation throughput of a preset shape on random data,
//! and the matmul peak it is measured against (model FLOPs utilization). The shapes and the
//! protocol are those of `../shared/bench/torch_llama_bench.py`, so the numbers compare 1:1:
//! training = forward + backward + global-norm clip + AdamW on (batch, ctx) random tokens;
//! generation = a 16-token prompt then 128 sampled tokens with the KV cache.

use std::time::Instant;

use anyhow::Result;
use clap::Args;
use kiln_engine::{generate, SamplingParams};
use kiln_model::burn::optim::GradientsAccumulator;
use kiln_model::burn::tensor::Tensor;
use kiln_model::{default_device, ForwardInput, Llama};
use rand::{Rng, SeedableRng};

use crate::model_cmd::preset;

#[derive(Args)]
pub struct BenchArgs {
    #[arg(long, default_value = "tiny")]
    preset: String,
    /// Timed training steps (after 2 warm-up steps).
    #[arg(long, default_value_t = 5)]
    steps: usize,
    /// Comma-separated parts to run: peak,train,forward,gen.
    /// Any of peak, train, forward, gen, ppo, and (not by default) ppo_trl and stages (a PPO
    /// iteration and SFT / reward steps with TRL's benchmark shapes) and matmul (the training
    /// step's matrix products at f32 and at bf16, side by side).
    #[arg(long, default_value = "peak,train,forward,gen,ppo")]
    what: String,
    #[arg(long)]
    json: bool,
    /// Precision of the linear layers' products: f32, or bf16 (bf16 inputs, f32 sums; f32 on a
    /// CPU without AVX512-BF16).
    #[arg(long, default_value = "f32")]
    precision: kiln_model::fused::MatmulPrecision,
    /// Batch sizes of the generation figures (`gen_tok_s_b{B}` for each).
    #[arg(long, value_delimiter = ',', default_value = "1,16")]
    gen_batch: Vec<usize>,
    /// PPO iterations of the ppo and ppo_trl figures: the first is a warm-up, the figures are
    /// medians of the rest (as `../shared/bench/trl/bench_ppo.py` reports TRL's).
    #[arg(long, default_value_t = 4)]
    ppo_iters: usize,
    /// `ppo.old_logprobs` of the PPO figures: `recompute` (Kiln's default) or `generation`
    /// (the sampler's, as TRL 1.12 does).
    #[arg(long, default_value = "recompute")]
    ppo_old_logprobs: String,
    /// The vocabulary of the train, forward and gen figures, in place of the preset's (4096 for
    /// tiny, 8192 for small): a Llama tokenizer's 32000, say, to see what a large vocabulary's
    /// logits cost in time and memory.
    #[arg(long)]
    vocab: Option<usize>,
    /// Tokens per row of the train, forward and matmul figures, in place of the preset's context
    /// (256 for tiny, 512 for small): a longer context, to see what attention costs in time and
    /// memory there. Generation, PPO and the stages keep the preset's.
    #[arg(long)]
    ctx: Option<usize>,
    /// Rows per training step of the train, forward and matmul figures, in place of the
    /// preset's (16 for tiny, 8 for small).
    #[arg(long)]
    batch: Option<usize>,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// Peak resident memory of this process so far (Linux `VmHWM`), in MiB.
pub fn peak_rss_mb() -> Option<f64> {
    proc_mib("/proc/self/status", "VmHWM:")
}

/// This process's anonymous memory in transparent huge pages now (Linux `AnonHugePages` of
/// `smaps_rollup`), in MiB: what glibc's huge pages ([`crate::huge_pages`]) took effect on.
pub fn anon_huge_pages_mb() -> Option<f64> {
    proc_mib("/proc/self/smaps_rollup", "AnonHugePages:")
}

/// This process's memory advised for huge pages now (`MADV_HUGEPAGE`: the mappings whose
/// `VmFlags` in `/proc/self/smaps` hold `hg`), in MiB: what glibc's huge pages asked for. Unlike
/// [`anon_huge_pages_mb`], which the kernel decides (it gives none when its free memory is
/// fragmented), this depends only on the process.
pub fn huge_page_advised_mb() -> Option<f64> {
    let text = std::fs::read_to_string("/proc/self/smaps").ok()?;
    let (mut size_kb, mut advised_kb) = (0.0, 0.0);
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("Size:") {
            size_kb = rest.split_whitespace().next()?.parse().ok()?;
        } else if let Some(flags) = line.strip_prefix("VmFlags:") {
            if flags.split_whitespace().any(|f| f == "hg") {
                advised_kb += size_kb;
            }
        }
    }
    Some(advised_kb / 1024.0)
}

/// The `key  N kB` line of a `/proc` file, in MiB.
fn proc_mib(path: &str, key: &str) -> Option<f64> {
    let text = std::fs::read_to_string(path).ok()?;
    let line = text.lines().find(|l| l.starts_with(key))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}

/// A small built-in world and a tokenizer trained on it, for the stage benchmarks.
struct BenchWorld {
    _dir: tempfile::TempDir,
    root: std::path::PathBuf,
    tk: kiln_tokenizer::Tokenizer,
}

fn bench_world() -> Result<BenchWorld> {
    let dir = tempfile::tempdir()?;
    let root = dir.path().to_path_buf();
    kiln_data::world::synth(&root.join("world"), 0, 0.05)?;
    let tk = kiln_tokenizer::Tokenizer::train(&[root.join("world/corpus.txt")], 1024)?;
    Ok(BenchWorld {
        _dir: dir,
        root,
        tk,
    })
}

/// GFLOP/s of one training step's matrix products at f32 (burn's matmul, as at f32 precision) and
/// at bf16 (`fused::matmul_bf16`), alternating, medians of 5: the forward products of a layer and
/// the head for `tokens` rows, and a weight gradient (`xᵀ dy`, the transposed layout).
fn matmul_gflops(config: &kiln_model::LlamaConfig, tokens: usize) -> [f64; 2] {
    use kiln_model::burn::tensor::Distribution;
    let device = default_device();
    let (d, f, v) = (
        config.hidden_size,
        config.intermediate_size,
        config.vocab_size,
    );
    let shapes = [
        (tokens, d, d, false),
        (tokens, d, f, false),
        (tokens, f, d, false),
        (tokens, d, v, false),
        (f, tokens, d, true),
    ];
    let mut secs = [0f64; 2];
    let mut flops = 0f64;
    for (m, k, n, transposed) in shapes {
        let dist = Distribution::Uniform(-1.0, 1.0);
        let a = if transposed {
            Tensor::<2>::random([k, m], dist, &device).transpose()
        } else {
            Tensor::<2>::random([m, k], dist, &device)
        };
        let b = Tensor::<2>::random([k, n], dist, &device);
        let mut times = [vec![], vec![]];
        for i in 0..6 {
            for (j, t) in times.iter_mut().enumerate() {
                let start = Instant::now();
                // f32 as the trainer's linear layers run it: Kiln's product, burn's with the
                // fused kernels off.
                let c = if j == 0 && kiln_model::fused::enabled() {
                    kiln_model::fused::matmul_f32(a.clone(), b.clone())
                } else if j == 0 {
                    a.clone().matmul(b.clone())
                } else {
                    kiln_model::fused::matmul_bf16(a.clone(), b.clone())
                };
                let _ = c.into_data();
                if i > 0 {
                    t.push(start.elapsed().as_secs_f64());
                }
            }
        }
        let [t32, t16] = times;
        secs[0] += median(t32);
        secs[1] += median(t16);
        flops += 2.0 * (m * k * n) as f64;
    }
    secs.map(|s| flops / s / 1e9)
}

/// A quiet trainer for a benchmark run into `out` (no MFU measurement of its own), at the
/// precision `kiln bench --precision` set.
fn bench_trainer(
    name: &str,
    mut config: kiln_train::TrainConfig,
    out: std::path::PathBuf,
    tokenizer: &kiln_tokenizer::Tokenizer,
) -> kiln_train::Trainer {
    config.precision = kiln_model::fused::matmul_precision();
    kiln_train::Trainer {
        name: name.into(),
        config,
        out,
        tokenizer: tokenizer.clone(),
        resume: false,
        stop_after: None,
        // The CPU's peak, measured once per `kiln bench` (before any timed run), so that the
        // stage runs' log lines show a real MFU (a peak of 1 printed GFLOP/s as "mfu 16319.6%").
        peak_gflops: Some(*PEAK.get_or_init(kiln_train::perf::mfu_peak_gflops)),
    }
}

/// [`bench_trainer`]'s peak, GFLOP/s.
static PEAK: std::sync::OnceLock<f64> = std::sync::OnceLock::new();

/// Median seconds per optimizer step after `warmup` steps, from a run's metrics.jsonl.
fn step_seconds(metrics: &std::path::Path, warmup: usize) -> f64 {
    median(
        steps(metrics, warmup)
            .into_iter()
            .map(|(dt, _, _)| dt)
            .collect(),
    )
}

/// Median GFLOP/s of the logged records after `warmup`: each one's FLOPs (`step_flops`, the
/// trainer's count of the stage's passes, times the `per` steps it covers) over its seconds. The
/// trainer's `mfu` is this over the CPU's peak (`fma_peak_gflops` at f32).
fn step_gflops(metrics: &std::path::Path, warmup: usize, per: usize) -> f64 {
    median(
        steps(metrics, warmup)
            .into_iter()
            .map(|(dt, _, flops)| flops * per as f64 / dt / 1e9)
            .collect(),
    )
}

/// Median over the steps after `warmup` of each step's tokens per second, as TRL's benchmark
/// reports `tokens_per_s_median` (`../shared/bench/trl/common.py`): length-bucketed steps differ
/// in size, and the mean tokens per step over the median step time moved by ±15% between runs.
fn step_tokens_per_s(metrics: &std::path::Path, warmup: usize) -> f64 {
    median(
        steps(metrics, warmup)
            .into_iter()
            .map(|(dt, tokens, _)| tokens / dt)
            .collect(),
    )
}

/// (seconds, tokens, FLOPs per step) of each logged record after `warmup`, from `metrics.jsonl`
/// (the trainer's elapsed time and cumulative tokens at its end, and its `step_flops`).
fn steps(metrics: &std::path::Path, warmup: usize) -> Vec<(f64, f64, f64)> {
    let recs = kiln_train::metrics::MetricsLog::read(metrics);
    let t: Vec<(f64, f64, f64)> = recs
        .iter()
        .filter(|r| r["kind"] == "train")
        .filter_map(|r| {
            let flops = r["step_flops"].as_f64().unwrap_or(f64::NAN);
            Some((r["elapsed_s"].as_f64()?, r["tokens"].as_f64()?, flops))
        })
        .collect();
    t.windows(2)
        .skip(warmup)
        .map(|w| (w[1].0 - w[0].0, w[1].1 - w[0].1, w[1].2))
        .collect()
}

/// SFT (full and LoRA r=8 on every projection) and reward-model training with TRL's benchmark
/// shapes (`../shared/bench/trl`: 16 conversations or pairs per step, max length 128, lr 1e-4
/// constant): median tokens/s and pairs/s per optimizer step.
fn stage_steps(config: &kiln_model::LlamaConfig, steps: usize) -> Result<Vec<(String, f64)>> {
    use kiln_train::stages::reward::{tokenize_pairs, RewardStage};
    use kiln_train::stages::sft::Sft;
    let w = bench_world()?;
    let mut cfg = config.clone();
    cfg.eos_token_id = w.tk.eos_id().map(kiln_model::config::TokenIds::One);
    let ad = default_device().autodiff();
    let warmup = 2;
    let mut out = Vec::new();
    let mut train = kiln_train::TrainConfig::load("sft")?;
    train.log.progress = false;
    train.log.every = 1;
    train.eval.every = 0;
    train.eval.batches = 1;
    train.eval.samples = 0;
    train.checkpoint.every = 0;
    train.data.seq_len = 128;
    train.data.batch_size = 16;
    train.optim.lr = 1e-4;
    train.schedule.warmup_steps = 0;
    train.schedule.max_steps = steps + warmup + 1;
    let (convs, _) = kiln_data::chat::read_sft(&[w.root.join("world/sft.jsonl")], false)?;
    for (name, method) in [("sft_full", "none"), ("sft_lora", "lora")] {
        let mut c = train.clone();
        c.peft.method = method.into();
        let model = kiln_model::peft::apply(Llama::init(&cfg, 0, &ad)?, &c.peft, &w.root, 0)?;
        let (mut stage, _) = Sft::new(&w.tk, &convs, &convs[..16], None, &c, false)?;
        let outdir = w.root.join(name);
        let (_, outcome) = bench_trainer(name, c, outdir.clone(), &w.tk).run(model, &mut stage)?;
        out.push((
            format!("{name}_tok_s"),
            step_tokens_per_s(&outdir.join("metrics.jsonl"), warmup),
        ));
        // The former figure, mean tokens per step over the median step's seconds.
        let secs = step_seconds(&outdir.join("metrics.jsonl"), warmup);
        let tok_per_step = outcome.tokens as f64 / outcome.step.max(1) as f64;
        out.push((format!("{name}_tok_s_mean_step"), tok_per_step / secs));
        out.push((
            format!("{name}_gflops"),
            step_gflops(&outdir.join("metrics.jsonl"), warmup, 1),
        ));
    }
    let mut c = kiln_train::TrainConfig::load("reward")?;
    c.log = train.log.clone();
    c.eval = train.eval.clone();
    c.checkpoint = train.checkpoint.clone();
    c.data.seq_len = 128;
    c.data.batch_size = 16;
    c.optim.lr = 1e-4;
    c.schedule = train.schedule.clone();
    let (pairs, _) = kiln_data::chat::read_prefs(&[w.root.join("world/prefs.jsonl")], false)?;
    let (tp, _) = tokenize_pairs(&w.tk, &pairs, 128, None)?;
    let (ep, _) = tokenize_pairs(&w.tk, &pairs[..16], 128, None)?;
    let mut stage = RewardStage::new(tp, ep, &c, 0.0, 0.0);
    let outdir = w.root.join("reward");
    let model = kiln_model::reward::RewardModel::from_llama(Llama::init(&cfg, 0, &ad)?, 0);
    bench_trainer("reward", c, outdir.clone(), &w.tk).run(model, &mut stage)?;
    out.push((
        "reward_pairs_s".into(),
        16.0 / step_seconds(&outdir.join("metrics.jsonl"), warmup),
    ));
    out.push((
        "reward_gflops".into(),
        step_gflops(&outdir.join("metrics.jsonl"), warmup, 1),
    ));
    Ok(out)
}

/// PPO iterations with untrained models of the preset's shape on a small built-in world: median
/// seconds per iteration after the first (a warm-up), and of the time spent generating, scoring
/// (old log-probs, values, reference, reward model) and updating. `trl_shapes` uses TRL's
/// benchmark (64 prompts, 32 response tokens, 4 epochs x 4 minibatches, no ptx); otherwise the
/// `ppo` preset (32 prompts, 24 tokens, 2 x 2, ptx on).
fn ppo_iteration(
    config: &kiln_model::LlamaConfig,
    preset: &str,
    trl_shapes: bool,
    iters: usize,
    old_logprobs: &str,
) -> Result<Vec<(String, f64)>> {
    use kiln_model::reward::RewardModel;
    use kiln_train::stages::ppo::{ActorCritic, Ppo};
    let w = bench_world()?;
    let (root, tk) = (w.root.as_path(), &w.tk);
    // The preset's vocabulary (4096 for tiny, as TRL's model), larger than the world's tokenizer.
    let mut cfg = config.clone();
    cfg.eos_token_id = tk.eos_id().map(kiln_model::config::TokenIds::One);
    let mut train = kiln_train::TrainConfig::load("ppo")?;
    train.log.progress = false;
    train.eval.every = 0;
    train.checkpoint.every = 0;
    train.ppo.old_logprobs = match old_logprobs {
        "recompute" => kiln_train::config::OldLogprobs::Recompute,
        "generation" => kiln_train::config::OldLogprobs::Generation,
        other => anyhow::bail!("--ppo-old-logprobs {other:?}: expected recompute or generation"),
    };
    if trl_shapes {
        train.ppo.trl_benchmark_shapes();
    }
    // One metrics record per iteration: its timers and the trainer's elapsed time at its end.
    let per = train.ppo.epochs * train.ppo.minibatches;
    train.log.every = per;
    train.schedule.max_steps = per * iters.max(2);
    let (ad, d) = (default_device().autodiff(), default_device());
    let (prompts, _) = kiln_data::chat::read_prompts(&[root.join("world/prompts.jsonl")], false)?;
    let shard = kiln_train::stages::pretrain::prepare_shard(
        &[root.join("world/corpus.txt")],
        tk,
        &root.join("shard"),
        Default::default(),
    )?;
    let mut stage = Ppo::new(
        train.ppo.clone(),
        prompts.clone(),
        prompts[..4].to_vec(),
        tk,
        Some(Llama::init(&cfg, 1, &d)?),
        RewardModel::from_llama(Llama::init(&cfg, 2, &d)?, 3),
        None,
        Some(shard),
        0,
    );
    let model = ActorCritic::with_critic(
        Llama::init(&cfg, 1, &ad)?,
        RewardModel::from_llama(Llama::init(&cfg, 2, &ad)?, 3),
    );
    let trainer = bench_trainer(&format!("bench-ppo-{preset}"), train, root.join("out"), tk);
    let t = Instant::now();
    trainer.run(model, &mut stage)?;
    let total = t.elapsed().as_secs_f64();
    // Each log line took the stage's timers for one iteration; read them from metrics.jsonl.
    let recs: Vec<_> = kiln_train::metrics::MetricsLog::read(&root.join("out/metrics.jsonl"))
        .into_iter()
        .filter(|r| r["kind"] == "train")
        .collect();
    anyhow::ensure!(
        recs.len() >= 2,
        "the PPO benchmark logged {} iterations, expected {}",
        recs.len(),
        iters.max(2)
    );
    let timed = |k: &str| {
        median(
            recs[1..]
                .iter()
                .map(|r| r[k].as_f64().unwrap_or(f64::NAN))
                .collect(),
        )
    };
    // The iteration is the trainer's loop (rollout, scoring, every minibatch update), as TRL's
    // benchmark times it; the run also holds the closing evaluation and the checkpoint and model
    // writes, which TRL's benchmark does not do (save_strategy "no").
    let elapsed: Vec<f64> = recs
        .iter()
        .map(|r| r["elapsed_s"].as_f64().unwrap_or(f64::NAN))
        .collect();
    let iteration = median(elapsed.windows(2).map(|w| w[1] - w[0]).collect());
    let p = if trl_shapes { "ppo_trl" } else { "ppo" };
    // An iteration's FLOPs as the trainer counts them (rollout, scoring and every minibatch),
    // over its seconds, after the first.
    let gflops = step_gflops(&root.join("out/metrics.jsonl"), 0, per);
    Ok(vec![
        (format!("{p}_iteration_s"), iteration),
        (format!("{p}_first_iteration_s"), elapsed[0]),
        (format!("{p}_iterations"), recs.len() as f64),
        (format!("{p}_run_s"), total),
        (format!("{p}_generate_s"), timed("generate_s")),
        (format!("{p}_score_s"), timed("score_s")),
        (format!("{p}_update_s"), timed("update_s")),
        (format!("{p}_prompt_len"), timed("prompt_len")),
        (format!("{p}_prompt_tokens"), timed("prompt_tokens")),
        (format!("{p}_response_len"), timed("response_len")),
        (format!("{p}_gflops"), gflops),
    ])
}

pub fn run(a: BenchArgs) -> Result<()> {
    let (vocab, batch) = match a.preset.as_str() {
        "tiny" => (4096, 16),
        "small" => (8192, 8),
        _ => (4096, 4),
    };
    let (vocab, batch) = (a.vocab.unwrap_or(vocab), a.batch.unwrap_or(batch));
    anyhow::ensure!(
        vocab >= 2,
        "--vocab {vocab}: a vocabulary needs at least 2 tokens"
    );
    anyhow::ensure!(batch >= 1, "--batch {batch}: a step needs at least 1 row");
    let config = preset(&a.preset, vocab)?;
    // `--ctx` is the train, forward and matmul figures' row length; generation, PPO and the
    // stages keep the preset's context (generation's 16 + 128 tokens need 144).
    let mut train_config = config.clone();
    if let Some(ctx) = a.ctx {
        anyhow::ensure!(ctx >= 2, "--ctx {ctx}: a row needs at least 2 tokens");
        train_config.max_position_embeddings = ctx;
    }
    let ctx = train_config.max_position_embeddings;
    kiln_train::trainer::set_precision(a.precision);
    // Decoding reads bf16 weights on more CPUs than training's products run bf16 on.
    let (precision, decode_precision) = kiln_model::fused::precision_in_effect();
    let mut report = serde_json::json!({"preset": a.preset, "vocab": vocab, "batch": batch, "ctx": ctx, "params": config.num_params(), "precision": precision.to_string(), "decode_precision": decode_precision.to_string()});
    let what: Vec<&str> = a.what.split(',').collect();
    let mut rng = rand::rngs::StdRng::seed_from_u64(0);
    let tokens: Vec<Vec<u32>> = (0..batch)
        .map(|_| {
            (0..=ctx)
                .map(|_| rng.random_range(0..vocab as u32))
                .collect()
        })
        .collect();
    let inputs: Vec<Vec<u32>> = tokens.iter().map(|r| r[..ctx].to_vec()).collect();
    // 6N per token for the matmuls (embedding lookup excluded) + attention, as the PyTorch script.
    let flops_per_token = kiln_train::perf::train_flops_per_token(&train_config, ctx);

    if what.contains(&"peak") {
        // A 1024³ matmul at the precision set above, median of 10 (the trainer measures its MFU
        // denominator the same way).
        report["peak_gflops"] = kiln_train::perf::peak_gflops(1024, 10).into();
        // The CPU's own limit: the multiply-add instruction the products run, from registers
        // on every thread (fused::peak). f32 always; bf16 pairs where the CPU has AVX512-BF16.
        let f32_peak = kiln_model::fused::peak::f32_peak(4 << 20, 7);
        report["fma_peak_gflops"] = f32_peak.gflops.into();
        let bf16_peak = kiln_model::fused::peak::bf16_peak(2 << 20, 7);
        if let Some(p) = &bf16_peak {
            report["bf16_dot_peak_gflops"] = p.gflops.into();
        }
        // The bound of the products at the precision in effect (none for AMX tiles, which
        // this does not measure).
        let hw = match precision {
            kiln_model::fused::MatmulPrecision::F32 => Some(f32_peak),
            _ if kiln_model::fused::bf16::amx() => None,
            _ => bf16_peak,
        };
        if let Some(p) = hw {
            report["hw_peak_gflops"] = p.gflops.into();
            report["hw_peak_isa"] = p.isa.into();
        }
    }
    if what.contains(&"matmul") {
        let [f32_gflops, bf16_gflops] = matmul_gflops(&train_config, batch * ctx);
        report["matmul_f32_gflops"] = f32_gflops.into();
        report["matmul_bf16_gflops"] = bf16_gflops.into();
        report["bf16_native"] = kiln_model::fused::bf16::native().into();
        report["bf16_amx"] = kiln_model::fused::bf16::amx().into();
    }
    if what.contains(&"train") {
        let device = default_device().autodiff();
        let mut model = Llama::init(&train_config, 0, &device)?;
        // Kiln's own AdamW with global-norm clipping: the step the trainer runs.
        let mut optim = kiln_train::optim::AdamW::new(&kiln_train::config::OptimSection {
            weight_decay: 0.1,
            ..Default::default()
        });
        let mut times = vec![];
        for i in 0..a.steps + 2 {
            let t = Instant::now();
            // The pre-training stage's step: the batch's two halves back-propagated side by
            // side (kiln_train::stages::pretrain::lm_grads), then one optimizer step.
            let (parts, _) = kiln_train::stages::pretrain::lm_grads(&model, &tokens, 1.0)
                .expect("a batch of two rows or more");
            let mut grads = GradientsAccumulator::new();
            for g in parts {
                grads.accumulate(&model, g);
            }
            model = optim.step(model, grads.grads(), 3e-4, 1.0).0;
            let _ = model.model.norm.weight.val().into_data();
            if i >= 2 {
                times.push(t.elapsed().as_secs_f64());
            }
        }
        let tok_s = (batch * ctx) as f64 / median(times);
        report["train_tok_s"] = tok_s.into();
        if let Some(peak) = report["peak_gflops"].as_f64() {
            report["mfu"] = (tok_s * flops_per_token / 1e9 / peak).into();
        }
        if let Some(hw) = report["hw_peak_gflops"].as_f64() {
            report["mfu_hw"] = (tok_s * flops_per_token / 1e9 / hw).into();
        }
        report["train_flops_per_token"] = flops_per_token.into();
    }
    if what.contains(&"forward") {
        let device = default_device();
        let model = Llama::init(&train_config, 0, &device)?;
        let input = ForwardInput::causal(&inputs, &device);
        let mut times = vec![];
        for i in 0..a.steps + 1 {
            let t = Instant::now();
            let _ = model.forward(&input, None).into_data();
            if i >= 1 {
                times.push(t.elapsed().as_secs_f64());
            }
        }
        report["forward_tok_s"] = ((batch * ctx) as f64 / median(times)).into();
    }
    if what.contains(&"gen") {
        let device = default_device();
        let model = Llama::init(&config, 0, &device)?;
        // 128 new tokens after a 16-token prompt, or as many as the context holds (the `test`
        // preset's 128).
        let new_tokens = 128.min(config.max_position_embeddings.saturating_sub(16));
        anyhow::ensure!(new_tokens > 0, "generation needs a context over 16 tokens");
        for &b in &a.gen_batch {
            let prompts: Vec<Vec<u32>> = (0..b)
                .map(|_| (0..16).map(|_| rng.random_range(0..vocab as u32)).collect())
                .collect();
            let params = SamplingParams {
                max_new_tokens: new_tokens,
                seed: 0,
                ..Default::default()
            };
            let mut times = vec![];
            for _ in 0..3 {
                let t = Instant::now();
                let out = generate(&model, &prompts, &params, |_, _| {})?;
                assert!(out.iter().all(|c| c.tokens.len() == new_tokens));
                times.push(t.elapsed().as_secs_f64());
            }
            report[format!("gen_tok_s_b{b}")] = ((b * new_tokens) as f64 / median(times)).into();
        }
    }
    let mut stage_figures = Vec::new();
    if what.contains(&"ppo") {
        stage_figures.extend(ppo_iteration(
            &config,
            &a.preset,
            false,
            a.ppo_iters,
            &a.ppo_old_logprobs,
        )?);
    }
    if what.contains(&"ppo_trl") {
        stage_figures.extend(ppo_iteration(
            &config,
            &a.preset,
            true,
            a.ppo_iters,
            &a.ppo_old_logprobs,
        )?);
    }
    if what.contains(&"stages") {
        stage_figures.extend(stage_steps(&config, a.steps.max(3))?);
    }
    for (k, v) in stage_figures {
        report[k] = v.into();
    }
    if let Some(mb) = peak_rss_mb() {
        report["peak_rss_mb"] = mb.into();
    }
    report["huge_pages"] = crate::huge_pages().into();
    // What Kiln itself set (the restart) or was given: whether glibc and the kernel act on it is
    // theirs to decide, which `huge_page_advised_mb` and `anon_huge_pages_mb` show.
    report["glibc_tunables"] = std::env::var("GLIBC_TUNABLES").ok().into();
    if let Some(mb) = anon_huge_pages_mb() {
        report["anon_huge_pages_mb"] = mb.into();
    }
    if let Some(mb) = huge_page_advised_mb() {
        report["huge_page_advised_mb"] = mb.into();
    }
    if a.json {
        println!("{report}");
    } else {
        println!("{}", serde_json::to_string_pretty(&report)?);
    }
    Ok(())
}
