//! PEFT invariants: an untrained LoRA (B = 0), a zero-initialized adapter and a frozen model give
//! exactly the base model's logits; a merged LoRA gives base + adapter's logits; an adapter
//! directory saves and loads back to the same logits; prefix tuning works with the KV cache;
//! only the PEFT parameters train.

use kiln_model::adapter_dir::{load_any, read_adapter_config, save_adapter};
use kiln_model::burn::module::{Module, ModuleMapper, ModuleVisitor, Param};
use kiln_model::burn::tensor::{Device, Distribution, Gradients, Int, Tensor, TensorData};
use kiln_model::checkpoint::save_llama;
use kiln_model::peft::{apply, merge_lora, set_trainable, PeftConfig};
use kiln_model::{default_device, ForwardInput, KvCache, Llama, LlamaConfig};

fn base(device: &Device) -> Llama {
    let mut config = LlamaConfig::new(64, 32, 64, 2, 4, 2, 48);
    config.initializer_range = 0.2;
    Llama::init(&config, 11, device).unwrap()
}

fn logits(m: &Llama, input: &ForwardInput) -> Vec<f32> {
    m.forward(input, None).try_into_vec_as::<f32>().unwrap()
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

fn input(device: &Device) -> ForwardInput {
    ForwardInput::padded(
        &[vec![0, 0, 5, 9, 13, 2, 40], vec![7, 8, 9, 10, 11, 12, 13]],
        &[
            vec![false, false, true, true, true, true, true],
            vec![true; 7],
        ],
        device,
    )
}

fn cfg(method: &str) -> PeftConfig {
    PeftConfig {
        method: method.into(),
        lora_r: 4,
        adapter_size: 8,
        prefix_len: 3,
        ..Default::default()
    }
}

/// Replaces every zero-initialized PEFT tensor (LoRA B, adapter up-projections) by noise, as
/// training would, so the tests below see adapters that change the output.
fn perturb(m: Llama) -> Llama {
    struct Noise(Vec<String>);
    impl ModuleMapper for Noise {
        fn enter_module(&mut self, name: &str, _: &str) {
            self.0.push(name.into());
        }
        fn exit_module(&mut self, _: &str, _: &str) {
            self.0.pop();
        }
        fn map_float<const D: usize>(&mut self, p: Param<Tensor<D>>) -> Param<Tensor<D>> {
            let path = self.0.join(".");
            if !kiln_model::peft::is_peft_param(&path) {
                return p;
            }
            let (id, t, mapper) = p.consume();
            let noise = t.random_like(Distribution::Normal(0.0, 0.1));
            // a fresh leaf, so that each forward pass builds its own graph from it
            let grad = t.is_require_grad();
            let v = (t + noise).detach();
            Param::from_mapped_value(id, if grad { v.require_grad() } else { v }, mapper)
        }
    }
    m.map(&mut Noise(Vec::new()))
}

#[test]
fn untrained_peft_gives_exactly_the_base_logits() {
    let device = default_device();
    let x = input(&device);
    let want = logits(&base(&device), &x);
    for method in ["lora", "adapter", "lora+adapter", "freeze"] {
        let mut c = cfg(method);
        c.train = vec!["norm".into()];
        let m = apply(base(&device), &c, "base".as_ref(), 1).unwrap();
        assert_eq!(logits(&m, &x), want, "{method}: logits changed");
    }
}

#[test]
fn peft_off_is_the_base_model_and_merge_matches() {
    let device = default_device();
    let x = input(&device);
    let want = logits(&base(&device), &x);
    let m = perturb(apply(base(&device), &cfg("lora"), "base".as_ref(), 1).unwrap());
    let with = logits(&m, &x);
    assert!(
        max_diff(&with, &want) > 1e-2,
        "the perturbed LoRA should matter"
    );
    // Adapters off: the base model, exactly (PPO's reference with a LoRA policy).
    assert_eq!(logits(&m, &x.clone().base()), want);
    let merged = merge_lora(m).unwrap();
    assert!(!merged.has_peft_modules());
    let d = max_diff(&logits(&merged, &x), &with);
    assert!(d < 1e-4, "merged LoRA differs from base + adapter by {d}");
    let ad = perturb(apply(base(&device), &cfg("adapter"), "base".as_ref(), 1).unwrap());
    let err = merge_lora(ad).unwrap_err().to_string();
    assert!(err.contains("only LoRA can be merged"), "{err}");
}

#[test]
fn adapter_directory_roundtrip() {
    let device = default_device();
    let x = input(&device);
    let root = tempfile::tempdir().unwrap();
    let base_dir = root.path().join("base");
    save_llama(&base(&device), &base_dir).unwrap();
    for method in ["lora", "prefix", "lora+adapter+prefix"] {
        let mut c = cfg(method);
        c.train = vec!["model.norm".into()];
        if method.contains("adapter") {
            c.prefix_hidden = 16; // reparameterized: the MLP must survive for resume
        }
        let m = perturb(apply(base(&device), &c, &base_dir, 2).unwrap());
        let want = logits(&m, &x);
        let dir = root.path().join(method.replace('+', "_"));
        save_adapter(&m, &dir).unwrap();
        let (back_cfg, recorded) = read_adapter_config(&dir).unwrap();
        assert_eq!(back_cfg, c);
        assert_eq!(recorded, std::path::absolute(&base_dir).unwrap());
        let back = load_any(&dir, &device).unwrap();
        let d = max_diff(&logits(&back, &x), &want);
        assert!(d < 1e-5, "{method}: logits differ by {d} after save/load");
        if let Some(p) = back.prefix.as_ref().filter(|p| p.encoder.is_some()) {
            // Folding the MLP (what the engine does before decoding) changes nothing.
            let mut folded = back.clone();
            folded.prefix = Some(p.folded());
            assert_eq!(
                logits(&folded, &x),
                logits(&back, &x),
                "{method}: folded prefix"
            );
        }
        let j: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(dir.join("adapter_config.json")).unwrap(),
        )
        .unwrap();
        let expected_type = match method {
            "lora" => "LORA",
            "prefix" => "PREFIX_TUNING",
            _ => "KILN",
        };
        assert_eq!(j["peft_type"], expected_type);
    }
    // PEFT's tensor names and layouts for LoRA.
    let f = kiln_model::checkpoint::TensorFile::read(
        &root.path().join("lora/adapter_model.safetensors"),
    )
    .unwrap();
    let (shape, _) = &f.tensors["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"];
    assert_eq!(shape, &vec![4, 32]);
    let (shape, _) = &f.tensors["base_model.model.model.layers.1.mlp.down_proj.lora_B.weight"];
    assert_eq!(shape, &vec![32, 4]);
}

#[test]
fn missing_base_says_how_to_fix() {
    let device = default_device();
    let root = tempfile::tempdir().unwrap();
    let base_dir = root.path().join("base");
    save_llama(&base(&device), &base_dir).unwrap();
    let m = apply(base(&device), &cfg("lora"), &base_dir, 2).unwrap();
    save_adapter(&m, &root.path().join("ad")).unwrap();
    std::fs::remove_dir_all(&base_dir).unwrap();
    let err = load_any(&root.path().join("ad"), &device)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("which is not there") && err.contains("kiln merge"),
        "{err}"
    );
}

#[test]
fn prefix_kv_cache_decode_equals_recompute() {
    let device = default_device();
    let m = perturb(apply(base(&device), &cfg("prefix"), "b".as_ref(), 3).unwrap());
    let seq: Vec<u32> = vec![5, 17, 3, 60, 22, 9, 41, 8, 33, 2];
    let full = m
        .forward(
            &ForwardInput::causal(std::slice::from_ref(&seq), &device),
            None,
        )
        .try_into_vec_as::<f32>()
        .unwrap();
    let v = 64;
    let prompt = 4;
    let mut cache = KvCache::new(&m.config, 1, seq.len(), &device);
    m.forward(
        &ForwardInput::causal(&[seq[..prompt].to_vec()], &device),
        Some(&mut cache),
    );
    let mut valid = vec![vec![true; prompt]];
    for j in prompt..seq.len() {
        let input = ForwardInput::decode_step(&[seq[j]], &[j], &valid, &device);
        let step = m
            .forward(&input, Some(&mut cache))
            .try_into_vec_as::<f32>()
            .unwrap();
        let d = max_diff(&step, &full[j * v..(j + 1) * v]);
        assert!(d < 1e-4, "decode position {j}: {d}");
        valid[0].push(true);
    }
    // And the prefix changes the output (it is in the computation at all).
    let plain = logits(
        &base(&device),
        &ForwardInput::causal(std::slice::from_ref(&seq), &device),
    );
    assert!(max_diff(&plain, &full) > 1e-3);
}

#[test]
fn only_peft_parameters_train() {
    let device = default_device().autodiff();
    let count = |m: &Llama| {
        struct C(Vec<String>, Vec<String>);
        impl ModuleMapper for C {
            fn enter_module(&mut self, name: &str, _: &str) {
                self.0.push(name.into());
            }
            fn exit_module(&mut self, _: &str, _: &str) {
                self.0.pop();
            }
            fn map_float<const D: usize>(&mut self, p: Param<Tensor<D>>) -> Param<Tensor<D>> {
                if p.val().is_require_grad() {
                    self.1.push(self.0.join("."));
                }
                p
            }
        }
        let mut c = C(Vec::new(), Vec::new());
        let _ = m.clone().map(&mut c);
        c.1
    };
    let mut c = cfg("lora");
    c.lora_targets = vec!["q_proj".into(), "v_proj".into()];
    c.train_last_layers = 1;
    let m = apply(base(&device), &c, "b".as_ref(), 1).unwrap();
    let trained = count(&m);
    // 2 layers x 2 targets x (A, B), plus the 9 tensors of layer 1.
    assert_eq!(trained.len(), 8 + 9, "{trained:?}");
    assert!(trained
        .iter()
        .all(|n| n.contains(".lora.") || n.starts_with("model.layers.1.")));
    // Loss gradients reach exactly those parameters.
    let x = ForwardInput::causal(&[vec![1, 2, 3, 4]], &device);
    let grads = m.forward(&x, None).sum().backward();
    let a = m.model.layers[0].self_attn.q_proj.lora.as_ref().unwrap();
    assert!(a.lora_a.grad(&grads).is_some());
    assert!(m.model.layers[0]
        .self_attn
        .q_proj
        .weight
        .grad(&grads)
        .is_none());
    // `none` trains everything again.
    let all = set_trainable(m, &cfg("none")).unwrap();
    assert_eq!(count(&all).len(), 2 * 9 + 3 + 8); // embed, norm, lm_head
}

/// With `KILN_EXPORT_DIR` set, writes a base model, a trained-looking LoRA adapter and a prefix
/// adapter (Kiln format) there with Kiln's logits, for tools/golden/check_kiln_lora.py to load
/// with `peft` and compare.
#[test]
#[ignore = "an export for tools/golden/check_kiln_lora.py, not a check: KILN_EXPORT_DIR=DIR cargo test -p kiln-model -- --ignored lora_dir_for_peft"]
fn lora_dir_for_peft() {
    let out =
        std::env::var("KILN_EXPORT_DIR").expect("set KILN_EXPORT_DIR to the directory to write");
    let device = default_device();
    let out = std::path::Path::new(&out);
    let base_dir = out.join("base");
    save_llama(&base(&device), &base_dir).unwrap();
    let ids = vec![vec![3u32, 17, 9, 4, 42, 8, 0, 63]];
    let x = ForwardInput::causal(&ids, &device);
    let mut c = cfg("lora");
    c.lora_targets = vec!["q_proj".into(), "v_proj".into(), "down_proj".into()];
    c.lora_alpha = 8.0;
    let m = perturb(apply(base(&device), &c, &base_dir, 9).unwrap());
    let dir = out.join("lora");
    save_adapter(&m, &dir).unwrap();
    let expected = serde_json::json!({"input_ids": ids, "logits": logits(&m, &x),
        "base_logits": logits(&base(&device), &x)});
    std::fs::write(dir.join("expected.json"), expected.to_string()).unwrap();
}

/// A LoRA adapter written by `peft` (tools/golden/make_lora_fixture.py) applies in Kiln with
/// the logits `PeftModel` computed.
#[test]
fn reads_a_peft_written_lora() {
    let device = default_device();
    let fix = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    let base_model = kiln_model::checkpoint::load_llama(&fix.join("llama_gqa"), &device).unwrap();
    let dir = fix.join("lora_peft");
    let m =
        kiln_model::adapter_dir::load_adapter(base_model, &fix.join("llama_gqa"), &dir).unwrap();
    let mut exp =
        kiln_model::checkpoint::TensorFile::read(&dir.join("expected.safetensors")).unwrap();
    let (shape, ids) = exp.tensors.remove("input_ids").unwrap();
    let ids: Vec<u32> = ids.iter().map(|&x| x as u32).collect();
    assert_eq!(shape[0], 1);
    let (_, want) = exp.tensors.remove("logits").unwrap();
    let got = logits(&m, &ForwardInput::causal(&[ids], &device));
    let d = max_diff(&got, &want);
    println!("Kiln vs PeftModel logits: max abs diff {d:e}");
    assert!(d < 1e-4, "{d}");
    let (c, _) = read_adapter_config(&dir).unwrap();
    assert_eq!((c.lora_r, c.lora_alpha), (4, 8.0));
}

/// Every float parameter's gradient, in module order (`None` where it does not train).
fn gradients(m: &Llama, g: &Gradients) -> Vec<Option<Vec<f32>>> {
    struct Grads<'a>(&'a Gradients, Vec<Option<Vec<f32>>>);
    impl ModuleVisitor for Grads<'_> {
        fn visit_float<const D: usize>(&mut self, p: &Param<Tensor<D>>) {
            let g = p.grad(self.0).map(|t| t.try_into_vec_as::<f32>().unwrap());
            self.1.push(g);
        }
    }
    let mut v = Grads(g, Vec::new());
    m.visit(&mut v);
    v.1
}

/// `hidden_at` (the last layer's output projection and feed-forward block run only where the
/// output is read) equals `hidden` at those positions, in values and in every trained
/// parameter's gradient: on the base model, and with LoRA, adapters and a prefix.
#[test]
fn hidden_at_equals_hidden_at_those_positions() {
    let device = default_device().autodiff();
    let x = input(&device);
    // out of order, repeated, and a left-padding position (1)
    let at = [13usize, 2, 6, 9, 13, 1, 7];
    let idx: Vec<i64> = at.iter().map(|&a| a as i64).collect();
    let idx = Tensor::<1, Int>::from_data(TensorData::new(idx, [at.len()]), &device);
    let peft = cfg("lora+adapter+prefix");
    for (name, m) in [
        ("base", base(&device)),
        (
            "peft",
            perturb(apply(base(&device), &peft, "base".as_ref(), 1).unwrap()),
        ),
    ] {
        let d = m.config.hidden_size;
        let w: Tensor<2> = Tensor::random([at.len(), d], Distribution::Normal(0.0, 1.0), &device);
        // each graph is built and consumed before the next one (burn keeps no graph around)
        let full = m.hidden(&x, None).reshape([14, d]).select(0, idx.clone());
        let a = full.clone().try_into_vec_as::<f32>().unwrap();
        let gf = gradients(&m, &(full * w.clone()).sum().backward());
        let part = m.hidden_at(&x, &at);
        let b = part.clone().try_into_vec_as::<f32>().unwrap();
        let gp = gradients(&m, &(part * w).sum().backward());
        assert!(a.iter().all(|v| v.is_finite()), "{name}: non-finite hidden");
        let diff = max_diff(&a, &b);
        assert!(diff < 1e-5, "{name}: hidden_at differs by {diff}");
        assert_eq!(gf.len(), gp.len());
        let mut trained = 0;
        for (i, (f, p)) in gf.iter().zip(&gp).enumerate() {
            match (f, p) {
                (Some(f), Some(p)) => {
                    let scale = f.iter().fold(1e-3f32, |s, v| s.max(v.abs()));
                    let diff = max_diff(f, p);
                    assert!(
                        diff < 1e-4 * scale,
                        "{name}: parameter {i}'s gradient differs by {diff}"
                    );
                    trained += 1;
                }
                (None, None) => {}
                _ => panic!("{name}: parameter {i} has a gradient on one side only"),
            }
        }
        assert!(trained >= 10, "{name}: only {trained} parameters compared");
    }
}
