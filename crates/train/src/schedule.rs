//! Learning-rate schedule: linear warm-up from 0, then cosine or linear decay to `min_lr` at
//! `max_steps`, or constant.

use crate::config::{Decay, OptimSection, ScheduleSection};

/// Learning rate for optimizer step `step` (0-based).
pub fn lr_at(step: usize, optim: &OptimSection, sched: &ScheduleSection) -> f64 {
    let (lr, min_lr) = (optim.lr, optim.min_lr.min(optim.lr));
    if step < sched.warmup_steps {
        return lr * (step + 1) as f64 / sched.warmup_steps as f64;
    }
    let span = sched.max_steps.saturating_sub(sched.warmup_steps).max(1) as f64;
    let progress = ((step - sched.warmup_steps) as f64 / span).min(1.0);
    match sched.decay {
        Decay::Constant => lr,
        Decay::Linear => lr - (lr - min_lr) * progress,
        Decay::Cosine => {
            min_lr + 0.5 * (lr - min_lr) * (1.0 + (std::f64::consts::PI * progress).cos())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warmup_then_decay() {
        let o = OptimSection {
            lr: 1.0,
            min_lr: 0.1,
            ..Default::default()
        };
        let s = ScheduleSection {
            warmup_steps: 10,
            max_steps: 110,
            decay: Decay::Cosine,
        };
        assert!((lr_at(0, &o, &s) - 0.1).abs() < 1e-12);
        assert!((lr_at(9, &o, &s) - 1.0).abs() < 1e-12);
        assert!((lr_at(60, &o, &s) - 0.55).abs() < 1e-12);
        assert!((lr_at(110, &o, &s) - 0.1).abs() < 1e-12);
        let s = ScheduleSection {
            decay: Decay::Linear,
            ..s
        };
        assert!((lr_at(35, &o, &s) - 0.775).abs() < 1e-12);
    }
}
