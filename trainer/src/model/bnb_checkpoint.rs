//! bitsandbytes 4-bit checkpoints as transformers saves them (tests/fixtures/README.md §8.3):
//! `config.json → quantization_config` (`quant_method "bitsandbytes"`, `load_in_4bit`, NF4) and,
//! per quantized weight `W`, six tensors: `W` (packed codes, U8), `W.absmax` (U8 codes with double
//! quantization, else F32), `W.nested_absmax`, `W.nested_quant_map`, `W.quant_map` and
//! `W.quant_state.bitsandbytes__nf4` (the quant state as UTF-8 JSON bytes).

use crate::weights::{to_f32, WeightFiles};
use anyhow::{anyhow, bail, Context, Result};
use kernels::nf4::{self, Absmax, DoubleQuantAbsmax, Nf4Weight, DYNAMIC_MAP, NF4_CODE};
use kernels::DType;
use safetensors::Dtype;
use serde_json::Value;

/// The 4-bit settings of a bitsandbytes checkpoint.
#[derive(Clone, Debug, PartialEq)]
pub struct Bnb4Bit {
    /// `bnb_4bit_compute_dtype`, when given.
    pub compute_dtype: Option<DType>,
    pub double_quant: bool,
}

/// Reads `quantization_config` from a config.json object: `None` for a dense checkpoint, the
/// 4-bit NF4 settings for bitsandbytes, an error naming the key for anything fuselora cannot train on.
pub fn quantization_of(config: &Value) -> Result<Option<Bnb4Bit>> {
    let Some(q) = config.get("quantization_config") else {
        return Ok(None);
    };
    let method = q
        .get("quant_method")
        .and_then(Value::as_str)
        .unwrap_or("(missing)");
    if method != "bitsandbytes" {
        bail!(
            "config.json: quantization_config.quant_method is `{method}`; fuselora trains on dense \
             checkpoints and bitsandbytes 4-bit NF4 ones. Use the unquantized model (QLoRA can quantize \
             it at load with `[model] quantize = \"nf4\"`)"
        );
    }
    let flag = |key: &str| q.get(key).and_then(Value::as_bool).unwrap_or(false);
    if !flag("load_in_4bit") {
        bail!(
            "config.json: quantization_config is bitsandbytes without `load_in_4bit: true` (8-bit \
             LLM.int8 weights); fuselora reads only 4-bit NF4 checkpoints. Use the unquantized model"
        );
    }
    let kind = q
        .get("bnb_4bit_quant_type")
        .and_then(Value::as_str)
        .unwrap_or("fp4");
    if kind != "nf4" {
        bail!("config.json: quantization_config.bnb_4bit_quant_type is `{kind}`; fuselora reads only `nf4`");
    }
    let compute_dtype = match q.get("bnb_4bit_compute_dtype").and_then(Value::as_str) {
        None => None,
        Some(s) => Some(DType::parse(s).ok_or_else(|| {
            anyhow!("config.json: quantization_config.bnb_4bit_compute_dtype `{s}` is not float32, bfloat16 or float16")
        })?),
    };
    Ok(Some(Bnb4Bit {
        compute_dtype,
        double_quant: flag("bnb_4bit_use_double_quant"),
    }))
}

/// Reads the NF4 weight `name` (`…q_proj.weight`) of shape `[out, in]` from its six tensors.
pub fn read_nf4(files: &WeightFiles, name: &str, shape: [usize; 2]) -> Result<Nf4Weight> {
    let state_name = format!("{name}.quant_state.bitsandbytes__nf4");
    let (_, state_bytes) = files.bytes(&state_name)?;
    let state: Value = serde_json::from_slice(&state_bytes)
        .with_context(|| format!("tensor `{state_name}` does not hold a JSON quant state"))?;
    let field = |key: &str| {
        state
            .get(key)
            .ok_or_else(|| anyhow!("`{state_name}` has no `{key}`"))
    };
    let stored_shape: Vec<usize> = serde_json::from_value(field("shape")?.clone())
        .with_context(|| format!("`{state_name}`: `shape`"))?;
    if stored_shape != shape {
        bail!("`{state_name}`: shape {stored_shape:?}, but config.json implies {shape:?}");
    }
    let blocksize = field("blocksize")?.as_u64();
    if blocksize != Some(nf4::BLOCK as u64) || field("quant_type")?.as_str() != Some("nf4") {
        bail!("`{state_name}`: fuselora reads quant_type nf4 with blocksize 64, found {state}");
    }
    let n = shape[0] * shape[1];
    let (_, packed) = files.bytes(name)?;
    if packed.len() != n.div_ceil(2) {
        bail!(
            "`{name}`: {} packed bytes for {n} elements, expected {}",
            packed.len(),
            n.div_ceil(2)
        );
    }
    same_table(files, &format!("{name}.quant_map"), &NF4_CODE)?;
    let absmax_name = format!("{name}.absmax");
    let (absmax_shape, absmax_dtype) = files.info(&absmax_name)?;
    let blocks = nf4::n_blocks(n);
    let absmax = if absmax_dtype == Dtype::U8 {
        same_table(files, &format!("{name}.nested_quant_map"), &DYNAMIC_MAP)?;
        let offset = field("nested_offset")?
            .as_f64()
            .ok_or_else(|| anyhow!("`{state_name}`: `nested_offset` is not a number"))?
            as f32;
        let nested_name = format!("{name}.nested_absmax");
        let nested_absmax = files.f32(&nested_name, &[blocks.div_ceil(256)])?;
        let (_, codes) = files.bytes(&absmax_name)?;
        Absmax::Double(DoubleQuantAbsmax {
            codes,
            nested_absmax,
            offset,
        })
    } else {
        Absmax::Plain(files.f32(&absmax_name, &[blocks])?)
    };
    if absmax_shape.iter().product::<usize>() != blocks {
        bail!("`{absmax_name}` has shape {absmax_shape:?}, expected {blocks} blocks");
    }
    Ok(Nf4Weight { n, packed, absmax })
}

/// Checks that a stored lookup table is the one fuselora decodes with.
fn same_table(files: &WeightFiles, name: &str, want: &[f32]) -> Result<()> {
    let (_, dtype) = files.info(name)?;
    let got = to_f32(dtype, &files.bytes(name)?.1)?;
    if got.len() != want.len()
        || got
            .iter()
            .zip(want)
            .any(|(a, b)| a.to_bits() != b.to_bits())
    {
        bail!("`{name}` is not bitsandbytes' standard table; fuselora decodes only the standard NF4 format");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn dense_bnb_nf4_and_refused_methods() {
        assert_eq!(quantization_of(&json!({"hidden_size": 8})).unwrap(), None);
        let nf4 = json!({"quantization_config": {"quant_method": "bitsandbytes", "load_in_4bit": true,
            "bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": true, "bnb_4bit_compute_dtype": "bfloat16"}});
        assert_eq!(
            quantization_of(&nf4).unwrap(),
            Some(Bnb4Bit {
                compute_dtype: Some(DType::BF16),
                double_quant: true
            })
        );
        for (config, needle) in [
            (
                json!({"quantization_config": {"quant_method": "gptq", "bits": 4}}),
                "quant_method is `gptq`",
            ),
            (
                json!({"quantization_config": {"quant_method": "awq"}}),
                "quant_method is `awq`",
            ),
            (
                json!({"quantization_config": {"quant_method": "bitsandbytes", "load_in_8bit": true}}),
                "8-bit",
            ),
            (
                json!({"quantization_config": {"quant_method": "bitsandbytes", "load_in_4bit": true,
                "bnb_4bit_quant_type": "fp4"}}),
                "`fp4`",
            ),
        ] {
            let e = quantization_of(&config).unwrap_err().to_string();
            assert!(
                e.contains(needle) && e.contains("quantization_config"),
                "{e}"
            );
        }
    }
}
