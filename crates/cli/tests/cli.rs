//! The `kiln` binary end to end: the whole pipeline on a small world (every stage's directory
//! loads, the report has all its sections), and errors that reach the user as messages, not
//! panics.

use std::path::Path;
use std::process::Command;

fn kiln(args: &[&str], cwd: &Path) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_kiln")).args(args).current_dir(cwd).env("KILN_LOG", "warn").output().unwrap();
    (out.status.success(), String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned())
}

const TINY_RUN: &str = r#"
name = "e2e"
world_scale = 0.05
vocab_size = 512
eval_prompts = 16

[pretrain]
config = "test"
max_steps = 30
set = ["eval.every=0", "eval.samples=0", "checkpoint.every=0"]

[sft]
config = "sft"
max_steps = 20
set = ["eval.every=0", "eval.batches=1", "data.seq_len=64", "data.batch_size=8", "checkpoint.every=0"]
"#;

#[test]
fn run_pipeline_end_to_end() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("e2e.toml"), TINY_RUN).unwrap();
    let (ok, stdout, stderr) = kiln(&["run", "--config", "e2e.toml", "--out", "runs"], dir.path());
    assert!(ok, "kiln run failed:\n{stdout}\n{stderr}");
    let root = dir.path().join("runs/e2e");
    let device = kiln_model::default_device();
    for stage in ["pretrain", "sft"] {
        kiln_model::ModelDir::load(&root.join(stage), &device).unwrap_or_else(|e| panic!("{stage}: {e}"));
    }
    kiln_tokenizer::Tokenizer::load(&root.join("tokenizer")).unwrap();
    let html = std::fs::read_to_string(root.join("report.html")).unwrap();
    for section in ["id=\"results\"", "id=\"curves\"", "id=\"samples\"", "id=\"stages\"", "<svg", "base", "sft"] {
        assert!(html.contains(section), "report.html lacks {section}");
    }
    let summary: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(root.join("summary.json")).unwrap()).unwrap();
    for m in ["base", "sft"] {
        assert!(summary["models"][m]["gold_reward"]["mean"].is_f64(), "summary lacks {m}");
        assert!(summary["models"][m]["heldout_loss"].is_f64());
    }
    assert!(stdout.contains("report.html"), "{stdout}");
    // A second run skips the finished stages.
    let (ok, _, stderr) = kiln(&["run", "--config", "e2e.toml", "--out", "runs"], dir.path());
    assert!(ok && stderr.contains("pretrain: done already"), "{stderr}");

    // The model directories work with the other commands.
    let sft = root.join("sft");
    let sft = sft.to_str().unwrap();
    let (ok, stdout, stderr) = kiln(&["generate", "--model", sft, "--prompt", "Mira likes", "--max-new-tokens", "5", "--json"], dir.path());
    assert!(ok, "{stderr}");
    let g: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
    assert!(g["new_tokens"].as_u64().unwrap() <= 5);
    let corpus = root.join("world/corpus.txt");
    let (ok, stdout, stderr) = kiln(&["eval", "loss", "--model", sft, "--data", corpus.to_str().unwrap(), "--json"], dir.path());
    assert!(ok, "{stderr}");
    let l: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
    assert!(l["bits_per_byte"].as_f64().unwrap() > 0.0);

    // Errors are messages naming the problem.
    let long = "word ".repeat(400);
    let (ok, _, stderr) = kiln(&["generate", "--model", sft, "--prompt", &long], dir.path());
    assert!(!ok && stderr.contains("error:") && stderr.contains("max_position_embeddings") && !stderr.contains("panicked"), "{stderr}");
    let (ok, _, stderr) = kiln(&["generate", "--model", "nowhere", "--prompt", "x"], dir.path());
    assert!(!ok && stderr.contains("nowhere") && stderr.contains("config.json"), "{stderr}");
    let (ok, _, stderr) = kiln(&["pretrain", "--data", corpus.to_str().unwrap(), "--out", "p", "--config", "test", "--set", "optim.lrr=1"], dir.path());
    assert!(!ok && stderr.contains("lrr"), "{stderr}");
    let (ok, _, stderr) = kiln(&["sft", "--model", sft, "--data", corpus.to_str().unwrap(), "--out", "s"], dir.path());
    assert!(!ok && stderr.contains("corpus.txt:1"), "{stderr}");
}
