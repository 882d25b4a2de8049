//! End-to-end training on the tiny fixture model (tests/fixtures/tiny-llama/model) with a
//! byte-level tokenizer (tests/fixtures/byte-tokenizer): the loss falls on held-out data, the saved
//! PEFT adapter reproduces the trained model, resuming is bitwise identical, and bad input is
//! reported clearly.

mod support;

use kernels::cpu::CpuBackend;
use std::path::{Path, PathBuf};
use std::process::Command;
use support::{fixtures, tiny_chat_model};
use trainer::lora::peft;
use trainer::model::weights::WeightFiles;
use trainer::train::checkpoint::Resume;
use trainer::train::config::RunConfig;
use trainer::train::method::Sums;
use trainer::train::metrics::read_steps;
use trainer::train::run::{load_model, train};
use trainer::train::sft::{evaluate, Sft};

/// 80 alpaca records with a learnable answer pattern.
fn dataset(dir: &Path) -> PathBuf {
    let colors = ["red", "blue", "green", "gold"];
    let lines: Vec<String> = (0..80)
        .map(|i| {
            let c = colors[i % 4];
            format!(r#"{{"instruction": "Colour {i}?", "output": "It is {c}. It is {c}."}}"#)
        })
        .collect();
    let p = dir.join("data.jsonl");
    std::fs::write(&p, lines.join("\n")).unwrap();
    p
}

fn config(dir: &Path, extra: &str) -> RunConfig {
    config_with(dir, extra, &[])
}

fn config_with(dir: &Path, extra: &str, overrides: &[String]) -> RunConfig {
    let text = format!(
        r#"
[model]
path = "{model}"
backend = "cpu"
[lora]
r = 4
alpha = 8
[data]
train = ["{data}"]
max_seq_len = 64
validation_split = 0.1
[train]
batch_size = 4
grad_accum = 2
lr = 1e-2
schedule = "linear"
warmup_steps = 2
seed = 3
{extra}
[output]
dir = "{out}"
"#,
        model = tiny_chat_model(dir, "model").display(),
        data = dataset(dir).display(),
        out = dir.join("out").display()
    );
    let path = dir.join("run.toml");
    std::fs::write(&path, text).unwrap();
    RunConfig::load(&path, overrides).unwrap()
}

#[test]
fn training_lowers_held_out_loss_and_the_saved_adapter_reproduces_it() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), "max_steps = 30\neval_steps = 10");
    let be = CpuBackend::new();
    let summary = train(&be, &cfg, Resume::No).unwrap();
    let (start, end) = (
        summary.eval_loss_start.unwrap(),
        summary.eval_loss_end.unwrap(),
    );
    assert!(end < start * 0.6, "held-out loss {start} → {end}");

    // Reload the written adapter: the held-out loss is the same to the bit.
    let out = dir.path().join("out");
    let model = load_model(&be, &cfg).unwrap();
    let sft = Sft::prepare(&cfg, model.config.vocab_size).unwrap();
    let lora = peft::load(&be, &model.config, &out.join("adapter")).unwrap();
    let batching = trainer::data::batching::Batching {
        rows: 4,
        max_seq_len: 64,
        packing: true,
        pad_id: 0,
    };
    let reloaded = evaluate(&be, &model, Some(&lora), &sft.eval, &batching)
        .unwrap()
        .loss();
    assert_eq!(reloaded, end);

    // The files follow PEFT's format: the fixture adapter (written by PEFT) is the model.
    let ours: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(out.join("adapter/adapter_config.json")).unwrap(),
    )
    .unwrap();
    let peft_cfg: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixtures().join("tiny-llama/adapter/adapter_config.json"))
            .unwrap(),
    )
    .unwrap();
    for (k, v) in ours.as_object().unwrap() {
        let theirs = peft_cfg
            .get(k)
            .unwrap_or_else(|| panic!("adapter_config key `{k}` is not one PEFT writes"));
        if !theirs.is_null() && !v.is_null() {
            assert_eq!(
                std::mem::discriminant(v),
                std::mem::discriminant(theirs),
                "type of `{k}`"
            );
        }
    }
    assert_eq!(
        (ours["r"].as_u64(), ours["lora_alpha"].as_f64()),
        (Some(4), Some(8.0))
    );
    let ours_t = WeightFiles::open_file(&out.join("adapter/adapter_model.safetensors")).unwrap();
    let peft_t =
        WeightFiles::open_file(&fixtures().join("tiny-llama/adapter/adapter_model.safetensors"))
            .unwrap();
    let names: Vec<&str> = ours_t.names().collect();
    assert_eq!(names, peft_t.names().collect::<Vec<_>>());
    for n in names {
        assert_eq!(ours_t.info(n).unwrap(), peft_t.info(n).unwrap(), "{n}");
    }
    for f in [
        "metrics.jsonl",
        "loss.png",
        "summary.json",
        "checkpoint-30/trainer_state.json",
    ] {
        assert!(out.join(f).exists(), "{f} was not written");
    }
    let (steps, _) = read_steps(&out.join("metrics.jsonl")).unwrap();
    assert_eq!(steps.len(), 30);
    // Each step logs its real tokens and, of those, the labelled ones; 2 micro-batches of
    // 4 rows × 64 slots hold at most 512.
    for r in &steps {
        assert!(
            0 < r.loss_tokens && r.loss_tokens < r.tokens && r.tokens <= 512,
            "{r:?}"
        );
    }
    let trained: u64 = steps.iter().map(|r| r.loss_tokens).sum();
    assert_eq!(trained, summary.tokens_trained);
    // summary.json carries the fill of the packed micro-batches, as the batching computes it.
    let written: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("summary.json")).unwrap()).unwrap();
    let fill = trainer::data::batching::epoch_fill(&*sft.train, &sft.batching, cfg.train.seed);
    assert!(fill > 0.5 && fill <= 1.0, "{fill}");
    assert_eq!(written["row_fill"].as_f64(), Some(fill));
    assert_eq!(summary.row_fill, fill);
}

#[test]
fn resuming_from_a_checkpoint_is_bitwise_identical() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(
        dir.path(),
        "max_steps = 6\nsave_steps = 3\nsave_total_limit = 5",
    );
    let be = CpuBackend::new();
    train(&be, &cfg, Resume::No).unwrap();
    let out = dir.path().join("out");
    let (full, _) = read_steps(&out.join("metrics.jsonl")).unwrap();

    // A second run that only has checkpoint-3, as if the first had died after saving it.
    let mut resumed_cfg = cfg.clone();
    resumed_cfg.output.dir = dir.path().join("resumed");
    std::fs::create_dir_all(&resumed_cfg.output.dir).unwrap();
    let ckpt = resumed_cfg.output.dir.join("checkpoint-3");
    std::fs::create_dir_all(&ckpt).unwrap();
    for e in std::fs::read_dir(out.join("checkpoint-3")).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), ckpt.join(e.file_name())).unwrap();
    }
    train(&be, &resumed_cfg, Resume::Latest).unwrap();
    let (resumed, _) = read_steps(&resumed_cfg.output.dir.join("metrics.jsonl")).unwrap();
    let tail: Vec<(u64, f64, f32)> = full
        .iter()
        .filter(|r| r.step > 3)
        .map(|r| (r.step, r.loss, r.grad_norm))
        .collect();
    let again: Vec<(u64, f64, f32)> = resumed
        .iter()
        .filter(|r| r.step > 3)
        .map(|r| (r.step, r.loss, r.grad_norm))
        .collect();
    assert_eq!(tail.len(), 3);
    assert_eq!(
        tail, again,
        "losses after resuming must be bitwise identical"
    );
    let a = std::fs::read(out.join("adapter/adapter_model.safetensors")).unwrap();
    let b = std::fs::read(
        resumed_cfg
            .output
            .dir
            .join("adapter/adapter_model.safetensors"),
    )
    .unwrap();
    assert_eq!(a, b, "final adapters must be bitwise identical");
}

/// AdamW's state in host memory, its update deferred into the next step's forward layer by layer
/// (with the layer inputs offloaded as well, so both kinds of parked groups interleave), trains
/// to the same bits as the state on the device: losses, gradient norms, evaluations between
/// steps, the checkpoint and the final adapter.
#[test]
fn the_optimizer_state_on_the_host_trains_to_the_device_states_bits() {
    let dir = tempfile::tempdir().unwrap();
    let be = CpuBackend::new();
    let run = |name: &str, extra: &str| {
        let sub = dir.path().join(name);
        std::fs::create_dir_all(&sub).unwrap();
        let cfg = config(
            &sub,
            &format!("max_steps = 5\neval_steps = 2\nsave_steps = 3\n{extra}"),
        );
        let summary = train(&be, &cfg, Resume::No).unwrap();
        let out = sub.join("out");
        let (steps, evals) = read_steps(&out.join("metrics.jsonl")).unwrap();
        let steps: Vec<(f64, f32)> = steps.iter().map(|r| (r.loss, r.grad_norm)).collect();
        let evals: Vec<f64> = evals.iter().map(|e| e.eval_loss).collect();
        let read = |p: &str| std::fs::read(out.join(p)).unwrap();
        (
            steps,
            evals,
            summary.eval_loss_end,
            read("adapter/adapter_model.safetensors"),
            read("checkpoint-3/optimizer.safetensors"),
        )
    };
    let device = run("device", "");
    let host = run(
        "host",
        "optimizer_state = \"host\"\ngradient_checkpointing = \"offload\"",
    );
    assert_eq!(device.0.len(), 5);
    assert_eq!(device.1.len(), 4, "evaluations at steps 0, 2, 4 and 5");
    assert_eq!(device, host);
}

#[test]
fn training_continues_from_an_adapter_written_by_peft() {
    let dir = tempfile::tempdir().unwrap();
    let adapter = fixtures().join("tiny-llama/adapter");
    let cfg = config_with(
        dir.path(),
        "max_steps = 1",
        &[format!("lora.init_adapter=\"{}\"", adapter.display())],
    );
    let be = CpuBackend::new();
    let model = load_model(&be, &cfg).unwrap();
    let sft = Sft::prepare(&cfg, model.config.vocab_size).unwrap();
    let lora = peft::load(&be, &model.config, &adapter).unwrap();
    let batching = trainer::data::batching::Batching {
        rows: 4,
        max_seq_len: 64,
        packing: true,
        pad_id: 0,
    };
    let with_peft_adapter = evaluate(&be, &model, Some(&lora), &sft.eval, &batching)
        .unwrap()
        .loss();
    let s = train(&be, &cfg, Resume::No).unwrap();
    assert_eq!(
        s.eval_loss_start,
        Some(with_peft_adapter),
        "training must start from the PEFT adapter's weights"
    );
}

/// `fuselora train --config CFG --set SET`: success, and stderr + stdout.
fn train_with(cfg: &Path, set: &str) -> (bool, String) {
    fuselora(&["train", "--config", cfg.to_str().unwrap(), "--set", set])
}

fn fuselora(args: &[&str]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_fuselora"))
        .args(args)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned() + &String::from_utf8_lossy(&out.stdout),
    )
}

#[test]
fn bad_input_gets_errors_that_say_what_and_where() {
    let dir = tempfile::tempdir().unwrap();
    config(dir.path(), "max_steps = 1");
    let cfg_path = dir.path().join("run.toml");

    let (ok, text) = train_with(&cfg_path, "train.learnig_rate=1");
    assert!(
        !ok && text.contains("learnig_rate") && text.contains("`lr`"),
        "{text}"
    );

    let (ok, text) = train_with(&cfg_path, "data.format=csv");
    assert!(
        !ok && text.contains("data.format") && text.contains("sharegpt"),
        "{text}"
    );

    let bad = dir.path().join("bad.jsonl");
    std::fs::write(
        &bad,
        "{\"instruction\": \"a\", \"output\": \"b\"}\n{\"instruction\": \"c\", \"output\": 3}\n",
    )
    .unwrap();
    let set = format!("data.train=[\"{}\"]", bad.display());
    let (ok, text) = train_with(&cfg_path, &set);
    assert!(
        !ok && text.contains("bad.jsonl:2") && text.contains("`output` must be a string"),
        "{text}"
    );

    let empty_model = dir.path().join("pickled");
    std::fs::create_dir_all(&empty_model).unwrap();
    std::fs::copy(
        fixtures().join("tiny-llama/model/config.json"),
        empty_model.join("config.json"),
    )
    .unwrap();
    std::fs::write(empty_model.join("pytorch_model.bin"), b"pickle").unwrap();
    let set = format!("model.path=\"{}\"", empty_model.display());
    let (ok, text) = train_with(&cfg_path, &set);
    assert!(
        !ok && text.contains("pytorch_model.bin") && text.contains("safe_serialization"),
        "{text}"
    );

    let (ok, text) = train_with(&cfg_path, "model.path=\"/no/such/model\"");
    assert!(!ok && text.contains("/no/such/model/config.json"), "{text}");
}

#[test]
fn every_example_config_is_valid() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../configs");
    let mut n = 0;
    for e in std::fs::read_dir(&dir).unwrap() {
        let p = e.unwrap().path();
        if p.extension().is_some_and(|x| x == "toml") {
            RunConfig::load(&p, &[]).unwrap_or_else(|e| panic!("{}: {e:#}", p.display()));
            n += 1;
        }
    }
    assert!(n >= 3, "configs/ holds the example configs");
}
