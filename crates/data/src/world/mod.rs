//! The built-in world: a small deterministic universe generated from a seed, in which every
//! question has a checkable answer and a gold reward knows the true preference.
//!
//! People have a favorite color, a pet, a home town, a job and a number of apples; the corpus
//! states these facts in prose (with arithmetic facts and simple stories), never in chat form.
//! Chat tasks ask about the facts, small sums and differences, list reversal and sorting, and
//! word counting. Questions about a quarter of the people are held out of SFT training entirely,
//! so evaluation measures whether fine-tuning unlocked knowledge the base model read in
//! pre-training, not memorized answers.

mod gold;
mod synth;
mod tasks;

pub use gold::{gold_reward, GoldScore, POLITE_OPENERS, RUDE_MARKERS};
pub use synth::{load_world, synth, SynthReport, LABEL_TEMPERATURE};
pub use tasks::{Task, TaskKind};

use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

pub const COLORS: [&str; 8] = [
    "red", "blue", "green", "yellow", "purple", "orange", "white", "black",
];
pub const PETS: [&str; 8] = [
    "cat", "dog", "bird", "fish", "rabbit", "horse", "goat", "frog",
];
pub const JOBS: [&str; 8] = [
    "baker", "farmer", "teacher", "doctor", "painter", "sailor", "miner", "singer",
];
const ONSETS: [&str; 14] = [
    "b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z",
];
const VOWELS: [&str; 5] = ["a", "e", "i", "o", "u"];
const CODAS: [&str; 6] = ["", "n", "r", "l", "s", "m"];

/// One person of the world.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Person {
    pub name: String,
    pub color: String,
    pub pet: String,
    pub town: String,
    pub job: String,
    pub apples: u32,
    /// Questions about held-out people never appear in SFT, preference or RL training data.
    pub held_out: bool,
}

/// The world: its people and towns, all derived from the seed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct World {
    pub seed: u64,
    pub people: Vec<Person>,
    pub towns: Vec<String>,
}

fn capitalize(s: &str) -> String {
    let mut c = s.chars();
    match c.next() {
        Some(f) => f.to_uppercase().collect::<String>() + c.as_str(),
        None => String::new(),
    }
}

fn make_name(rng: &mut StdRng, syllables: usize) -> String {
    let mut s = String::new();
    for i in 0..syllables {
        s.push_str(ONSETS[rng.random_range(0..ONSETS.len())]);
        s.push_str(VOWELS[rng.random_range(0..VOWELS.len())]);
        if i + 1 == syllables {
            s.push_str(CODAS[rng.random_range(0..CODAS.len())]);
        }
    }
    capitalize(&s)
}

impl World {
    /// The world of `seed`: 32 people (8 held out) in 8 towns.
    pub fn new(seed: u64) -> Self {
        let mut rng = StdRng::seed_from_u64(seed ^ 0x6b69_6c6e);
        let mut names = std::collections::BTreeSet::new();
        let mut ordered = Vec::new();
        while ordered.len() < 32 {
            let n = make_name(&mut rng, 2);
            if names.insert(n.clone()) {
                ordered.push(n);
            }
        }
        let mut towns = Vec::new();
        while towns.len() < 8 {
            let t = make_name(&mut rng, 2) + ["ton", "ford", "wick", "by"][rng.random_range(0..4)];
            if !towns.contains(&t) && !names.contains(&t) {
                towns.push(t);
            }
        }
        let mut held: Vec<usize> = (0..32).collect();
        held.shuffle(&mut rng);
        let held: Vec<usize> = held[..8].to_vec();
        let people = ordered
            .into_iter()
            .enumerate()
            .map(|(i, name)| Person {
                name,
                color: COLORS[rng.random_range(0..8)].into(),
                pet: PETS[rng.random_range(0..8)].into(),
                town: towns[rng.random_range(0..towns.len())].clone(),
                job: JOBS[rng.random_range(0..8)].into(),
                apples: rng.random_range(2..10),
                held_out: held.contains(&i),
            })
            .collect();
        World {
            seed,
            people,
            towns,
        }
    }

    pub fn person(&self, name: &str) -> Option<&Person> {
        self.people.iter().find(|p| p.name == name)
    }
}
