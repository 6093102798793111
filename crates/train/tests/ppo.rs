//! PPO on small models of the built-in world: the first ratio is exactly 1, an interrupted and
//! resumed run ends bit-identical to an uninterrupted one, and the metrics are all there.

use std::path::Path;

mod grads;
mod ppo_setup;

use kiln_data::chat::read_prompts;
use kiln_model::checkpoint::TensorFile;
use kiln_train::perf::FlopCount;
use kiln_train::stages::ppo::{ActorCritic, Ppo};
use kiln_train::{TrainConfig, Trainer};
use ppo_setup::{models, setup, stage, Setup};

#[test]
fn first_ratio_is_exactly_one() {
    let s = setup();
    let (ac, reference, reward) = models(&s);
    let mut st = stage(&s, reference, reward);
    let (dev, gen_dev) = st.first_ratio_deviation(&ac).unwrap();
    println!("max |ratio - 1| = {dev:e}; generation-time vs recomputed log-prob: {gen_dev:e}");
    assert_eq!(dev, 0.0, "the first minibatch's ratio must be exactly 1");
    assert!(
        gen_dev < 1e-4,
        "engine log-probs differ from the forward pass by {gen_dev}"
    );
}

/// `ppo.old_logprobs = "generation"`: the rollout's old log-probabilities are the sampler's,
/// bit for bit; everything else (answers, values, scores) is what the recomputing rollout has,
/// and the first ratio is 1 within the decoding kernels' rounding.
#[test]
fn old_logprobs_from_generation() {
    use kiln_train::config::OldLogprobs;
    let mut s = setup();
    let (ac, reference, reward) = models(&s);
    let recompute = stage(&s, reference.clone(), reward.clone()).make_rollout(&ac, 0);
    let recompute = recompute.unwrap();
    s.config.ppo.old_logprobs = OldLogprobs::Generation;
    let mut st = stage(&s, reference, reward);
    let generation = st.make_rollout(&ac, 0).unwrap();
    assert_eq!(generation.rows, recompute.rows);
    assert_eq!(generation.values, recompute.values);
    assert_eq!(generation.scores, recompute.scores);
    let mut gap = 0.0f32;
    for (i, &n) in generation.lens.iter().enumerate() {
        assert!(n > 0);
        assert_eq!(generation.old_logp[i][..n], generation.gen_logp[i][..n]);
        assert_eq!(generation.old_logp[i].len(), generation.r);
        for t in 0..n {
            gap = gap.max((generation.old_logp[i][t] - recompute.old_logp[i][t]).abs());
        }
    }
    println!("sampler vs forward-pass log-probs: max gap {gap:e}");
    assert!(
        gap < 1e-4,
        "sampler vs forward-pass log-probs differ by {gap}"
    );
    let (dev, _) = st.first_ratio_deviation(&ac).unwrap();
    assert!(dev < 1e-3, "first ratio off 1 by {dev}");
}

fn trainer(
    s: &Setup,
    out: &Path,
    config: &TrainConfig,
    resume: bool,
    stop_after: Option<usize>,
) -> Trainer {
    Trainer {
        name: "ppo".into(),
        config: config.clone(),
        out: out.into(),
        tokenizer: s.tk.clone(),
        resume,
        stop_after,
        peak_gflops: Some(100.0),
    }
}

#[test]
fn resume_is_exact_and_metrics_are_logged() {
    let s = setup();
    let per = s.config.ppo.epochs * s.config.ppo.minibatches;
    let mut config = s.config.clone();
    config.schedule.max_steps = 3 * per;
    config.eval.every = 0;
    config.checkpoint.every = 0;
    config.log.every = per;
    let a = s.root.join("a");
    let (ac, r, w) = models(&s);
    let (_, outcome) = trainer(&s, &a, &config, false, None)
        .run(ac, &mut stage(&s, r, w))
        .unwrap();
    assert_eq!(outcome.step, 3 * per);
    for plot in ["loss.svg", "reward.svg", "kl.svg"] {
        assert!(
            std::fs::read_to_string(a.join(plot))
                .unwrap()
                .contains("<polyline"),
            "{plot}"
        );
    }
    let recs = kiln_train::metrics::MetricsLog::read(&a.join("metrics.jsonl"));
    let train = recs.iter().find(|r| r["kind"] == "train").unwrap();
    for key in [
        "rm_score",
        "rm_score_std",
        "kl",
        "entropy",
        "clip_frac",
        "approx_kl",
        "vf_loss",
        "explained_var",
        "response_len",
        "ptx_loss",
        "rollout_s",
        "update_s",
        "gold_reward",
        "beta",
        "step_flops",
    ] {
        assert!(train[key].is_f64(), "metrics.jsonl lacks {key}: {train}");
    }
    // The iteration's rollout and updates, counted by the stage (not the per-token default).
    assert!(train["step_flops"].as_f64().unwrap() > 0.0 && train["mfu"].as_f64().unwrap() > 0.0);
    let eval = recs.iter().find(|r| r["kind"] == "eval").unwrap();
    for key in ["rm_score", "gold_reward", "kl"] {
        assert!(eval[key].is_f64(), "eval lacks {key}: {eval}");
    }

    // Interrupted after one iteration (asked mid-iteration: it stops at the boundary), resumed.
    let b = s.root.join("b");
    let (ac, r, w) = models(&s);
    let (_, first) = trainer(&s, &b, &config, false, Some(per - 1))
        .run(ac, &mut stage(&s, r, w))
        .unwrap();
    assert!(
        first.interrupted && first.step == per,
        "stopped at step {}",
        first.step
    );
    let (ac, r, w) = models(&s);
    let (_, second) = trainer(&s, &b, &config, true, None)
        .run(ac, &mut stage(&s, r, w))
        .unwrap();
    assert_eq!(second.step, 3 * per);
    for f in ["model.safetensors", "critic/model.safetensors"] {
        let read = |d: &Path| {
            let mut t: Vec<(String, Vec<f32>)> = TensorFile::read(&d.join(f))
                .unwrap()
                .tensors
                .into_iter()
                .map(|(k, v)| (k, v.1))
                .collect();
            t.sort_by(|x, y| x.0.cmp(&y.0));
            t
        };
        assert!(read(&a) == read(&b), "{f} differs after resume");
    }
}

/// A LoRA policy: its reference is the policy with the adapter off (no second copy), the first
/// ratio is still exactly 1, the KL starts at 0 (B = 0), and the output is an adapter directory
/// over an unchanged base.
#[test]
fn lora_policy_uses_itself_as_reference() {
    let s = setup();
    let mut config = s.config.clone();
    config.peft.method = "lora".into();
    config.peft.lora_r = 2;
    let per = config.ppo.epochs * config.ppo.minibatches;
    config.schedule.max_steps = per;
    config.eval.every = 0;
    config.checkpoint.every = 0;
    config.log.every = per;
    let base_dir = s.root.join("base");
    let (ac, _, reward) = models(&s);
    kiln_model::checkpoint::save_llama(&ac.policy, &base_dir).unwrap();
    let policy = kiln_model::peft::apply(ac.policy, &config.peft, &base_dir, 1).unwrap();
    let ac = ActorCritic {
        policy,
        critic: ac.critic,
        value_head: None,
    };
    let mut st = Ppo::new(
        config.ppo.clone(),
        read_prompts(&[s.root.join("world/prompts.jsonl")], false)
            .unwrap()
            .0,
        read_prompts(&[s.root.join("world/prompts_eval.jsonl")], false)
            .unwrap()
            .0[..4]
            .to_vec(),
        &s.tk,
        None,
        reward,
        None,
        None,
        s.config.seed,
    );
    let (dev, _) = st.first_ratio_deviation(&ac).unwrap();
    assert_eq!(dev, 0.0);
    let out = s.root.join("lora");
    trainer(&s, &out, &config, false, None)
        .run(ac, &mut st)
        .unwrap();
    let recs = kiln_train::metrics::MetricsLog::read(&out.join("metrics.jsonl"));
    let kl = recs.iter().find(|r| r["kind"] == "train").unwrap()["kl"]
        .as_f64()
        .unwrap();
    assert!(kl.abs() < 1e-3, "first rollout's KL to the reference: {kl}");
    assert!(out.join("adapter_config.json").exists());
    assert!(!out.join("model.safetensors").exists());
    let names = TensorFile::read(&out.join("adapter_model.safetensors")).unwrap();
    assert!(names.tensors.keys().all(|n| n.contains(".lora_")));
}

/// A value head on the policy instead of a separate critic: the first ratio is still exactly 1,
/// values start at 0, training moves the head, and an interrupted run resumes bit-identically
/// (the head is saved beside the policy as `value_head.safetensors`).
#[test]
fn policy_value_head_trains_and_resumes() {
    let s = setup();
    let per = s.config.ppo.epochs * s.config.ppo.minibatches;
    let mut config = s.config.clone();
    config.ppo.critic = "policy_head".into();
    config.schedule.max_steps = 2 * per;
    config.eval.every = 0;
    config.checkpoint.every = 0;
    config.log.every = per;
    let fresh = |s: &Setup| {
        let (ac, r, w) = models(s);
        (ActorCritic::with_value_head(ac.policy), r, w)
    };
    let (ac, r, w) = fresh(&s);
    let mut st = stage(&s, r, w);
    let (dev, _) = st.first_ratio_deviation(&ac).unwrap();
    assert_eq!(dev, 0.0);
    let a = s.root.join("vh_a");
    let (ac, r, w) = fresh(&s);
    let (trained, _) = trainer(&s, &a, &config, false, None)
        .run(ac, &mut stage(&s, r, w))
        .unwrap();
    let head = kiln_model::to_vec(trained.value_head.as_ref().unwrap().weight.val());
    assert!(
        head.iter().any(|&x| x != 0.0),
        "the value head did not train"
    );
    assert!(a.join("value_head.safetensors").exists() && !a.join("critic").exists());
    let b = s.root.join("vh_b");
    let (ac, r, w) = fresh(&s);
    let (_, first) = trainer(&s, &b, &config, false, Some(per))
        .run(ac, &mut stage(&s, r, w))
        .unwrap();
    assert!(first.interrupted);
    let (ac, r, w) = fresh(&s);
    trainer(&s, &b, &config, true, None)
        .run(ac, &mut stage(&s, r, w))
        .unwrap();
    for f in ["model.safetensors", "value_head.safetensors"] {
        let read = |d: &Path| {
            TensorFile::read(&d.join(f))
                .unwrap()
                .tensors
                .into_iter()
                .map(|(k, v)| (k, v.1))
                .collect::<std::collections::BTreeMap<_, _>>()
        };
        assert!(read(&a) == read(&b), "{f} differs after resume");
    }
}

/// The policy's and the critic's parts of a minibatch's loss, back-propagated side by side
/// (`Ppo::minibatch_grads`, what the trainer runs with a separate critic), give the gradients of
/// the summed loss (`Ppo::minibatch_loss`, one backward pass) for every parameter, and the same
/// loss and statistics.
#[test]
fn side_by_side_gradients_equal_the_summed_loss() {
    use kiln_model::burn::optim::GradientsParams;

    let s = setup();
    let (ac, reference, reward) = models(&s);
    let mut st = stage(&s, reference, reward);
    let ro = st.make_rollout(&ac, 0).unwrap();
    let idx = st.minibatch(0, 0, 0, ro.rows.len());
    let (loss, stats) = st.minibatch_loss(&ac, &ro, &idx, 0, None);
    let loss_value = kiln_model::to_vec(loss.clone())[0] as f64;
    let joint = GradientsParams::from_grads(loss.backward(), &ac);
    let (parts, loss2, stats2) = st.minibatch_grads(&ac, &ro, &idx, 0, 1.0, None).unwrap();
    let c = grads::compare(&ac, &joint, &parts);
    // Every parameter of both models, the policy's and the critic's, has its gradient, from
    // one part.
    assert_eq!(c.params, c.visited, "parameters with a gradient");
    assert_eq!(
        c.most_parts, 1,
        "each parameter's gradient comes from one part"
    );
    assert!(c.worst <= 1e-6, "side-by-side gradients off by {}", c.worst);
    assert!(
        (loss_value - loss2).abs() <= 1e-6 * (1.0 + loss_value.abs()),
        "{loss_value} vs {loss2}"
    );
    for (a, b) in stats.iter().zip(&stats2) {
        assert!(
            (a - b).abs() <= 1e-6 * (1.0 + a.abs()),
            "{stats:?} vs {stats2:?}"
        );
    }
    // A value head on the policy has one pass for both: no side-by-side gradients.
    let (policy, _, _) = models(&s);
    let head = ActorCritic::with_value_head(policy.policy);
    assert!(st.minibatch_grads(&head, &ro, &idx, 0, 1.0, None).is_none());
}

/// Iteration 0's first minibatch of a new stage on `s`'s models, `reuse_first_pass` set to
/// `reuse`, run by `step`: checks that the scoring pass holds its forward pass exactly when
/// reusing, and that step 0 takes it. (`step` makes the rollout again, the same one: it depends on
/// the iteration only. Whether the held pass is then used rather than dropped is a matter of
/// speed, which `examples/first_pass.rs` measures; a held pass of the wrong rows, the second
/// chunk's instead of the first's, fails the test below.)
fn first_minibatch<T>(
    s: &Setup,
    model: &ActorCritic,
    reuse: bool,
    step: impl FnOnce(&mut Ppo) -> T,
) -> (T, FirstCount) {
    let (_, reference, reward) = models(s);
    let mut st = stage(s, reference, reward);
    st.reuse_first_pass = reuse;
    let ro = st.make_rollout(model, 0).unwrap();
    assert_eq!(st.first_pass_iteration(), reuse.then_some(0));
    let out = step(&mut st);
    assert_eq!(
        st.first_pass_iteration(),
        None,
        "the pass is taken by step 0"
    );
    // The step's FLOPs, and the forward passes the held pass would save: the policy's (and a
    // value head's) and a separate critic's over the first minibatch's rows.
    let idx = st.minibatch(0, 0, 0, ro.rows.len());
    let rows: Vec<(usize, usize)> = idx
        .iter()
        .map(|&i| {
            (
                ro.valid[i][..ro.p].iter().filter(|&&v| v).count() + ro.lens[i],
                ro.lens[i],
            )
        })
        .collect();
    let policy = FlopCount::new(&model.policy.config, 0.0);
    let v = model.policy.config.vocab_size;
    let forwards = match &model.critic {
        Some(c) => {
            let critic = FlopCount::new(&c.base.config, 0.0).rows(rows.iter().copied(), 1, false);
            let held = s.config.ppo.old_logprobs == kiln_train::config::OldLogprobs::Recompute;
            critic
                + if held {
                    policy.rows(rows.iter().copied(), v, false)
                } else {
                    0.0
                }
        }
        None => policy.rows(rows.iter().copied(), v + 1, false),
    };
    let count = FlopCount::new(&model.policy.config, 1.0);
    let step_flops = kiln_train::trainer::Stage::flops(&mut st, &count, 0, 0).expect("counted");
    (
        out,
        FirstCount {
            step_flops,
            forwards,
        },
    )
}

/// What [`first_minibatch`] counted.
struct FirstCount {
    step_flops: f64,
    forwards: f64,
}

/// Reusing the held pass saves exactly its forward passes in the step's count.
fn check_saved(fresh: &FirstCount, reused: &FirstCount, what: &str) {
    let saved = fresh.step_flops - reused.step_flops;
    assert!(
        fresh.forwards > 0.0 && (saved - fresh.forwards).abs() < 1e-9 * fresh.step_flops,
        "{what}: the held pass saved {saved} FLOPs of {}",
        fresh.forwards
    );
}

/// The update's first minibatch back-propagates through the scoring pass's forward pass
/// (`Ppo::reuse_first_pass`): the same loss and the same gradients, bit for bit, as running that
/// forward pass again, with a separate critic (old log-probabilities recomputed or from the
/// sampler) and with a value head on the policy (one pass, back-propagated by the trainer).
#[test]
fn first_minibatch_reuses_the_scoring_pass_exactly() {
    use kiln_model::burn::optim::GradientsParams;
    use kiln_train::config::OldLogprobs;
    use kiln_train::trainer::Stage;

    for generation in [false, true] {
        let mut s2 = setup();
        s2.config.ppo.old_logprobs = if generation {
            OldLogprobs::Generation
        } else {
            OldLogprobs::Recompute
        };
        let (ac, _, _) = models(&s2);
        let run = |reuse| {
            first_minibatch(&s2, &ac, reuse, |st| {
                st.train_grads(&ac, 0, 0, 1.0).unwrap().unwrap()
            })
        };
        let ((fresh, fresh_count), (reused, reused_count)) = (run(false), run(true));
        check_saved(
            &fresh_count,
            &reused_count,
            &format!("generation {generation}"),
        );
        assert_eq!(fresh.loss, reused.loss, "generation {generation}");
        for (a, b) in fresh.grads.iter().zip(&reused.grads) {
            let c = grads::compare(&ac, a, std::slice::from_ref(b));
            assert!(c.params > 0);
            assert_eq!(c.worst, 0.0, "generation {generation}: gradients differ");
        }
    }
    // A value head: the trainer back-propagates `train_loss`.
    let s = setup();
    let (policy, _, _) = models(&s);
    let head = ActorCritic::with_value_head(policy.policy);
    let run = |reuse| {
        first_minibatch(&s, &head, reuse, |st| {
            let (loss, _) = st.train_loss(&head, 0, 0).unwrap();
            let value = kiln_model::to_vec(loss.clone())[0];
            (value, GradientsParams::from_grads(loss.backward(), &head))
        })
    };
    let (((l0, g0), c0), ((l1, g1), c1)) = (run(false), run(true));
    check_saved(&c0, &c1, "value head");
    assert_eq!(l0, l1);
    let c = grads::compare(&head, &g0, &[g1]);
    assert!(c.params > 0);
    assert_eq!(c.worst, 0.0, "value head: gradients differ");
}

/// The reference pass's log-probabilities without logits (`answer_logprobs_only`, chunked past
/// the logits budget) are, below it, bit for bit those of the pass that returns the logits, on
/// left-padded rows; with the adapters on and off.
#[test]
fn answer_logprobs_without_logits_equal_those_with_them() {
    use kiln_train::stages::ppo::{answer_logprobs_only, answer_logprobs_with};
    let s = setup();
    let (_, reference, _) = models(&s);
    let v = s.policy_cfg.vocab_size as u32;
    let (p, r) = (5, 4);
    let rows: Vec<Vec<u32>> = (0..3u32)
        .map(|i| {
            (0..(p + r) as u32)
                .map(|j| (7 + 13 * i + 5 * j) % v)
                .collect()
        })
        .collect();
    // Left padding of 0, 2 and 4 columns.
    let valid: Vec<Vec<bool>> = (0..3)
        .map(|i| (0..p + r).map(|j| j >= 2 * i).collect())
        .collect();
    for peft in [true, false] {
        let with = answer_logprobs_with(&reference, &rows, &valid, p, r, peft).0;
        let without = answer_logprobs_only(&reference, &rows, &valid, p, r, peft);
        assert_eq!(with.dims(), [3, r]);
        assert_eq!(
            kiln_model::to_vec(with),
            kiln_model::to_vec(without),
            "peft {peft}"
        );
    }
}
