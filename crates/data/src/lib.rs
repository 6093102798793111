//! Kiln's data readers. This first piece reads pre-training documents: plain text (documents
//! separated by blank lines) and JSONL with a `text` key, streaming, with errors that name the
//! file and line.

pub mod chat;
pub mod documents;
pub mod shards;
pub mod world;

pub use documents::{read_documents, DataError, Documents};
