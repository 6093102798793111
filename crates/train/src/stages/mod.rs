//! The stages. Each supplies batches, a loss and an evaluation to the shared [`crate::Trainer`].

pub mod ppo;
pub mod pretrain;
pub mod reward;
pub mod sft;

use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::SeedableRng;

/// Examples grouped into batches of similar length (`group_by_length`), so a batch pads to
/// little more than its own examples: indices sorted by length, cut into batches of `batch`.
/// Used by SFT and reward-model training; measured on the built-in world's preference pairs,
/// random batches spent a third of their tokens on padding.
#[derive(Debug, Clone)]
pub struct LengthBuckets {
    buckets: Vec<Vec<usize>>,
    seed: u64,
}

impl LengthBuckets {
    pub fn new(lens: &[usize], batch: usize, seed: u64) -> Self {
        let mut order: Vec<usize> = (0..lens.len()).collect();
        order.sort_by_key(|&i| (lens[i], i));
        LengthBuckets {
            buckets: order.chunks(batch.max(1)).map(|c| c.to_vec()).collect(),
            seed,
        }
    }

    /// The batch for global micro-batch `k`: buckets are visited in a fresh random order each
    /// epoch, a pure function of (seed, k), so a resumed run sees the same batches.
    pub fn get(&self, k: usize) -> &[usize] {
        let n = self.buckets.len();
        let epoch = k / n;
        let mut order: Vec<usize> = (0..n).collect();
        order.shuffle(&mut StdRng::seed_from_u64(
            self.seed ^ (epoch as u64).wrapping_mul(0x9E37_79B9),
        ));
        &self.buckets[order[k % n]]
    }
}

#[cfg(test)]
mod tests {
    use super::LengthBuckets;

    #[test]
    fn buckets_cover_every_example_once_per_epoch_with_similar_lengths() {
        let lens: Vec<usize> = (0..103).map(|i| (i * 37) % 61 + 5).collect();
        let b = LengthBuckets::new(&lens, 8, 7);
        let n = 103usize.div_ceil(8);
        for epoch in 0..2 {
            let mut seen = vec![0usize; lens.len()];
            let mut spans = Vec::new();
            for k in epoch * n..(epoch + 1) * n {
                let batch = b.get(k);
                assert!(!batch.is_empty() && batch.len() <= 8);
                batch.iter().for_each(|&i| seen[i] += 1);
                let (lo, hi) = batch.iter().fold((usize::MAX, 0), |(lo, hi), &i| {
                    (lo.min(lens[i]), hi.max(lens[i]))
                });
                spans.push((lo, hi));
            }
            assert!(seen.iter().all(|&c| c == 1), "epoch {epoch}: {seen:?}");
            // Buckets hold consecutive lengths of the sorted order: their ranges do not overlap.
            spans.sort();
            assert!(spans.windows(2).all(|w| w[0].1 <= w[1].0), "{spans:?}");
        }
        // A pure function of (seed, k): a resumed run sees the same batches.
        let again = LengthBuckets::new(&lens, 8, 7);
        assert!((0..3 * n).all(|k| b.get(k) == again.get(k)));
        assert_ne!(
            (0..n).map(|k| b.get(k).to_vec()).collect::<Vec<_>>(),
            (n..2 * n).map(|k| b.get(k).to_vec()).collect::<Vec<_>>(),
            "each epoch visits the buckets in a new order"
        );
    }
}
