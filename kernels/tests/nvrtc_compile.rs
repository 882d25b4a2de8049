//! Every CUDA kernel source compiles with NVRTC to PTX for sm_75, sm_80 and sm_90, and the PTX
//! holds exactly the entry points the backend loads (a kernel missing from `entry_points` would be
//! compiled but never loaded, and fail only when a GPU launches it); for sm_90 the Hopper attention kernels hold wgmma. Needs libnvrtc but no GPU:
//! `pip install nvidia-cuda-nvrtc==13.0.*` gives it on any machine, and the backend's own search
//! (`kernels::cuda::libraries`) finds it in that Python environment with no LD_LIBRARY_PATH.
#![cfg(feature = "cuda")]

use kernels::cuda::compile::{compile_to_ptx, nvrtc_version, KERNEL_SOURCES};
use kernels::cuda::libraries::{load_nvrtc, Origin};

/// Loads libnvrtc as the backend does and checks the file it found is libnvrtc.
fn load() {
    let found = load_nvrtc().unwrap_or_else(|e| {
        panic!("{e} (for this test: python3 -m pip install \"nvidia-cuda-nvrtc==13.0.*\")")
    });
    let name = found
        .path
        .file_name()
        .unwrap()
        .to_string_lossy()
        .into_owned();
    assert!(
        name.starts_with("libnvrtc.so"),
        "found {} ({:?})",
        found.path.display(),
        found.origin
    );
    if found.origin == Origin::PythonEnvironment {
        assert!(found.path.is_absolute(), "{}", found.path.display());
    }
}

#[test]
fn every_kernel_compiles_for_turing_ampere_and_hopper() {
    load();
    let (major, minor) = nvrtc_version().unwrap();
    assert!(major >= 12, "NVRTC {major}.{minor} is older than CUDA 12");
    for arch in [75, 80, 90] {
        for source in KERNEL_SOURCES {
            let ptx = compile_to_ptx(source, arch).unwrap_or_else(|e| panic!("sm_{arch}: {e}"));
            assert!(
                ptx.contains(&format!(".target sm_{arch}")),
                "{} for sm_{arch}: wrong target",
                source.name
            );
            let mut loaded = (source.entry_points)();
            assert!(!loaded.is_empty());
            loaded.sort();
            let mut in_ptx: Vec<String> = ptx
                .lines()
                .filter_map(|l| l.trim_start().strip_prefix(".visible .entry "))
                .map(|l| l.split('(').next().unwrap().trim().to_string())
                .collect();
            in_ptx.sort();
            assert_eq!(
                in_ptx, loaded,
                "{}.cu for sm_{arch}: kernels in the PTX (left) against the entry points the backend loads (right)",
                source.name
            );
        }
    }
}

/// The build compiles cc 9.0 for `compute_90a`, where the Hopper attention kernels use wgmma; on any
/// other target their bodies are a trap (the host never launches them there). A PTX without wgmma
/// for sm_90 would mean the feature macro went missing and the H200 path traps at run time.
#[test]
fn the_hopper_attention_kernels_use_wgmma_on_sm_90_only() {
    load();
    for name in ["attention_fwd_hopper", "attention_bwd_hopper"] {
        let source = KERNEL_SOURCES.iter().find(|s| s.name == name).unwrap();
        for arch in [75, 80, 90] {
            let ptx = compile_to_ptx(source, arch).unwrap();
            assert_eq!(
                ptx.contains("wgmma.mma_async"),
                arch == 90,
                "{name} for sm_{arch}"
            );
        }
    }
}

#[test]
fn a_broken_kernel_reports_the_compiler_log() {
    load();
    let broken = kernels::cuda::compile::KernelSource {
        name: "broken",
        source: "extern \"C\" __global__ void broken() { undeclared_name = 1; }",
        headers: &[],
        entry_points: Vec::new,
    };
    let err = compile_to_ptx(&broken, 80).unwrap_err().to_string();
    assert!(
        err.contains("broken") && err.contains("undeclared_name"),
        "log missing from: {err}"
    );
}
