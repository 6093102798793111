//! Sampling one token from a row of logits: repetition penalty (as HF's
//! `RepetitionPenaltyLogitsProcessor`), temperature (0 = greedy), top-k, top-p (nucleus).

use rand::rngs::StdRng;
use rand::Rng;

#[derive(Debug, Clone)]
pub struct SamplingParams {
    /// 0 means greedy (argmax).
    pub temperature: f32,
    /// Keep only the k most likely tokens; 0 disables.
    pub top_k: usize,
    /// Keep the smallest set of tokens whose probability reaches p; 1 disables.
    pub top_p: f32,
    /// > 1 discourages tokens already in the prompt or the output; 1 disables.
    pub repetition_penalty: f32,
    pub max_new_tokens: usize,
    /// Tokens that end a row (EOS, typically); the stop token is part of the output.
    pub stop_tokens: Vec<u32>,
    pub seed: u64,
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams {
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
            repetition_penalty: 1.0,
            max_new_tokens: 64,
            stop_tokens: vec![],
            seed: 0,
        }
    }
}

impl SamplingParams {
    pub fn greedy(max_new_tokens: usize) -> Self {
        SamplingParams {
            temperature: 0.0,
            max_new_tokens,
            ..Default::default()
        }
    }
}

/// log softmax(logits)[token], computed stably in f64.
pub fn log_softmax_at(logits: &[f32], token: u32) -> f32 {
    let max = logits.iter().cloned().fold(f32::NEG_INFINITY, f32::max) as f64;
    let sum: f64 = logits.iter().map(|&x| (x as f64 - max).exp()).sum();
    (logits[token as usize] as f64 - max - sum.ln()) as f32
}

fn argmax(x: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &v) in x.iter().enumerate() {
        if v > x[best] {
            best = i;
        }
    }
    best as u32
}

/// Samples a token id from `logits` given the tokens seen so far.
pub fn sample(logits: &[f32], seen: &[u32], p: &SamplingParams, rng: &mut StdRng) -> u32 {
    let mut x = logits.to_vec();
    if p.repetition_penalty != 1.0 {
        let mut seen_set = seen.to_vec();
        seen_set.sort_unstable();
        seen_set.dedup();
        for &t in &seen_set {
            let v = &mut x[t as usize];
            *v = if *v < 0.0 {
                *v * p.repetition_penalty
            } else {
                *v / p.repetition_penalty
            };
        }
    }
    if p.temperature <= 0.0 {
        return argmax(&x);
    }
    let mut idx: Vec<usize> = (0..x.len()).collect();
    idx.sort_unstable_by(|&a, &b| x[b].total_cmp(&x[a]));
    if p.top_k > 0 && p.top_k < idx.len() {
        idx.truncate(p.top_k);
    }
    let max = x[idx[0]];
    let mut probs: Vec<f64> = idx
        .iter()
        .map(|&i| (((x[i] - max) / p.temperature) as f64).exp())
        .collect();
    let total: f64 = probs.iter().sum();
    probs.iter_mut().for_each(|q| *q /= total);
    if p.top_p < 1.0 {
        let mut cum = 0.0;
        let mut keep = probs.len();
        for (j, q) in probs.iter().enumerate() {
            cum += q;
            if cum >= p.top_p as f64 {
                keep = j + 1;
                break;
            }
        }
        probs.truncate(keep);
        idx.truncate(keep);
        let total: f64 = probs.iter().sum();
        probs.iter_mut().for_each(|q| *q /= total);
    }
    let r: f64 = rng.random();
    let mut cum = 0.0;
    for (j, q) in probs.iter().enumerate() {
        cum += q;
        if r < cum {
            return idx[j] as u32;
        }
    }
    idx[probs.len() - 1] as u32
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn greedy_takes_argmax_and_penalty_applies() {
        let mut rng = StdRng::seed_from_u64(0);
        let logits = [0.1, 2.0, 1.9, -1.0];
        assert_eq!(
            sample(&logits, &[], &SamplingParams::greedy(1), &mut rng),
            1
        );
        let p = SamplingParams {
            repetition_penalty: 1.2,
            ..SamplingParams::greedy(1)
        };
        // 2.0 / 1.2 = 1.67 < 1.9: the repeated token loses.
        assert_eq!(sample(&logits, &[1], &p, &mut rng), 2);
    }

    #[test]
    fn top_k_one_is_greedy_and_top_p_filters() {
        let mut rng = StdRng::seed_from_u64(1);
        let logits = [0.0, 3.0, 2.5, 0.5];
        let k1 = SamplingParams {
            top_k: 1,
            ..Default::default()
        };
        let p = SamplingParams {
            top_p: 0.5,
            ..Default::default()
        };
        for _ in 0..50 {
            assert_eq!(sample(&logits, &[], &k1, &mut rng), 1);
            // p(1) = 0.55 > 0.5: the nucleus holds token 1 alone.
            assert_eq!(sample(&logits, &[], &p, &mut rng), 1);
        }
    }

    #[test]
    fn temperature_sampling_matches_softmax_frequencies() {
        let mut rng = StdRng::seed_from_u64(2);
        let logits = [0.0f32, 1.0, 2.0];
        let n = 20000;
        let mut counts = [0usize; 3];
        for _ in 0..n {
            counts[sample(&logits, &[], &SamplingParams::default(), &mut rng) as usize] += 1;
        }
        for t in 0..3u32 {
            let expected = log_softmax_at(&logits, t).exp() as f64;
            let got = counts[t as usize] as f64 / n as f64;
            assert!(
                (got - expected).abs() < 0.015,
                "token {t}: {got} vs {expected}"
            );
        }
    }
}
