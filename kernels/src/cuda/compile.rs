//! The CUDA C sources under `kernels/cuda/`, embedded in the binary, and their compilation by
//! NVRTC to PTX for one architecture (compute capability 9.0 as `compute_90a`, so that the Hopper
//! kernels may use wgmma). Each source is compiled with `common.cuh` and the headers it names
//! prepended, so no CUDA header or include path is needed on any NVRTC version. PTX is cached on disk under
//! `$FUSELORA_KERNEL_CACHE`, else `$XDG_CACHE_HOME/fuselora/kernels`, else `~/.cache/fuselora/kernels`,
//! keyed by a hash of the source, the architecture and the NVRTC version; a failed compile returns
//! the compiler's log.

use crate::KernelError;
use cudarc::nvrtc::{result as nvrtc, sys as nvrtc_sys};
use std::collections::hash_map::DefaultHasher;
use std::ffi::CString;
use std::hash::{Hash, Hasher};
use std::path::PathBuf;

const COMMON: &str = include_str!("../../cuda/common.cuh");
const ATTENTION: &str = include_str!("../../cuda/attention.cuh");
const WGMMA: &str = include_str!("../../cuda/wgmma.cuh");
const PLACE_BLOCK: &str = include_str!("../../cuda/place_block.cuh");

/// One kernel file, the headers prepended to it (after `common.cuh`, as `(file name, text)`) and the
/// entry points the backend loads from it.
pub struct KernelSource {
    pub name: &'static str,
    pub source: &'static str,
    pub headers: &'static [(&'static str, &'static str)],
    pub entry_points: fn() -> Vec<String>,
}

const DTYPES: [&str; 3] = ["f32", "bf16", "f16"];

fn per_dtype(ops: &[&str]) -> Vec<String> {
    ops.iter()
        .flat_map(|op| DTYPES.iter().map(move |t| format!("{op}_{t}")))
        .collect()
}

/// The tensor-core attention kernels: forward (mma.sync and wgmma) and the wgmma backward per head
/// size, the mma.sync backward per (head size, warps).
fn attention_mma(op: &str) -> Vec<String> {
    let variants: Vec<String> = match op {
        "attention_backward_mma" => super::attention::BACKWARD_MMA_VARIANTS
            .map(|(d, w)| format!("d{d}_w{w}"))
            .to_vec(),
        _ => [64, 128].map(|d| format!("d{d}")).to_vec(),
    };
    ["bf16", "f16"]
        .iter()
        .flat_map(|t| variants.iter().map(move |v| format!("{op}_{t}_{v}")))
        .collect()
}

/// Every kernel file, in the order the backend loads them.
pub const KERNEL_SOURCES: &[KernelSource] = &[
    KernelSource {
        name: "rmsnorm",
        source: include_str!("../../cuda/rmsnorm.cu"),
        headers: &[],
        entry_points: || per_dtype(&["rms_norm_forward", "rms_norm_backward"]),
    },
    KernelSource {
        name: "rope",
        source: include_str!("../../cuda/rope.cu"),
        headers: &[],
        entry_points: || per_dtype(&["rope", "rope_from_f32"]),
    },
    KernelSource {
        name: "broadcast",
        source: include_str!("../../cuda/broadcast.cu"),
        headers: &[],
        entry_points: || per_dtype(&["broadcast_rows"]),
    },
    KernelSource {
        name: "place_block",
        source: include_str!("../../cuda/place_block.cu"),
        headers: &[("place_block.cuh", PLACE_BLOCK)],
        entry_points: || per_dtype(&["place_block", "place_blocks"]),
    },
    KernelSource {
        name: "swiglu",
        source: include_str!("../../cuda/swiglu.cu"),
        headers: &[],
        entry_points: || per_dtype(&["swiglu_forward", "swiglu_backward"]),
    },
    KernelSource {
        name: "embedding",
        source: include_str!("../../cuda/embedding.cu"),
        headers: &[],
        entry_points: || per_dtype(&["embedding"]),
    },
    KernelSource {
        name: "attention_fwd",
        source: include_str!("../../cuda/attention_fwd.cu"),
        headers: &[("attention.cuh", ATTENTION)],
        entry_points: || {
            let mut names = attention_mma("attention_forward_mma");
            names.extend(per_dtype(&["attention_forward_simple"]));
            names
        },
    },
    KernelSource {
        name: "attention_bwd",
        source: include_str!("../../cuda/attention_bwd.cu"),
        headers: &[("attention.cuh", ATTENTION)],
        entry_points: || {
            let mut names = attention_mma("attention_backward_mma");
            names.extend(per_dtype(&[
                "attention_backward_dot",
                "attention_backward_group_sum",
                "attention_backward_simple_dq",
                "attention_backward_simple_dkdv",
            ]));
            names
        },
    },
    KernelSource {
        name: "attention_fwd_hopper",
        source: include_str!("../../cuda/attention_fwd_hopper.cu"),
        headers: &[("attention.cuh", ATTENTION), ("wgmma.cuh", WGMMA)],
        entry_points: || attention_mma("attention_forward_wgmma"),
    },
    KernelSource {
        name: "attention_bwd_hopper",
        source: include_str!("../../cuda/attention_bwd_hopper.cu"),
        headers: &[("attention.cuh", ATTENTION), ("wgmma.cuh", WGMMA)],
        entry_points: || attention_mma("attention_backward_wgmma"),
    },
    KernelSource {
        name: "lora_dy",
        source: include_str!("../../cuda/lora_dy.cu"),
        headers: &[],
        entry_points: || {
            ["bf16", "f16"]
                .iter()
                .flat_map(|t| {
                    super::lora_dy::PADDED_RANKS.map(|rp| format!("lora_dy_products_{t}_r{rp}"))
                })
                .collect()
        },
    },
    KernelSource {
        name: "generation",
        source: include_str!("../../cuda/generation.cu"),
        headers: &[],
        entry_points: || per_dtype(&["write_cache", "attention_cached"]),
    },
    KernelSource {
        name: "random",
        source: include_str!("../../cuda/random.cu"),
        headers: &[],
        entry_points: || per_dtype(&["fill_random"]),
    },
    KernelSource {
        name: "cross_entropy",
        source: include_str!("../../cuda/cross_entropy.cu"),
        headers: &[],
        entry_points: || per_dtype(&["softmax_cross_entropy"]),
    },
    KernelSource {
        name: "adamw",
        source: include_str!("../../cuda/adamw.cu"),
        headers: &[],
        entry_points: || vec!["adamw_multi_f32".to_string()],
    },
    KernelSource {
        name: "reduce",
        source: include_str!("../../cuda/reduce.cu"),
        headers: &[],
        entry_points: || {
            vec![
                "sum_squares_multi".to_string(),
                "all_finite_multi".to_string(),
            ]
        },
    },
    KernelSource {
        name: "nf4",
        source: include_str!("../../cuda/nf4.cu"),
        headers: &[],
        entry_points: || {
            per_dtype(&[
                "nf4_dequantize_plain",
                "nf4_dequantize_double",
                "nf4_dequantize_plain_padded",
                "nf4_dequantize_double_padded",
            ])
        },
    },
    KernelSource {
        name: "nf4_quantize",
        source: include_str!("../../cuda/nf4_quantize.cu"),
        headers: &[],
        entry_points: || {
            let mut names = per_dtype(&["nf4_quantize"]);
            names.push("nf4_double_quant".to_string());
            names
        },
    },
    KernelSource {
        name: "cast",
        source: include_str!("../../cuda/cast.cu"),
        headers: &[],
        entry_points: || {
            let mut names: Vec<String> = DTYPES
                .iter()
                .flat_map(|s| {
                    DTYPES
                        .iter()
                        .flat_map(move |d| [format!("cast_{s}_{d}"), format!("axpy_{s}_{d}")])
                })
                .collect();
            names.extend(per_dtype(&["scale", "cast_multi_f32"]));
            names.push("zero_multi_f32".to_string());
            names.push("axpy_blocks_f32".to_string());
            names
        },
    },
];

/// The full text NVRTC compiles for `source`: the shared header, the file's headers, then the file.
/// For kernel work, `FUSELORA_KERNEL_SOURCE_DIR` names a folder whose `common.cuh`, headers and
/// `<name>.cu`, where present, replace the embedded copies (variants tried on a GPU machine without
/// rebuilding the binary).
pub fn full_source(source: &KernelSource) -> String {
    let from_dir = |file: &str| {
        std::env::var_os("FUSELORA_KERNEL_SOURCE_DIR")
            .and_then(|dir| std::fs::read_to_string(PathBuf::from(dir).join(file)).ok())
    };
    let mut text = from_dir("common.cuh").unwrap_or_else(|| COMMON.to_string());
    for (file, embedded) in source.headers {
        let header = from_dir(file).unwrap_or_else(|| embedded.to_string());
        text.push_str(&format!("\n#line 1 \"{file}\"\n{header}"));
    }
    let body =
        from_dir(&format!("{}.cu", source.name)).unwrap_or_else(|| source.source.to_string());
    text.push_str(&format!("\n#line 1 \"{}.cu\"\n{body}", source.name));
    text
}

/// NVRTC's version, `(major, minor)`.
pub fn nvrtc_version() -> Result<(i32, i32), KernelError> {
    let (mut major, mut minor) = (0, 0);
    unsafe { nvrtc_sys::nvrtcVersion(&mut major, &mut minor) }
        .result()
        .map_err(|e| KernelError::Device {
            op: "nvrtc version",
            message: format!("{e:?}"),
        })?;
    Ok((major, minor))
}

/// Compiles `source` to PTX for compute capability `arch` (e.g. 90 for sm_90), no cache.
pub fn compile_to_ptx(source: &KernelSource, arch: u32) -> Result<String, KernelError> {
    let text = CString::new(full_source(source)).expect("kernel sources contain no NUL byte");
    let name =
        CString::new(format!("{}.cu", source.name)).expect("kernel names contain no NUL byte");
    let fail = |e: nvrtc::NvrtcError| KernelError::Compile {
        name: source.name.to_string(),
        log: format!("{e:?}"),
    };
    let prog = nvrtc::create_program(&text, Some(&name)).map_err(fail)?;
    // 9.0 as 90a: the architecture-specific target that admits wgmma (a 9.x GPU runs no other).
    let target = if arch == 90 {
        "90a".to_string()
    } else {
        arch.to_string()
    };
    let options = [
        format!("--gpu-architecture=compute_{target}"),
        "--std=c++17".to_string(),
        "-lineinfo".to_string(),
    ];
    let compiled = unsafe { nvrtc::compile_program(prog, &options) };
    let result = match compiled {
        Err(e) => {
            let log = unsafe { nvrtc::get_program_log(prog) }
                .map(|raw| c_chars_to_string(&raw))
                .unwrap_or_default();
            Err(KernelError::Compile {
                name: source.name.to_string(),
                log: format!("{e:?}\n{log}"),
            })
        }
        Ok(()) => unsafe { nvrtc::get_ptx(prog) }
            .map(|raw| c_chars_to_string(&raw))
            .map_err(fail),
    };
    unsafe { nvrtc::destroy_program(prog) }.map_err(fail)?;
    result
}

fn c_chars_to_string(raw: &[std::ffi::c_char]) -> String {
    let bytes: Vec<u8> = raw
        .iter()
        .take_while(|&&c| c != 0)
        .map(|&c| c as u8)
        .collect();
    String::from_utf8_lossy(&bytes).into_owned()
}

/// Where compiled PTX is kept between runs.
pub fn cache_dir() -> Option<PathBuf> {
    if let Some(dir) = std::env::var_os("FUSELORA_KERNEL_CACHE") {
        return Some(PathBuf::from(dir));
    }
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))?;
    Some(base.join("fuselora").join("kernels"))
}

/// PTX for `source` on `arch`, from the disk cache when an entry for this exact source, arch and
/// NVRTC version exists, else compiled and stored (written to a temporary name, then renamed).
pub fn cached_ptx(source: &KernelSource, arch: u32) -> Result<String, KernelError> {
    let (major, minor) = nvrtc_version()?;
    let mut hasher = DefaultHasher::new();
    full_source(source).hash(&mut hasher);
    let key = format!(
        "{}-sm{arch}-nvrtc{major}.{minor}-{:016x}.ptx",
        source.name,
        hasher.finish()
    );
    let path = cache_dir().map(|d| d.join(&key));
    if let Some(p) = &path {
        if let Ok(ptx) = std::fs::read_to_string(p) {
            return Ok(ptx);
        }
    }
    let ptx = compile_to_ptx(source, arch)?;
    if let Some(p) = &path {
        // A cache that cannot be written only costs a recompile next time.
        if let Some(dir) = p.parent() {
            let _ = std::fs::create_dir_all(dir);
        }
        let tmp = p.with_extension(format!("tmp{}", std::process::id()));
        if std::fs::write(&tmp, &ptx).is_ok() {
            let _ = std::fs::rename(&tmp, p);
        }
    }
    Ok(ptx)
}
