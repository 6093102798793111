//! The stages. Each supplies batches, a loss and an evaluation to the shared [`crate::Trainer`].

pub mod ppo;
pub mod pretrain;
pub mod reward;
pub mod sft;
