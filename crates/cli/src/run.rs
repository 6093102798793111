//! `kiln run`: the whole pipeline in one command. The built-in world (or the data a config
//! names) → tokenizer → pre-training → SFT → reward model → PPO-ptx, each stage's output
//! directory feeding the next, then an evaluation of the base, SFT and PPO models side by side
//! on the same held-out prompts, `summary.json` and `report.html`. Rerunning skips completed
//! stages and resumes an interrupted one from its checkpoint.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result};
use clap::Args;
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::pretrain::{CommonTrainArgs, PretrainArgs};
use crate::sft::SftArgs;

#[derive(Args)]
pub struct RunArgs {
    /// A pipeline config (TOML); see configs/run-*.toml.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Where runs/<name>/ goes.
    #[arg(long, default_value = "runs")]
    out: PathBuf,
    /// quick: a smoke run in about a minute; default: clear gains at every stage.
    #[arg(long, default_value = "default")]
    preset: String,
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StageConfig {
    /// A training preset or TOML file for this stage.
    pub config: String,
    pub max_steps: Option<usize>,
    /// `section.key=value` overrides, as --set.
    pub set: Vec<String>,
    /// Data files; empty = the built-in world's.
    pub data: Vec<PathBuf>,
    /// Skip this stage and use this model directory as its output.
    pub model: Option<PathBuf>,
}

impl Default for StageConfig {
    fn default() -> Self {
        StageConfig {
            config: "tiny".into(),
            max_steps: None,
            set: vec![],
            data: vec![],
            model: None,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RunConfig {
    pub name: String,
    pub seed: u64,
    /// Size of the built-in world (kiln data synth --scale).
    pub world_scale: f64,
    pub vocab_size: usize,
    /// An existing tokenizer to use instead of training one.
    pub tokenizer: Option<PathBuf>,
    /// Matmul precision of every stage and of the final evaluation (`f32` or `bf16`); a stage's
    /// own `set = ["precision=..."]` overrides it.
    pub precision: kiln_model::fused::MatmulPrecision,
    pub pretrain: StageConfig,
    pub sft: StageConfig,
    pub reward: StageConfig,
    pub ppo: StageConfig,
    /// Held-out world prompts evaluated at the end.
    pub eval_prompts: usize,
}

impl Default for RunConfig {
    fn default() -> Self {
        RunConfig {
            name: "default".into(),
            seed: 0,
            world_scale: 1.0,
            vocab_size: 4096,
            tokenizer: None,
            precision: Default::default(),
            pretrain: StageConfig {
                config: "tiny".into(),
                max_steps: Some(300),
                ..Default::default()
            },
            sft: StageConfig {
                config: "sft".into(),
                max_steps: Some(300),
                ..Default::default()
            },
            reward: StageConfig {
                config: "reward".into(),
                max_steps: Some(300),
                ..Default::default()
            },
            ppo: StageConfig {
                config: "ppo".into(),
                max_steps: Some(30),
                ..Default::default()
            },
            eval_prompts: 200,
        }
    }
}

pub const PRESETS: [(&str, &str); 2] = [
    ("quick", include_str!("../../../configs/run-quick.toml")),
    ("default", include_str!("../../../configs/run-default.toml")),
];

fn load(a: &RunArgs) -> Result<RunConfig> {
    let text = match &a.config {
        Some(p) => {
            std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?
        }
        None => PRESETS
            .iter()
            .find(|(n, _)| *n == a.preset)
            .map(|(_, t)| t.to_string())
            .with_context(|| {
                format!("unknown --preset {:?}: expected quick or default", a.preset)
            })?,
    };
    toml::from_str(&text).with_context(|| {
        format!(
            "pipeline config {}",
            a.config
                .as_ref()
                .map_or(a.preset.clone(), |p| p.display().to_string())
        )
    })
}

const DONE: &str = "stage_summary.json";

/// Runs `f` unless `dir` holds a completed stage; returns the stage summary.
fn stage(
    dir: &Path,
    name: &str,
    f: impl FnOnce(bool) -> Result<serde_json::Value>,
) -> Result<serde_json::Value> {
    let done = dir.join(DONE);
    if done.exists() {
        eprintln!("== {name}: done already ({}), skipping", dir.display());
        return Ok(serde_json::from_str(&std::fs::read_to_string(&done)?)?);
    }
    let resume = kiln_train::checkpoint::latest(&dir.join("checkpoints")).is_some();
    eprintln!("== {name}{}", if resume { " (resuming)" } else { "" });
    let t = Instant::now();
    let mut summary = f(resume)?;
    if summary["interrupted"].as_bool() == Some(true) {
        anyhow::bail!("{name} was interrupted; run the same command again to resume");
    }
    summary["wall_s"] = json!(summary["wall_s"]
        .as_f64()
        .unwrap_or(t.elapsed().as_secs_f64()));
    summary["out"] = json!(dir);
    std::fs::write(&done, serde_json::to_string_pretty(&summary)?)?;
    Ok(summary)
}

fn common(s: &StageConfig, cfg: &RunConfig) -> CommonTrainArgs {
    let mut sets = vec![format!("precision={}", cfg.precision)];
    sets.extend(s.set.iter().cloned());
    CommonTrainArgs {
        config: Some(s.config.clone()),
        sets,
        resume: false,
        max_steps: s.max_steps,
        seed: Some(cfg.seed),
        json: false,
    }
}

pub fn run(a: RunArgs) -> Result<()> {
    let cfg = load(&a)?;
    let root = a.out.join(&cfg.name);
    std::fs::create_dir_all(&root)?;
    std::fs::write(root.join("run_config.toml"), toml::to_string_pretty(&cfg)?)?;
    let start = Instant::now();
    let mut stages = serde_json::Map::new();

    // The built-in world.
    let world_dir = root.join("world");
    let t = Instant::now();
    if !world_dir.join("world.json").exists() {
        kiln_data::world::synth(&world_dir, cfg.seed, cfg.world_scale)?;
    }
    let world = kiln_data::world::load_world(&world_dir.join("world.json"))?;
    stages.insert(
        "world".into(),
        json!({"out": world_dir, "wall_s": t.elapsed().as_secs_f64()}),
    );

    // Tokenizer.
    let tok_dir = root.join("tokenizer");
    let corpus: Vec<PathBuf> = if cfg.pretrain.data.is_empty() {
        vec![world_dir.join("corpus.txt")]
    } else {
        cfg.pretrain.data.clone()
    };
    let t = Instant::now();
    let tokenizer = match &cfg.tokenizer {
        Some(p) => kiln_tokenizer::Tokenizer::load(p)?,
        None if tok_dir.join("tokenizer.json").exists() => {
            kiln_tokenizer::Tokenizer::load(&tok_dir)?
        }
        None => {
            eprintln!("== tokenizer");
            let tk = crate::pretrain::tokenizer_for(
                None,
                None,
                &corpus,
                &root.join("tokenizer-work"),
                cfg.vocab_size,
            )?;
            tk.save(&tok_dir, None)?;
            tk
        }
    };
    stages.insert("tokenizer".into(), json!({"out": tok_dir, "vocab_size": tokenizer.vocab_size(), "wall_s": t.elapsed().as_secs_f64()}));

    // Pre-training.
    let pre_dir = root.join("pretrain");
    let pre = match &cfg.pretrain.model {
        Some(m) => json!({"out": m, "skipped": true}),
        None => stage(&pre_dir, "pretrain", |resume| {
            let mut c = common(&cfg.pretrain, &cfg);
            c.resume = resume;
            crate::pretrain::run(PretrainArgs {
                skip_bad: false,
                doc_per_file: false,
                data: corpus.clone(),
                out: pre_dir.clone(),
                tokenizer: Some(tok_dir.clone()),
                init: None,
                common: c,
            })
        })?,
    };
    let base_model = cfg.pretrain.model.clone().unwrap_or(pre_dir.clone());
    stages.insert("pretrain".into(), pre);

    // SFT.
    let sft_dir = root.join("sft");
    let sft_data = if cfg.sft.data.is_empty() {
        vec![world_dir.join("sft.jsonl")]
    } else {
        cfg.sft.data.clone()
    };
    let sft = match &cfg.sft.model {
        Some(m) => json!({"out": m, "skipped": true}),
        None => stage(&sft_dir, "sft", |resume| {
            let mut c = common(&cfg.sft, &cfg);
            c.resume = resume;
            crate::sft::run(SftArgs {
                model: base_model.clone(),
                data: sft_data.clone(),
                eval_data: vec![],
                out: sft_dir.clone(),
                peft: None,
                all_tokens: false,
                skip_bad: false,
                world: Some(world_dir.join("world.json")),
                common: c,
            })
        })?,
    };
    let sft_model = cfg.sft.model.clone().unwrap_or(sft_dir.clone());
    stages.insert("sft".into(), sft);

    // Reward model, from the SFT model.
    let rm_dir = root.join("reward");
    let pref_data = if cfg.reward.data.is_empty() {
        vec![world_dir.join("prefs.jsonl")]
    } else {
        cfg.reward.data.clone()
    };
    let rm = match &cfg.reward.model {
        Some(m) => json!({"out": m, "skipped": true}),
        None => stage(&rm_dir, "reward", |resume| {
            let mut c = common(&cfg.reward, &cfg);
            c.resume = resume;
            crate::reward::run(crate::reward::RewardArgs {
                peft: None,
                model: sft_model.clone(),
                data: pref_data.clone(),
                eval_data: vec![],
                out: rm_dir.clone(),
                margin: 0.0,
                center: 0.01,
                skip_bad: false,
                world: Some(world_dir.join("world.json")),
                no_normalize: false,
                common: c,
            })
        })?,
    };
    let rm_model = cfg.reward.model.clone().unwrap_or(rm_dir.clone());
    stages.insert("reward".into(), rm);

    // PPO-ptx, from the SFT policy against the reward model, with the corpus as ptx data.
    let ppo_dir = root.join("ppo");
    let prompt_data = if cfg.ppo.data.is_empty() {
        vec![world_dir.join("prompts.jsonl")]
    } else {
        cfg.ppo.data.clone()
    };
    let ppo = match &cfg.ppo.model {
        Some(m) => json!({"out": m, "skipped": true}),
        None => stage(&ppo_dir, "ppo", |resume| {
            let mut c = common(&cfg.ppo, &cfg);
            c.resume = resume;
            crate::ppo::run(crate::ppo::PpoArgs {
                peft: None,
                policy: sft_model.clone(),
                reward_model: rm_model.clone(),
                prompts: prompt_data.clone(),
                eval_prompts: vec![],
                ptx_data: corpus.clone(),
                out: ppo_dir.clone(),
                world: Some(world_dir.join("world.json")),
                common: c,
            })
        })?,
    };
    let ppo_model = cfg.ppo.model.clone().unwrap_or(ppo_dir.clone());
    stages.insert("ppo".into(), ppo);

    // Evaluate base and SFT side by side on the same held-out prompts and held-out text.
    eprintln!("== evaluation");
    kiln_train::trainer::set_precision(cfg.precision);
    let report = crate::report::evaluate_models(
        &root,
        &world,
        &world_dir,
        &[
            ("base", &base_model),
            ("sft", &sft_model),
            ("ppo", &ppo_model),
        ],
        Some(&rm_model),
        cfg.eval_prompts,
    )?;
    // Stages skipped on a rerun keep their recorded times, so this sums the whole pipeline.
    let stages_wall_s: f64 = stages.values().filter_map(|v| v["wall_s"].as_f64()).sum();
    let summary = json!({
        "name": cfg.name,
        "wall_s": start.elapsed().as_secs_f64(),
        "stages_wall_s": stages_wall_s,
        "stages": stages,
        "models": report["models"],
        "noise_ceiling": serde_json::from_str::<serde_json::Value>(&std::fs::read_to_string(world_dir.join("world.json"))?)?["synth"]["noise_ceiling"],
    });
    std::fs::write(
        root.join("summary.json"),
        serde_json::to_string_pretty(&summary)?,
    )?;
    let html = crate::report::html(&root, &summary, &report)?;
    std::fs::write(root.join("report.html"), html)?;
    if a.json {
        println!("{summary}");
    } else {
        crate::report::print_summary(&root, &summary);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_model::fused::MatmulPrecision;
    use kiln_train::TrainConfig;

    #[test]
    fn pipeline_precision_reaches_every_stage_unless_the_stage_sets_its_own() {
        let cfg: RunConfig = toml::from_str(
            "precision = \"bf16\"\n[ppo]\nconfig = \"ppo\"\nset = [\"precision=f32\"]\n",
        )
        .unwrap();
        let stage_precision = |s: &StageConfig| {
            let mut c = TrainConfig::load(&s.config).unwrap();
            c.apply_overrides(&common(s, &cfg).sets).unwrap();
            c.precision
        };
        assert_eq!(stage_precision(&cfg.pretrain), MatmulPrecision::Bf16);
        assert_eq!(stage_precision(&cfg.sft), MatmulPrecision::Bf16);
        assert_eq!(stage_precision(&cfg.ppo), MatmulPrecision::F32);
        for (name, text) in PRESETS {
            let c: RunConfig = toml::from_str(text).unwrap();
            assert_eq!(c.precision, MatmulPrecision::F32, "preset {name}");
        }
    }
}
