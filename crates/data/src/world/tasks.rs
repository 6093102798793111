//! The world's chat tasks: how each is asked (several phrasings), its canonical answer, and the
//! parser that recovers the task from any prompt text the templates produce (so the gold reward
//! can score a response to any world prompt).

use rand::rngs::StdRng;
use rand::seq::IndexedRandom;
use rand::Rng;

use super::{World, COLORS, JOBS, PETS};

/// What a task asks.
#[derive(Debug, Clone, PartialEq)]
pub enum TaskKind {
    Color(String),
    Town(String),
    Pet(String),
    Job(String),
    Apples(String),
    Add(u32, u32),
    Sub(u32, u32),
    Reverse(Vec<String>),
    Sort(Vec<u32>),
    Count(Vec<String>),
}

/// A task with its prompt phrasing.
#[derive(Debug, Clone, PartialEq)]
pub struct Task {
    pub kind: TaskKind,
    pub prompt: String,
}

const TEMPLATES: &[(&str, &str)] = &[
    ("color", "What color does {} like?"),
    ("color", "What is {}'s favorite color?"),
    ("town", "Where does {} live?"),
    ("town", "In which town does {} live?"),
    ("pet", "What pet does {} have?"),
    ("pet", "Which animal does {} keep?"),
    ("job", "What does {} do for work?"),
    ("job", "What is {}'s job?"),
    ("apples", "How many apples does {} have?"),
    ("apples", "How many apples does {} own?"),
    ("add", "What is {} plus {}?"),
    ("add", "Add {} and {}."),
    ("sub", "What is {} minus {}?"),
    ("reverse", "Reverse the words: {}"),
    ("sort", "Sort the numbers: {}"),
    ("count", "How many words are in this list: {}?"),
];

/// Matches `text` against a template with `{}` slots; returns the slot contents.
fn match_template(template: &str, text: &str) -> Option<Vec<String>> {
    let parts: Vec<&str> = template.split("{}").collect();
    let mut rest = text.strip_prefix(parts[0])?;
    let mut slots = Vec::new();
    for (i, lit) in parts[1..].iter().enumerate() {
        let last = i + 2 == parts.len();
        let end = if last {
            if !rest.ends_with(lit) {
                return None;
            }
            rest.len() - lit.len()
        } else {
            rest.find(lit)?
        };
        let slot = &rest[..end];
        if slot.is_empty() {
            return None;
        }
        slots.push(slot.to_string());
        rest = &rest[end + lit.len()..];
    }
    Some(slots)
}

fn words(s: &str) -> Vec<String> {
    s.split_whitespace().map(String::from).collect()
}

impl Task {
    /// Recovers the task behind a prompt, if the prompt is a world prompt.
    pub fn parse(world: &World, prompt: &str) -> Option<Task> {
        let prompt = prompt.trim();
        for (kind, tpl) in TEMPLATES {
            let Some(slots) = match_template(tpl, prompt) else {
                continue;
            };
            let person = || world.person(&slots[0]).map(|p| p.name.clone());
            let num = |s: &String| s.parse::<u32>().ok();
            let kind = match *kind {
                "color" => TaskKind::Color(person()?),
                "town" => TaskKind::Town(person()?),
                "pet" => TaskKind::Pet(person()?),
                "job" => TaskKind::Job(person()?),
                "apples" => TaskKind::Apples(person()?),
                "add" => TaskKind::Add(num(&slots[0])?, num(&slots[1])?),
                "sub" => TaskKind::Sub(num(&slots[0])?, num(&slots[1])?),
                "reverse" => TaskKind::Reverse(words(&slots[0])),
                "sort" => TaskKind::Sort(
                    slots[0]
                        .split_whitespace()
                        .map(|w| w.parse().ok())
                        .collect::<Option<Vec<u32>>>()?,
                ),
                "count" => TaskKind::Count(words(&slots[0])),
                _ => continue,
            };
            return Some(Task {
                kind,
                prompt: prompt.to_string(),
            });
        }
        None
    }

    /// The canonical (correct, neutral, concise) answer.
    pub fn answer(&self, world: &World) -> String {
        let p = |n: &String| world.person(n).expect("task names a person of the world");
        match &self.kind {
            TaskKind::Color(n) => format!("{n} likes {}.", p(n).color),
            TaskKind::Town(n) => format!("{n} lives in {}.", p(n).town),
            TaskKind::Pet(n) => format!("{n} has a {}.", p(n).pet),
            TaskKind::Job(n) => format!("{n} is a {}.", p(n).job),
            TaskKind::Apples(n) => format!("{n} has {} apples.", p(n).apples),
            TaskKind::Add(a, b) => format!("{a} plus {b} is {}.", a + b),
            TaskKind::Sub(a, b) => format!("{a} minus {b} is {}.", a - b),
            TaskKind::Reverse(w) => w.iter().rev().cloned().collect::<Vec<_>>().join(" "),
            TaskKind::Sort(v) => {
                let mut s = v.clone();
                s.sort_unstable();
                s.iter().map(u32::to_string).collect::<Vec<_>>().join(" ")
            }
            TaskKind::Count(w) => format!("There are {} words.", w.len()),
        }
    }

    /// The same answer with the key fact replaced by a wrong one (for rejected responses).
    pub fn wrong_answer(&self, world: &World, rng: &mut StdRng) -> String {
        let other = |list: &[&str], right: &str, rng: &mut StdRng| loop {
            let c = *list.choose(rng).expect("non-empty");
            if c != right {
                return c.to_string();
            }
        };
        let p = |n: &String| world.person(n).expect("task names a person of the world");
        let off = |x: u32, rng: &mut StdRng| {
            if x == 0 || rng.random_bool(0.5) {
                x + rng.random_range(1..4)
            } else {
                x - 1
            }
        };
        match &self.kind {
            TaskKind::Color(n) => format!("{n} likes {}.", other(&COLORS, &p(n).color, rng)),
            TaskKind::Town(n) => {
                let towns: Vec<&str> = world.towns.iter().map(String::as_str).collect();
                format!("{n} lives in {}.", other(&towns, &p(n).town, rng))
            }
            TaskKind::Pet(n) => format!("{n} has a {}.", other(&PETS, &p(n).pet, rng)),
            TaskKind::Job(n) => format!("{n} is a {}.", other(&JOBS, &p(n).job, rng)),
            TaskKind::Apples(n) => format!("{n} has {} apples.", off(p(n).apples, rng)),
            TaskKind::Add(a, b) => format!("{a} plus {b} is {}.", off(a + b, rng)),
            TaskKind::Sub(a, b) => format!("{a} minus {b} is {}.", off(a - b, rng)),
            TaskKind::Reverse(w) => {
                let mut s = w.clone();
                s.shuffle_until_different(rng);
                s.join(" ")
            }
            TaskKind::Sort(v) => {
                let mut s: Vec<String> = v.iter().map(u32::to_string).collect();
                s.shuffle_until_different(rng);
                s.join(" ")
            }
            TaskKind::Count(w) => format!("There are {} words.", off(w.len() as u32, rng)),
        }
    }
}

trait ShuffleDifferent {
    fn shuffle_until_different(&mut self, rng: &mut StdRng);
}

impl ShuffleDifferent for Vec<String> {
    /// Shuffles into an order that is neither the original nor its reverse (lists of >= 3
    /// distinct items); a wrong answer must not be accidentally right.
    fn shuffle_until_different(&mut self, rng: &mut StdRng) {
        use rand::seq::SliceRandom;
        let orig = self.clone();
        let mut rev = orig.clone();
        rev.reverse();
        let mut sorted = orig.clone();
        sorted.sort_by_key(|s| s.parse::<u32>().unwrap_or(0));
        for _ in 0..50 {
            self.shuffle(rng);
            if *self != orig && *self != rev && *self != sorted {
                return;
            }
        }
        self.rotate_left(1);
    }
}

/// Which half of the world a generated task belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Split {
    Train,
    Eval,
}

/// Held-out sums and differences: one pair in five.
fn arithmetic_held_out(a: u32, b: u32) -> bool {
    (a * 7 + b * 3).is_multiple_of(5)
}

fn pick<'a>(rng: &mut StdRng, templates: &[&'a str]) -> &'a str {
    templates.choose(rng).expect("non-empty")
}

fn fill(tpl: &str, slots: &[String]) -> String {
    let mut out = tpl.to_string();
    for s in slots {
        out = out.replacen("{}", s, 1);
    }
    out
}

fn templates_of(kind: &str) -> Vec<&'static str> {
    TEMPLATES
        .iter()
        .filter(|(k, _)| *k == kind)
        .map(|(_, t)| *t)
        .collect()
}

/// A random task of the given split.
pub fn random_task(world: &World, split: Split, rng: &mut StdRng) -> Task {
    let vocab: Vec<&str> = COLORS
        .iter()
        .chain(PETS.iter())
        .chain(JOBS.iter())
        .copied()
        .collect();
    loop {
        let r: f64 = rng.random();
        let (kind, slots) = if r < 0.5 {
            let people: Vec<&super::Person> = world
                .people
                .iter()
                .filter(|p| p.held_out == (split == Split::Eval))
                .collect();
            let person = people.choose(rng).expect("people").name.clone();
            let kind = *["color", "town", "pet", "job", "apples"]
                .choose(rng)
                .expect("kinds");
            (kind, vec![person])
        } else if r < 0.7 {
            let (a, b) = (rng.random_range(0..=20u32), rng.random_range(0..=20u32));
            if arithmetic_held_out(a, b) != (split == Split::Eval) {
                continue;
            }
            if rng.random_bool(0.6) {
                ("add", vec![a.to_string(), b.to_string()])
            } else {
                ("sub", vec![a.max(b).to_string(), a.min(b).to_string()])
            }
        } else {
            let n = rng.random_range(3..=6);
            let kind = *["reverse", "sort", "count"].choose(rng).expect("kinds");
            let list: Vec<String> = if kind == "sort" {
                let mut v: Vec<u32> = (1..=30).collect();
                v.shuffle(rng);
                v[..n].iter().map(u32::to_string).collect()
            } else {
                let mut v = vocab.clone();
                v.shuffle(rng);
                v[..n].iter().map(|s| s.to_string()).collect()
            };
            (kind, vec![list.join(" ")])
        };
        let prompt = fill(pick(rng, &templates_of(kind)), &slots);
        return Task::parse(world, &prompt).expect("generated prompts parse");
    }
}

use rand::seq::SliceRandom as _;
