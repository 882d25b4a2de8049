//! PEFT adapter folders: `adapter_config.json` + `adapter_model.safetensors`, with PEFT's key names
//! (`base_model.model.<module>.lora_A.weight`, A `[r, in]`, B `[out, r]`), so that
//! `PeftModel.from_pretrained(base, dir)` loads what we write and we load what PEFT writes.

use super::{LoraConfig, LoraParams};
use crate::arch::{ModelConfig, Projection};
use crate::io::{write_atomic, write_safetensors_f32};
use crate::weights::WeightFiles;
use anyhow::{anyhow, bail, Context, Result};
use kernels::Backend;
use serde_json::{json, Value};
use std::path::Path;

/// Reads `dir/adapter_config.json`, refusing what we cannot reproduce exactly.
pub fn read_config(dir: &Path) -> Result<LoraConfig> {
    let path = dir.join("adapter_config.json");
    let text = std::fs::read_to_string(&path).with_context(|| {
        format!(
            "cannot read {}: is this a PEFT adapter folder?",
            path.display()
        )
    })?;
    let v: Value = serde_json::from_str(&text)
        .with_context(|| format!("{} is not valid JSON", path.display()))?;
    config_from_json(&v).with_context(|| format!("in {}", path.display()))
}

fn config_from_json(v: &Value) -> Result<LoraConfig> {
    if let Some(t) = v.get("peft_type").and_then(Value::as_str) {
        if t != "LORA" {
            bail!("peft_type `{t}` is not supported: only LORA adapters");
        }
    }
    let r = v
        .get("r")
        .and_then(Value::as_u64)
        .ok_or_else(|| anyhow!("key `r` is missing"))? as usize;
    let alpha = v.get("lora_alpha").and_then(Value::as_f64).unwrap_or(8.0) as f32;
    let unsupported_true = ["use_dora", "fan_in_fan_out", "lora_bias"];
    for key in unsupported_true {
        if v.get(key).and_then(Value::as_bool) == Some(true) {
            bail!("`{key}: true` is not supported");
        }
    }
    if let Some(b) = v.get("bias").and_then(Value::as_str) {
        if b != "none" {
            bail!("`bias: \"{b}\"` is not supported: use \"none\"");
        }
    }
    for key in ["rank_pattern", "alpha_pattern"] {
        if v.get(key)
            .and_then(Value::as_object)
            .is_some_and(|o| !o.is_empty())
        {
            bail!("`{key}` (per-module ranks) is not supported");
        }
    }
    if let Some(modules) = v
        .get("modules_to_save")
        .and_then(Value::as_array)
        .filter(|m| !m.is_empty())
    {
        let names: Vec<String> = modules.iter().map(|m| m.to_string()).collect();
        bail!(
            "`modules_to_save: [{}]` is not supported: those modules were trained whole, and fuselora applies              LoRA matrices only, so they would be silently dropped; merge this adapter with PEFT (`merge_and_unload`)",
            names.join(", ")
        );
    }
    if v.get("layers_to_transform").is_some_and(|x| !x.is_null()) {
        bail!("`layers_to_transform` is not supported: adapters cover every layer");
    }
    let targets = parse_targets(v.get("target_modules"))?;
    Ok(LoraConfig {
        r,
        alpha,
        targets,
        use_rslora: v
            .get("use_rslora")
            .and_then(Value::as_bool)
            .unwrap_or(false),
        dropout: v.get("lora_dropout").and_then(Value::as_f64).unwrap_or(0.0) as f32,
    })
}

/// `target_modules`: a list of module names, or `"all-linear"`.
pub fn parse_targets(v: Option<&Value>) -> Result<Vec<Projection>> {
    match v {
        Some(Value::String(s)) if s == "all-linear" => Ok(Projection::ALL.to_vec()),
        Some(Value::Array(items)) => items
            .iter()
            .map(|item| {
                let name = item.as_str().ok_or_else(|| anyhow!("target_modules entries must be strings"))?;
                Projection::from_name(name).ok_or_else(|| {
                    anyhow!(
                        "target module `{name}` is not supported; choose among {}",
                        Projection::ALL.map(|p| p.name()).join(", ")
                    )
                })
            })
            .collect(),
        Some(other) => bail!("target_modules {other} is not supported: give a list of module names or \"all-linear\""),
        None => bail!("key `target_modules` is missing"),
    }
}

/// Loads the adapter in `dir` for `model` onto the backend.
pub fn load<B: Backend>(be: &B, model: &ModelConfig, dir: &Path) -> Result<LoraParams<B>> {
    let config = read_config(dir)?;
    let path = dir.join("adapter_model.safetensors");
    if !path.exists() {
        bail!("{} is missing (adapter_model.bin pickles are refused; re-save the adapter with safe_serialization)", path.display());
    }
    let files = WeightFiles::open_file(&path)?;
    let lora = LoraParams::build(be, model, config, |name, shape| files.f32(name, &shape))?;
    if let Some(unused) = files.names().find(|n| !lora.names.iter().any(|m| m == n)) {
        bail!(
            "{}: tensor `{unused}` is not one of the adapter's LoRA matrices for this model, and would be ignored:              is the adapter for another model, or does it hold more than LoRA weights?",
            path.display()
        );
    }
    Ok(lora)
}

/// Writes `lora` as a PEFT adapter folder.
pub fn save<B: Backend>(be: &B, lora: &LoraParams<B>, base_model: &str, dir: &Path) -> Result<()> {
    let what = format!("the adapter {}", dir.display());
    crate::finite::refuse_non_finite(be, &lora.params, &lora.names, &what)?;
    let c = &lora.config;
    let mut targets: Vec<&str> = c.targets.iter().map(|p| p.name()).collect();
    targets.sort();
    let config = json!({
        "alpha_pattern": {},
        "auto_mapping": null,
        "base_model_name_or_path": base_model,
        "bias": "none",
        "fan_in_fan_out": false,
        "inference_mode": true,
        "init_lora_weights": true,
        "layers_pattern": null,
        "layers_to_transform": null,
        "lora_alpha": c.alpha,
        "lora_dropout": c.dropout,
        "modules_to_save": null,
        "peft_type": "LORA",
        "r": c.r,
        "rank_pattern": {},
        "revision": null,
        "target_modules": targets,
        "task_type": "CAUSAL_LM",
        "use_dora": false,
        "use_rslora": c.use_rslora,
    });
    let tensors: Vec<(String, Vec<usize>, Vec<f32>)> = lora
        .download_params(be)?
        .into_iter()
        .map(|(n, s, v)| (n, s.to_vec(), v))
        .collect();
    write_safetensors_f32(&dir.join("adapter_model.safetensors"), &tensors)?;
    write_atomic(
        &dir.join("adapter_config.json"),
        serde_json::to_string_pretty(&config)?.as_bytes(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unsupported_settings_are_refused_by_name() {
        let e = config_from_json(&json!({"r": 4, "target_modules": ["q_proj"], "use_dora": true}))
            .unwrap_err();
        assert!(e.to_string().contains("use_dora"));
        let e = config_from_json(&json!({"r": 4, "target_modules": ["lm_head"]})).unwrap_err();
        assert!(e.to_string().contains("lm_head") && e.to_string().contains("q_proj"));
        let e = config_from_json(
            &json!({"r": 4, "target_modules": ["q_proj"], "modules_to_save": ["lm_head"]}),
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("modules_to_save") && e.contains("\"lm_head\"") && e.contains("dropped"),
            "{e}"
        );
        config_from_json(&json!({"r": 4, "target_modules": ["q_proj"], "modules_to_save": null}))
            .unwrap();
        let c = config_from_json(
            &json!({"r": 8, "lora_alpha": 16, "target_modules": "all-linear", "use_rslora": true}),
        )
        .unwrap();
        assert_eq!(c.targets.len(), 7);
        assert!((c.scaling() - 16.0 / 8f32.sqrt()).abs() < 1e-6);
    }
}
