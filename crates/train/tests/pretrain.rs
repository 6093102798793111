//! The training loop on the built-in world: the loss falls, an interrupted and resumed run ends
//! bit-identical to an uninterrupted one, a half-written checkpoint leaves the previous one
//! loadable, and divergence stops with a message naming the step.

mod common;

use std::path::Path;

use common::{model_for, setup, stage, trainer, Setup};
use kiln_model::burn::tensor::Tensor;
use kiln_model::checkpoint::TensorFile;
use kiln_model::{default_device, Llama};
use kiln_train::perf::FlopCount;
use kiln_train::stages::pretrain::Pretrain;
use kiln_train::trainer::Stage;
use kiln_train::{checkpoint, TrainError};

#[test]
fn loss_falls_on_the_world() {
    let mut s = setup();
    s.config.schedule.max_steps = 60;
    let out = s.root.join("run");
    let mut st = stage(&s);
    let model = model_for(&s);
    let before = st.evaluate(&model).unwrap()[0].1;
    let (_, outcome) = trainer(&s, &out, false, None).run(model, &mut st).unwrap();
    let after = outcome.last_eval[0].1;
    println!("val loss {before:.3} -> {after:.3}");
    // ln(512) = 6.24 at the start; 60 steps of the 2-layer model must take at least 2 nats off.
    assert!(after < before - 2.0, "val loss {before} -> {after}");
    // The final directory is a loadable model, with metrics and a plot beside it.
    kiln_model::ModelDir::load(&out, &default_device()).unwrap();
    assert!(out.join("metrics.jsonl").exists() && out.join("loss.svg").exists());
    let evals = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
    assert!(evals.contains("\"val_bpb\""));
    // Each logged step counts its windows' passes: every position through every layer and the
    // vocabulary head, forward and backward, all weights training.
    let c = s.config.llama_config(&s.tokenizer);
    let t = s.config.data.seq_len;
    let want =
        FlopCount::new(&c, 1.0).row(t, t, c.vocab_size, true) * s.config.data.batch_size as f64;
    let logged = step_flops(&out);
    assert!(!logged.is_empty());
    for f in logged {
        assert!(
            (f - want).abs() < 1e-9 * want,
            "step_flops {f}, want {want}"
        );
    }
}

/// `step_flops` of every training record of a run's metrics.jsonl.
fn step_flops(dir: &Path) -> Vec<f64> {
    kiln_train::metrics::MetricsLog::read(&dir.join("metrics.jsonl"))
        .iter()
        .filter(|r| r["kind"] == "train")
        .map(|r| r["step_flops"].as_f64().expect("step_flops logged"))
        .collect()
}

fn weights(dir: &Path) -> Vec<(String, Vec<f32>)> {
    let mut t: Vec<(String, Vec<f32>)> = TensorFile::read(&dir.join("model.safetensors"))
        .unwrap()
        .tensors
        .into_iter()
        .map(|(k, v)| (k, v.1))
        .collect();
    t.sort_by(|a, b| a.0.cmp(&b.0));
    t
}

#[test]
fn resume_is_bit_identical_to_an_uninterrupted_run() {
    let mut s = setup();
    s.config.schedule.max_steps = 12;
    s.config.checkpoint.every = 0;
    s.config.eval.every = 0;
    s.config.optim.grad_accum = 2;
    let a = s.root.join("a");
    trainer(&s, &a, false, None)
        .run(model_for(&s), &mut stage(&s))
        .unwrap();

    let b = s.root.join("b");
    let (_, first) = trainer(&s, &b, false, Some(5))
        .run(model_for(&s), &mut stage(&s))
        .unwrap();
    assert!(first.interrupted && first.step == 5);
    assert!(
        !b.join("model.safetensors").exists(),
        "an interrupted run must not write the final model"
    );
    let (_, second) = trainer(&s, &b, true, None)
        .run(model_for(&s), &mut stage(&s))
        .unwrap();
    assert_eq!(second.step, 12);
    let (wa, wb) = (weights(&a), weights(&b));
    assert_eq!(wa.len(), wb.len());
    for ((na, xa), (nb, xb)) in wa.iter().zip(&wb) {
        assert_eq!(na, nb);
        assert!(xa == xb, "{na} differs after resume");
    }
    // metrics.jsonl of the resumed run matches the uninterrupted one step for step.
    let steps = |d: &Path| -> Vec<u64> {
        kiln_train::metrics::MetricsLog::read(&d.join("metrics.jsonl"))
            .iter()
            .filter_map(|r| r["step"].as_u64())
            .collect()
    };
    assert_eq!(steps(&a), steps(&b));
}

#[test]
fn half_written_checkpoint_leaves_the_previous_one_loadable() {
    let mut s = setup();
    s.config.schedule.max_steps = 4;
    s.config.checkpoint.every = 2;
    let out = s.root.join("c");
    let (_, o) = trainer(&s, &out, false, Some(2))
        .run(model_for(&s), &mut stage(&s))
        .unwrap();
    assert_eq!(o.step, 2);
    let root = out.join("checkpoints");
    // A crash while writing step 4: a temporary directory with a torn weights file.
    let torn = root.join(".step-0000004.tmp");
    std::fs::create_dir_all(&torn).unwrap();
    std::fs::write(torn.join("model.safetensors"), b"\x10\x00\x00").unwrap();
    let latest = checkpoint::latest(&root).unwrap();
    assert!(latest.ends_with("step-0000002"), "{latest:?}");
    kiln_model::ModelDir::load(&latest, &default_device()).unwrap();
    let (_, o) = trainer(&s, &out, true, None)
        .run(model_for(&s), &mut stage(&s))
        .unwrap();
    assert_eq!(o.step, 4);
    assert!(
        !torn.exists(),
        "the torn temporary checkpoint is swept away"
    );
}

struct Poisoned(Pretrain);

impl Stage<Llama> for Poisoned {
    fn train_loss(
        &mut self,
        model: &Llama,
        step: usize,
        micro: usize,
    ) -> Result<(Tensor<1>, usize), TrainError> {
        let (loss, n) = self.0.train_loss(model, step, micro)?;
        Ok((if step == 3 { loss * f64::NAN } else { loss }, n))
    }
    fn evaluate(&mut self, model: &Llama) -> Result<Vec<(String, f64)>, TrainError> {
        self.0.evaluate(model)
    }
}

#[test]
fn divergence_names_the_step_and_keeps_the_checkpoint() {
    let mut s = setup();
    s.config.schedule.max_steps = 10;
    s.config.checkpoint.every = 2;
    let out = s.root.join("d");
    let err = trainer(&s, &out, false, None)
        .run(model_for(&s), &mut Poisoned(stage(&s)))
        .unwrap_err()
        .to_string();
    assert!(err.contains("step 3") && err.contains("NaN"), "{err}");
    assert!(checkpoint::latest(&out.join("checkpoints"))
        .unwrap()
        .ends_with("step-0000002"));
}

/// With PEFT (LoRA + a reparameterized prefix + the final norm trained), the run writes an
/// adapter directory, leaves the base untouched, and resumes bit-identically: the adapter, the
/// prefix MLP and the trained base tensor all come back from the checkpoint.
#[test]
fn peft_resume_is_bit_identical() {
    let mut s = setup();
    s.config.schedule.max_steps = 8;
    s.config.checkpoint.every = 0;
    s.config.eval.every = 0;
    s.config.peft.method = "lora+prefix".into();
    s.config.peft.lora_r = 2;
    s.config.peft.prefix_len = 2;
    s.config.peft.prefix_hidden = 8;
    s.config.peft.train = vec!["model.norm".into()];
    let base_dir = s.root.join("base");
    kiln_model::checkpoint::save_llama(&model_for(&s), &base_dir).unwrap();
    let peft_model =
        |s: &Setup| kiln_model::peft::apply(model_for(s), &s.config.peft, &base_dir, 5).unwrap();
    let a = s.root.join("a");
    trainer(&s, &a, false, None)
        .run(peft_model(&s), &mut stage(&s))
        .unwrap();
    let b = s.root.join("b");
    let (_, first) = trainer(&s, &b, false, Some(3))
        .run(peft_model(&s), &mut stage(&s))
        .unwrap();
    assert!(first.interrupted);
    trainer(&s, &b, true, None)
        .run(peft_model(&s), &mut stage(&s))
        .unwrap();
    let read = |d: &Path, f: &str| {
        let mut t: Vec<(String, Vec<f32>)> = TensorFile::read(&d.join(f))
            .unwrap()
            .tensors
            .into_iter()
            .map(|(k, v)| (k, v.1))
            .collect();
        t.sort_by(|x, y| x.0.cmp(&y.0));
        t
    };
    for f in ["adapter_model.safetensors", "kiln_peft.safetensors"] {
        let (wa, wb) = (read(&a, f), read(&b, f));
        assert!(!wa.is_empty());
        assert!(wa == wb, "{f} differs after resume");
    }
    assert!(!a.join("model.safetensors").exists());
    // Frozen weights get no weight gradient: a step counts weight gradients for the share of
    // the parameters that train, not for all of them.
    let c = s.config.llama_config(&s.tokenizer);
    let t = s.config.data.seq_len;
    let rows = s.config.data.batch_size as f64;
    let (total, trainable) = kiln_train::optim::count_params(&peft_model(&s));
    let dw = trainable as f64 / total as f64;
    assert!(dw > 0.0 && dw < 0.5, "{trainable} of {total} train");
    let want = FlopCount::new(&c, dw).row(t, t, c.vocab_size, true) * rows;
    let full = FlopCount::new(&c, 1.0).row(t, t, c.vocab_size, true) * rows;
    assert!(want < 0.9 * full);
    for f in step_flops(&a) {
        assert!((f - want).abs() < 1e-9 * want, "LoRA step {f}, want {want}");
    }
    let extra: Vec<String> = read(&a, "kiln_peft.safetensors")
        .into_iter()
        .map(|x| x.0)
        .collect();
    assert!(
        extra.contains(&"model.norm.weight".to_string()),
        "{extra:?}"
    );
    assert!(
        extra.contains(&"prefix.encoder.w1.weight".to_string()),
        "{extra:?}"
    );
    // The trained norm moved; the frozen base did not.
    let base = read(&base_dir, "model.safetensors");
    let norm = read(&a, "kiln_peft.safetensors")
        .into_iter()
        .find(|x| x.0 == "model.norm.weight")
        .unwrap();
    assert!(base.iter().find(|x| x.0 == "model.norm.weight").unwrap().1 != norm.1);
}
