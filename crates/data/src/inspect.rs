//! `kiln data inspect`: what a data file holds, before a run trips over it. Each row is
//! classified as a pre-training document, an SFT conversation (by format), a preference pair
//! (explicit or implicit/HH) or an RL prompt; bad rows are counted with their reasons (the first
//! [`SHOWN_BAD`] kept); token statistics come from a caller-supplied counter.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Serialize;
use serde_json::Value;

use crate::chat::{parse_pref_row, parse_prompt_row, parse_sft_row, PrefPair, Turn};
use crate::documents::{read_documents, DataError};
use crate::rows::{describe, is_jsonl, is_parquet, open_rows};

/// Bad rows listed in a report (all are counted).
pub const SHOWN_BAD: usize = 20;

/// One parsed row.
#[derive(Debug, Clone)]
pub enum Item {
    Document(String),
    Conversation(Vec<Turn>),
    Pair(PrefPair),
    Prompt(Vec<Turn>),
}

/// Classifies a structured row; the kind name is what the report counts.
pub fn classify(v: &Value) -> Result<(String, Item), String> {
    if !v.is_object() {
        return Err("not a JSON object".into());
    }
    if v.get("chosen").is_some() || v.get("rejected").is_some() {
        let form = if v.get("prompt").is_some() {
            "explicit"
        } else {
            "implicit"
        };
        return parse_pref_row(v).map(|p| (format!("preference pairs ({form})"), Item::Pair(p)));
    }
    if let Some(t) = v.get("text") {
        return match t {
            Value::String(s) => Ok(("documents".into(), Item::Document(s.clone()))),
            _ => Err("`text` is not a string".into()),
        };
    }
    let sft = parse_sft_row(v);
    if let Ok((format, turns)) = sft {
        return Ok((
            format!("conversations ({})", format.name()),
            Item::Conversation(turns),
        ));
    }
    match parse_prompt_row(v) {
        Ok(turns) => Ok(("prompts".into(), Item::Prompt(turns))),
        Err(prompt_err) => Err(match sft {
            Err(e) if v.get("prompt").is_none() => e,
            _ => prompt_err,
        }),
    }
}

#[derive(Debug, Clone, Serialize, Default)]
pub struct TokenStats {
    pub rows: usize,
    pub total: u64,
    pub mean: f64,
    pub p50: usize,
    pub p95: usize,
    pub max: usize,
}

impl TokenStats {
    pub fn of(mut counts: Vec<usize>) -> Option<Self> {
        if counts.is_empty() {
            return None;
        }
        counts.sort_unstable();
        let n = counts.len();
        let total: u64 = counts.iter().map(|&c| c as u64).sum();
        Some(TokenStats {
            rows: n,
            total,
            mean: total as f64 / n as f64,
            p50: counts[n / 2],
            p95: counts[((n as f64 * 0.95) as usize).min(n - 1)],
            max: counts[n - 1],
        })
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct FileReport {
    pub path: PathBuf,
    /// `JSONL`, `Parquet` or `text`, and the dominant kind of row.
    pub format: String,
    pub rows: usize,
    /// Rows by kind (`documents`, `conversations (messages (OpenAI/TRL))`, ...).
    pub kinds: BTreeMap<String, usize>,
    pub bad_rows: usize,
    /// The first [`SHOWN_BAD`] bad rows, `file:line: reason`.
    pub bad: Vec<String>,
    pub tokens: Option<TokenStats>,
}

/// Counts an item's tokens (given a tokenizer), or says why it cannot.
pub type TokenCounter<'a> = &'a mut dyn FnMut(&Item) -> Result<usize, String>;

/// Inspects one file; `count` (given a tokenizer) returns the tokens of an item.
pub fn inspect_file(path: &Path, mut count: Option<TokenCounter>) -> Result<FileReport, DataError> {
    let mut kinds: BTreeMap<String, usize> = BTreeMap::new();
    let mut bad = Vec::new();
    let mut bad_rows = 0;
    let mut counts = Vec::new();
    let mut rows = 0;
    let mut note_bad = |msg: String| {
        bad_rows += 1;
        if bad.len() < SHOWN_BAD {
            bad.push(msg);
        }
    };
    let container = if is_parquet(path) {
        "Parquet"
    } else if is_jsonl(path) {
        "JSONL"
    } else {
        "text"
    };
    if container == "text" {
        for doc in read_documents(path)? {
            rows += 1;
            match doc {
                Ok(d) => {
                    *kinds.entry("documents".into()).or_default() += 1;
                    if let Some(c) = count.as_deref_mut() {
                        match c(&Item::Document(d)) {
                            Ok(n) => counts.push(n),
                            Err(e) => note_bad(format!("{}: {e}", path.display())),
                        }
                    }
                }
                Err(e) => note_bad(e.to_string()),
            }
        }
    } else {
        for (loc, row) in open_rows(path, None)? {
            rows += 1;
            match row.and_then(|v| classify(&v)) {
                Ok((kind, item)) => {
                    *kinds.entry(kind).or_default() += 1;
                    if let Some(c) = count.as_deref_mut() {
                        match c(&item) {
                            Ok(n) => counts.push(n),
                            Err(e) => note_bad(describe(path, loc, &e)),
                        }
                    }
                }
                Err(why) => note_bad(describe(path, loc, &why)),
            }
        }
    }
    let dominant = kinds
        .iter()
        .max_by_key(|(_, n)| **n)
        .map(|(k, _)| k.clone())
        .unwrap_or_else(|| "no readable rows".into());
    Ok(FileReport {
        path: path.into(),
        format: format!("{container}, {dominant}"),
        rows,
        kinds,
        bad_rows,
        bad,
        tokens: TokenStats::of(counts),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn every_kind_is_recognized() {
        let kind = |v: Value| classify(&v).map(|(k, _)| k);
        assert_eq!(kind(json!({"text": "a"})).unwrap(), "documents");
        assert!(kind(json!({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}))
            .unwrap()
            .starts_with("conversations (messages"));
        assert!(kind(json!({"instruction": "q", "output": "a"}))
            .unwrap()
            .contains("Alpaca"));
        assert!(kind(json!({"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}))
            .unwrap()
            .contains("ShareGPT"));
        assert!(kind(json!({"prompt": "q", "completion": "a"}))
            .unwrap()
            .contains("prompt/completion"));
        assert_eq!(
            kind(json!({"prompt": "q", "chosen": "a", "rejected": "b"})).unwrap(),
            "preference pairs (explicit)"
        );
        assert_eq!(
            kind(json!({"chosen": "\n\nHuman: q\n\nAssistant: a", "rejected": "\n\nHuman: q\n\nAssistant: b"})).unwrap(),
            "preference pairs (implicit)"
        );
        assert_eq!(kind(json!({"prompt": "q"})).unwrap(), "prompts");
        assert_eq!(
            kind(json!({"messages": [{"role": "user", "content": "q"}]})).unwrap(),
            "prompts"
        );
        assert!(kind(json!({"foo": 1}))
            .unwrap_err()
            .contains("unknown SFT format"));
        assert!(kind(json!({"text": 3}))
            .unwrap_err()
            .contains("not a string"));
        assert!(kind(json!([1, 2]))
            .unwrap_err()
            .contains("not a JSON object"));
        assert!(kind(json!({"prompt": "q", "chosen": "a"}))
            .unwrap_err()
            .contains("rejected"));
    }

    #[test]
    fn reports_count_every_bad_row_and_show_twenty() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("mixed.jsonl");
        let mut text = String::new();
        for i in 0..30 {
            text.push_str(&format!(
                "{{\"prompt\": \"q{i}\", \"completion\": \"a\"}}\n"
            ));
            text.push_str("{broken\n");
        }
        std::fs::write(&p, text).unwrap();
        let mut count = |item: &Item| -> Result<usize, String> {
            match item {
                Item::Conversation(t) => Ok(t.iter().map(|x| x.content.len()).sum()),
                _ => Err("unexpected".into()),
            }
        };
        let r = inspect_file(&p, Some(&mut count)).unwrap();
        assert_eq!(r.rows, 60);
        assert_eq!(r.bad_rows, 30);
        assert_eq!(r.bad.len(), SHOWN_BAD);
        assert!(
            r.bad[0].contains("mixed.jsonl:2") && r.bad[0].contains("malformed JSON"),
            "{}",
            r.bad[0]
        );
        assert_eq!(r.format, "JSONL, conversations (prompt/completion)");
        let t = r.tokens.unwrap();
        assert_eq!((t.rows, t.max), (30, 4));
    }
}
