//! Documents for pre-training and evaluation, read one at a time.
//!
//! - `.jsonl` / `.json`: one JSON object per line with a string `text` field.
//! - `.parquet`: a `text` column (only that column is read).
//! - anything else: UTF-8 text; documents are separated by one or more blank lines.

use std::fs::File;
use std::io::{BufRead, BufReader, Lines};
use std::path::{Path, PathBuf};

use crate::rows::{is_jsonl, is_parquet, open_rows, Rows};

#[derive(Debug, thiserror::Error)]
pub enum DataError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}:{line}: {why}")]
    BadLine {
        path: PathBuf,
        line: usize,
        why: String,
    },
    #[error("{path}: row {row}: {why}")]
    BadRow {
        path: PathBuf,
        row: usize,
        why: String,
    },
    #[error("{path}: {why}")]
    Format { path: PathBuf, why: String },
    #[error("{0}: no documents found (the file is empty or holds only blank lines)")]
    Empty(PathBuf),
}

enum Kind {
    Text(Lines<BufReader<File>>),
    Whole(Option<String>),
    Rows(Rows),
}

/// A streaming iterator over the documents of one file.
pub struct Documents {
    path: PathBuf,
    kind: Kind,
    line_no: usize,
    done: bool,
}

/// Opens `path` and detects its format from the extension.
pub fn read_documents(path: &Path) -> Result<Documents, DataError> {
    read_documents_as(path, false)
}

/// As [`read_documents`]; with `whole_file`, a plain text file is one document (a folder of
/// articles, say) instead of being split on blank lines.
pub fn read_documents_as(path: &Path, whole_file: bool) -> Result<Documents, DataError> {
    let kind = if is_jsonl(path) || is_parquet(path) {
        Kind::Rows(open_rows(path, Some(&["text"]))?)
    } else if whole_file {
        let text = std::fs::read_to_string(path).map_err(|e| DataError::Io {
            path: path.into(),
            source: e,
        })?;
        Kind::Whole((!text.trim().is_empty()).then(|| text.trim().to_string()))
    } else {
        let file = File::open(path).map_err(|e| DataError::Io {
            path: path.into(),
            source: e,
        })?;
        Kind::Text(BufReader::new(file).lines())
    };
    Ok(Documents {
        path: path.into(),
        kind,
        line_no: 0,
        done: false,
    })
}

impl Documents {
    fn next_line(&mut self) -> Option<Result<String, DataError>> {
        let Kind::Text(lines) = &mut self.kind else {
            return None;
        };
        let line = lines.next()?;
        self.line_no += 1;
        Some(line.map_err(|e| DataError::BadLine {
            path: self.path.clone(),
            line: self.line_no,
            why: format!("unreadable line ({e})"),
        }))
    }
}

impl Iterator for Documents {
    type Item = Result<String, DataError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.done {
            return None;
        }
        match &mut self.kind {
            Kind::Whole(doc) => doc.take().map(Ok),
            Kind::Rows(rows) => {
                let (loc, row) = rows.next()?;
                let path = &self.path;
                let text = row.and_then(|v| match v.get("text") {
                    Some(serde_json::Value::String(s)) => Ok(s.clone()),
                    Some(serde_json::Value::Null) => Err("`text` is null".into()),
                    Some(_) => Err("`text` is not a string".into()),
                    None => Err("no `text` key (pre-training JSONL needs {\"text\": ...})".into()),
                });
                Some(text.map_err(|why| DataError::at(path, loc, why)))
            }
            Kind::Text(_) => {
                let mut doc = String::new();
                loop {
                    match self.next_line() {
                        None => {
                            self.done = true;
                            break;
                        }
                        Some(Err(e)) => return Some(Err(e)),
                        Some(Ok(line)) => {
                            if line.trim().is_empty() {
                                if doc.is_empty() {
                                    continue;
                                }
                                break;
                            }
                            if !doc.is_empty() {
                                doc.push('\n');
                            }
                            doc.push_str(&line);
                        }
                    }
                }
                if doc.is_empty() {
                    None
                } else {
                    Some(Ok(doc))
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn whole_file_is_one_document() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a.txt");
        std::fs::write(&p, "\n\nfirst part\n\nsecond part\n").unwrap();
        let docs: Vec<String> = read_documents_as(&p, true)
            .unwrap()
            .map(Result::unwrap)
            .collect();
        assert_eq!(docs, vec!["first part\n\nsecond part"]);
        std::fs::write(&p, "  \n").unwrap();
        assert_eq!(read_documents_as(&p, true).unwrap().count(), 0);
    }

    #[test]
    fn text_splits_on_blank_lines() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a.txt");
        std::fs::write(&p, "\n\nfirst doc\nline two\n\n\nsecond\n  \nthird").unwrap();
        let docs: Vec<String> = read_documents(&p).unwrap().map(Result::unwrap).collect();
        assert_eq!(docs, vec!["first doc\nline two", "second", "third"]);
    }

    #[test]
    fn jsonl_errors_name_file_and_line() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a.jsonl");
        std::fs::write(
            &p,
            "{\"text\": \"ok\"}\n\n{\"text\": 3}\n{bad json\n{\"other\": 1}\n",
        )
        .unwrap();
        let items: Vec<_> = read_documents(&p).unwrap().collect();
        assert_eq!(items[0].as_ref().unwrap(), "ok");
        let errs: Vec<String> = items[1..]
            .iter()
            .map(|r| r.as_ref().unwrap_err().to_string())
            .collect();
        assert!(
            errs[0].contains("a.jsonl:3") && errs[0].contains("not a string"),
            "{}",
            errs[0]
        );
        assert!(
            errs[1].contains("a.jsonl:4") && errs[1].contains("malformed JSON"),
            "{}",
            errs[1]
        );
        assert!(
            errs[2].contains("a.jsonl:5") && errs[2].contains("no `text` key"),
            "{}",
            errs[2]
        );
    }
}
