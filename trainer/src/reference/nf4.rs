//! The NF4 reference cases (tests/fixtures/README.md §8): `nf4_quant` re-quantizes each matrix and
//! compares codes, packed bytes and absmax exactly and every dequantized value bit for bit;
//! `qlora_sft` is the SFT case on a bitsandbytes 4-bit checkpoint, plus the `W'` each quantized
//! linear multiplies with (dequantized by the backend) and its decoded absmax, both exact.

use super::{sft, Comparison};
use crate::model::bnb_checkpoint::read_nf4;
use crate::model::weights::WeightFiles;
use crate::model::{ModelConfig, Nf4Tensor, Projection};
use anyhow::{anyhow, Context, Result};
use kernels::nf4::double_quant::{absmax_mean, code8_lut, nearest_code8, DoubleQuantAbsmax};
use kernels::nf4::{self, DYNAMIC_MAP, NF4_CODE};
use kernels::{Backend, DType};
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::Path;

/// f32 values compared for identity (an f32 widens to f64 exactly).
fn bits(values: &[f32]) -> Comparison {
    Comparison::Absolute {
        got: values.iter().map(|&x| x as f64).collect(),
        tol: 0.0,
        mask: None,
    }
}

fn bytes(values: &[u8]) -> Comparison {
    Comparison::Exact {
        got: values.iter().map(|&x| x as i64).collect(),
    }
}

/// `nf4_quant`: every matrix of `inputs.safetensors` listed in `case.json → matrices`.
pub fn run_quant(dir: &Path, case: &Value) -> Result<BTreeMap<String, Comparison>> {
    let inputs = WeightFiles::open_file(&dir.join("inputs.safetensors"))?;
    let expected = WeightFiles::open_file(&dir.join("expected.safetensors"))?;
    let matrices = case
        .get("matrices")
        .and_then(Value::as_object)
        .ok_or_else(|| anyhow!("case.json has no `matrices` object"))?;
    let mut out = BTreeMap::new();
    out.insert("quant_map".into(), bits(&NF4_CODE));
    out.insert("nf4_midpoints".into(), bits(&nf4::nf4_midpoints()));
    out.insert("nested_quant_map".into(), bits(&DYNAMIC_MAP));
    out.insert("nested_quant_map_lut".into(), bytes(code8_lut()));
    for (name, m) in matrices {
        let shape: Vec<usize> = serde_json::from_value(m.get("shape").cloned().unwrap_or_default())
            .with_context(|| format!("case.json matrices.{name}.shape"))?;
        let x = inputs.f32(name, &shape)?;
        let (codes, absmax) = nf4::quantize(&x);
        let packed = nf4::pack(&codes);
        out.insert(format!("{name}/codes"), bytes(&codes));
        out.insert(format!("{name}/plain/packed"), bytes(&packed));
        out.insert(format!("{name}/double/packed"), bytes(&packed));
        out.insert(format!("{name}/plain/absmax"), bits(&absmax));
        out.insert(
            format!("{name}/plain/dequantized"),
            bits(&nf4::dequantize(&packed, &absmax, x.len())),
        );
        // The stored offset came from a pairwise f32 sum; ours may be 1 ulp away (≈ 1.2e-7 relative).
        out.insert(
            format!("{name}/double/offset"),
            Comparison::Relative {
                got: vec![absmax_mean(&absmax) as f64],
                tol: 2.5e-7,
                mask: None,
            },
        );
        let offset = expected.f32(&format!("{name}/double/offset"), &[1])?[0];
        let double = DoubleQuantAbsmax::quantize(&absmax, offset);
        let nearest = DoubleQuantAbsmax::quantize_with(&absmax, offset, nearest_code8);
        let decoded = double.decode();
        out.insert(format!("{name}/double/absmax"), bytes(&double.codes));
        out.insert(
            format!("{name}/double/absmax_nearest_rule"),
            bytes(&nearest.codes),
        );
        out.insert(
            format!("{name}/double/nested_absmax"),
            bits(&double.nested_absmax),
        );
        out.insert(format!("{name}/double/absmax_dequantized"), bits(&decoded));
        out.insert(
            format!("{name}/double/dequantized"),
            bits(&nf4::dequantize(&packed, &decoded, x.len())),
        );
    }
    Ok(out)
}

/// `qlora_sft`: the SFT comparisons on the 4-bit model, plus each projection's `W'` and `A`.
pub fn run_qlora<B: Backend>(
    be: &B,
    dir: &Path,
    case: &Value,
) -> Result<BTreeMap<String, Comparison>> {
    let mut out = sft::run(be, dir, case)?;
    let model_dir = dir.join(
        case.get("model")
            .and_then(|m| m.get("dir"))
            .and_then(Value::as_str)
            .unwrap_or("model"),
    );
    let config = ModelConfig::load(&model_dir)?;
    let files = WeightFiles::open(&model_dir)?;
    for layer in 0..config.num_layers {
        for p in Projection::ALL {
            let name = format!("{}.weight", p.module_path(layer));
            let (o, i) = p.shape(&config);
            let w = read_nf4(&files, &name, [o, i])?;
            let mut dense = be.zeros(w.n, DType::F32)?;
            Nf4Tensor::upload(be, &w)?.dequantize_into(be, i, i, None, &mut dense)?;
            out.insert(format!("dequantized/{name}"), bits(&be.download(&dense)?));
            out.insert(
                format!("absmax_dequantized/{name}"),
                bits(&w.block_absmax()),
            );
        }
    }
    Ok(out)
}
