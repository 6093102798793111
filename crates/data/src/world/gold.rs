//! The gold reward: the world's true preference over responses, used to label preference pairs
//! (with noise) and to measure what each stage really bought.
//!
//! reward = correctness (+1 correct, −1 otherwise)
//!        + 0.3 if the answer opens politely ("Sure!", ...)
//!        − 0.6 if it is rude ("Ugh", "Obviously", ...)
//!        − 0.05 per word beyond the canonical answer (at most −1).
//! Correctness dominates, then tone, then concision. A fact answer is correct when it names the
//! right value and no other value of that kind; a numeric answer when its last number is right;
//! a list answer when it contains the right sequence.

use serde::Serialize;

use super::tasks::{Task, TaskKind};
use super::{World, COLORS, JOBS, PETS};

pub const POLITE_OPENERS: [&str; 3] = ["Sure!", "Of course!", "Happy to help!"];
pub const RUDE_MARKERS: [&str; 4] = ["ugh", "obviously", "whatever", "stupid question"];

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct GoldScore {
    pub reward: f64,
    pub correct: bool,
    /// The response, minus a polite opener, is exactly the canonical answer.
    pub exact_match: bool,
    pub polite: bool,
    pub rude: bool,
    pub extra_words: usize,
}

fn norm_words(s: &str) -> Vec<String> {
    s.split_whitespace()
        .map(|w| {
            w.trim_matches(|c: char| !c.is_alphanumeric())
                .to_lowercase()
        })
        .filter(|w| !w.is_empty())
        .collect()
}

fn contains_seq(hay: &[String], needle: &[String]) -> bool {
    !needle.is_empty() && hay.windows(needle.len()).any(|w| w == needle)
}

/// Strips a leading polite opener; returns the rest and whether one was there.
pub fn strip_polite(response: &str) -> (&str, bool) {
    let r = response.trim();
    for o in POLITE_OPENERS {
        if let Some(rest) = r.strip_prefix(o) {
            return (rest.trim_start(), true);
        }
    }
    (r, false)
}

fn is_correct(world: &World, task: &Task, response: &str) -> bool {
    let words = norm_words(response);
    let one_of = |right: &str, all: &[&str]| {
        let right = right.to_lowercase();
        words.contains(&right)
            && !all
                .iter()
                .any(|o| o.to_lowercase() != right && words.contains(&o.to_lowercase()))
    };
    let last_number = || words.iter().rev().find_map(|w| w.parse::<u64>().ok());
    let p = |n: &String| world.person(n).expect("task names a person");
    match &task.kind {
        TaskKind::Color(n) => one_of(&p(n).color, &COLORS),
        TaskKind::Pet(n) => one_of(&p(n).pet, &PETS),
        TaskKind::Job(n) => one_of(&p(n).job, &JOBS),
        TaskKind::Town(n) => {
            let towns: Vec<&str> = world.towns.iter().map(String::as_str).collect();
            one_of(&p(n).town, &towns)
        }
        TaskKind::Apples(n) => last_number() == Some(p(n).apples as u64),
        TaskKind::Add(a, b) => last_number() == Some((a + b) as u64),
        TaskKind::Sub(a, b) => last_number() == Some((a - b) as u64),
        TaskKind::Count(w) => last_number() == Some(w.len() as u64),
        TaskKind::Reverse(_) | TaskKind::Sort(_) => {
            contains_seq(&words, &norm_words(&task.answer(world)))
        }
    }
}

/// Scores `response` to a world `task`.
pub fn gold_reward(world: &World, task: &Task, response: &str) -> GoldScore {
    let canonical = task.answer(world);
    let (body, polite) = strip_polite(response);
    let lower = response.to_lowercase();
    let rude = RUDE_MARKERS.iter().any(|m| lower.contains(m));
    let correct = !body.is_empty() && is_correct(world, task, response);
    let extra_words = norm_words(body)
        .len()
        .saturating_sub(norm_words(&canonical).len());
    let reward = if correct { 1.0 } else { -1.0 } + if polite { 0.3 } else { 0.0 }
        - if rude { 0.6 } else { 0.0 }
        - (0.05 * extra_words as f64).min(1.0);
    GoldScore {
        reward,
        correct,
        exact_match: body == canonical,
        polite,
        rude,
        extra_words,
    }
}

#[cfg(test)]
mod tests {
    use super::super::tasks::{random_task, Split};
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn correct_polite_concise_beats_every_degraded_variant() {
        let world = World::new(1);
        let mut rng = rand::rngs::StdRng::seed_from_u64(0);
        for _ in 0..300 {
            let task = random_task(&world, Split::Train, &mut rng);
            let best = format!("Sure! {}", task.answer(&world));
            let g = |r: &str| gold_reward(&world, &task, r);
            let top = g(&best);
            assert!(
                top.correct && top.polite && !top.rude && top.exact_match,
                "{best:?}: {top:?}"
            );
            let variants = [
                task.answer(&world),                                // not polite
                format!("Ugh. Obviously, {}", task.answer(&world)), // rude
                format!(
                    "Sure! {} I hope this answer is useful to you.",
                    task.answer(&world)
                ), // verbose
                format!("Sure! {}", task.wrong_answer(&world, &mut rng)), // wrong
                String::new(),                                      // empty
            ];
            for v in variants {
                assert!(
                    top.reward > g(&v).reward,
                    "{:?}: {best:?} ({}) vs {v:?} ({})",
                    task.prompt,
                    top.reward,
                    g(&v).reward
                );
            }
            // Ordering of the degradations: wrong is worst among non-empty answers.
            let wrong = g(&task.wrong_answer(&world, &mut rng));
            assert!(!wrong.correct, "{:?}", task.prompt);
            assert!(g(&format!("Ugh. Obviously, {}", task.answer(&world))).reward > wrong.reward);
        }
    }

    #[test]
    fn numeric_and_fact_checks() {
        let world = World::new(2);
        let p = &world.people[0];
        let task = Task::parse(&world, &format!("What color does {} like?", p.name)).unwrap();
        let other = COLORS.iter().find(|c| **c != p.color).unwrap();
        assert!(gold_reward(&world, &task, &format!("{} likes {}.", p.name, p.color)).correct);
        // Naming two colors is not an answer.
        assert!(
            !gold_reward(
                &world,
                &task,
                &format!("{} likes {} or {other}.", p.name, p.color)
            )
            .correct
        );
        let task = Task::parse(&world, "What is 7 plus 5?").unwrap();
        assert!(gold_reward(&world, &task, "7 plus 5 is 12.").correct);
        assert!(!gold_reward(&world, &task, "7 plus 5 is 13.").correct);
        let task = Task::parse(&world, "Sort the numbers: 9 2 5").unwrap();
        assert_eq!(task.answer(&world), "2 5 9");
        assert!(gold_reward(&world, &task, "2 5 9").exact_match);
        assert!(Task::parse(&world, "What is the meaning of life?").is_none());
    }
}
