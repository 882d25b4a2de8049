//! How many GPUs this node shows: `CUDA_VISIBLE_DEVICES` when set (CUDA stops at the first
//! entry that is empty or negative, so `0,1,-1,2` shows two), else the `GPU n:` lines of
//! `nvidia-smi -L`, else none. The launcher starts one rank per GPU, and one rank without GPUs.

use std::process::{Command, Stdio};

/// Ranks to start when `--nproc-per-node` is not given.
pub fn default_nproc_per_node() -> usize {
    let visible = std::env::var("CUDA_VISIBLE_DEVICES").ok();
    let listing = match visible {
        Some(_) => None,
        None => nvidia_smi_listing(),
    };
    count_visible_gpus(visible.as_deref(), listing.as_deref()).max(1)
}

/// GPUs named by `CUDA_VISIBLE_DEVICES` if given, else listed by `nvidia-smi -L`.
pub fn count_visible_gpus(cuda_visible_devices: Option<&str>, nvidia_smi_l: Option<&str>) -> usize {
    match cuda_visible_devices {
        Some(list) => list
            .split(',')
            .map(str::trim)
            .take_while(|id| !id.is_empty() && !id.starts_with('-'))
            .count(),
        None => nvidia_smi_l
            .unwrap_or("")
            .lines()
            .filter(|line| line.starts_with("GPU "))
            .count(),
    }
}

/// `nvidia-smi -L`'s output, or `None` when it is missing or fails.
fn nvidia_smi_listing() -> Option<String> {
    let output = Command::new("nvidia-smi")
        .arg("-L")
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .ok()?;
    output
        .status
        .success()
        .then(|| String::from_utf8_lossy(&output.stdout).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    const LISTING: &str = "GPU 0: NVIDIA H200 (UUID: GPU-1)\nGPU 1: NVIDIA H200 (UUID: GPU-2)\n  \
                           MIG 1g.18gb Device 0: (UUID: MIG-3)\n";

    #[test]
    fn cuda_visible_devices_wins_and_stops_at_an_invalid_entry() {
        assert_eq!(count_visible_gpus(Some("0,1,2"), Some(LISTING)), 3);
        assert_eq!(count_visible_gpus(Some("GPU-1,GPU-2"), None), 2);
        assert_eq!(count_visible_gpus(Some("0,1,-1,2"), None), 2);
        assert_eq!(count_visible_gpus(Some(""), Some(LISTING)), 0);
        assert_eq!(count_visible_gpus(Some("-1"), None), 0);
    }

    #[test]
    fn nvidia_smi_lines_count_gpus_not_mig_slices() {
        assert_eq!(count_visible_gpus(None, Some(LISTING)), 2);
        assert_eq!(count_visible_gpus(None, None), 0);
    }
}
