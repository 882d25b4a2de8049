//! NCCL for the ranks of a multi-GPU job without LD_LIBRARY_PATH.
//!
//! cudarc opens NCCL as `libnccl.so` or a few versioned names, never `libnccl.so.2`, the only name
//! that the libnccl2 package and the nvidia-nccl wheels (PyTorch's, on Kaggle and Colab) install; and
//! the dynamic loader's search path is fixed when a process starts. So a rank of a multi-rank job,
//! when cudarc cannot open NCCL but `libnccl.so.2` is on the loader's path or in the Python
//! environment, points a `libnccl.so` link at that file (in the user's cache) and re-executes itself
//! once with the link's folder first on LD_LIBRARY_PATH.

use anyhow::{bail, Context, Result};
use kernels::cuda::libraries::{find_in_python_environment, loader_path};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};

/// Set on the re-executed process: the folder holding the `libnccl.so` link.
const LINK_DIR_VAR: &str = "FUSELORA_NCCL_LINK_DIR";

/// Re-executes this process with a `libnccl.so` link on LD_LIBRARY_PATH when it is a rank of a
/// multi-rank job and cudarc could not open NCCL otherwise; returns when nothing needs doing.
pub fn relaunch_with_nccl_link_if_needed() -> Result<()> {
    let multi_rank = comms::detect().is_ok_and(|info| info.world_size > 1);
    if !multi_rank || std::env::var_os(LINK_DIR_VAR).is_some() || comms::nccl_loadable() {
        return Ok(());
    }
    let Some(nccl) = loader_path("libnccl.so.2", c"ncclGetUniqueId")
        .or_else(|| find_in_python_environment(&["libnccl.so.2"]))
    else {
        // Nothing to link: the NCCL communicator says what to install when it is opened.
        return Ok(());
    };
    let link_dir = link_folder(&cache_base(), &nccl)?;
    let library_path = match std::env::var_os("LD_LIBRARY_PATH").filter(|p| !p.is_empty()) {
        Some(old) => {
            let mut joined = link_dir.clone().into_os_string();
            joined.push(":");
            joined.push(old);
            joined
        }
        None => link_dir.clone().into_os_string(),
    };
    eprintln!(
        "nccl: {} through {}/libnccl.so (restarting with it on LD_LIBRARY_PATH)",
        nccl.display(),
        link_dir.display()
    );
    let exe = std::env::current_exe().context("finding this executable to restart it")?;
    let mut args = std::env::args_os();
    let arg0 = args.next().unwrap_or_else(|| exe.clone().into_os_string());
    let err = std::process::Command::new(&exe)
        .arg0(arg0)
        .args(args)
        .env("LD_LIBRARY_PATH", library_path)
        .env(LINK_DIR_VAR, &link_dir)
        .exec();
    bail!(
        "restarting {} with NCCL on LD_LIBRARY_PATH: {err}",
        exe.display()
    )
}

/// `$XDG_CACHE_HOME`, else `~/.cache`, else the temp folder.
fn cache_base() -> PathBuf {
    std::env::var_os("XDG_CACHE_HOME")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(std::env::temp_dir)
}

/// A folder holding `libnccl.so` → `target`, one per target: `<base>/fuselora/nccl/<hash>`. The
/// link is made under a temporary name and renamed into place, so ranks starting together never
/// see half of it.
fn link_folder(base: &Path, target: &Path) -> Result<PathBuf> {
    use std::hash::{Hash, Hasher};
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    target.hash(&mut hasher);
    let dir = base
        .join("fuselora")
        .join("nccl")
        .join(format!("{:016x}", hasher.finish()));
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let link = dir.join("libnccl.so");
    if std::fs::read_link(&link).is_ok_and(|t| t == target) {
        return Ok(dir);
    }
    let temp = dir.join(format!("libnccl.so.{}.tmp", std::process::id()));
    let _ = std::fs::remove_file(&temp);
    std::os::unix::fs::symlink(target, &temp)
        .with_context(|| format!("linking {} to {}", temp.display(), target.display()))?;
    std::fs::rename(&temp, &link)
        .with_context(|| format!("renaming {} to {}", temp.display(), link.display()))?;
    Ok(dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn link_folder_points_libnccl_so_at_the_target() {
        let cache = tempfile::tempdir().unwrap();
        let target = cache.path().join("libnccl.so.2");
        std::fs::write(&target, b"").unwrap();
        let dir = link_folder(cache.path(), &target).unwrap();
        let again = link_folder(cache.path(), &target).unwrap();
        assert_eq!(dir, again);
        assert!(dir.starts_with(cache.path().join("fuselora/nccl")));
        assert_eq!(std::fs::read_link(dir.join("libnccl.so")).unwrap(), target);
        let entries = std::fs::read_dir(&dir).unwrap().count();
        assert_eq!(entries, 1, "temporary link left behind");
    }
}
