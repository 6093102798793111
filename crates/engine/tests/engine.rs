//! Invariants of the generation engine: KV-cache decoding equals full recomputation at every
//! position, and a left-padded batch generates exactly what each prompt generates alone.

use kiln_engine::{generate, EngineError, Finish, SamplingParams};
use kiln_model::burn::tensor::{Device, Tensor};
use kiln_model::{default_device, ForwardInput, KvCache, Llama, LlamaConfig};

fn model(device: &Device) -> Llama {
    let mut config = LlamaConfig::new(64, 32, 64, 2, 4, 2, 48);
    // Large weights give peaked distributions, so greedy choices are far from ties.
    config.initializer_range = 0.3;
    Llama::init(&config, 3, device).unwrap()
}

fn rows(t: Tensor<3>) -> Vec<Vec<f32>> {
    let [_, _, v] = t.dims();
    t.try_into_vec_as::<f32>()
        .unwrap()
        .chunks(v)
        .map(|c| c.to_vec())
        .collect()
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

#[test]
fn kv_cache_decode_equals_recompute() {
    let device = default_device();
    let m = model(&device);
    let seq: Vec<u32> = vec![5, 17, 3, 60, 22, 9, 41, 8, 33, 2, 11, 47, 19, 30];
    let full = rows(m.forward(
        &ForwardInput::causal(std::slice::from_ref(&seq), &device),
        None,
    ));
    let prompt = 6;
    let mut cache = KvCache::new(&m.config, 1, seq.len(), &device);
    let pre = rows(m.forward(
        &ForwardInput::causal(&[seq[..prompt].to_vec()], &device),
        Some(&mut cache),
    ));
    for j in 0..prompt {
        assert!(max_diff(&pre[j], &full[j]) < 1e-4, "prefill position {j}");
    }
    let mut valid = vec![vec![true; prompt]];
    for j in prompt..seq.len() {
        let input = ForwardInput::decode_step(&[seq[j]], &[j], &valid, &device);
        let step = rows(m.forward(&input, Some(&mut cache)));
        let d = max_diff(&step[0], &full[j]);
        assert!(d < 1e-4, "decode position {j}: max abs diff {d}");
        valid[0].push(true);
    }
    assert_eq!(cache.len(), seq.len());
}

#[test]
fn batched_generation_equals_each_alone() {
    let device = default_device();
    let m = model(&device);
    let prompts: Vec<Vec<u32>> = vec![
        vec![1, 2, 3],
        vec![7, 8, 9, 10, 11, 12, 13],
        vec![40],
        vec![5, 6, 7, 8, 9],
    ];
    let params = SamplingParams {
        stop_tokens: vec![63],
        ..SamplingParams::greedy(12)
    };
    let batched = generate(&m, &prompts, &params, |_, _| {}).unwrap();
    for (i, p) in prompts.iter().enumerate() {
        let alone = generate(&m, std::slice::from_ref(p), &params, |_, _| {}).unwrap();
        assert_eq!(batched[i].tokens, alone[0].tokens, "prompt {i}");
        for (a, b) in batched[i].logprobs.iter().zip(&alone[0].logprobs) {
            assert!((a - b).abs() < 1e-4, "prompt {i}: logprob {a} vs {b}");
        }
    }
}

#[test]
fn generation_logprobs_match_a_forward_pass() {
    // The log-probabilities returned with each sampled token equal those a fresh forward pass
    // over prompt + completion assigns (what PPO's first ratio must see).
    let device = default_device();
    let m = model(&device);
    let prompt = vec![4u32, 9, 16, 25];
    let params = SamplingParams {
        seed: 11,
        max_new_tokens: 10,
        ..Default::default()
    };
    let out = generate(&m, std::slice::from_ref(&prompt), &params, |_, _| {}).unwrap();
    let mut seq = prompt.clone();
    seq.extend(&out[0].tokens);
    let logits = rows(m.forward(&ForwardInput::causal(&[seq.clone()], &device), None));
    for (k, tok) in out[0].tokens.iter().enumerate() {
        let lp = kiln_engine::log_softmax_at(&logits[prompt.len() - 1 + k], *tok);
        assert!(
            (lp - out[0].logprobs[k]).abs() < 1e-4,
            "token {k}: {lp} vs {}",
            out[0].logprobs[k]
        );
    }
}

#[test]
fn stops_at_stop_token_and_seed_is_deterministic() {
    let device = default_device();
    let m = model(&device);
    let params = SamplingParams {
        seed: 5,
        max_new_tokens: 20,
        ..Default::default()
    };
    let a = generate(&m, &[vec![1, 2]], &params, |_, _| {}).unwrap();
    let b = generate(&m, &[vec![1, 2]], &params, |_, _| {}).unwrap();
    assert_eq!(a[0].tokens, b[0].tokens);
    // Stop on the third sampled token: generation ends there, the stop token included.
    let stop = a[0].tokens[2];
    let first = a[0].tokens.iter().position(|&t| t == stop).unwrap();
    let params = SamplingParams {
        stop_tokens: vec![stop],
        ..params
    };
    let c = generate(&m, &[vec![1, 2]], &params, |_, _| {}).unwrap();
    assert_eq!(c[0].tokens, a[0].tokens[..=first].to_vec());
    assert_eq!(c[0].finish, Finish::Stop);
}

#[test]
fn too_long_and_empty_prompts_are_errors() {
    let device = default_device();
    let m = model(&device);
    let err = generate(&m, &[vec![1; 40]], &SamplingParams::greedy(20), |_, _| {}).unwrap_err();
    assert!(
        matches!(
            err,
            EngineError::TooLong {
                prompt: 40,
                new: 20,
                max: 48
            }
        ),
        "{err}"
    );
    assert!(err.to_string().contains("max_position_embeddings"), "{err}");
    let err = generate(
        &m,
        &[vec![1], vec![]],
        &SamplingParams::greedy(2),
        |_, _| {},
    )
    .unwrap_err();
    assert!(err.to_string().contains("empty prompt at index 1"), "{err}");
    let err = generate(&m, &[vec![1, 99]], &SamplingParams::greedy(2), |_, _| {}).unwrap_err();
    assert!(
        err.to_string().contains("token id 99") && err.to_string().contains("vocab_size = 64"),
        "{err}"
    );
}
