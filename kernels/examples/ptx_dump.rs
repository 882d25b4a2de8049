//! Writes each CUDA kernel source's PTX for one architecture into a folder, as the backend
//! compiles it (NVRTC, the embedded sources or `FUSELORA_KERNEL_SOURCE_DIR`'s), so that
//! `ptxas -v` can report registers, spills and shared memory without a GPU
//! (scripts/ptxas-report.sh; ptxas comes with PyPI's `nvidia-cuda-nvcc`).
//!
//! usage: cargo run --release -p kernels --features cuda --example ptx_dump -- ARCH OUT_DIR [NAME...]

#[cfg(feature = "cuda")]
fn main() {
    use kernels::cuda::compile::{compile_to_ptx, KERNEL_SOURCES};
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [arch, out, names @ ..] = args.as_slice() else {
        eprintln!("usage: ptx_dump ARCH OUT_DIR [NAME...]   (ARCH: 75, 80 or 90)");
        std::process::exit(2);
    };
    let arch: u32 = arch.parse().expect("ARCH is a number such as 90");
    kernels::cuda::libraries::load_nvrtc()
        .unwrap_or_else(|e| panic!("{e} (python3 -m pip install \"nvidia-cuda-nvrtc==13.0.*\")"));
    std::fs::create_dir_all(out).expect("OUT_DIR can be made");
    for source in KERNEL_SOURCES {
        if !names.is_empty() && !names.iter().any(|n| n == source.name) {
            continue;
        }
        let ptx = compile_to_ptx(source, arch).unwrap_or_else(|e| panic!("sm_{arch}: {e}"));
        let path = std::path::Path::new(out).join(format!("{}.ptx", source.name));
        std::fs::write(&path, ptx).expect("the PTX file can be written");
        println!("{}", path.display());
    }
}

#[cfg(not(feature = "cuda"))]
fn main() {
    eprintln!("build with --features cuda");
    std::process::exit(2);
}
