//! Rows of structured data files, streamed one at a time as JSON values: JSONL (one object per
//! line) and Parquet (one object per row, nested lists and structs as arrays and objects, read
//! row group by row group through the `parquet` crate's record API). Every row carries its
//! location (`line 12`, `row 12`), so a bad one can be named.
//!
//! Parquet is behind the `parquet` feature (on by default).

use std::fs::File;
use std::io::{BufRead, BufReader, Lines};
use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::documents::DataError;

/// Where a row sits in its file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Loc {
    Line(usize),
    Row(usize),
}

impl std::fmt::Display for Loc {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Loc::Line(n) => write!(f, "{n}"),
            Loc::Row(n) => write!(f, "row {n}"),
        }
    }
}

pub fn is_parquet(path: &Path) -> bool {
    path.extension().and_then(|e| e.to_str()) == Some("parquet")
}

pub fn is_jsonl(path: &Path) -> bool {
    matches!(
        path.extension().and_then(|e| e.to_str()),
        Some("jsonl") | Some("json") | Some("ndjson")
    )
}

enum Source {
    Jsonl(Lines<BufReader<File>>),
    #[cfg(feature = "parquet")]
    Parquet(parquet::record::reader::RowIter<'static>),
}

/// A streaming iterator over the rows of one JSONL or Parquet file. Blank JSONL lines are
/// skipped; a malformed line or unreadable row is an `Err` naming its location.
pub struct Rows {
    pub path: PathBuf,
    source: Source,
    n: usize,
}

/// Opens a JSONL or Parquet file (by extension). `columns`, for Parquet, reads only those
/// top-level columns (a multi-GB file with many columns reads just the text); a missing one is
/// an error naming the columns the file has.
pub fn open_rows(path: &Path, columns: Option<&[&str]>) -> Result<Rows, DataError> {
    let file = File::open(path).map_err(|e| DataError::Io {
        path: path.into(),
        source: e,
    })?;
    let source = if is_parquet(path) {
        open_parquet(path, file, columns)?
    } else {
        let _ = columns;
        Source::Jsonl(BufReader::new(file).lines())
    };
    Ok(Rows {
        path: path.into(),
        source,
        n: 0,
    })
}

#[cfg(feature = "parquet")]
fn open_parquet(path: &Path, file: File, columns: Option<&[&str]>) -> Result<Source, DataError> {
    use parquet::file::reader::{FileReader, SerializedFileReader};
    use parquet::schema::types::Type;
    let bad = |why: String| DataError::Format {
        path: path.into(),
        why,
    };
    let reader = SerializedFileReader::new(file)
        .map_err(|e| bad(format!("not a readable Parquet file: {e}")))?;
    let projection = match columns {
        None => None,
        Some(cols) => {
            let schema = reader.metadata().file_metadata().schema();
            let fields = schema.get_fields();
            let mut picked = Vec::new();
            for c in cols {
                match fields.iter().find(|f| f.name() == *c) {
                    Some(f) => picked.push(f.clone()),
                    None => {
                        let have: Vec<&str> = fields.iter().map(|f| f.name()).collect();
                        return Err(bad(format!(
                            "no `{c}` column (the file has columns {have:?})"
                        )));
                    }
                }
            }
            Some(
                Type::group_type_builder(schema.name())
                    .with_fields(picked)
                    .build()
                    .map_err(|e| bad(e.to_string()))?,
            )
        }
    };
    let iter = parquet::record::reader::RowIter::from_file_into(Box::new(reader))
        .project(projection)
        .map_err(|e| bad(e.to_string()))?;
    Ok(Source::Parquet(iter))
}

#[cfg(not(feature = "parquet"))]
fn open_parquet(path: &Path, _: File, _: Option<&[&str]>) -> Result<Source, DataError> {
    Err(DataError::Format {
        path: path.into(),
        why: "this build of Kiln has no Parquet support (build with the `parquet` feature)".into(),
    })
}

impl Iterator for Rows {
    type Item = (Loc, Result<Value, String>);

    fn next(&mut self) -> Option<Self::Item> {
        match &mut self.source {
            Source::Jsonl(lines) => loop {
                let line = lines.next()?;
                self.n += 1;
                let loc = Loc::Line(self.n);
                let line = match line {
                    Ok(l) => l,
                    Err(e) => return Some((loc, Err(format!("unreadable line ({e})")))),
                };
                if line.trim().is_empty() {
                    continue;
                }
                return Some((
                    loc,
                    serde_json::from_str::<Value>(&line)
                        .map_err(|e| format!("malformed JSON: {e}")),
                ));
            },
            #[cfg(feature = "parquet")]
            Source::Parquet(iter) => {
                let row = iter.next()?;
                self.n += 1;
                Some((
                    Loc::Row(self.n),
                    row.map(|r| r.to_json_value())
                        .map_err(|e| format!("unreadable Parquet row ({e})")),
                ))
            }
        }
    }
}

impl DataError {
    /// A bad row at `loc` of `path`.
    pub fn at(path: &Path, loc: Loc, why: String) -> Self {
        match loc {
            Loc::Line(line) => DataError::BadLine {
                path: path.into(),
                line,
                why,
            },
            Loc::Row(row) => DataError::BadRow {
                path: path.into(),
                row,
                why,
            },
        }
    }
}

/// `path:loc: why`, the form bad-row reports take.
pub fn describe(path: &Path, loc: Loc, why: &str) -> String {
    match loc {
        Loc::Line(n) => format!("{}:{n}: {why}", path.display()),
        Loc::Row(n) => format!("{}: row {n}: {why}", path.display()),
    }
}
