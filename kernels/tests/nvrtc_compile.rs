//! Every CUDA kernel source compiles with NVRTC to PTX for sm_75, sm_80 and sm_90, and the PTX
//! holds every entry point the backend loads. Needs libnvrtc but no GPU:
//! `pip install nvidia-cuda-nvrtc==13.0.*` gives it on any machine; point
//! `FUSELORA_NVRTC_LIB` at the library (…/site-packages/nvidia/cu13/lib/libnvrtc.so.13) or put its
//! folder on LD_LIBRARY_PATH.
#![cfg(feature = "cuda")]

use kernels::cuda::compile::{compile_to_ptx, nvrtc_version, KERNEL_SOURCES};

fn load_global(path: &std::path::Path) {
    let flags = libloading::os::unix::RTLD_NOW | libloading::os::unix::RTLD_GLOBAL;
    let lib = unsafe { libloading::os::unix::Library::open(Some(path), flags) }
        .unwrap_or_else(|e| panic!("FUSELORA_NVRTC_LIB: cannot load {}: {e}", path.display()));
    std::mem::forget(lib);
}

/// Loads libnvrtc from `FUSELORA_NVRTC_LIB` (if set), with the libnvrtc-builtins beside it, before
/// cudarc looks it up by name: the dynamic loader then hands out the libraries already loaded
/// under the same sonames.
fn load_nvrtc() {
    if let Some(path) = std::env::var_os("FUSELORA_NVRTC_LIB") {
        let path = std::path::PathBuf::from(path);
        let dir = path.parent().expect("FUSELORA_NVRTC_LIB names a file");
        let builtins = std::fs::read_dir(dir)
            .unwrap_or_else(|e| panic!("FUSELORA_NVRTC_LIB: cannot list {}: {e}", dir.display()))
            .filter_map(|entry| entry.ok().map(|e| e.path()))
            .filter(|p| {
                p.file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with("libnvrtc-builtins.so"))
            });
        builtins.for_each(|p| load_global(&p));
        load_global(&path);
    }
    assert!(
        unsafe { cudarc::nvrtc::sys::is_culib_present() },
        "libnvrtc not found: `pip install nvidia-cuda-nvrtc==13.0.*` and set FUSELORA_NVRTC_LIB to its libnvrtc.so.13"
    );
}

#[test]
fn every_kernel_compiles_for_turing_ampere_and_hopper() {
    load_nvrtc();
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
            let entries = (source.entry_points)();
            assert!(!entries.is_empty());
            for name in entries {
                assert!(
                    ptx.contains(&format!(".entry {name}(")),
                    "{}.cu for sm_{arch}: no entry point {name}",
                    source.name
                );
            }
        }
    }
}

#[test]
fn a_broken_kernel_reports_the_compiler_log() {
    load_nvrtc();
    let broken = kernels::cuda::compile::KernelSource {
        name: "broken",
        source: "extern \"C\" __global__ void broken() { undeclared_name = 1; }",
        entry_points: Vec::new,
    };
    let err = compile_to_ptx(&broken, 80).unwrap_err().to_string();
    assert!(
        err.contains("broken") && err.contains("undeclared_name"),
        "log missing from: {err}"
    );
}
