//! Gradients computed in parts (side by side) against those of the whole loss, parameter by
//! parameter: shared by the test binaries that check `Stage::train_grads`.

use kiln_model::burn::module::{Module, ModuleVisitor, Param};
use kiln_model::burn::optim::GradientsParams;
use kiln_model::burn::tensor::Tensor;

/// What [`compare`] found.
#[derive(Debug)]
pub struct Report {
    /// Parameters of the model, and those with a gradient (in the whole loss and the parts).
    pub visited: usize,
    pub params: usize,
    /// Most parts that hold a gradient for one parameter.
    pub most_parts: usize,
    /// Largest `|parts − whole| / (1 + |whole|)` over every element.
    pub worst: f32,
    /// Largest `|parts − whole|` over every element, relative to the largest `|whole|` of its
    /// parameter.
    pub worst_of_largest: f32,
}

/// Each parameter's gradient in `joint` against the sum of its gradients in `parts`. Panics
/// where one side has a parameter's gradient and the other has not, or their shapes differ.
pub fn compare<M: Module>(model: &M, joint: &GradientsParams, parts: &[GradientsParams]) -> Report {
    struct Compare<'a> {
        joint: &'a GradientsParams,
        parts: &'a [GradientsParams],
        report: Report,
    }
    impl ModuleVisitor for Compare<'_> {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            self.report.visited += 1;
            let got: Vec<Vec<f32>> = self
                .parts
                .iter()
                .filter_map(|g| g.get::<D>(param.id))
                .map(kiln_model::to_vec)
                .collect();
            let Some(want) = self.joint.get::<D>(param.id) else {
                assert!(got.is_empty(), "a gradient the whole loss does not have");
                return;
            };
            let want = kiln_model::to_vec(want);
            assert!(!got.is_empty(), "a gradient missing from the parts");
            let largest = want.iter().fold(0f32, |m, x| m.max(x.abs())).max(1e-6);
            let r = &mut self.report;
            for (i, w) in want.iter().enumerate() {
                let g: f32 = got
                    .iter()
                    .map(|p| {
                        assert_eq!(p.len(), want.len(), "gradient shapes");
                        p[i]
                    })
                    .sum();
                r.worst = r.worst.max((g - w).abs() / (1.0 + w.abs()));
                r.worst_of_largest = r.worst_of_largest.max((g - w).abs() / largest);
            }
            r.most_parts = r.most_parts.max(got.len());
            r.params += 1;
        }
    }
    let mut c = Compare {
        joint,
        parts,
        report: Report {
            visited: 0,
            params: 0,
            most_parts: 0,
            worst: 0.0,
            worst_of_largest: 0.0,
        },
    };
    model.visit(&mut c);
    c.report
}
