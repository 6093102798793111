//! A batch-1 decoding step's products on the `small` preset's shapes (8 layers of q, k, v, o,
//! gate, up, down and the head, each weight its own), packed as f32 and as bf16 (`skinny::pack`,
//! `skinny::pack_bf16`), alternating, medians of 50 steps: the products' share of a token, and
//! the bandwidth they reach: `cargo run --release -p kiln-model --example decode_products`.

use kiln_model::fused::skinny;
use std::time::Instant;

fn main() {
    kiln_model::tune_allocator();
    if !skinny::available() {
        eprintln!("this CPU has no copy of the few-rows kernel (it needs AVX2 + FMA)");
        return;
    }
    let (d, ffn, vocab, layers) = (512, 1376, 8192, 8);
    let mut shapes = vec![];
    for _ in 0..layers {
        shapes.extend([(d, d), (d, d), (d, d), (d, d), (d, ffn), (d, ffn), (ffn, d)]);
    }
    shapes.push((d, vocab));
    let weights: Vec<Vec<f32>> = shapes
        .iter()
        .enumerate()
        .map(|(i, &(k, n))| {
            (0..k * n)
                .map(|j| ((i * 31 + j) % 97) as f32 / 97.0 - 0.5)
                .collect()
        })
        .collect();
    // SAFETY: every weight is a row-major k x n matrix.
    let pack = |bf: bool| -> Vec<skinny::Packed> {
        weights
            .iter()
            .zip(&shapes)
            .map(|(w, &(k, n))| unsafe {
                if bf {
                    skinny::pack_bf16(k, n, w.as_ptr(), n)
                } else {
                    skinny::pack(k, n, w.as_ptr(), n)
                }
            })
            .collect()
    };
    let (f32w, bf16w) = (pack(false), pack(true));
    let x = vec![0.25f32; ffn];
    let step = |ws: &[skinny::Packed]| {
        let t = Instant::now();
        for w in ws {
            // SAFETY: `x` holds at least K values of every weight.
            std::hint::black_box(unsafe { skinny::matmul_packed(1, x.as_ptr(), ffn, w) });
        }
        t.elapsed().as_secs_f64()
    };
    rayon::ThreadPoolBuilder::new()
        .build()
        .unwrap()
        .install(|| {
            let (mut tf, mut tb) = (vec![], vec![]);
            for _ in 0..50 {
                tf.push(step(&f32w));
                tb.push(step(&bf16w));
            }
            let median = |v: &mut Vec<f64>| {
                v.sort_by(f64::total_cmp);
                v[v.len() / 2]
            };
            let bytes: usize = f32w.iter().map(|p| p.bytes()).sum();
            for (what, t, b) in [
                ("f32", median(&mut tf), bytes),
                ("bf16", median(&mut tb), bytes / 2),
            ] {
                println!(
                    "{what}: {:.2} ms a token ({:.0} tok/s if nothing else ran), {:.1} GB/s",
                    t * 1e3,
                    1.0 / t,
                    b as f64 / t / 1e9
                );
            }
        });
}
