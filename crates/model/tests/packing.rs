//! `Packing`: a padded batch run without its padding gives the padded pass's hidden states and
//! gradients at every valid token, in fewer rows, with positions restarting in each segment.

use kiln_model::burn::tensor::{Device, Distribution, Tensor};
use kiln_model::{default_device, ForwardInput, Llama, LlamaConfig, Packing};

fn model(device: &Device) -> Llama {
    let mut config = LlamaConfig::new(64, 32, 64, 2, 4, 2, 48);
    config.initializer_range = 0.2;
    Llama::init(&config, 5, device).unwrap()
}

/// Rows of width 12: left padding of every length PPO makes, right padding, a hole in the middle,
/// a full row and a row with no valid token at all.
fn batch() -> (Vec<Vec<u32>>, Vec<Vec<bool>>) {
    let pads: [(usize, usize); 6] = [(0, 0), (5, 0), (2, 3), (7, 0), (0, 8), (12, 0)];
    let mut rows = vec![];
    let mut valid = vec![];
    for (i, &(left, right)) in pads.iter().enumerate() {
        let ok: Vec<bool> = (0..12).map(|t| t >= left && t < 12 - right).collect();
        rows.push(
            (0..12)
                .map(|t| {
                    if ok[t] {
                        (3 + 7 * i + 5 * t) as u32 % 64
                    } else {
                        0
                    }
                })
                .collect(),
        );
        valid.push(ok);
    }
    valid[3][9] = false; // a hole: the model must skip it as the padded mask does
    (rows, valid)
}

fn vec3(t: Tensor<3>) -> Vec<f32> {
    kiln_model::to_vec(t)
}

#[test]
fn packed_hidden_states_equal_padded_ones() {
    let device = default_device();
    let m = model(&device);
    let (rows, valid) = batch();
    let padded = vec3(m.hidden(&ForwardInput::padded(&rows, &valid, &device), None));
    let packing = m.packing(&rows, &valid);
    let [n, w] = packing.shape();
    assert!(n < rows.len(), "{n} rows of width {w} for 6 rows of 12");
    let packed = vec3(packing.select(m.hidden(&packing.input, None), 0..12));
    let d = m.config.hidden_size;
    let mut worst = 0.0f32;
    for (b, ok) in valid.iter().enumerate() {
        for (t, _) in ok.iter().enumerate().filter(|(_, v)| **v) {
            let o = (b * 12 + t) * d;
            for k in 0..d {
                worst = worst.max((padded[o + k] - packed[o + k]).abs());
            }
        }
    }
    assert!(
        worst < 1e-5,
        "packed vs padded hidden states differ by {worst}"
    );
    // A padding column reads a valid token of its own row: the latest before it, else the first.
    let token = |b: usize, t: usize| packing.index(b, t);
    assert_eq!(token(1, 2), token(1, 5));
    assert_eq!(token(2, 11), token(2, 8));
    assert_eq!(token(3, 9), token(3, 8));
    assert_ne!(token(0, 0), token(0, 1));
}

#[test]
fn segments_restart_positions_and_see_only_themselves() {
    let device = default_device();
    let (rows, valid) = batch();
    let packing = Packing::new(&rows, &valid, |_| 1.0, &device);
    // 35 tokens (12, 7, 7, 4, 4 and the empty row's one slot). With no cost to wide rows the
    // narrowest width that takes them all in one row wins; rows of 12 would need 3 (36 slots).
    assert_eq!(packing.shape(), [1, 35]);
    let w = packing.shape()[1];
    let pos: Vec<i64> = packing
        .input
        .positions
        .clone()
        .into_data()
        .convert::<i64>()
        .try_to_vec::<i64>()
        .unwrap();
    let mask = kiln_model::to_vec(packing.input.mask.clone());
    for (b, ok) in valid.iter().enumerate() {
        let slots: Vec<usize> = (0..12)
            .filter(|&t| ok[t])
            .map(|t| packing.index(b, t))
            .collect();
        for (n, &s) in slots.iter().enumerate() {
            assert_eq!(
                pos[s], n as i64,
                "row {b}: token {n} at position {}",
                pos[s]
            );
            let (row, q) = (s / w, s % w);
            for k in 0..w {
                let seen = mask[(row * w + q) * w + k] == 0.0;
                let own = slots[..=n].contains(&(row * w + k));
                assert_eq!(seen, own, "row {b} token {n}: key slot {k}");
            }
        }
    }
}

#[test]
fn packed_gradients_equal_padded_ones() {
    let device = default_device().autodiff();
    let m = model(&device);
    let (rows, valid) = batch();
    let d = m.config.hidden_size;
    let weights: Tensor<3> = Tensor::random([6, 12, d], Distribution::Normal(0.0, 1.0), &device);
    let mask: Vec<f32> = valid
        .iter()
        .flatten()
        .map(|&v| if v { 1.0 } else { 0.0 })
        .collect();
    let mask = Tensor::<1>::from_floats(mask.as_slice(), &device).reshape([6, 12, 1]);
    let loss = |h: Tensor<3>| (h * weights.clone() * mask.clone()).sum();
    let g_padded = loss(m.hidden(&ForwardInput::padded(&rows, &valid, &device), None)).backward();
    let packing = m.packing(&rows, &valid);
    let g_packed = loss(packing.select(m.hidden(&packing.input, None), 0..12)).backward();
    let pairs = [
        (
            m.model.embed_tokens.weight.grad(&g_padded).unwrap(),
            m.model.embed_tokens.weight.grad(&g_packed).unwrap(),
        ),
        (
            m.model.layers[0]
                .self_attn
                .q_proj
                .weight
                .grad(&g_padded)
                .unwrap(),
            m.model.layers[0]
                .self_attn
                .q_proj
                .weight
                .grad(&g_packed)
                .unwrap(),
        ),
        (
            m.model.layers[1]
                .mlp
                .down_proj
                .weight
                .grad(&g_padded)
                .unwrap(),
            m.model.layers[1]
                .mlp
                .down_proj
                .weight
                .grad(&g_packed)
                .unwrap(),
        ),
    ];
    for (i, (a, b)) in pairs.into_iter().enumerate() {
        let (a, b) = (kiln_model::to_vec(a), kiln_model::to_vec(b));
        let scale = a.iter().fold(0.0f32, |s, x| s.max(x.abs()));
        let worst = a
            .iter()
            .zip(&b)
            .fold(0.0f32, |s, (x, y)| s.max((x - y).abs()));
        assert!(
            scale > 0.0 && worst < 1e-4 * scale,
            "gradient {i}: {worst} of {scale}"
        );
    }
}
