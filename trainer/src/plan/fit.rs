//! `train.gradient_checkpointing = "auto"`: the checkpointing that fits, chosen from the plan.
//!
//! On a GPU the checkpointed layers are offloaded (the fastest checkpointed mode: recomputation
//! skips attention and the o projection), and as few layers as the device's free memory needs are
//! checkpointed at all: the layers above keep every activation and are not recomputed. Each
//! candidate is metered by [`Plan::account`] (the real step on the metering backend), so the choice
//! follows the code. On the CPU, whose memory the plan does not model, every layer is checkpointed
//! in full.

use super::{Plan, PlanSpec};
use crate::model::{CheckpointPolicy, Checkpointing, CheckpointingSetting, KeptKv};
use crate::train::config::RunConfig;
use anyhow::{bail, Result};

/// Device memory left unplanned: 5% of what is free (the plan is within 5% of the measured peaks,
/// docs/benchmarks.md) and 512 MiB for what the pool does not hold (cuBLAS workspace, kernels).
fn device_budget(free: u64) -> u64 {
    (free - free / 20).saturating_sub(512 << 20)
}

/// The offloaded checkpoints may pin up to half the host memory available.
fn host_budget(available: u64) -> u64 {
    available / 2
}

/// Pinned host bytes of the checkpoints `policy` parks (model/layer.rs's `LayerCheckpoint`,
/// [`KeptKv::checkpoint_values_per_token`], [`CheckpointPolicy::parked_layers`]).
pub fn offload_host_bytes(spec: &PlanSpec, policy: CheckpointPolicy) -> u64 {
    let layers = policy.parked_layers(spec.model.num_layers);
    let n = (spec.batch * spec.seq) as u64;
    let e = spec.dtype.size_bytes() as u64;
    let lora_t = spec.lora.targets.len() * spec.lora.r;
    let (compute, f32s) = KeptKv::checkpoint_values_per_token(&spec.model, lora_t);
    n * (e * compute as u64 + 4 * f32s as u64) * layers as u64
}

/// The checkpointing `"auto"` chooses, and why, in words.
pub struct Choice {
    pub policy: CheckpointPolicy,
    pub why: String,
}

/// `"auto"` for `spec` (its `checkpointing` is ignored) with `device_free` bytes free on the
/// device (`None`: the CPU) and `host_available` bytes of host memory available.
pub fn choose(
    spec: &PlanSpec,
    device_free: Option<u64>,
    host_available: Option<u64>,
) -> Result<Choice> {
    let layers = spec.model.num_layers;
    let Some(free) = device_free else {
        return Ok(Choice {
            policy: CheckpointPolicy::all(Checkpointing::Full),
            why: "every layer (no free-memory figure from the backend: the CPU's memory is not planned)"
                .into(),
        });
    };
    let budget = device_budget(free);
    let every_offloaded = CheckpointPolicy::all(Checkpointing::Offload);
    let offload_fits =
        host_available.is_some_and(|a| offload_host_bytes(spec, every_offloaded) <= host_budget(a));
    let mode = if offload_fits {
        Checkpointing::Offload
    } else {
        Checkpointing::Full
    };
    let total = |r: usize| -> Result<u64> {
        let candidate = PlanSpec {
            checkpointing: CheckpointPolicy {
                mode,
                layers: Some(r),
            },
            ..spec.clone()
        };
        Ok(Plan::account(&candidate)?.memory.total())
    };
    let gib = |b: u64| b as f64 / (1u64 << 30) as f64;
    let every_layer = total(layers)?;
    if every_layer > budget {
        return Ok(Choice {
            policy: CheckpointPolicy::all(mode),
            why: format!(
                "every layer, and the plan still needs {:.2} GiB of the {:.2} GiB free: lower train.batch_size or data.max_seq_len, quantize, or keep AdamW's state and the embedding in host memory (train.optimizer_state = \"host\", model.embedding = \"host\")",
                gib(every_layer),
                gib(free)
            ),
        });
    }
    // Memory falls as more layers are recomputed: the fewest that fit, by bisection (`fitting`:
    // the plan of `hi` layers, which always fits).
    let (mut lo, mut hi, mut fitting) = (0, layers, every_layer);
    while lo < hi {
        let mid = (lo + hi) / 2;
        let t = total(mid)?;
        if t <= budget {
            (hi, fitting) = (mid, t);
        } else {
            lo = mid + 1;
        }
    }
    let policy = CheckpointPolicy {
        mode,
        layers: Some(lo),
    };
    Ok(Choice {
        policy,
        why: format!(
            "{} of {layers} layers recomputed: the plan's {:.2} GiB fit in the {:.2} GiB free",
            policy.recomputed_layers(layers),
            gib(fitting),
            gib(free)
        ),
    })
}

/// The checkpointing a run uses: `train.gradient_checkpointing` as written (for the first
/// `train.checkpoint_layers` layers when that is set), or `"auto"`'s [`choose`] with `device_free`
/// bytes free on the device (`None`: the CPU) and this host's available memory.
pub fn for_run(cfg: &RunConfig, device_free: Option<u64>, nproc: usize) -> Result<Choice> {
    match (cfg.train.gradient_checkpointing, cfg.train.checkpoint_layers) {
        (CheckpointingSetting::Mode(mode), layers) => Ok(Choice {
            policy: CheckpointPolicy { mode, layers },
            why: "as configured".into(),
        }),
        (CheckpointingSetting::Auto, Some(_)) => bail!(
            "train.checkpoint_layers is set but train.gradient_checkpointing is \"auto\", which chooses the layers itself: set gradient_checkpointing to \"full\" or \"offload\", or remove checkpoint_layers"
        ),
        (CheckpointingSetting::Auto, None) => {
            let spec = PlanSpec::from_run(cfg, nproc, CheckpointPolicy::OFF)?;
            choose(&spec, device_free, host_available_bytes())
        }
    }
}

/// `MemAvailable` of /proc/meminfo, in bytes (`None` where there is none).
pub fn host_available_bytes() -> Option<u64> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = info.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib << 10)
}
