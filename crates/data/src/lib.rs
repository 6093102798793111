//! Kiln's data readers: pre-training documents (text, JSONL, Parquet), chat data for SFT,
//! preference pairs and prompts (JSONL or Parquet, every common format), token shards, format
//! detection for `kiln data inspect`, and the built-in synthetic world with its true reward.
//! Everything streams, and a bad row names its file and line (or row).

pub mod chat;
pub mod documents;
pub mod inspect;
pub mod rows;
pub mod shards;
pub mod world;

pub use documents::{read_documents, DataError, Documents};
