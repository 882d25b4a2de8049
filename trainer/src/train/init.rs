//! A fresh adapter as PEFT initialises it: `A ~ kaiming_uniform(a = √5)`, i.e. uniform in
//! `±1/√in_features` (gain √(2/(1+a²)) = √(1/3) times √(3/fan_in)), and `B = 0`, so training
//! starts from exactly the base model. Seeded: the same seed gives the same adapter.

use crate::lora::{LoraConfig, LoraParams};
use crate::model::ModelConfig;
use anyhow::Result;
use kernels::Backend;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

pub fn fresh_adapter<B: Backend>(
    be: &B,
    model: &ModelConfig,
    config: LoraConfig,
    seed: u64,
) -> Result<LoraParams<B>> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    LoraParams::build(be, model, config, |name, [rows, cols]| {
        Ok(if name.contains(".lora_A.") {
            let bound = 1.0 / (cols as f32).sqrt();
            (0..rows * cols)
                .map(|_| rng.random_range(-bound..bound))
                .collect()
        } else {
            vec![0.0; rows * cols]
        })
    })
}
