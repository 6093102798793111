//! Conversations, preference pairs and prompts from the JSONL formats people already have.
//!
//! SFT rows (detected per row by their keys):
//! - `{"messages": [{"role", "content"}, ...]}` (OpenAI / TRL conversational)
//! - `{"prompt", "completion"}` (TRL prompt-completion)
//! - `{"instruction", "input"?, "output"}` (Alpaca)
//! - `{"conversations": [{"from", "value"}, ...]}` (ShareGPT; human/gpt/system)
//!
//! Prompt rows: `{"prompt"}`, `{"messages"}` ending in a user turn, or plain text, one per line.
//! Errors name the file, the line and what is wrong.

use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::documents::DataError;
use crate::rows::{describe, is_jsonl, is_parquet, open_rows};

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Turn {
    pub role: String,
    pub content: String,
}

impl Turn {
    pub fn new(role: &str, content: &str) -> Self {
        Turn {
            role: role.into(),
            content: content.into(),
        }
    }
}

/// The format a row was recognized as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SftFormat {
    Messages,
    PromptCompletion,
    Alpaca,
    ShareGpt,
}

impl SftFormat {
    pub fn name(self) -> &'static str {
        match self {
            SftFormat::Messages => "messages (OpenAI/TRL)",
            SftFormat::PromptCompletion => "prompt/completion",
            SftFormat::Alpaca => "Alpaca instruction/input/output",
            SftFormat::ShareGpt => "ShareGPT conversations",
        }
    }
}

fn string_field<'a>(v: &'a Value, key: &str) -> Result<&'a str, String> {
    match v.get(key) {
        Some(Value::String(s)) => Ok(s),
        Some(_) => Err(format!("`{key}` is not a string")),
        None => Err(format!("no `{key}` key")),
    }
}

fn messages(
    v: &Value,
    key: &str,
    role_key: &str,
    content_key: &str,
    map_role: fn(&str) -> Option<&'static str>,
) -> Result<Vec<Turn>, String> {
    let list = v
        .get(key)
        .and_then(Value::as_array)
        .ok_or_else(|| format!("`{key}` is not a list"))?;
    if list.is_empty() {
        return Err(format!("`{key}` is empty"));
    }
    list.iter()
        .enumerate()
        .map(|(i, m)| {
            let role = m
                .get(role_key)
                .and_then(Value::as_str)
                .ok_or_else(|| format!("{key}[{i}] has no string `{role_key}`"))?;
            let content = m
                .get(content_key)
                .and_then(Value::as_str)
                .ok_or_else(|| format!("{key}[{i}] has no string `{content_key}`"))?;
            let role =
                map_role(role).ok_or_else(|| format!("{key}[{i}]: unknown role {role:?}"))?;
            Ok(Turn::new(role, content))
        })
        .collect()
}

fn openai_role(r: &str) -> Option<&'static str> {
    match r {
        "system" => Some("system"),
        "user" => Some("user"),
        "assistant" => Some("assistant"),
        _ => None,
    }
}

fn sharegpt_role(r: &str) -> Option<&'static str> {
    match r {
        "system" => Some("system"),
        "human" | "user" => Some("user"),
        "gpt" | "assistant" | "chatgpt" | "bard" => Some("assistant"),
        _ => None,
    }
}

/// Parses one SFT row.
pub fn parse_sft_row(v: &Value) -> Result<(SftFormat, Vec<Turn>), String> {
    let (format, turns) = if v.get("messages").is_some() {
        (
            SftFormat::Messages,
            messages(v, "messages", "role", "content", openai_role)?,
        )
    } else if v.get("conversations").is_some() {
        (
            SftFormat::ShareGpt,
            messages(v, "conversations", "from", "value", sharegpt_role)?,
        )
    } else if v.get("instruction").is_some() {
        let inst = string_field(v, "instruction")?;
        let input = v.get("input").and_then(Value::as_str).unwrap_or("");
        let user = if input.trim().is_empty() {
            inst.to_string()
        } else {
            format!("{inst}\n\n{input}")
        };
        (
            SftFormat::Alpaca,
            vec![
                Turn::new("user", &user),
                Turn::new("assistant", string_field(v, "output")?),
            ],
        )
    } else if v.get("prompt").is_some() && v.get("completion").is_some() {
        (
            SftFormat::PromptCompletion,
            vec![
                Turn::new("user", string_field(v, "prompt")?),
                Turn::new("assistant", string_field(v, "completion")?),
            ],
        )
    } else {
        let keys: Vec<&String> = v
            .as_object()
            .map(|o| o.keys().collect())
            .unwrap_or_default();
        return Err(format!("unknown SFT format (keys {keys:?}); expected messages, prompt+completion, instruction+output, or conversations"));
    };
    if !turns.iter().any(|t| t.role == "assistant") {
        return Err("no assistant turn to learn from".into());
    }
    Ok((format, turns))
}

/// Rows of a JSONL or Parquet file, each parsed by `parse`; a bad row is an error naming file
/// and line (or row), or, with `skip_bad`, counted and skipped.
pub fn read_rows<T>(
    path: &Path,
    skip_bad: bool,
    mut parse: impl FnMut(&Value) -> Result<T, String>,
) -> Result<(Vec<T>, Vec<String>), DataError> {
    let mut rows = Vec::new();
    let mut bad = Vec::new();
    for (loc, row) in open_rows(path, None)? {
        match row.and_then(|v| parse(&v)) {
            Ok(r) => rows.push(r),
            Err(why) if skip_bad => bad.push(describe(path, loc, &why)),
            Err(why) => return Err(DataError::at(path, loc, why)),
        }
    }
    if rows.is_empty() && bad.is_empty() {
        return Err(DataError::Empty(path.into()));
    }
    Ok((rows, bad))
}

/// Conversations of SFT files.
pub fn read_sft(
    paths: &[PathBuf],
    skip_bad: bool,
) -> Result<(Vec<Vec<Turn>>, Vec<String>), DataError> {
    read_sft_detected(paths, skip_bad).map(|(c, b, _)| (c, b))
}

/// What a `*_detected` reader returns: the rows, the messages of the bad lines skipped, and
/// its counts of what it found.
pub type Detected<T, C> = (Vec<T>, Vec<String>, C);

/// Rows read per detected format, by the format's name.
pub type FormatCounts = Vec<(&'static str, usize)>;

/// As [`read_sft`], also counting the rows of each detected format (for the log line that
/// says what was read: `messages (OpenAI/TRL): 6000`).
pub fn read_sft_detected(
    paths: &[PathBuf],
    skip_bad: bool,
) -> Result<Detected<Vec<Turn>, FormatCounts>, DataError> {
    let mut counts: FormatCounts = Vec::new();
    let (rows, bad) = read_rows_files(paths, skip_bad, |v| {
        let (format, turns) = parse_sft_row(v)?;
        match counts.iter_mut().find(|(n, _)| *n == format.name()) {
            Some((_, c)) => *c += 1,
            None => counts.push((format.name(), 1)),
        }
        Ok(turns)
    })?;
    Ok((rows, bad, counts))
}

/// [`read_rows`] over several files, rows and bad-row reports concatenated in order.
pub fn read_rows_files<T>(
    paths: &[PathBuf],
    skip_bad: bool,
    mut parse: impl FnMut(&Value) -> Result<T, String>,
) -> Result<(Vec<T>, Vec<String>), DataError> {
    let mut all = Vec::new();
    let mut bad = Vec::new();
    for p in paths {
        let (rows, b) = read_rows(p, skip_bad, &mut parse)?;
        all.extend(rows);
        bad.extend(b);
    }
    Ok((all, bad))
}

/// A prompt: the conversation so far, ending in a user turn.
pub fn parse_prompt_row(v: &Value) -> Result<Vec<Turn>, String> {
    if v.get("messages").is_some() {
        let turns = messages(v, "messages", "role", "content", openai_role)?;
        if turns.last().is_some_and(|t| t.role == "user") {
            Ok(turns)
        } else {
            Err("`messages` must end with a user turn to be a prompt".into())
        }
    } else {
        Ok(vec![Turn::new("user", string_field(v, "prompt")?)])
    }
}

/// Prompts of JSONL files, or of plain text files (one prompt per line).
pub fn read_prompts(
    paths: &[PathBuf],
    skip_bad: bool,
) -> Result<(Vec<Vec<Turn>>, Vec<String>), DataError> {
    let mut all = Vec::new();
    let mut bad = Vec::new();
    for p in paths {
        if is_jsonl(p) || is_parquet(p) {
            let (rows, b) = read_rows(p, skip_bad, parse_prompt_row)?;
            all.extend(rows);
            bad.extend(b);
        } else {
            let text = std::fs::read_to_string(p).map_err(|e| DataError::Io {
                path: p.into(),
                source: e,
            })?;
            all.extend(
                text.lines()
                    .filter(|l| !l.trim().is_empty())
                    .map(|l| vec![Turn::new("user", l.trim())]),
            );
        }
    }
    if all.is_empty() {
        return Err(DataError::Empty(paths.first().cloned().unwrap_or_default()));
    }
    Ok((all, bad))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn every_sft_format_parses() {
        let cases = [
            (
                json!({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}),
                SftFormat::Messages,
            ),
            (
                json!({"prompt": "hi", "completion": "hello"}),
                SftFormat::PromptCompletion,
            ),
            (
                json!({"instruction": "hi", "input": "", "output": "hello"}),
                SftFormat::Alpaca,
            ),
            (
                json!({"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]}),
                SftFormat::ShareGpt,
            ),
        ];
        for (row, format) in cases {
            let (f, turns) = parse_sft_row(&row).unwrap();
            assert_eq!(f, format);
            assert_eq!(
                turns,
                vec![Turn::new("user", "hi"), Turn::new("assistant", "hello")]
            );
        }
        let (_, t) =
            parse_sft_row(&json!({"instruction": "Sum", "input": "2 3", "output": "5"})).unwrap();
        assert_eq!(t[0].content, "Sum\n\n2 3");
    }

    #[test]
    fn broken_rows_name_file_line_and_reason() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("sft.jsonl");
        let rows = [
            r#"{"prompt": "a", "completion": "b"}"#,
            r#"{"messages": [{"role": "wizard", "content": "x"}]}"#,
            r#"{"messages": "nope"}"#,
            r#"{"instruction": "a"}"#,
            r#"{"conversations": [{"from": "human", "value": "only a question"}]}"#,
            r#"{"foo": 1}"#,
            r#"{"prompt": "a", "completion": 3}"#,
            r#"not json"#,
        ];
        std::fs::write(&p, rows.join("\n")).unwrap();
        let err = read_sft(std::slice::from_ref(&p), false)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("sft.jsonl:2") && err.contains("unknown role"),
            "{err}"
        );
        let (ok, bad) = read_sft(&[p], true).unwrap();
        assert_eq!(ok.len(), 1);
        let expect = [
            "unknown role",
            "not a list",
            "no `output` key",
            "no assistant turn",
            "unknown SFT format",
            "not a string",
            "malformed JSON",
        ];
        assert_eq!(bad.len(), expect.len());
        for (b, e) in bad.iter().zip(expect) {
            assert!(b.contains(e), "{b} should say {e}");
        }
        let empty = d.path().join("empty.jsonl");
        std::fs::write(&empty, "\n\n").unwrap();
        assert!(read_sft(&[empty], false)
            .unwrap_err()
            .to_string()
            .contains("no documents"));
    }

    #[test]
    fn prompts_from_jsonl_and_text() {
        let d = tempfile::tempdir().unwrap();
        let j = d.path().join("p.jsonl");
        std::fs::write(
            &j,
            "{\"prompt\": \"a?\"}\n{\"messages\": [{\"role\": \"user\", \"content\": \"b?\"}]}\n",
        )
        .unwrap();
        let t = d.path().join("p.txt");
        std::fs::write(&t, "c?\n\nd?\n").unwrap();
        let (p, _) = read_prompts(&[j.clone(), t], false).unwrap();
        assert_eq!(
            p.iter().map(|c| c[0].content.as_str()).collect::<Vec<_>>(),
            ["a?", "b?", "c?", "d?"]
        );
        std::fs::write(&j, "{\"messages\": [{\"role\": \"user\", \"content\": \"b\"}, {\"role\": \"assistant\", \"content\": \"c\"}]}\n").unwrap();
        assert!(read_prompts(&[j], false)
            .unwrap_err()
            .to_string()
            .contains("must end with a user turn"));
    }
}

/// A preference pair: a prompt and two answers, the first preferred.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PrefPair {
    pub prompt: Vec<Turn>,
    pub chosen: String,
    pub rejected: String,
}

/// Parses Anthropic HH dialogue text: `"\n\nHuman: ...\n\nAssistant: ..."`.
pub fn parse_hh(text: &str) -> Result<Vec<Turn>, String> {
    let mut turns = Vec::new();
    let mut rest = text;
    loop {
        let h = rest.find("\n\nHuman:");
        let a = rest.find("\n\nAssistant:");
        let (pos, role, tag) = match (h, a) {
            (Some(h), Some(a)) if h < a => (h, "user", "\n\nHuman:"),
            (Some(h), None) => (h, "user", "\n\nHuman:"),
            (_, Some(a)) => (a, "assistant", "\n\nAssistant:"),
            (None, None) => break,
        };
        if turns.is_empty() && !rest[..pos].trim().is_empty() {
            return Err("text before the first \"\\n\\nHuman:\" turn".into());
        }
        if let Some(last) = turns.last_mut() {
            let t: &mut Turn = last;
            t.content = rest[..pos].trim().to_string();
        }
        turns.push(Turn::new(role, ""));
        rest = &rest[pos + tag.len()..];
    }
    match turns.last_mut() {
        Some(t) => t.content = rest.trim().to_string(),
        None => return Err("no \"\\n\\nHuman:\" / \"\\n\\nAssistant:\" turns".into()),
    }
    Ok(turns)
}

fn turns_of(v: &Value, key: &str) -> Result<Vec<Turn>, String> {
    match v.get(key) {
        Some(Value::String(s)) => parse_hh(s).map_err(|e| format!("`{key}`: {e}")),
        Some(Value::Array(_)) => messages(v, key, "role", "content", openai_role),
        Some(_) => Err(format!("`{key}` is neither a string nor a message list")),
        None => Err(format!("no `{key}` key")),
    }
}

/// The answer a `chosen`/`rejected` field holds in the explicit form: a string, or a message
/// list whose turns are the answer (the last assistant turn counts).
fn answer_of(v: &Value, key: &str) -> Result<String, String> {
    match v.get(key) {
        Some(Value::String(s)) => Ok(s.clone()),
        Some(Value::Array(_)) => {
            let turns = messages(v, key, "role", "content", openai_role)?;
            turns
                .iter()
                .rev()
                .find(|t| t.role == "assistant")
                .map(|t| t.content.clone())
                .ok_or_else(|| format!("`{key}` has no assistant turn"))
        }
        Some(_) => Err(format!("`{key}` is neither a string nor a message list")),
        None => Err(format!("no `{key}` key")),
    }
}

/// Parses one preference row: explicit (`prompt`, `chosen`, `rejected`) or implicit
/// (`chosen`, `rejected` holding whole dialogues that share a prefix, split at the last common
/// assistant turn).
pub fn parse_pref_row(v: &Value) -> Result<PrefPair, String> {
    if v.get("prompt").is_some() {
        let prompt = match v.get("prompt") {
            Some(Value::String(s)) => vec![Turn::new("user", s)],
            Some(Value::Array(_)) => messages(v, "prompt", "role", "content", openai_role)?,
            _ => return Err("`prompt` is neither a string nor a message list".into()),
        };
        return Ok(PrefPair {
            prompt,
            chosen: answer_of(v, "chosen")?,
            rejected: answer_of(v, "rejected")?,
        });
    }
    let c = turns_of(v, "chosen")?;
    let r = turns_of(v, "rejected")?;
    let k = c.iter().zip(&r).take_while(|(a, b)| a == b).count();
    if k == c.len() || k == r.len() {
        return Err(
            "`chosen` and `rejected` are the same dialogue (or one contains the other)".into(),
        );
    }
    if k + 1 != c.len() || k + 1 != r.len() || c[k].role != "assistant" || r[k].role != "assistant"
    {
        return Err("`chosen` and `rejected` must differ only in their last assistant turn".into());
    }
    if k == 0 {
        return Err("no shared prompt before the differing assistant turns".into());
    }
    Ok(PrefPair {
        prompt: c[..k].to_vec(),
        chosen: c[k].content.clone(),
        rejected: r[k].content.clone(),
    })
}

/// Preference pairs of JSONL or Parquet files.
pub fn read_prefs(
    paths: &[PathBuf],
    skip_bad: bool,
) -> Result<(Vec<PrefPair>, Vec<String>), DataError> {
    read_prefs_detected(paths, skip_bad).map(|(p, b, _)| (p, b))
}

/// As [`read_prefs`], also counting explicit (`prompt` given) and implicit (shared-prefix
/// dialogues) rows.
pub fn read_prefs_detected(
    paths: &[PathBuf],
    skip_bad: bool,
) -> Result<Detected<PrefPair, [usize; 2]>, DataError> {
    let mut counts = [0usize; 2];
    let (rows, bad) = read_rows_files(paths, skip_bad, |v| {
        let pair = parse_pref_row(v)?;
        counts[usize::from(v.get("prompt").is_none())] += 1;
        Ok(pair)
    })?;
    Ok((rows, bad, counts))
}

#[cfg(test)]
mod pref_tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn hh_implicit_pair_splits_at_the_last_common_assistant_turn() {
        let row = json!({
            "chosen": "\n\nHuman: What is 2 plus 2?\n\nAssistant: 4.\n\nHuman: And 3 plus 3?\n\nAssistant: 6.",
            "rejected": "\n\nHuman: What is 2 plus 2?\n\nAssistant: 4.\n\nHuman: And 3 plus 3?\n\nAssistant: Ugh, 7."
        });
        let p = parse_pref_row(&row).unwrap();
        assert_eq!(
            p.prompt,
            vec![
                Turn::new("user", "What is 2 plus 2?"),
                Turn::new("assistant", "4."),
                Turn::new("user", "And 3 plus 3?")
            ]
        );
        assert_eq!((p.chosen.as_str(), p.rejected.as_str()), ("6.", "Ugh, 7."));
    }

    #[test]
    fn explicit_forms_and_errors() {
        let p = parse_pref_row(&json!({"prompt": "q", "chosen": "a", "rejected": "b"})).unwrap();
        assert_eq!(
            p,
            PrefPair {
                prompt: vec![Turn::new("user", "q")],
                chosen: "a".into(),
                rejected: "b".into()
            }
        );
        let p = parse_pref_row(&json!({"prompt": [{"role": "user", "content": "q"}], "chosen": [{"role": "assistant", "content": "a"}], "rejected": [{"role": "assistant", "content": "b"}]})).unwrap();
        assert_eq!((p.chosen.as_str(), p.rejected.as_str()), ("a", "b"));
        let p = parse_pref_row(&json!({"chosen": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}], "rejected": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "b"}]})).unwrap();
        assert_eq!(p.prompt, vec![Turn::new("user", "q")]);
        for (row, why) in [
            (
                json!({"chosen": "\n\nHuman: q\n\nAssistant: a", "rejected": "\n\nHuman: q\n\nAssistant: a"}),
                "same dialogue",
            ),
            (
                json!({"chosen": "\n\nHuman: q\n\nAssistant: a", "rejected": "\n\nHuman: other\n\nAssistant: a"}),
                "differ only in their last assistant turn",
            ),
            (
                json!({"chosen": "plain text", "rejected": "\n\nHuman: q\n\nAssistant: a"}),
                "no \"\\n\\nHuman:\"",
            ),
            (json!({"prompt": "q", "chosen": "a"}), "no `rejected` key"),
            (
                json!({"prompt": 3, "chosen": "a", "rejected": "b"}),
                "neither a string",
            ),
        ] {
            let e = parse_pref_row(&row).unwrap_err();
            assert!(e.contains(why), "{e} should say {why}");
        }
    }
}
