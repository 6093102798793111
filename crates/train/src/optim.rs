//! AdamW (Loshchilov & Hutter 2019) with decoupled weight decay that skips norms and biases
//! (every rank-1 parameter), global-norm gradient clipping (burn's built-in clipping is per
//! tensor, which is not the same thing), and state keyed by parameter path so that it saves
//! and resumes exactly.
//!
//! Written here rather than using burn-optim's AdamW because resume needs the moment estimates
//! by name, the decay needs a per-parameter rule, and clipping must see all gradients at once.

use std::collections::HashMap;

use kiln_model::burn::module::{Module, ModuleMapper, ModuleVisitor, Param};
use kiln_model::burn::optim::GradientsParams;
use kiln_model::burn::tensor::{Device, Tensor, TensorData};

use kiln_model::fused::simd::AdamWStep;

use crate::config::OptimSection;

/// First and second moment estimates of one parameter, flattened.
#[derive(Clone)]
pub struct Moments {
    pub shape: Vec<usize>,
    pub m: Tensor<1>,
    pub v: Tensor<1>,
}

pub struct AdamW {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    /// Optimizer steps taken (for bias correction).
    pub t: u64,
    pub state: HashMap<String, Moments>,
}

struct NormVisitor<'a> {
    grads: &'a GradientsParams,
    total: f64,
}

impl ModuleVisitor for NormVisitor<'_> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        if let Some(g) = self.grads.get::<D>(param.id) {
            self.total += kiln_model::fused::sum_squares(g);
        }
    }
}

/// Global L2 norm of all gradients of `module` (each gradient's sum of squares in one fused
/// pass, summed in f64).
pub fn grad_norm<M: Module>(module: &M, grads: &GradientsParams) -> f64 {
    let mut v = NormVisitor { grads, total: 0.0 };
    module.visit(&mut v);
    v.total.sqrt()
}

struct StepMapper<'a> {
    opt: &'a mut AdamW,
    grads: &'a mut GradientsParams,
    lr: f64,
    clip_scale: f64,
    path: Vec<String>,
}

impl ModuleMapper for StepMapper<'_> {
    fn enter_module(&mut self, name: &str, _: &str) {
        self.path.push(name.to_string());
    }
    fn exit_module(&mut self, _: &str, _: &str) {
        self.path.pop();
    }

    fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
        let Some(grad) = self.grads.remove::<D>(param.id) else {
            return param;
        };
        let name = self.path.join(".");
        let (id, tensor, mapper) = param.consume();
        let require_grad = tensor.is_require_grad();
        let shape = tensor.dims().to_vec();
        let n: usize = shape.iter().product();
        let x = tensor.inner().reshape([n]);
        let g = grad.inner().reshape([n]);
        let o = &mut *self.opt;
        let st = o.state.entry(name).or_insert_with(|| Moments {
            shape: shape.clone(),
            m: Tensor::zeros([n], &x.device()),
            v: Tensor::zeros([n], &x.device()),
        });
        let t = o.t as i32;
        let step = AdamWStep {
            lr: self.lr as f32,
            beta1: o.beta1 as f32,
            beta2: o.beta2 as f32,
            eps: o.eps as f32,
            // Decoupled decay on matrices only: norms and biases (rank 1) are not decayed.
            decay: if D >= 2 { o.weight_decay as f32 } else { 0.0 },
            bc1: (1.0 - o.beta1.powi(t)) as f32,
            bc2: (1.0 - o.beta2.powi(t)) as f32,
            grad_scale: self.clip_scale as f32,
        };
        // One fused pass (kiln_model::fused::adamw); the moments are taken out of the state so
        // the kernel can update them in place.
        let placeholder = || Tensor::<1>::empty([0], &x.device());
        let (m, v) = (
            std::mem::replace(&mut st.m, placeholder()),
            std::mem::replace(&mut st.v, placeholder()),
        );
        let (x, m, v) = kiln_model::fused::adamw(x, m, v, g, step);
        st.m = m;
        st.v = v;
        let mut x = x.reshape::<D, _>(shape_array::<D>(&shape)).autodiff();
        if require_grad {
            x = x.require_grad();
        }
        Param::from_mapped_value(id, x, mapper)
    }
}

fn shape_array<const D: usize>(shape: &[usize]) -> [usize; D] {
    let mut a = [0; D];
    a.copy_from_slice(shape);
    a
}

impl AdamW {
    pub fn new(c: &OptimSection) -> Self {
        AdamW {
            beta1: c.beta1,
            beta2: c.beta2,
            eps: c.eps,
            weight_decay: c.weight_decay,
            t: 0,
            state: HashMap::new(),
        }
    }

    /// One update with learning rate `lr`, gradients clipped to global norm `clip` (0 = off).
    /// Returns the model and the gradient norm before clipping.
    pub fn step<M: Module>(
        &mut self,
        module: M,
        mut grads: GradientsParams,
        lr: f64,
        clip: f64,
    ) -> (M, f64) {
        let norm = grad_norm(&module, &grads);
        let clip_scale = if clip > 0.0 && norm > clip {
            clip / (norm + 1e-6)
        } else {
            1.0
        };
        self.t += 1;
        let mut mapper = StepMapper {
            opt: self,
            grads: &mut grads,
            lr,
            clip_scale,
            path: Vec::new(),
        };
        (module.map(&mut mapper), norm)
    }

    /// The state as named f32 tensors (`m.<path>`, `v.<path>`) for a safetensors file.
    pub fn tensors(&self) -> Vec<(String, Vec<usize>, Vec<f32>)> {
        let mut names: Vec<&String> = self.state.keys().collect();
        names.sort();
        let mut out = Vec::new();
        for name in names {
            let s = &self.state[name];
            out.push((
                format!("m.{name}"),
                s.shape.clone(),
                kiln_model::to_vec(s.m.clone()),
            ));
            out.push((
                format!("v.{name}"),
                s.shape.clone(),
                kiln_model::to_vec(s.v.clone()),
            ));
        }
        out
    }

    /// Restores the state written by [`AdamW::tensors`].
    pub fn load_tensors(
        &mut self,
        mut tensors: HashMap<String, (Vec<usize>, Vec<f32>)>,
        t: u64,
        device: &Device,
    ) {
        self.t = t;
        self.state.clear();
        let names: Vec<String> = tensors
            .keys()
            .filter_map(|k| k.strip_prefix("m.").map(String::from))
            .collect();
        for name in names {
            let (shape, m) = tensors.remove(&format!("m.{name}")).expect("m");
            let (_, v) = tensors
                .remove(&format!("v.{name}"))
                .unwrap_or_else(|| (shape.clone(), vec![0.0; m.len()]));
            let n = m.len();
            self.state.insert(
                name,
                // Outside the autodiff graph, like fresh moments, whatever device the
                // checkpoint is loaded onto.
                Moments {
                    shape,
                    m: Tensor::from_data(TensorData::new(m, [n]), device).inner(),
                    v: Tensor::from_data(TensorData::new(v, [n]), device).inner(),
                },
            );
        }
    }
}

/// Number of parameters of `module`, and how many of them require gradients.
pub fn count_params<M: Module>(module: &M) -> (usize, usize) {
    struct Count(usize, usize);
    impl ModuleVisitor for Count {
        fn visit_float<const D: usize>(&mut self, p: &Param<Tensor<D>>) {
            let n: usize = p.shape().dims::<D>().iter().product();
            self.0 += n;
            if p.val().is_require_grad() {
                self.1 += n;
            }
        }
    }
    let mut c = Count(0, 0);
    module.visit(&mut c);
    (c.0, c.1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_model::burn::module::Module;
    use kiln_model::default_device;

    #[derive(Module, Debug)]
    struct Toy {
        w: Param<Tensor<2>>,
        b: Param<Tensor<1>>,
    }

    /// Two steps against a hand-computed AdamW (PyTorch's formula), decay on w only.
    #[test]
    fn matches_reference_adamw() {
        let device = default_device().autodiff();
        let w0 = [0.5f32, -1.0, 2.0, 0.25];
        let b0 = [0.1f32, -0.2];
        let mut toy = Toy {
            w: Param::from_tensor(Tensor::from_data(
                TensorData::new(w0.to_vec(), [2, 2]),
                &device,
            )),
            b: Param::from_tensor(Tensor::from_data(
                TensorData::new(b0.to_vec(), [2]),
                &device,
            )),
        };
        let c = OptimSection {
            lr: 0.1,
            weight_decay: 0.5,
            beta1: 0.9,
            beta2: 0.99,
            eps: 1e-8,
            ..Default::default()
        };
        let mut opt = AdamW::new(&c);
        // loss = sum(w^2) + sum(3 b): grad w = 2w, grad b = 3.
        let (mut w, mut b) = (w0.map(|x| x as f64).to_vec(), b0.map(|x| x as f64).to_vec());
        let (mut mw, mut vw, mut mb, mut vb) =
            (vec![0.0; 4], vec![0.0; 4], vec![0.0; 2], vec![0.0; 2]);
        for t in 1..=2 {
            let loss = toy.w.val().square().sum() + toy.b.val().sum() * 3.0;
            let grads = GradientsParams::from_grads(loss.backward(), &toy);
            toy = opt.step(toy, grads, c.lr, 0.0).0;
            let upd = |x: &mut Vec<f64>,
                       m: &mut Vec<f64>,
                       v: &mut Vec<f64>,
                       g: &dyn Fn(f64) -> f64,
                       wd: f64| {
                for i in 0..x.len() {
                    let gi = g(x[i]);
                    m[i] = 0.9 * m[i] + 0.1 * gi;
                    v[i] = 0.99 * v[i] + 0.01 * gi * gi;
                    let mh = m[i] / (1.0 - 0.9f64.powi(t));
                    let vh = v[i] / (1.0 - 0.99f64.powi(t));
                    x[i] = x[i] * (1.0 - 0.1 * wd) - 0.1 * mh / (vh.sqrt() + 1e-8);
                }
            };
            upd(&mut w, &mut mw, &mut vw, &|x| 2.0 * x, 0.5);
            upd(&mut b, &mut mb, &mut vb, &|_| 3.0, 0.0);
        }
        let got_w = kiln_model::to_vec(toy.w.val());
        let got_b = kiln_model::to_vec(toy.b.val());
        for (g, e) in got_w.iter().zip(&w).chain(got_b.iter().zip(&b)) {
            assert!(
                (*g as f64 - e).abs() < 1e-5,
                "{got_w:?} {got_b:?} vs {w:?} {b:?}"
            );
        }
    }

    #[test]
    fn global_norm_clipping_scales_all_gradients_together() {
        let device = default_device().autodiff();
        let toy = Toy {
            w: Param::from_tensor(Tensor::from_data(
                TensorData::new(vec![3.0f32, 0.0, 0.0, 0.0], [2, 2]),
                &device,
            )),
            b: Param::from_tensor(Tensor::from_data(
                TensorData::new(vec![0.0f32, 4.0], [2]),
                &device,
            )),
        };
        // grad = x: norms 3 and 4 per tensor, 5 globally.
        let loss = (toy.w.val().square().sum() + toy.b.val().square().sum()) * 0.5;
        let grads = GradientsParams::from_grads(loss.backward(), &toy);
        assert!((grad_norm(&toy, &grads) - 5.0).abs() < 1e-6);
        // With eps = lr = 1e6 and no momentum, the step is lr * g / (|g| + eps) ≈ g: it exposes
        // the clipped gradient.
        let c = OptimSection {
            weight_decay: 0.0,
            eps: 1e6,
            beta1: 0.0,
            beta2: 0.0,
            ..Default::default()
        };
        let mut opt = AdamW::new(&c);
        let (toy2, norm) = opt.step(toy, grads, 1e6, 1.0);
        assert!((norm - 5.0).abs() < 1e-6);
        let w = kiln_model::to_vec(toy2.w.val());
        let b = kiln_model::to_vec(toy2.b.val());
        // Clipped gradients: 3/5 and 4/5 (not 1 and 1 as per-tensor clipping would give).
        assert!((w[0] as f64 - 2.4).abs() < 1e-4, "{w:?}");
        assert!((b[1] as f64 - 3.2).abs() < 1e-4, "{b:?}");
    }
}
