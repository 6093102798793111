//! Answers of a chat model to prompts (batched KV-cache generation through the chat template),
//! and their gold-reward evaluation on the built-in world.

use kiln_data::chat::Turn;
use kiln_data::world::{gold_reward, Task, World};
use kiln_engine::{generate, SamplingParams};
use kiln_model::{Llama, ModelError};
use kiln_tokenizer::chat::Message;
use kiln_tokenizer::Tokenizer;
use serde::Serialize;

/// Mean and 95% confidence half-width (normal approximation: 1.96 standard errors).
#[derive(Debug, Clone, Copy, Serialize, PartialEq)]
pub struct MeanCi {
    pub mean: f64,
    pub ci95: f64,
}

impl MeanCi {
    pub fn of(xs: &[f64]) -> Self {
        let n = xs.len().max(1) as f64;
        let mean = xs.iter().sum::<f64>() / n;
        let var = if xs.len() > 1 {
            xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1.0)
        } else {
            0.0
        };
        MeanCi {
            mean,
            ci95: 1.96 * (var / n).sqrt(),
        }
    }
}

pub fn to_messages(turns: &[Turn]) -> Vec<Message> {
    turns
        .iter()
        .map(|t| Message::new(&t.role, &t.content))
        .collect()
}

/// Generates an answer to each prompt (a conversation ending in a user turn), `batch` at a time.
/// Returns the decoded answers (special tokens removed) and their token counts.
pub fn answer_prompts(
    model: &Llama,
    tokenizer: &Tokenizer,
    prompts: &[Vec<Turn>],
    params: &SamplingParams,
    batch: usize,
) -> Result<Vec<(String, usize)>, ModelError> {
    let mut out = Vec::with_capacity(prompts.len());
    let mut params = params.clone();
    if let Some(eos) = tokenizer.eos_id() {
        if !params.stop_tokens.contains(&eos) {
            params.stop_tokens.push(eos);
        }
    }
    for (i, chunk) in prompts.chunks(batch.max(1)).enumerate() {
        let ids: Vec<Vec<u32>> = chunk
            .iter()
            .map(|p| tokenizer.encode_chat_prompt(&to_messages(p)))
            .collect::<Result<_, _>>()?;
        let longest = ids.iter().map(Vec::len).max().unwrap_or(0);
        let room = model.config.max_position_embeddings.saturating_sub(longest);
        let p = SamplingParams {
            max_new_tokens: params.max_new_tokens.min(room),
            seed: params.seed.wrapping_add(i as u64),
            ..params.clone()
        };
        let completions = generate(model, &ids, &p, |_, _| {}).map_err(|e| match e {
            kiln_engine::EngineError::Model(m) => m,
            other => ModelError::Config {
                field: "prompt".into(),
                why: other.to_string(),
            },
        })?;
        for c in completions {
            out.push((
                tokenizer.decode(&c.tokens, true)?.trim().to_string(),
                c.tokens.len(),
            ));
        }
    }
    Ok(out)
}

#[derive(Debug, Clone, Serialize)]
pub struct GoldReport {
    pub n: usize,
    pub gold_reward: MeanCi,
    pub exact_match: MeanCi,
    pub correct: MeanCi,
    pub polite: f64,
    pub rude: f64,
    pub mean_tokens: f64,
    /// (prompt, answer, gold reward) of the first few prompts.
    pub samples: Vec<(String, String, f64)>,
    /// Prompts that are not world prompts (not scored).
    pub unscored: usize,
    /// The greedy answer to every prompt, in order (for further scoring without regenerating).
    #[serde(skip)]
    pub answers: Vec<String>,
}

/// Greedy answers to world prompts, scored by the gold reward.
pub fn gold_eval(
    model: &Llama,
    tokenizer: &Tokenizer,
    world: &World,
    prompts: &[Vec<Turn>],
    max_new_tokens: usize,
    batch: usize,
) -> Result<GoldReport, ModelError> {
    let answers = answer_prompts(
        model,
        tokenizer,
        prompts,
        &SamplingParams::greedy(max_new_tokens),
        batch,
    )?;
    let (mut rewards, mut em, mut correct, mut polite, mut rude, mut tokens) =
        (vec![], vec![], vec![], 0usize, 0usize, 0usize);
    let mut samples = Vec::new();
    let mut unscored = 0;
    for (p, (answer, n)) in prompts.iter().zip(&answers) {
        let question = &p.last().expect("prompt has a turn").content;
        let Some(task) = Task::parse(world, question) else {
            unscored += 1;
            continue;
        };
        let g = gold_reward(world, &task, answer);
        rewards.push(g.reward);
        em.push(if g.exact_match { 1.0 } else { 0.0 });
        correct.push(if g.correct { 1.0 } else { 0.0 });
        polite += g.polite as usize;
        rude += g.rude as usize;
        tokens += n;
        if samples.len() < 6 {
            samples.push((question.clone(), answer.clone(), g.reward));
        }
    }
    let n = rewards.len();
    Ok(GoldReport {
        n,
        gold_reward: MeanCi::of(&rewards),
        exact_match: MeanCi::of(&em),
        correct: MeanCi::of(&correct),
        polite: polite as f64 / n.max(1) as f64,
        rude: rude as f64 / n.max(1) as f64,
        mean_tokens: tokens as f64 / n.max(1) as f64,
        samples,
        unscored,
        answers: answers.into_iter().map(|(a, _)| a).collect(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mean_and_ci() {
        let m = MeanCi::of(&[1.0, 2.0, 3.0, 4.0]);
        assert!((m.mean - 2.5).abs() < 1e-12);
        // sample std = 1.291; se = 0.6455; 1.96 se = 1.2652
        assert!((m.ci95 - 1.2652).abs() < 1e-3, "{m:?}");
    }
}
