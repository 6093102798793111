//! The reward model against transformers' `LlamaForSequenceClassification` (fixture written by
//! tools/golden/make_reward_fixture.py), and its invariances.

use std::path::Path;

use kiln_model::checkpoint::TensorFile;
use kiln_model::default_device;
use kiln_model::reward::RewardModel;

fn fixture() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/reward_seqcls")
}

fn batch() -> (Vec<Vec<u32>>, Vec<Vec<bool>>, Vec<f32>) {
    let mut g = TensorFile::read(&fixture().join("golden.safetensors")).unwrap();
    let (shape, ids) = g.tensors.remove("input_ids").unwrap();
    let (_, mask) = g.tensors.remove("attention_mask").unwrap();
    let (_, scores) = g.tensors.remove("scores").unwrap();
    let rows = ids
        .chunks(shape[1])
        .map(|r| r.iter().map(|&x| x as u32).collect())
        .collect();
    let valid = mask
        .chunks(shape[1])
        .map(|r| r.iter().map(|&x| x > 0.5).collect())
        .collect();
    (rows, valid, scores)
}

#[test]
fn scores_match_transformers() {
    let rm = RewardModel::load(&fixture(), &default_device()).unwrap();
    let (rows, valid, expected) = batch();
    let got = kiln_model::to_vec(rm.forward(&rows, &valid));
    for (g, e) in got.iter().zip(&expected) {
        assert!((g - e).abs() < 1e-5, "{got:?} vs {expected:?}");
    }
}

#[test]
fn scores_ignore_padding_side_and_batch_company() {
    let rm = RewardModel::load(&fixture(), &default_device()).unwrap();
    let (rows, valid, _) = batch();
    let seqs: Vec<Vec<u32>> = rows
        .iter()
        .zip(&valid)
        .map(|(r, v)| {
            r.iter()
                .zip(v)
                .filter(|(_, &ok)| ok)
                .map(|(&t, _)| t)
                .collect()
        })
        .collect();
    let together = rm.score(&seqs);
    // Left padding instead of right.
    let t = 10;
    let left_rows: Vec<Vec<u32>> = seqs
        .iter()
        .map(|s| {
            let mut r = vec![0; t - s.len()];
            r.extend(s);
            r
        })
        .collect();
    let left_valid: Vec<Vec<bool>> = seqs
        .iter()
        .map(|s| (0..t).map(|j| j >= t - s.len()).collect())
        .collect();
    let left = kiln_model::to_vec(rm.forward(&left_rows, &left_valid));
    for (i, s) in seqs.iter().enumerate() {
        let alone = rm.score(std::slice::from_ref(s))[0];
        assert!(
            (alone - together[i]).abs() < 1e-5,
            "row {i}: alone {alone} vs batched {}",
            together[i]
        );
        assert!(
            (left[i] - together[i]).abs() < 1e-5,
            "row {i}: left-padded {} vs right-padded {}",
            left[i],
            together[i]
        );
    }
}

#[test]
fn save_load_roundtrip_keeps_scores_and_offset() {
    let device = default_device();
    let mut rm = RewardModel::load(&fixture(), &device).unwrap();
    rm.offset = 0.25;
    let dir = tempfile::tempdir().unwrap();
    rm.save(dir.path()).unwrap();
    let back = RewardModel::load(dir.path(), &device).unwrap();
    let s = vec![vec![5u32, 9, 13, 2]];
    assert_eq!(rm.score(&s), back.score(&s));
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("config.json")).unwrap())
            .unwrap();
    assert_eq!(cfg["architectures"][0], "LlamaForSequenceClassification");
    assert_eq!(cfg["num_labels"], 1);
    assert_eq!(cfg["kiln_reward_offset"], 0.25);
    let names: Vec<String> = TensorFile::read(&dir.path().join("model.safetensors"))
        .unwrap()
        .tensors
        .into_keys()
        .collect();
    assert!(
        names.contains(&"score.weight".to_string())
            && !names.iter().any(|n| n.starts_with("lm_head"))
    );
}
