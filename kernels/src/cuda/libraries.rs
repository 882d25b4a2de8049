//! Finding the CUDA libraries at run time, so a `pip install`ed fuselora runs in a notebook with no
//! LD_LIBRARY_PATH.
//!
//! cudarc loads libcuda, libcublas and libnvrtc by name (`libcublas.so`, `libcublas.so.13`,
//! `libcublas.so.12`, …) through the dynamic loader's search path. In a Python environment the
//! libraries usually sit in PyTorch's NVIDIA wheels instead: `site-packages/nvidia/cu13/lib` (CUDA 13
//! wheels) or `nvidia/cublas/lib`, `nvidia/cuda_nvrtc/lib`, `nvidia/nccl/lib` (CUDA 12 wheels). When
//! the loader cannot find a library, [`load`] looks there and loads the file by its full path with
//! `RTLD_GLOBAL`; cudarc's later `dlopen` by soname then gets that library, because glibc matches a
//! requested name against the sonames of the objects already loaded.
//!
//! The environment's `nvidia` folders are found, in order, next to the binary itself (pip installs it
//! in `<prefix>/bin`, beside `<prefix>/lib/python3.X/site-packages`), under `$VIRTUAL_ENV` and
//! `$CONDA_PREFIX`, and last by asking `python3` for `nvidia.__path__` (user site, `.pth` files).
//!
//! libcuda comes from the NVIDIA driver and is only ever taken from the loader's path.

use crate::{KernelError, Result};
use std::ffi::{CStr, CString};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// Where a library was found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Origin {
    /// The dynamic loader's own search (LD_LIBRARY_PATH, ld.so.cache, system folders).
    LoaderPath,
    /// A Python environment's NVIDIA wheels, loaded by full path.
    PythonEnvironment,
}

/// A library loaded into this process: its file and how it was found.
#[derive(Clone, Debug)]
pub struct FoundLibrary {
    pub path: PathBuf,
    pub origin: Origin,
}

impl FoundLibrary {
    fn describe(&self) -> String {
        let origin = match self.origin {
            Origin::LoaderPath => "loader path",
            Origin::PythonEnvironment => "Python environment",
        };
        format!("{} ({origin})", self.path.display())
    }
}

/// The CUDA libraries the backend runs on.
#[derive(Clone, Debug)]
pub struct CudaLibraries {
    /// The CUDA version the driver supports (`cuDriverGetVersion`), as (major, minor).
    pub driver_version: (u32, u32),
    pub cublas: FoundLibrary,
    pub nvrtc: FoundLibrary,
    /// NVRTC's own version (`nvrtcVersion`).
    pub nvrtc_version: (i32, i32),
}

impl CudaLibraries {
    /// Why the driver may refuse the kernels' PTX: it carries the ISA version of the NVRTC that
    /// wrote it, and a driver JIT-compiles PTX only up to its own CUDA version (PTX has no
    /// minor-version compatibility).
    pub fn ptx_version_problem(&self) -> Option<String> {
        let driver = (self.driver_version.0 as i32, self.driver_version.1 as i32);
        (self.nvrtc_version > driver).then(|| {
            format!(
                "NVRTC {}.{} ({}) writes PTX newer than this driver's CUDA {}.{}: install an NVRTC no \
                 newer than the driver (pip install \"nvidia-cuda-nvrtc-cu{}=={}.{}.*\") or update the \
                 NVIDIA driver",
                self.nvrtc_version.0,
                self.nvrtc_version.1,
                self.nvrtc.path.display(),
                driver.0,
                driver.1,
                driver.0,
                driver.0,
                driver.1
            )
        })
    }

    /// One line for the log: which CUDA was found and where.
    pub fn describe(&self) -> String {
        format!(
            "driver CUDA {}.{}; cuBLAS {}; NVRTC {}.{} {}",
            self.driver_version.0,
            self.driver_version.1,
            self.cublas.describe(),
            self.nvrtc_version.0,
            self.nvrtc_version.1,
            self.nvrtc.describe()
        )
    }
}

/// The CUDA major versions whose library files (`libcublas.so.<major>`, …) are searched for.
const CUDA_MAJORS: [u32; 2] = [13, 12];

/// Loads libcuda, cuBLAS and NVRTC (once per process) and says where each came from, or why one
/// could not be used.
pub fn load() -> Result<&'static CudaLibraries> {
    static LOADED: OnceLock<std::result::Result<CudaLibraries, String>> = OnceLock::new();
    LOADED
        .get_or_init(load_uncached)
        .as_ref()
        .map_err(|message| KernelError::Unsupported(message.clone()))
}

fn load_uncached() -> std::result::Result<CudaLibraries, String> {
    // SAFETY: is_culib_present only dlopens candidate names.
    if !unsafe { cudarc::driver::sys::is_culib_present() } {
        return Err(
            "CUDA backend: the NVIDIA driver's libcuda.so.1 is not on the loader's path: this \
                    machine has no NVIDIA driver, or the container was started without GPUs \
                    (docker run --gpus all)"
                .to_string(),
        );
    }
    let driver_version = driver_version()?;
    let nvrtc = load_library(&NVRTC, Some(driver_version.0))?;
    let nvrtc_version = super::compile::nvrtc_version().map_err(|e| e.to_string())?;
    let cublas = load_library(&CUBLAS, Some(driver_version.0))?;
    Ok(CudaLibraries {
        driver_version,
        cublas,
        nvrtc,
        nvrtc_version,
    })
}

fn driver_version() -> std::result::Result<(u32, u32), String> {
    let mut version = 0;
    // SAFETY: libcuda is loadable (checked by the caller); cuDriverGetVersion writes one int and
    // needs no cuInit.
    let status = unsafe { cudarc::driver::sys::cuDriverGetVersion(&mut version) };
    if status != cudarc::driver::sys::CUresult::CUDA_SUCCESS {
        return Err(format!(
            "CUDA backend: cuDriverGetVersion failed: {status:?}"
        ));
    }
    // The driver encodes CUDA X.Y as 1000·X + 10·Y.
    Ok(((version / 1000) as u32, ((version % 1000) / 10) as u32))
}

/// A library cudarc loads by name, and how to find it elsewhere.
struct LibrarySpec {
    /// What the user would call it.
    name: &'static str,
    /// File name stem, e.g. `libcublas` (files are `<stem>.so.<major>`).
    stem: &'static str,
    /// Files in the same folder to load first (prefix match), e.g. NVRTC's builtins.
    companions: &'static [&'static str],
    /// A symbol the library exports, to ask the loader where it found it.
    symbol: &'static CStr,
    /// cudarc's check that it can load the library by one of its names.
    present: unsafe fn() -> bool,
    /// The pip package of CUDA `major`, for the error message.
    pip_package: fn(u32) -> String,
}

const CUBLAS: LibrarySpec = LibrarySpec {
    name: "cuBLAS",
    stem: "libcublas",
    companions: &["libcublasLt.so."],
    symbol: c"cublasCreate_v2",
    present: cudarc::cublas::sys::is_culib_present,
    pip_package: |major| format!("nvidia-cublas-cu{major}"),
};

const NVRTC: LibrarySpec = LibrarySpec {
    name: "NVRTC",
    stem: "libnvrtc",
    companions: &["libnvrtc-builtins.so."],
    symbol: c"nvrtcVersion",
    present: cudarc::nvrtc::sys::is_culib_present,
    pip_package: |major| format!("nvidia-cuda-nvrtc-cu{major}"),
};

/// Loads NVRTC alone (no driver needed), for compiling kernels on a machine without a GPU; `load`
/// is what the backend uses.
pub fn load_nvrtc() -> Result<FoundLibrary> {
    load_library(&NVRTC, None).map_err(KernelError::Unsupported)
}

/// The loader's copy of `spec` when it has one, else the newest one in the Python environment that
/// the driver (CUDA `driver_major`, any when `None`) supports, loaded by full path.
fn load_library(
    spec: &LibrarySpec,
    driver_major: Option<u32>,
) -> std::result::Result<FoundLibrary, String> {
    // SAFETY: is_culib_present only dlopens candidate names.
    if unsafe { (spec.present)() } {
        let path = cudarc::get_lib_name_candidates(&spec.stem["lib".len()..])
            .iter()
            .find_map(|name| loader_path(name, spec.symbol))
            .unwrap_or_default();
        return Ok(FoundLibrary {
            path,
            origin: Origin::LoaderPath,
        });
    }
    let majors: Vec<u32> = CUDA_MAJORS
        .into_iter()
        .filter(|&m| driver_major.is_none_or(|d| m <= d))
        .collect();
    let file_names: Vec<String> = majors
        .iter()
        .map(|m| format!("{}.so.{m}", spec.stem))
        .collect();
    let names: Vec<&str> = file_names.iter().map(String::as_str).collect();
    let Some(path) = find_in_python_environment(&names) else {
        let searched = python_library_dirs();
        let major = majors
            .first()
            .copied()
            .or(driver_major)
            .unwrap_or(CUDA_MAJORS[0]);
        return Err(format!(
            "CUDA backend: {} ({}) is neither on the loader's path nor in a Python environment's NVIDIA \
             wheels (searched {}): pip install {} (or put a CUDA toolkit's lib64 on LD_LIBRARY_PATH)",
            spec.name,
            names.join(" or "),
            if searched.is_empty() {
                "no site-packages/nvidia folder found".to_string()
            } else {
                searched
                    .iter()
                    .map(|d| d.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            },
            (spec.pip_package)(major)
        ));
    };
    let dir = path.parent().unwrap_or(Path::new("/"));
    for companion in companions_in(dir, spec.companions) {
        load_global(&companion)?;
    }
    load_global(&path)?;
    // SAFETY: as above.
    if !unsafe { (spec.present)() } {
        return Err(format!(
            "CUDA backend: loaded {} but cudarc still cannot open {} by name",
            path.display(),
            spec.name
        ));
    }
    Ok(FoundLibrary {
        path,
        origin: Origin::PythonEnvironment,
    })
}

/// Files in `dir` whose names start with one of `prefixes`, sorted.
fn companions_in(dir: &Path, prefixes: &[&str]) -> Vec<PathBuf> {
    let mut found: Vec<PathBuf> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name().is_some_and(|n| {
                let n = n.to_string_lossy();
                prefixes.iter().any(|prefix| n.starts_with(prefix))
            })
        })
        .collect();
    found.sort();
    found
}

/// Loads `path` for the whole process (`RTLD_NOW | RTLD_GLOBAL`), never unloaded.
pub fn load_global(path: &Path) -> std::result::Result<(), String> {
    let c_path = CString::new(path.as_os_str().as_encoded_bytes())
        .map_err(|_| format!("{}: a path with a NUL byte", path.display()))?;
    // SAFETY: dlopen with a valid C string; the handle is kept open for the process's life.
    let handle = unsafe { libc::dlopen(c_path.as_ptr(), libc::RTLD_NOW | libc::RTLD_GLOBAL) };
    if handle.is_null() {
        // SAFETY: dlerror returns a C string owned by libc, or null.
        let why = unsafe {
            let e = libc::dlerror();
            if e.is_null() {
                "unknown error".to_string()
            } else {
                CStr::from_ptr(e).to_string_lossy().into_owned()
            }
        };
        return Err(format!("cannot load {}: {why}", path.display()));
    }
    Ok(())
}

/// The file the dynamic loader opens for `name` (a bare soname, searched as `dlopen` searches),
/// found through where it put `symbol`; `None` when the loader cannot open `name`.
pub fn loader_path(name: &str, symbol: &CStr) -> Option<PathBuf> {
    let c_name = CString::new(name).ok()?;
    // SAFETY: dlopen/dlsym/dladdr with valid C strings; the file name is copied out before
    // dlclose (the library stays loaded only if something else holds it).
    unsafe {
        let handle = libc::dlopen(c_name.as_ptr(), libc::RTLD_LAZY | libc::RTLD_LOCAL);
        if handle.is_null() {
            return None;
        }
        let address = libc::dlsym(handle, symbol.as_ptr());
        let mut info: libc::Dl_info = std::mem::zeroed();
        let path = if !address.is_null()
            && libc::dladdr(address, &mut info) != 0
            && !info.dli_fname.is_null()
        {
            PathBuf::from(
                CStr::from_ptr(info.dli_fname)
                    .to_string_lossy()
                    .into_owned(),
            )
        } else {
            PathBuf::from(name)
        };
        libc::dlclose(handle);
        Some(path)
    }
}

/// The first of `file_names` (in order of preference) in the Python environment's NVIDIA library
/// folders: those near the binary and the active environments first, then those `python3` reports.
pub fn find_in_python_environment(file_names: &[&str]) -> Option<PathBuf> {
    let search = |dirs: &[PathBuf]| {
        file_names
            .iter()
            .find_map(|name| dirs.iter().map(|d| d.join(name)).find(|p| p.is_file()))
    };
    search(&nearby_library_dirs()).or_else(|| search(python_reported_library_dirs()))
}

/// Every NVIDIA library folder this module searches, in order.
pub fn python_library_dirs() -> Vec<PathBuf> {
    let mut dirs = nearby_library_dirs();
    for d in python_reported_library_dirs() {
        if !dirs.contains(d) {
            dirs.push(d.clone());
        }
    }
    dirs
}

/// `<nvidia>/*/lib` of the environments found without running Python: the binary's prefix,
/// `$VIRTUAL_ENV`, `$CONDA_PREFIX`.
fn nearby_library_dirs() -> Vec<PathBuf> {
    let mut prefixes = Vec::new();
    // pip puts the binary in <prefix>/bin (also ~/.local/bin for --user installs).
    if let Some(prefix) = std::env::current_exe()
        .and_then(|p| p.canonicalize())
        .ok()
        .and_then(|exe| exe.parent()?.parent().map(Path::to_path_buf))
    {
        prefixes.push(prefix);
    }
    for var in ["VIRTUAL_ENV", "CONDA_PREFIX"] {
        if let Some(prefix) = std::env::var_os(var).filter(|v| !v.is_empty()) {
            prefixes.push(PathBuf::from(prefix));
        }
    }
    let nvidia_dirs = prefixes.iter().flat_map(|p| site_packages_nvidia(p));
    let mut dirs = Vec::new();
    for dir in nvidia_dirs.flat_map(|n| library_dirs_in(&n)) {
        if !dirs.contains(&dir) {
            dirs.push(dir);
        }
    }
    dirs
}

/// `<prefix>/lib{,64}/python3.*/{site,dist}-packages/nvidia` folders that exist (Debian's
/// system Python, as on Kaggle and Colab, uses dist-packages).
fn site_packages_nvidia(prefix: &Path) -> Vec<PathBuf> {
    let mut found = Vec::new();
    for lib in ["lib", "lib64"] {
        let Ok(entries) = std::fs::read_dir(prefix.join(lib)) else {
            continue;
        };
        let mut pythons: Vec<PathBuf> = entries
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| {
                p.file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with("python3"))
            })
            .collect();
        pythons.sort();
        for python in pythons {
            for packages in ["site-packages", "dist-packages"] {
                let nvidia = python.join(packages).join("nvidia");
                if nvidia.is_dir() {
                    found.push(nvidia);
                }
            }
        }
    }
    found
}

/// `<nvidia>/<package>/lib` folders, sorted (`cu13/lib`, `cublas/lib`, `cuda_nvrtc/lib`, …).
fn library_dirs_in(nvidia: &Path) -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(nvidia)
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok().map(|e| e.path().join("lib")))
        .filter(|p| p.is_dir())
        .collect();
    dirs.sort();
    dirs
}

/// The library folders of `nvidia.__path__` as `python3` (else `python`) on PATH reports them;
/// asked once per process.
fn python_reported_library_dirs() -> &'static [PathBuf] {
    static DIRS: OnceLock<Vec<PathBuf>> = OnceLock::new();
    DIRS.get_or_init(|| {
        const SCRIPT: &str = "import nvidia\nfor p in nvidia.__path__: print(p)";
        let output = ["python3", "python"].iter().find_map(|python| {
            std::process::Command::new(python)
                .args(["-c", SCRIPT])
                .stderr(std::process::Stdio::null())
                .output()
                .ok()
                .filter(|o| o.status.success())
        });
        let Some(output) = output else {
            return Vec::new();
        };
        String::from_utf8_lossy(&output.stdout)
            .lines()
            .flat_map(|line| library_dirs_in(Path::new(line.trim())))
            .collect()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_wheel_library_folders_under_a_prefix() {
        let root = std::env::temp_dir().join(format!("fuselora-libs-{}", std::process::id()));
        let cu13 = root.join("lib/python3.11/site-packages/nvidia/cu13/lib");
        let nccl = root.join("lib/python3.11/site-packages/nvidia/nccl/lib");
        let debian = root.join("lib/python3.10/dist-packages/nvidia/cublas/lib");
        for d in [&cu13, &nccl, &debian] {
            std::fs::create_dir_all(d).unwrap();
        }
        std::fs::create_dir_all(root.join("lib/python3.11/site-packages/nvidia/no_lib")).unwrap();
        let dirs: Vec<PathBuf> = site_packages_nvidia(&root)
            .iter()
            .flat_map(|n| library_dirs_in(n))
            .collect();
        assert_eq!(dirs, vec![debian, cu13, nccl]);
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn companions_are_matched_by_prefix() {
        let dir = std::env::temp_dir().join(format!("fuselora-companions-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        for name in [
            "libnvrtc.so.13",
            "libnvrtc-builtins.so.13.2",
            "libnvrtc-builtins.so.13.0",
        ] {
            std::fs::write(dir.join(name), b"").unwrap();
        }
        let found = companions_in(&dir, &["libnvrtc-builtins.so."]);
        assert_eq!(
            found,
            vec![
                dir.join("libnvrtc-builtins.so.13.0"),
                dir.join("libnvrtc-builtins.so.13.2")
            ]
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
