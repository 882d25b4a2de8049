//! Build facts for `fuselora --version`: the git commit, the CUDA version of cudarc's bindings and the
//! features built in, passed to the crate as FUSELORA_* environment variables.

use std::process::Command;

fn git(args: &[&str]) -> Option<String> {
    let out = Command::new("git").args(args).output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
        .filter(|s| !s.is_empty())
}

fn main() {
    // A source tarball (or sdist) has no .git: FUSELORA_GIT_COMMIT names the commit instead.
    println!("cargo:rerun-if-env-changed=FUSELORA_GIT_COMMIT");
    let commit = std::env::var("FUSELORA_GIT_COMMIT")
        .ok()
        .filter(|c| !c.is_empty())
        .or_else(|| git(&["rev-parse", "--short=12", "HEAD"]))
        .unwrap_or_else(|| "unknown".to_string());
    // Rebuild when HEAD moves: the HEAD file, and the branch ref it points at (loose or packed).
    // (A path that does not exist would rerun this script on every build, so only existing ones.)
    let branch = git(&["symbolic-ref", "-q", "HEAD"]);
    let watched = ["HEAD", "packed-refs"]
        .into_iter()
        .map(str::to_string)
        .chain(branch)
        .filter_map(|path| git(&["rev-parse", "--git-path", &path]))
        .filter(|p| std::path::Path::new(p).exists());
    for path in watched {
        println!("cargo:rerun-if-changed={path}");
    }
    println!("cargo:rustc-env=FUSELORA_GIT_COMMIT={commit}");

    let cuda = std::env::var_os("CARGO_FEATURE_CUDA").is_some();
    let mpi = std::env::var_os("CARGO_FEATURE_MPI").is_some();
    // cudarc reads the same variable (set in .cargo/config.toml): 13000 = CUDA 13.0.
    println!("cargo:rerun-if-env-changed=CUDARC_CUDA_VERSION");
    let bindings = std::env::var("CUDARC_CUDA_VERSION").ok().and_then(|v| {
        let n: u32 = v.parse().ok()?;
        Some(format!("{}.{}", n / 1000, (n % 1000) / 10))
    });
    let cuda_line = match (cuda, bindings) {
        (true, Some(b)) => format!(
            "bindings for CUDA {b}; libcuda, cuBLAS, NVRTC and NCCL are loaded at run time \
             (loader path, else the Python environment's nvidia-* wheels)"
        ),
        (true, None) => "built in (bindings version unknown)".to_string(),
        (false, _) => "not built in (cargo build --features cuda)".to_string(),
    };
    println!("cargo:rustc-env=FUSELORA_CUDA={cuda_line}");
    let features: Vec<&str> = [("cuda", cuda), ("mpi", mpi)]
        .into_iter()
        .filter_map(|(name, on)| on.then_some(name))
        .collect();
    let features = if features.is_empty() {
        "none (CPU only)".to_string()
    } else {
        features.join(", ")
    };
    println!("cargo:rustc-env=FUSELORA_FEATURES={features}");
}
