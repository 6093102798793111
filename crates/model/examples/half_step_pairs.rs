//! A training step's half (the `tiny` shape: 8 rows of 256 tokens; `small`: 4 rows of 512 at
//! d = 512, with `tiny`'s 4 layers and 4,096-token vocabulary, not the preset's 8 and 8,192),
//! forward and backward with the model's own loss (`mean_nll`), as each of a step's two halves
//! runs (`trainer::backward_pair`: one rayon thread each), with a switch flipped between
//! consecutive steps in one process (which side runs first alternating): 32 pairs after 2
//! warm-ups, printing the medians and the median of the pair ratios (off / on, so above 1 means
//! faster with the switch on).
//!
//! Pairs of whole `kiln bench` runs move by ±6% a pair on a busy shared host, so a change under
//! 2% cannot be seen that way; pairs of steps in one process repeat to within about 1%. To
//! measure a change, give it a switch read on each call and flip it here. The switches:
//! `none` (both sides the same: the harness's own spread), `tiles` (attention tile by tile over
//! the keys each query row may see, against dense products), `recompute` (attention's backward
//! pass computing its probabilities again, against keeping them from the forward pass: see
//! `fused::kernels::keep_probs_max`), `bf16` (the linear layers' products at bf16, against f32).
//!
//! `cargo run --release -p kiln-model --example half_step_pairs -- [tiny|small] [threads]
//! [none|tiles|recompute|bf16]`

use kiln_model::burn::tensor::{Int, Tensor, TensorData};
use kiln_model::fused::{self, MatmulPrecision};
use kiln_model::{default_device, ForwardInput, Llama, LlamaConfig};
use std::time::Instant;

fn main() {
    kiln_model::tune_allocator();
    let arg = |i: usize| std::env::args().nth(i);
    let preset = arg(1).unwrap_or_else(|| "tiny".into());
    let threads: usize = arg(2).map_or(1, |a| a.parse().expect("threads"));
    let switch = arg(3).unwrap_or_else(|| "none".into());
    let (d, f, rows_n, ctx) = match preset.as_str() {
        "tiny" => (256, 688, 8, 256),
        "small" => (512, 1376, 4, 512),
        other => panic!("preset tiny or small, not {other}"),
    };
    let set = |on: bool| match switch.as_str() {
        "none" => {}
        "tiles" => fused::kernels::set_tiles_enabled(on),
        "recompute" => fused::kernels::set_keep_probs_max(if on { 0 } else { usize::MAX }),
        "bf16" => fused::set_matmul_precision(if on {
            MatmulPrecision::Bf16
        } else {
            MatmulPrecision::F32
        }),
        other => panic!("switch none, tiles, recompute or bf16, not {other}"),
    };
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .expect("a rayon pool");
    pool.install(|| {
        let device = default_device().autodiff();
        let vocab = 4096;
        let cfg = LlamaConfig::new(vocab, d, f, 4, d / 64, d / 64, ctx);
        let model = Llama::init(&cfg, 1, &device).expect("a model");
        let rows: Vec<Vec<u32>> = (0..rows_n)
            .map(|i| {
                (0..ctx)
                    .map(|t| ((i * 131 + t * 17) % vocab) as u32)
                    .collect()
            })
            .collect();
        let input = ForwardInput::causal(&rows, &device);
        let targets: Vec<i64> = rows
            .iter()
            .flatten()
            .map(|&t| ((t as usize + 1) % vocab) as i64)
            .collect();
        let n = targets.len();
        let targets = Tensor::<1, Int>::from_data(TensorData::new(targets, [n]), &device);
        let step = || {
            let hidden = model.hidden(&input, None).reshape([n, d]);
            drop(model.mean_nll(hidden, targets.clone()).backward());
        };
        let mut times = [vec![], vec![]];
        for round in 0..34 {
            // Which side runs first alternates, so that neither always follows the other.
            for side in [round % 2, 1 - round % 2] {
                set(side == 0);
                let start = Instant::now();
                step();
                if round >= 2 {
                    times[side].push(start.elapsed().as_secs_f64());
                }
            }
        }
        set(false);
        let mut ratios: Vec<f64> = times[1]
            .iter()
            .zip(&times[0])
            .map(|(off, on)| off / on)
            .collect();
        ratios.sort_by(f64::total_cmp);
        let [on, off] = times.map(|mut v| {
            v.sort_by(f64::total_cmp);
            v[v.len() / 2] * 1e3
        });
        println!(
            "{preset}, {threads} thread(s), switch {switch}: on {on:.1} ms, off {off:.1} ms; \
             median pair ratio off / on {:.3} ({:.3}-{:.3})",
            ratios[ratios.len() / 2],
            ratios[0],
            ratios[ratios.len() - 1]
        );
    });
}
