//! Kiln's evaluations. This first piece: held-out next-token loss, perplexity and bits per byte.

pub mod loss;

pub use loss::{evaluate_loss, LossReport};
