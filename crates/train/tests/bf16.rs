//! Training at the `bf16` matmul precision follows the f32 run: the loss falls as far, to within
//! rounding. Its own test binary, because the precision is process-wide and the trainer sets it.

mod common;

use common::{model_for, setup, stage, trainer};
use kiln_model::fused::{self, MatmulPrecision};
use kiln_train::trainer::Stage;

#[test]
fn bf16_training_follows_the_f32_run() {
    let mut s = setup();
    s.config.schedule.max_steps = 40;
    s.config.checkpoint.every = 0;
    let before = stage(&s).evaluate(&model_for(&s)).unwrap()[0].1;
    let mut after = vec![];
    for p in [MatmulPrecision::F32, MatmulPrecision::Bf16] {
        s.config.precision = p;
        let out = s.root.join(p.to_string());
        let (_, outcome) = trainer(&s, &out, false, None)
            .run(model_for(&s), &mut stage(&s))
            .unwrap();
        after.push(outcome.last_eval[0].1);
        let saved =
            std::fs::read_to_string(out.join(kiln_train::checkpoint::RUN_CONFIG_FILE)).unwrap();
        assert!(
            saved.contains(&format!("precision = \"{p}\"")),
            "run config records the precision"
        );
    }
    let (f32_loss, bf16_loss) = (after[0], after[1]);
    println!("val loss {before:.3} -> f32 {f32_loss:.4}, bf16 {bf16_loss:.4}");
    assert!(f32_loss < before - 1.5, "f32 run: {before} -> {f32_loss}");
    assert!(
        (bf16_loss - f32_loss).abs() < 0.03 * f32_loss,
        "bf16 run ends at {bf16_loss}, f32 at {f32_loss}"
    );
    if fused::enabled() && fused::bf16::pays() {
        assert_ne!(
            bf16_loss, f32_loss,
            "bf16 was asked for and available, yet the run is f32's"
        );
    }
}
