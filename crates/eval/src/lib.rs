//! Kiln's evaluations: held-out loss / perplexity / bits per byte, chat answers to prompts, and
//! the built-in world's gold reward with confidence intervals.

pub mod answers;
pub mod loss;

pub use answers::{answer_prompts, gold_eval, GoldReport, MeanCi};
pub use loss::{evaluate_loss, LossReport};
