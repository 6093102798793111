//! `kiln data synth`: writes the built-in world's files.
//!
//! corpus.txt (prose, documents separated by blank lines), sft.jsonl / sft_eval.jsonl (chat
//! `messages`), prefs.jsonl / prefs_eval.jsonl (`prompt`, `chosen`, `rejected`, labels drawn
//! Bradley–Terry style from the gold reward with noise), prompts.jsonl / prompts_eval.jsonl,
//! and world.json (the world itself and the statistics of what was written).

use std::fmt::Write as _;
use std::path::Path;

use rand::rngs::StdRng;
use rand::seq::{IndexedRandom, SliceRandom};
use rand::{Rng, SeedableRng};
use serde::Serialize;
use serde_json::json;

use super::gold::{gold_reward, POLITE_OPENERS};
use super::tasks::{random_task, Split, Task};
use super::World;
use crate::documents::DataError;

/// Temperature of the Bradley–Terry labeler: P(a preferred) = σ((gold_a − gold_b) / τ).
pub const LABEL_TEMPERATURE: f64 = 0.5;

#[derive(Debug, Clone, Serialize)]
pub struct SynthReport {
    pub seed: u64,
    pub scale: f64,
    pub corpus_bytes: usize,
    pub sft: usize,
    pub sft_eval: usize,
    pub prefs: usize,
    pub prefs_eval: usize,
    pub prompts: usize,
    pub prompts_eval: usize,
    /// Share of preference pairs whose label disagrees with the gold reward.
    pub label_flip_rate: f64,
    /// Expected accuracy of a perfect reward model on prefs_eval (the label-noise ceiling).
    pub noise_ceiling: f64,
}

const FILLERS: [&str; 5] = [
    "I hope this answer is useful to you.",
    "Let me know if you want to ask anything else.",
    "That is what I know about it.",
    "This was a good question to ask.",
    "I thought about it for a while before answering.",
];

fn fact_sentences(world: &World, rng: &mut StdRng, out: &mut String) {
    let mut people: Vec<_> = world.people.iter().collect();
    people.shuffle(rng);
    for p in people {
        let n = &p.name;
        let mut facts = [
            [
                format!("{n} lives in {}.", p.town),
                format!("{n}'s home is in {}.", p.town),
                format!("In {} lives {n}.", p.town),
            ],
            [
                format!("{n} likes {}.", p.color),
                format!("{n}'s favorite color is {}.", p.color),
                format!("The favorite color of {n} is {}.", p.color),
            ],
            [
                format!("{n} has a {}.", p.pet),
                format!("{n} keeps a {} as a pet.", p.pet),
                format!("The pet of {n} is a {}.", p.pet),
            ],
            [
                format!("{n} is a {}.", p.job),
                format!("{n} works as a {}.", p.job),
                format!("By trade, {n} is a {}.", p.job),
            ],
            [
                format!("{n} has {} apples.", p.apples),
                format!("{n} owns {} apples.", p.apples),
                format!("There are {} apples in the basket of {n}.", p.apples),
            ],
        ];
        facts.shuffle(rng);
        let k = rng.random_range(2..=5);
        let mut sentences: Vec<String> = facts[..k]
            .iter()
            .map(|f| f.choose(rng).expect("phrasing").clone())
            .collect();
        if rng.random_bool(0.4) {
            sentences.push(format!(
                "One day {n} walked the {} through {} and counted {} apples on the way home.",
                p.pet, p.town, p.apples
            ));
        }
        out.push_str(&sentences.join(" "));
        out.push_str("\n\n");
    }
}

fn skill_sentences(rng: &mut StdRng, out: &mut String) {
    let vocab: Vec<&str> = super::COLORS
        .iter()
        .chain(super::PETS.iter())
        .chain(super::JOBS.iter())
        .copied()
        .collect();
    let mut lines = Vec::new();
    for _ in 0..12 {
        let (a, b) = (rng.random_range(0..=20u32), rng.random_range(0..=20u32));
        lines.push(match rng.random_range(0..3) {
            0 => format!("{a} plus {b} is {}.", a + b),
            1 => format!(
                "{} minus {} is {}.",
                a.max(b),
                a.min(b),
                a.max(b) - a.min(b)
            ),
            _ => format!("If you add {a} and {b} you get {}.", a + b),
        });
    }
    for _ in 0..4 {
        let n = rng.random_range(3..=6);
        let mut v = vocab.clone();
        v.shuffle(rng);
        let w: Vec<&str> = v[..n].to_vec();
        let rev: Vec<&str> = w.iter().rev().copied().collect();
        lines.push(match rng.random_range(0..2) {
            0 => format!(
                "The words {} read backwards are {}.",
                w.join(" "),
                rev.join(" ")
            ),
            _ => format!("The list {} has {n} words.", w.join(" ")),
        });
        let mut nums: Vec<u32> = (1..=30).collect();
        nums.shuffle(rng);
        let mut s = nums[..n].to_vec();
        let orig: Vec<String> = s.iter().map(u32::to_string).collect();
        s.sort_unstable();
        let sorted: Vec<String> = s.iter().map(u32::to_string).collect();
        lines.push(format!(
            "In order, the numbers {} become {}.",
            orig.join(" "),
            sorted.join(" ")
        ));
    }
    lines.shuffle(rng);
    for chunk in lines.chunks(5) {
        out.push_str(&chunk.join(" "));
        out.push_str("\n\n");
    }
}

/// A response to `task` of one of several qualities.
fn variant(world: &World, task: &Task, kind: usize, rng: &mut StdRng) -> String {
    let answer = task.answer(world);
    match kind {
        0 => answer,
        1 => format!("{} {answer}", POLITE_OPENERS.choose(rng).expect("openers")),
        2 => format!(
            "{} {answer}",
            ["Ugh.", "Obviously,", "Whatever."]
                .choose(rng)
                .expect("rude")
        ),
        3 => format!("{answer} {}", FILLERS.choose(rng).expect("fillers")),
        4 => format!(
            "{} {answer} {}",
            POLITE_OPENERS.choose(rng).expect("openers"),
            FILLERS.choose(rng).expect("fillers")
        ),
        5 => task.wrong_answer(world, rng),
        _ => format!(
            "{} {}",
            POLITE_OPENERS.choose(rng).expect("openers"),
            task.wrong_answer(world, rng)
        ),
    }
}

fn sigmoid(x: f64) -> f64 {
    1.0 / (1.0 + (-x).exp())
}

fn chat(prompt: &str, answer: &str) -> serde_json::Value {
    json!({"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]})
}

fn write_jsonl(path: &Path, rows: &[serde_json::Value]) -> Result<(), DataError> {
    let mut s = String::new();
    for r in rows {
        s.push_str(&r.to_string());
        s.push('\n');
    }
    std::fs::write(path, s).map_err(|e| DataError::Io {
        path: path.into(),
        source: e,
    })
}

/// Preference pairs for `n` tasks; returns rows, flip count and the summed noise ceiling.
fn prefs(
    world: &World,
    split: Split,
    n: usize,
    rng: &mut StdRng,
) -> (Vec<serde_json::Value>, usize, f64) {
    let mut rows = Vec::with_capacity(n);
    let (mut flips, mut ceiling) = (0usize, 0.0f64);
    while rows.len() < n {
        let task = random_task(world, split, rng);
        let (ka, kb) = (rng.random_range(0..7), rng.random_range(0..7));
        let (a, b) = (
            variant(world, &task, ka, rng),
            variant(world, &task, kb, rng),
        );
        let (ga, gb) = (
            gold_reward(world, &task, &a).reward,
            gold_reward(world, &task, &b).reward,
        );
        if a == b || (ga - gb).abs() < 1e-9 {
            continue;
        }
        let p = sigmoid((ga - gb) / LABEL_TEMPERATURE);
        let a_wins = rng.random_bool(p);
        if a_wins != (ga > gb) {
            flips += 1;
        }
        ceiling += p.max(1.0 - p);
        let (chosen, rejected) = if a_wins { (a, b) } else { (b, a) };
        rows.push(json!({"prompt": task.prompt, "chosen": chosen, "rejected": rejected}));
    }
    (rows, flips, ceiling)
}

/// Writes the world's files into `out`. Same seed and scale, same bytes.
pub fn synth(out: &Path, seed: u64, scale: f64) -> Result<SynthReport, DataError> {
    std::fs::create_dir_all(out).map_err(|e| DataError::Io {
        path: out.into(),
        source: e,
    })?;
    let world = World::new(seed);
    let mut rng = StdRng::seed_from_u64(seed);
    let n = |base: f64| ((base * scale).round() as usize).max(1);

    let mut corpus = String::new();
    for _ in 0..n(400.0) {
        fact_sentences(&world, &mut rng, &mut corpus);
        skill_sentences(&mut rng, &mut corpus);
    }
    let corpus_path = out.join("corpus.txt");
    std::fs::write(&corpus_path, &corpus).map_err(|e| DataError::Io {
        path: corpus_path.clone(),
        source: e,
    })?;

    let sft_rows = |split: Split, count: usize, rng: &mut StdRng| -> Vec<serde_json::Value> {
        (0..count)
            .map(|_| {
                let task = random_task(&world, split, rng);
                // Three answers in ten open politely: SFT teaches the format, PPO has tone to gain.
                let answer = if rng.random_bool(0.3) {
                    variant(&world, &task, 1, rng)
                } else {
                    task.answer(&world)
                };
                chat(&task.prompt, &answer)
            })
            .collect()
    };
    let sft = sft_rows(Split::Train, n(6000.0), &mut rng);
    let sft_eval = sft_rows(Split::Eval, n(300.0).max(50), &mut rng);
    write_jsonl(&out.join("sft.jsonl"), &sft)?;
    write_jsonl(&out.join("sft_eval.jsonl"), &sft_eval)?;

    let (prefs_train, flips_train, _) = prefs(&world, Split::Train, n(4000.0), &mut rng);
    let (prefs_eval, flips_eval, ceiling) = prefs(&world, Split::Eval, n(400.0).max(50), &mut rng);
    write_jsonl(&out.join("prefs.jsonl"), &prefs_train)?;
    write_jsonl(&out.join("prefs_eval.jsonl"), &prefs_eval)?;

    let prompt_rows = |split: Split, count: usize, rng: &mut StdRng| -> Vec<serde_json::Value> {
        (0..count)
            .map(|_| json!({"prompt": random_task(&world, split, rng).prompt}))
            .collect()
    };
    let prompts = prompt_rows(Split::Train, n(2000.0), &mut rng);
    let prompts_eval = prompt_rows(Split::Eval, n(200.0).max(50), &mut rng);
    write_jsonl(&out.join("prompts.jsonl"), &prompts)?;
    write_jsonl(&out.join("prompts_eval.jsonl"), &prompts_eval)?;

    let report = SynthReport {
        seed,
        scale,
        corpus_bytes: corpus.len(),
        sft: sft.len(),
        sft_eval: sft_eval.len(),
        prefs: prefs_train.len(),
        prefs_eval: prefs_eval.len(),
        prompts: prompts.len(),
        prompts_eval: prompts_eval.len(),
        label_flip_rate: (flips_train + flips_eval) as f64
            / (prefs_train.len() + prefs_eval.len()) as f64,
        noise_ceiling: ceiling / prefs_eval.len() as f64,
    };
    let mut meta = String::new();
    let _ = write!(
        meta,
        "{}",
        serde_json::to_string_pretty(&json!({"world": world, "synth": report})).expect("json")
    );
    let path = out.join("world.json");
    std::fs::write(&path, meta).map_err(|e| DataError::Io { path, source: e })?;
    Ok(report)
}

/// Reads the world back from a `world.json` that `synth` wrote.
pub fn load_world(path: &Path) -> Result<World, DataError> {
    let text = std::fs::read_to_string(path).map_err(|e| DataError::Io {
        path: path.into(),
        source: e,
    })?;
    let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| DataError::BadLine {
        path: path.into(),
        line: 1,
        why: e.to_string(),
    })?;
    serde_json::from_value(v["world"].clone()).map_err(|e| DataError::BadLine {
        path: path.into(),
        line: 1,
        why: format!("not a world.json: {e}"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deterministic_and_fast() {
        let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let t = std::time::Instant::now();
        let ra = synth(a.path(), 7, 1.0).unwrap();
        let secs = t.elapsed().as_secs_f64();
        synth(b.path(), 7, 1.0).unwrap();
        for f in [
            "corpus.txt",
            "sft.jsonl",
            "sft_eval.jsonl",
            "prefs.jsonl",
            "prefs_eval.jsonl",
            "prompts.jsonl",
            "prompts_eval.jsonl",
            "world.json",
        ] {
            assert_eq!(
                std::fs::read(a.path().join(f)).unwrap(),
                std::fs::read(b.path().join(f)).unwrap(),
                "{f} differs"
            );
        }
        println!("{ra:?} in {secs:.2}s");
        assert!(secs < 5.0, "synth took {secs}s");
        assert!(
            ra.corpus_bytes > 1_000_000,
            "corpus of {} bytes",
            ra.corpus_bytes
        );
        assert!(
            (0.15..0.25).contains(&ra.label_flip_rate),
            "flip rate {}",
            ra.label_flip_rate
        );
        let c = synth(b.path(), 8, 1.0).unwrap();
        assert_ne!(
            std::fs::read(a.path().join("corpus.txt")).unwrap(),
            std::fs::read(b.path().join("corpus.txt")).unwrap()
        );
        assert_eq!(
            load_world(&a.path().join("world.json")).unwrap(),
            World::new(7)
        );
        let _ = c;
    }

    #[test]
    fn eval_questions_are_held_out_of_training() {
        let d = tempfile::tempdir().unwrap();
        synth(d.path(), 3, 0.2).unwrap();
        let world = World::new(3);
        let held: Vec<&str> = world
            .people
            .iter()
            .filter(|p| p.held_out)
            .map(|p| p.name.as_str())
            .collect();
        let train = std::fs::read_to_string(d.path().join("sft.jsonl")).unwrap();
        for name in &held {
            assert!(
                !train.contains(name),
                "held-out {name} appears in sft.jsonl"
            );
        }
        let corpus = std::fs::read_to_string(d.path().join("corpus.txt")).unwrap();
        for name in &held {
            assert!(
                corpus.contains(name),
                "held-out {name} must still be in the corpus"
            );
        }
    }
}
