//! Token shards: a pre-training corpus tokenized once into a flat little-endian u32 file
//! (`tokens.bin`) with a JSON description (`tokens.json`), memory-mapped at training time so
//! reading costs no parsing and a resumed run reads exactly the same tokens.
//!
//! Documents are packed back to back, each as BOS (if the tokenizer has one), its tokens, EOS:
//! boundaries are marked by EOS, as in GPT-2 and nanoGPT.

use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::documents::{read_documents_as, DataError};

/// How documents are read for a shard.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ReadOptions {
    /// Skip malformed documents (counted) instead of stopping at the first.
    pub skip_bad: bool,
    /// Each plain text file is one document (otherwise: split on blank lines).
    pub whole_files: bool,
}

pub const TOKENS_FILE: &str = "tokens.bin";
pub const TOKENS_META: &str = "tokens.json";

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ShardMeta {
    pub num_tokens: usize,
    pub num_documents: usize,
    pub num_bytes: usize,
    pub vocab_size: usize,
    pub sources: Vec<PathBuf>,
    /// Malformed documents skipped (`skip_bad`), and the first few of them with their reasons.
    #[serde(default)]
    pub skipped: usize,
    #[serde(default)]
    pub skipped_examples: Vec<String>,
}

/// Tokenizes every document of `inputs` with `encode` and writes the shard into `out`. A
/// malformed document stops with an error naming file and line, or with `opts.skip_bad` is counted
/// (`skipped`) and left out.
pub fn write_shard(
    inputs: &[PathBuf],
    out: &Path,
    vocab_size: usize,
    bos: Option<u32>,
    eos: Option<u32>,
    opts: ReadOptions,
    mut encode: impl FnMut(&str) -> Result<Vec<u32>, String>,
) -> Result<ShardMeta, DataError> {
    std::fs::create_dir_all(out).map_err(|e| DataError::Io {
        path: out.into(),
        source: e,
    })?;
    let path = out.join(TOKENS_FILE);
    let tmp = out.join(".tokens.bin.tmp");
    let io = |e| DataError::Io {
        path: path.clone(),
        source: e,
    };
    let mut w = std::io::BufWriter::new(std::fs::File::create(&tmp).map_err(io)?);
    let (mut num_tokens, mut num_documents, mut num_bytes) = (0usize, 0usize, 0usize);
    let (mut skipped, mut skipped_examples) = (0usize, Vec::new());
    for input in inputs {
        let files = expand(input)?;
        for file in files {
            for doc in read_documents_as(&file, opts.whole_files)? {
                let doc = match doc {
                    Ok(d) => d,
                    Err(e) if opts.skip_bad => {
                        skipped += 1;
                        if skipped_examples.len() < 20 {
                            skipped_examples.push(e.to_string());
                        }
                        continue;
                    }
                    Err(e) => return Err(e),
                };
                let mut ids: Vec<u32> = bos.into_iter().collect();
                ids.extend(encode(&doc).map_err(|why| DataError::BadLine {
                    path: file.clone(),
                    line: 0,
                    why,
                })?);
                ids.extend(eos);
                for id in &ids {
                    w.write_all(&id.to_le_bytes()).map_err(io)?;
                }
                num_tokens += ids.len();
                num_documents += 1;
                num_bytes += doc.len();
            }
        }
    }
    if num_documents == 0 {
        return Err(DataError::Empty(
            inputs.first().cloned().unwrap_or_default(),
        ));
    }
    let f = w.into_inner().map_err(|e| io(e.into_error()))?;
    f.sync_all().map_err(io)?;
    std::fs::rename(&tmp, &path).map_err(io)?;
    let meta = ShardMeta {
        num_tokens,
        num_documents,
        num_bytes,
        vocab_size,
        sources: inputs.to_vec(),
        skipped,
        skipped_examples,
    };
    let mpath = out.join(TOKENS_META);
    std::fs::write(&mpath, serde_json::to_string_pretty(&meta).expect("json")).map_err(|e| {
        DataError::Io {
            path: mpath,
            source: e,
        }
    })?;
    Ok(meta)
}

/// A file, or the text/JSONL files of a folder (sorted, so the order is reproducible).
pub fn expand(input: &Path) -> Result<Vec<PathBuf>, DataError> {
    if input.is_dir() {
        let mut files: Vec<PathBuf> = std::fs::read_dir(input)
            .map_err(|e| DataError::Io {
                path: input.into(),
                source: e,
            })?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| {
                p.is_file()
                    && !p
                        .file_name()
                        .is_some_and(|n| n.to_string_lossy().starts_with('.'))
            })
            .collect();
        files.sort();
        Ok(files)
    } else if input.exists() {
        Ok(vec![input.to_path_buf()])
    } else {
        Err(DataError::Io {
            path: input.into(),
            source: std::io::Error::new(std::io::ErrorKind::NotFound, "no such file or directory"),
        })
    }
}

/// A memory-mapped shard.
pub struct Shard {
    map: memmap2::Mmap,
    pub meta: ShardMeta,
}

impl Shard {
    pub fn open(dir: &Path) -> Result<Self, DataError> {
        let mpath = dir.join(TOKENS_META);
        let text = std::fs::read_to_string(&mpath).map_err(|e| DataError::Io {
            path: mpath.clone(),
            source: e,
        })?;
        let meta: ShardMeta = serde_json::from_str(&text).map_err(|e| DataError::BadLine {
            path: mpath.clone(),
            line: 1,
            why: e.to_string(),
        })?;
        let path = dir.join(TOKENS_FILE);
        let file = std::fs::File::open(&path).map_err(|e| DataError::Io {
            path: path.clone(),
            source: e,
        })?;
        // Safety: the file is written once (temporary + rename) and never modified in place.
        let map = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| DataError::Io {
            path: path.clone(),
            source: e,
        })?;
        if map.len() != meta.num_tokens * 4 {
            return Err(DataError::BadLine {
                path,
                line: 0,
                why: format!(
                    "holds {} bytes, tokens.json says {} tokens; re-run `kiln data tokenize`",
                    map.len(),
                    meta.num_tokens
                ),
            });
        }
        Ok(Shard { map, meta })
    }

    pub fn len(&self) -> usize {
        self.meta.num_tokens
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Tokens `[start, end)`.
    pub fn tokens(&self, start: usize, end: usize) -> Vec<u32> {
        self.map[start * 4..end * 4]
            .chunks_exact(4)
            .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shard_roundtrip_marks_documents() {
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("a.txt");
        std::fs::write(&f, "ab c\n\nde").unwrap();
        let meta = write_shard(
            &[f],
            &d.path().join("s"),
            300,
            Some(0),
            Some(1),
            ReadOptions::default(),
            |t| Ok(t.bytes().map(|b| b as u32 + 10).collect()),
        )
        .unwrap();
        let shard = Shard::open(&d.path().join("s")).unwrap();
        assert_eq!(meta.num_documents, 2);
        assert_eq!(
            shard.tokens(0, shard.len()),
            vec![0, 107, 108, 42, 109, 1, 0, 110, 111, 1]
        );
        // A truncated shard is detected.
        let bin = d.path().join("s").join(TOKENS_FILE);
        let bytes = std::fs::read(&bin).unwrap();
        std::fs::write(&bin, &bytes[..8]).unwrap();
        let e = Shard::open(&d.path().join("s")).err().unwrap().to_string();
        assert!(e.contains("tokens.json says 10 tokens"), "{e}");
    }

    #[test]
    fn bad_documents_stop_or_are_skipped_and_counted() {
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("docs.jsonl");
        std::fs::write(
            &f,
            "{\"text\": \"ab\"}\n{\"txt\": 1}\n{oops\n{\"text\": \"c\"}\n",
        )
        .unwrap();
        let enc = |t: &str| Ok(t.bytes().map(|b| b as u32).collect());
        let e = write_shard(
            std::slice::from_ref(&f),
            &d.path().join("s"),
            300,
            None,
            None,
            ReadOptions::default(),
            enc,
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("docs.jsonl:2") && e.contains("no `text` key"),
            "{e}"
        );
        let skip = ReadOptions {
            skip_bad: true,
            ..Default::default()
        };
        let meta = write_shard(&[f], &d.path().join("s"), 300, None, None, skip, enc).unwrap();
        assert_eq!((meta.num_documents, meta.skipped), (2, 2));
        assert!(
            meta.skipped_examples[1].contains("docs.jsonl:3"),
            "{:?}",
            meta.skipped_examples
        );
    }
}
