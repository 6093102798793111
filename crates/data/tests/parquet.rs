//! Parquet in the layouts Hugging Face datasets write (fixtures from
//! tools/golden/make_parquet_fixtures.py): nested message lists, Alpaca columns, preference
//! pairs, a `text` column among others, four compressions, several row groups; a null text is
//! an error naming the row.

use std::path::{Path, PathBuf};

use kiln_data::chat::{read_prefs, read_sft, Turn};
use kiln_data::inspect::inspect_file;
use kiln_data::read_documents;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

#[test]
fn sft_messages_and_alpaca() {
    let (convs, bad) = read_sft(&[fixture("sft_messages.parquet")], false).unwrap();
    assert!(bad.is_empty());
    assert_eq!(convs.len(), 3);
    assert_eq!(
        convs[1],
        vec![
            Turn::new("system", "Be brief."),
            Turn::new("user", "2+3?"),
            Turn::new("assistant", "5")
        ]
    );
    let (convs, _) = read_sft(&[fixture("sft_alpaca.parquet")], false).unwrap();
    assert_eq!(convs[1][0].content, "Say hi\n\npolitely");
    assert_eq!(convs[0][1], Turn::new("assistant", "3"));
}

#[test]
fn preference_pairs() {
    let (pairs, _) = read_prefs(&[fixture("prefs.parquet")], false).unwrap();
    assert_eq!(pairs.len(), 2);
    assert_eq!(
        (pairs[1].chosen.as_str(), pairs[1].rejected.as_str()),
        ("fine", "worse")
    );
}

#[test]
fn text_column_and_null_row() {
    let docs: Vec<_> = read_documents(&fixture("text.parquet")).unwrap().collect();
    assert_eq!(docs.len(), 4);
    assert_eq!(docs[0].as_ref().unwrap(), "The first document.");
    assert_eq!(
        docs[1].as_ref().unwrap(),
        "The second one,\nover two lines."
    );
    let err = docs[2].as_ref().unwrap_err().to_string();
    assert!(
        err.contains("text.parquet: row 3") && err.contains("null"),
        "{err}"
    );
    assert_eq!(docs[3].as_ref().unwrap(), "The fourth.");
}

#[test]
fn missing_column_names_the_columns() {
    let err = read_documents(&fixture("prefs.parquet"))
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("no `text` column") && err.contains("chosen"),
        "{err}"
    );
    let dir = tempfile::tempdir().unwrap();
    let junk = dir.path().join("junk.parquet");
    std::fs::write(&junk, b"not parquet at all").unwrap();
    let err = read_sft(&[junk], false).unwrap_err().to_string();
    assert!(
        err.contains("junk.parquet") && err.contains("not a readable Parquet file"),
        "{err}"
    );
}

#[test]
fn inspect_detects_formats() {
    let r = inspect_file(&fixture("sft_messages.parquet"), None).unwrap();
    assert_eq!(r.format, "Parquet, conversations (messages (OpenAI/TRL))");
    assert_eq!((r.rows, r.bad_rows), (3, 0));
    let r = inspect_file(&fixture("prefs.parquet"), None).unwrap();
    assert_eq!(r.format, "Parquet, preference pairs (explicit)");
    let r = inspect_file(&fixture("text.parquet"), None).unwrap();
    assert_eq!(r.kinds["documents"], 3);
    assert_eq!(r.bad_rows, 1);
}
