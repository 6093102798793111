//! PPO's policy pass past the logits budget, its head run chunk by chunk and its answer logits
//! never held whole (`AnswerDist::Entropy`), against the same minibatch through the whole
//! logits. One test: it sets the process-wide budget (`fused::set_logits_budget`).

mod grads;
mod ppo_setup;

use kiln_model::burn::optim::GradientsParams;
use kiln_model::burn::tensor::{Distribution, Int, Tensor, TensorData};
use kiln_model::fused::set_logits_budget;
use kiln_train::stages::ppo::{answer_logprobs, AnswerDist};
use ppo_setup::{models, setup, stage};

#[test]
fn minibatch_without_whole_logits_matches_the_logits() {
    let mut s = setup();
    for tied in [true, false] {
        s.policy_cfg.tie_word_embeddings = tied;
        // Measured only, and differentiated as the entropy bonus.
        for ent_coef in [0.0, 0.05] {
            let what = format!("tied {tied}, ent_coef {ent_coef}");
            let (ac, reference, reward) = models(&s);
            let mut st = stage(&s, reference, reward);
            st.cfg.ent_coef = ent_coef;
            set_logits_budget(1 << 60);
            let ro = st.make_rollout(&ac, 0).unwrap();
            let idx = st.minibatch(0, 0, 0, ro.rows.len());
            let rows: Vec<Vec<u32>> = idx.iter().map(|&i| ro.rows[i].clone()).collect();
            let valid: Vec<Vec<bool>> = idx.iter().map(|&i| ro.valid[i].clone()).collect();
            let run = |chunked: bool| {
                set_logits_budget(if chunked { 0 } else { 1 << 60 });
                // The path taken is the one asked for.
                let (_, dist) = answer_logprobs(&ac.policy, &rows, &valid, ro.p, ro.r);
                assert_eq!(
                    matches!(dist, AnswerDist::Entropy(_)),
                    chunked,
                    "{what}: chunked {chunked}"
                );
                let (loss, stats) = st.minibatch_loss(&ac, &ro, &idx, 0, None);
                let value = kiln_model::to_vec(loss.clone())[0] as f64;
                (
                    value,
                    stats,
                    GradientsParams::from_grads(loss.backward(), &ac),
                )
            };
            // The model's own method agrees with itself across the budget.
            let device = ac.policy.device();
            let d = s.policy_cfg.hidden_size;
            let hidden = Tensor::<2>::random([7, d], Distribution::Normal(0.0, 1.0), &device);
            let ids: Vec<i64> = (0..7)
                .map(|i| (i * 37 + 5) % s.policy_cfg.vocab_size as i64)
                .collect();
            let targets = Tensor::<1, Int>::from_data(TensorData::new(ids, [7]), &device);
            let both = |budget: usize| {
                set_logits_budget(budget);
                let (lp, ent) = ac
                    .policy
                    .target_logprobs_entropy(hidden.clone(), targets.clone());
                (kiln_model::to_vec(lp), kiln_model::to_vec(ent))
            };
            let ((lp0, ent0), (lp1, ent1)) = (both(1 << 60), both(0));
            for (a, b) in lp0.iter().chain(&ent0).zip(lp1.iter().chain(&ent1)) {
                assert!(
                    (a - b).abs() <= 1e-5 * (1.0 + a.abs()),
                    "{what}: {a} against {b}"
                );
            }
            let (whole, whole_stats, whole_grads) = run(false);
            let (chunked, chunked_stats, chunked_grads) = run(true);
            assert!(
                (whole - chunked).abs() <= 1e-5 * (1.0 + whole.abs()),
                "{what}: loss {whole} against {chunked}"
            );
            // (clip fraction, approx KL, entropy, policy loss, value loss, ptx loss)
            assert!(whole_stats[2] > 0.5, "{what}: entropy {}", whole_stats[2]);
            for (a, b) in whole_stats.iter().zip(&chunked_stats) {
                assert!(
                    (a - b).abs() <= 1e-5 * (1.0 + a.abs()),
                    "{what}: {whole_stats:?} against {chunked_stats:?}"
                );
            }
            let c = grads::compare(&ac, &whole_grads, &[chunked_grads]);
            assert_eq!(c.params, c.visited, "{what}: parameters with a gradient");
            assert!(c.worst <= 1e-5, "{what}: gradients off by {}", c.worst);
        }
    }
}
