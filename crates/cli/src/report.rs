//! The pipeline's report: the models of each stage evaluated side by side on the same held-out
//! prompts and held-out text, `report.html` (self-contained: inline SVG plots and tables, no
//! network) and the one-screen summary.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use anyhow::Result;
use kiln_data::chat::read_prompts;
use kiln_data::world::World;
use kiln_model::{default_device, ModelDir};
use serde_json::{json, Value};

/// Gold reward, exact match and held-out pre-training loss of each model.
pub fn evaluate_models(
    root: &Path,
    world: &World,
    world_dir: &Path,
    models: &[(&str, &PathBuf)],
    reward_model: Option<&PathBuf>,
    n_prompts: usize,
) -> Result<Value> {
    let device = default_device();
    let rm = match reward_model {
        Some(dir) => Some(kiln_model::reward::RewardModel::load(dir, &device)?),
        None => None,
    };
    let (mut prompts, _) = read_prompts(&[world_dir.join("prompts_eval.jsonl")], false)?;
    prompts.truncate(n_prompts);
    // Held-out text: the last documents of the corpus, inside pre-training's validation split.
    let docs: Vec<String> =
        kiln_data::read_documents(&world_dir.join("corpus.txt"))?.collect::<Result<_, _>>()?;
    let heldout: Vec<String> = docs[docs.len() - (docs.len() / 20).clamp(1, 200)..].to_vec();
    let mut out = serde_json::Map::new();
    let mut answers: Vec<Vec<(String, String, f64)>> = Vec::new();
    for (name, dir) in models {
        let d = ModelDir::load(dir, &device)?;
        let g = kiln_eval::gold_eval(&d.model, &d.tokenizer, world, &prompts, 32, 32)?;
        // Reward-model score of the same greedy answers.
        let rm_score = match &rm {
            Some(rm) => {
                let seqs: Vec<Vec<u32>> = prompts
                    .iter()
                    .zip(&g.answers)
                    .map(|(p, a)| kiln_train::stages::reward::encode_answer(&d.tokenizer, p, a))
                    .collect::<Result<_, _>>()?;
                let scores: Vec<f64> = seqs
                    .chunks(32)
                    .flat_map(|c| rm.score(c))
                    .map(|x| x as f64)
                    .collect();
                json!(kiln_eval::MeanCi::of(&scores))
            }
            None => Value::Null,
        };
        let l = kiln_eval::evaluate_loss(&d.model, &d.tokenizer, &heldout, 16)?;
        eprintln!(
            "   {name}: gold reward {:.3} ± {:.3}, exact match {:.1}%, correct {:.1}%, held-out loss {:.3} ({:.3} bits/byte)",
            g.gold_reward.mean, g.gold_reward.ci95, 100.0 * g.exact_match.mean, 100.0 * g.correct.mean, l.loss, l.bits_per_byte
        );
        out.insert(
            name.to_string(),
            json!({"dir": dir, "gold_reward": g.gold_reward, "exact_match": g.exact_match, "correct": g.correct, "polite": g.polite, "rude": g.rude,
                   "mean_tokens": g.mean_tokens, "rm_score": rm_score, "heldout_loss": l.loss, "heldout_bpb": l.bits_per_byte, "n_prompts": g.n}),
        );
        answers.push(
            prompts
                .iter()
                .zip(g.answers.iter().take(8).cloned())
                .map(|(p, a)| {
                    let q = p.last().map(|t| t.content.clone()).unwrap_or_default();
                    let r = kiln_data::world::Task::parse(world, &q).map_or(f64::NAN, |t| {
                        kiln_data::world::gold_reward(world, &t, &a).reward
                    });
                    (q, a, r)
                })
                .collect(),
        );
    }
    let samples: Vec<Value> = (0..answers.first().map_or(0, Vec::len))
        .map(|i| {
            let mut row = json!({"prompt": answers[0][i].0});
            for (m, (name, _)) in models.iter().enumerate() {
                row[name] = json!({"answer": answers[m][i].1, "gold": answers[m][i].2});
            }
            row
        })
        .collect();
    let _ = root;
    Ok(json!({"models": out, "samples": samples}))
}

/// Stages in pipeline order.
const STAGE_ORDER: [&str; 6] = ["world", "tokenizer", "pretrain", "sft", "reward", "ppo"];

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

fn num(v: &Value, digits: usize) -> String {
    v.as_f64().map_or("–".into(), |x| format!("{x:.digits$}"))
}

/// The HTML report.
pub fn html(root: &Path, summary: &Value, report: &Value) -> Result<String> {
    let mut h = String::new();
    h.push_str("<!doctype html><html><head><meta charset=\"utf-8\"><title>Kiln run report</title><style>body{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 10px;text-align:right}th{background:#f3f3f3}td.l{text-align:left}.plots{display:flex;flex-wrap:wrap;gap:1em}</style></head><body>");
    let _ = write!(
        h,
        "<h1>Kiln run <code>{}</code></h1><p>Wall time of all stages {:.0} s (this invocation {:.0} s; a rerun skips finished stages).</p>",
        esc(summary["name"].as_str().unwrap_or("")),
        summary["stages_wall_s"].as_f64().unwrap_or(0.0),
        summary["wall_s"].as_f64().unwrap_or(0.0)
    );

    h.push_str("<h2 id=\"results\">What each stage bought</h2><table><tr><th>model</th><th>gold reward (95% CI)</th><th>reward-model score</th><th>exact match</th><th>correct</th><th>polite</th><th>tokens/answer</th><th>held-out loss</th><th>bits/byte</th></tr>");
    if let Some(models) = report["models"].as_object() {
        for (name, m) in models {
            let _ = write!(
                h,
                "<tr><td class=l>{}</td><td>{} ± {}</td><td>{}</td><td>{:.1}%</td><td>{:.1}%</td><td>{:.1}%</td><td>{}</td><td>{}</td><td>{}</td></tr>",
                esc(name), num(&m["gold_reward"]["mean"], 3), num(&m["gold_reward"]["ci95"], 3), num(&m["rm_score"]["mean"], 3),
                100.0 * m["exact_match"]["mean"].as_f64().unwrap_or(0.0), 100.0 * m["correct"]["mean"].as_f64().unwrap_or(0.0),
                100.0 * m["polite"].as_f64().unwrap_or(0.0), num(&m["mean_tokens"], 1), num(&m["heldout_loss"], 3), num(&m["heldout_bpb"], 3)
            );
        }
    }
    h.push_str("</table>");
    let rm = &summary["stages"]["reward"];
    let _ = write!(
        h,
        "<p>Reward model on held-out pairs: accuracy {} (label-noise ceiling {}), agreement with the gold reward {}.</p>",
        num(&rm["accuracy"], 3), num(&summary["noise_ceiling"], 3), num(&rm["gold_agreement"], 3)
    );
    if rm["gold_agreement_correct"].is_f64() {
        let _ = write!(
            h,
            "<p>Agreement with the gold reward by what separates the pair: correctness {}, tone {}, length only {} \
             (below 0.5: the reward model prefers the answer the gold reward ranks lower; PPO optimizes that too).</p>",
            num(&rm["gold_agreement_correct"], 3),
            num(&rm["gold_agreement_tone"], 3),
            num(&rm["gold_agreement_length"], 3)
        );
    }

    h.push_str("<h2 id=\"curves\">Training curves</h2><div class=plots>");
    for (stage, file) in [
        ("pretrain", "loss.svg"),
        ("sft", "loss.svg"),
        ("reward", "loss.svg"),
        ("ppo", "reward.svg"),
        ("ppo", "kl.svg"),
        ("ppo", "loss.svg"),
    ] {
        if let Ok(svg) = std::fs::read_to_string(root.join(stage).join(file)) {
            h.push_str(&svg);
        }
    }
    h.push_str("</div>");

    h.push_str(
        "<h2 id=\"samples\">Answers to the same held-out prompts</h2><table><tr><th>prompt</th>",
    );
    let names: Vec<String> = report["models"]
        .as_object()
        .map(|m| m.keys().cloned().collect())
        .unwrap_or_default();
    for n in &names {
        let _ = write!(h, "<th>{}</th>", esc(n));
    }
    h.push_str("</tr>");
    for row in report["samples"].as_array().into_iter().flatten() {
        let _ = write!(
            h,
            "<tr><td class=l>{}</td>",
            esc(row["prompt"].as_str().unwrap_or(""))
        );
        for n in &names {
            let _ = write!(
                h,
                "<td class=l>{} <small>[{}]</small></td>",
                esc(row[n]["answer"].as_str().unwrap_or("")),
                num(&row[n]["gold"], 2)
            );
        }
        h.push_str("</tr>");
    }
    h.push_str("</table>");

    h.push_str("<h2 id=\"stages\">Stages</h2><table><tr><th>stage</th><th>output</th><th>wall time (s)</th><th>steps</th><th>tokens</th><th>tokens/s</th><th>MFU</th></tr>");
    for name in STAGE_ORDER {
        let s = &summary["stages"][name];
        let wall = s["wall_s"].as_f64();
        let tok = s["tokens"].as_f64();
        let tps = match (wall, tok) {
            (Some(w), Some(t)) if w > 0.0 => format!("{:.0}", t / w),
            _ => "–".into(),
        };
        let out = s["out"]
            .as_str()
            .map(esc)
            .unwrap_or_else(|| esc(s["status"].as_str().unwrap_or("")));
        let _ = write!(h, "<tr><td class=l>{}</td><td class=l>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>", esc(name), out, num(&s["wall_s"], 1), num(&s["step"], 0), num(&s["tokens"], 0), tps, mfu(&s["mfu"]).unwrap_or("–".into()));
    }
    h.push_str("</table></body></html>\n");
    Ok(h)
}

/// A stage's MFU (the share of the CPU's multiply-add peak its training steps ran at, as
/// `perf::FlopCount` counts them) as a percentage; `None` for stages that do not train.
fn mfu(v: &Value) -> Option<String> {
    v.as_f64().map(|m| format!("{:.0}%", 100.0 * m))
}

/// The one-screen summary printed at the end.
pub fn print_summary(root: &Path, summary: &Value) {
    println!(
        "\nKiln run {} finished in {:.0} s (all stages: {:.0} s)",
        summary["name"].as_str().unwrap_or(""),
        summary["wall_s"].as_f64().unwrap_or(0.0),
        summary["stages_wall_s"].as_f64().unwrap_or(0.0)
    );
    println!(
        "{:<10} {:>20} {:>12} {:>10} {:>14}",
        "model", "gold reward (95% CI)", "exact match", "correct", "held-out loss"
    );
    for (name, m) in summary["models"].as_object().into_iter().flatten() {
        println!(
            "{:<10} {:>12} ± {:<5} {:>11.1}% {:>9.1}% {:>14}",
            name,
            num(&m["gold_reward"]["mean"], 3),
            num(&m["gold_reward"]["ci95"], 3),
            100.0 * m["exact_match"]["mean"].as_f64().unwrap_or(0.0),
            100.0 * m["correct"]["mean"].as_f64().unwrap_or(0.0),
            num(&m["heldout_loss"], 3)
        );
    }
    for name in STAGE_ORDER {
        let s = &summary["stages"][name];
        match s["wall_s"].as_f64() {
            Some(w) => println!(
                "  {name:<10} {w:>7.1} s  {:>9}  {}",
                mfu(&s["mfu"]).map_or(String::new(), |m| format!("mfu {m}")),
                s["out"].as_str().unwrap_or("")
            ),
            None => println!("  {name:<10} {}", s["status"].as_str().unwrap_or("")),
        }
    }
    let rm = &summary["stages"]["reward"];
    if rm["accuracy"].is_f64() {
        println!(
            "reward model: held-out accuracy {} (noise ceiling {}), gold agreement {}",
            num(&rm["accuracy"], 3),
            num(&summary["noise_ceiling"], 3),
            num(&rm["gold_agreement"], 3)
        );
    }
    println!("report: {}", root.join("report.html").display());
    println!("summary: {}", root.join("summary.json").display());
}
