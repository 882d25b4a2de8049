//! Data-parallel training of the tiny fixture model under a real Open MPI `mpirun`:
//!
//! - 2 and 3 CPU ranks with gradient accumulation k end with the same adapter (≤ 1e-5 relative,
//!   per tensor) and log the same losses (≤ 1e-6) as 1 rank with accumulation N·k (the same global
//!   batch). The ranks add the same f32 gradients in another order, so the runs differ by rounding,
//!   which Adam amplifies where a gradient element cancels to about its `eps`; at lr 1e-3 over one
//!   epoch (6 or 4 steps) the worst tensor differs by 1.0e-6 for 2 ranks and 6.6e-7 for 3
//!   (2026-12-04: a local CI run met 1e-6 at 4f5bc78; after session 19's later changes to the
//!   step's products the 2-rank run measured 1.0e-6, past it).
//! - each rank reads a disjoint part of the pre-tokenized dataset, together all of it;
//! - a rank that fails mid-run stops the whole job with a non-zero exit, without hanging.
//!
//! The data goes text → `fuselora prepare-data` (a word-level tokenizer whose ids fit the fixture's
//! 320-token vocabulary) → token shards → `fuselora train`. Needs `--features mpi` and Open MPI.
#![cfg(feature = "mpi")]

mod support;

use safetensors::SafeTensors;
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

const EXAMPLES: usize = 48;
const WORDS: usize = 200;

fn fuselora() -> &'static str {
    env!("CARGO_BIN_EXE_fuselora")
}

/// A model folder: the tiny-llama fixture's weights with a word-level tokenizer `w0 … w199`.
fn model_folder(root: &Path) -> PathBuf {
    let fixture =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/tiny-llama/model");
    let model = root.join("model");
    std::fs::create_dir_all(&model).unwrap();
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(fixture.join(f), model.join(f)).unwrap();
    }
    let mut vocab = serde_json::Map::new();
    vocab.insert("<unk>".into(), 0.into());
    vocab.insert("</s>".into(), 1.into());
    for w in 0..WORDS {
        vocab.insert(format!("w{w}"), (w + 2).into());
    }
    let special = |id: usize, content: &str| {
        serde_json::json!({"id": id, "content": content, "single_word": false, "lstrip": false,
                           "rstrip": false, "normalized": false, "special": true})
    };
    let tokenizer = serde_json::json!({
        "version": "1.0", "truncation": null, "padding": null,
        "added_tokens": [special(0, "<unk>"), special(1, "</s>")],
        "normalizer": null, "pre_tokenizer": {"type": "Whitespace"},
        "post_processor": null, "decoder": null,
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "<unk>"}
    });
    std::fs::write(model.join("tokenizer.json"), tokenizer.to_string()).unwrap();
    std::fs::write(
        model.join("tokenizer_config.json"),
        r#"{"eos_token": "</s>", "unk_token": "<unk>", "pad_token": "</s>"}"#,
    )
    .unwrap();
    model
}

/// `EXAMPLES` text records of 3 to 17 words.
fn dataset(root: &Path) -> PathBuf {
    let path = root.join("data.jsonl");
    let lines: Vec<String> = (0..EXAMPLES)
        .map(|i| {
            let words: Vec<String> = (0..3 + (i * 7) % 15)
                .map(|j| format!("w{}", (i * 31 + j * 17) % WORDS))
                .collect();
            serde_json::json!({ "text": words.join(" ") }).to_string()
        })
        .collect();
    std::fs::write(&path, lines.join("\n")).unwrap();
    path
}

/// `model_keys`: extra `[model]` lines (e.g. `quantize = "nf4"`).
fn write_config(
    path: &Path,
    model: &Path,
    model_keys: &str,
    train: &[PathBuf],
    out: &Path,
    accum: usize,
) {
    let list: Vec<String> = train
        .iter()
        .map(|p| format!("{:?}", p.display().to_string()))
        .collect();
    let text = format!(
        r#"[model]
path = {model:?}
backend = "cpu"
{model_keys}

[lora]
r = 4
alpha = 8.0

[data]
train = [{train}]
format = "text"
max_seq_len = 64
packing = false

[train]
batch_size = 2
grad_accum = {accum}
epochs = 1.0
lr = 0.001
warmup_steps = 0
max_grad_norm = 0.5
gradient_checkpointing = false
seed = 11

[output]
dir = {out:?}
"#,
        model = model.display().to_string(),
        train = list.join(", "),
        out = out.display().to_string(),
    );
    std::fs::write(path, text).unwrap();
}

/// The shards of the test dataset (3 files of at most 20 examples).
fn prepared(root: &Path) -> (PathBuf, Vec<PathBuf>) {
    let model = model_folder(root);
    let data = dataset(root);
    let cfg = root.join("prepare.toml");
    write_config(&cfg, &model, "", &[data], &root.join("unused"), 1);
    let out = Command::new(fuselora())
        .args(["prepare-data", "--examples-per-shard", "20", "--config"])
        .arg(&cfg)
        .arg("--out")
        .arg(root.join("shards"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let shards: Vec<PathBuf> = (0..3)
        .map(|i| root.join(format!("shards/train-{i:05}.tokens")))
        .collect();
    assert!(
        shards.iter().all(|s| s.is_file()),
        "prepare-data wrote {shards:?}?"
    );
    (model, shards)
}

/// Runs `command` to its end, failing the test if it takes longer than `limit`.
fn run_with_limit(command: &mut Command, limit: Duration) -> Output {
    let mut child = command
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("cannot start mpirun: apt-get install -y openmpi-bin");
    let start = Instant::now();
    while child.try_wait().unwrap().is_none() {
        if start.elapsed() > limit {
            child.kill().unwrap();
            let out = child.wait_with_output().unwrap();
            panic!(
                "still running after {limit:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    child.wait_with_output().unwrap()
}

fn mpirun(ranks: usize, config: &Path, env: &[(&str, &Path)]) -> Command {
    let mut c = Command::new("mpirun");
    c.args([
        "--oversubscribe",
        "--bind-to",
        "none",
        "-np",
        &ranks.to_string(),
    ]);
    for (name, _) in env {
        c.args(["-x", name]);
    }
    c.args([
        "-x",
        "RAYON_NUM_THREADS",
        "--",
        fuselora(),
        "train",
        "--config",
    ])
    .arg(config)
    .env("OMPI_ALLOW_RUN_AS_ROOT", "1")
    .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
    .env("RAYON_NUM_THREADS", "1");
    for (name, value) in env {
        c.env(name, value);
    }
    c
}

/// Every tensor of an adapter file.
fn adapter(out: &Path) -> Vec<(String, Vec<f32>)> {
    let bytes = std::fs::read(out.join("adapter/adapter_model.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let mut tensors: Vec<(String, Vec<f32>)> = st
        .tensors()
        .into_iter()
        .map(|(name, view)| {
            let values = view
                .data()
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
                .collect();
            (name, values)
        })
        .collect();
    tensors.sort_by(|a, b| a.0.cmp(&b.0));
    tensors
}

/// The logged loss of every step.
fn losses(out: &Path) -> Vec<f64> {
    std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter_map(|v| v.get("loss").and_then(|l| l.as_f64()))
        .collect()
}

fn relative_difference(a: &[f32], b: &[f32]) -> f64 {
    let diff: f64 = a.iter().zip(b).map(|(x, y)| ((x - y) as f64).powi(2)).sum();
    let norm: f64 = b.iter().map(|y| (*y as f64).powi(2)).sum();
    (diff / norm.max(1e-30)).sqrt()
}

/// N ranks × accumulation 2 against 1 rank × accumulation 2N, plus the shard trace; `model_keys`
/// go into both runs' `[model]` section. The adapters may differ by `tolerance` (relative): the sums
/// run in another order in f32, and Adam's `m / √v` magnifies that where a gradient is small.
/// Returns what the N ranks printed.
fn ranks_match_one_rank_with_the_same_global_batch(
    ranks: usize,
    model_keys: &str,
    tolerance: f64,
) -> String {
    let root = tempfile::tempdir().unwrap();
    let root = root.path();
    let (model, shards) = prepared(root);
    let (multi_cfg, single_cfg) = (root.join("multi.toml"), root.join("single.toml"));
    let (multi_out, single_out) = (root.join("multi"), root.join("single"));
    write_config(&multi_cfg, &model, model_keys, &shards, &multi_out, 2);
    write_config(
        &single_cfg,
        &model,
        model_keys,
        &shards,
        &single_out,
        2 * ranks,
    );
    let trace = root.join("trace");

    let out = run_with_limit(
        &mut mpirun(ranks, &multi_cfg, &[("FUSELORA_TRACE_EXAMPLES", &trace)]),
        Duration::from_secs(240),
    );
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "{ranks} ranks failed:\n{stderr}");
    assert!(
        stderr.contains(&format!("{ranks} ranks (mpi ({ranks} ranks))")),
        "{stderr}"
    );
    let out = run_with_limit(&mut mpirun(1, &single_cfg, &[]), Duration::from_secs(240));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // 48 examples in 24 batches of 2: one epoch is 24 / (2 × ranks) steps either way.
    let (multi_loss, single_loss) = (losses(&multi_out), losses(&single_out));
    assert_eq!(multi_loss.len(), 24 / (2 * ranks), "{multi_loss:?}");
    assert_eq!(multi_loss.len(), single_loss.len());
    for (m, s) in multi_loss.iter().zip(&single_loss) {
        assert!(
            (m - s).abs() <= 1e-6 * s.abs(),
            "losses {multi_loss:?} vs {single_loss:?}"
        );
    }
    let (multi, single) = (adapter(&multi_out), adapter(&single_out));
    assert_eq!(multi.len(), 3 * 7 * 2);
    let mut moved = 0;
    let mut worst = 0.0f64;
    for ((name, m), (_, s)) in multi.iter().zip(&single) {
        let rel = relative_difference(m, s);
        worst = worst.max(rel);
        assert!(rel <= tolerance, "{name}: relative difference {rel:e}");
        moved += usize::from(name.contains("lora_B") && s.iter().any(|&x| x != 0.0));
    }
    assert_eq!(moved, 21, "a B left zero: training did not move it");
    eprintln!("{ranks} ranks vs 1: worst relative difference of an adapter tensor {worst:.2e}");
    // Only rank 0 writes the output folder.
    assert!(multi_out.join("summary.json").is_file());

    let mut seen = BTreeSet::new();
    let mut total = 0;
    for rank in 0..ranks {
        let text = std::fs::read_to_string(trace.join(format!("rank-{rank}.txt"))).unwrap();
        let read: Vec<usize> = text
            .lines()
            .flat_map(|l| l.split_once(": ").unwrap().1.split_whitespace())
            .map(|i| i.parse().unwrap())
            .collect();
        assert_eq!(read.len(), EXAMPLES / ranks, "rank {rank} read {read:?}");
        total += read.len();
        seen.extend(read);
    }
    assert_eq!(total, EXAMPLES, "an example was read by two ranks");
    assert_eq!(
        seen,
        (0..EXAMPLES).collect(),
        "the ranks' shards cover the dataset"
    );
    stderr
}

#[test]
fn two_ranks_match_one_rank() {
    // Measured: 1.0e-6 at worst (2026-12-04).
    ranks_match_one_rank_with_the_same_global_batch(2, "", 1e-5);
}

#[test]
fn two_ranks_match_one_rank_with_nf4_weights() {
    // Measured: 1.1e-6 at worst (2026-12-02).
    let said = ranks_match_one_rank_with_the_same_global_batch(2, "quantize = \"nf4\"", 1e-5);
    // Every rank quantizes its own copy at load.
    assert_eq!(said.matches("quantized to NF4").count(), 2, "{said}");
}

#[test]
fn three_ranks_match_one_rank() {
    // Measured: 6.6e-7 at worst (2026-12-04).
    ranks_match_one_rank_with_the_same_global_batch(3, "", 1e-5);
}

#[test]
fn a_rank_failing_mid_run_stops_the_job() {
    let root = tempfile::tempdir().unwrap();
    let root = root.path();
    let (model, shards) = prepared(root);
    let cfg = root.join("run.toml");
    write_config(&cfg, &model, "", &shards, &root.join("out"), 1);
    let step = Path::new("3");
    let rank = Path::new("1");
    let out = run_with_limit(
        &mut mpirun(
            2,
            &cfg,
            &[
                ("FUSELORA_FAIL_AT_STEP", step),
                ("FUSELORA_FAIL_RANK", rank),
            ],
        ),
        Duration::from_secs(120),
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "mpirun exited 0:\n{stderr}");
    assert!(
        stderr.contains("rank 1 stops at step 3 because FUSELORA_FAIL_AT_STEP=3"),
        "{stderr}"
    );
    assert!(
        !root.join("out/summary.json").exists(),
        "the job went on to the end"
    );
}

#[test]
fn launch_runs_the_training_as_rank_0_with_prefixed_output() {
    let root = tempfile::tempdir().unwrap();
    let root = root.path();
    let (model, shards) = prepared(root);
    let cfg = root.join("run.toml");
    write_config(&cfg, &model, "", &shards, &root.join("out"), 4);
    let out = run_with_limit(
        Command::new(fuselora())
            .args(["launch", "--nproc-per-node", "1", "--", "train", "--config"])
            .arg(&cfg),
        Duration::from_secs(120),
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("[rank 0] trained 6 steps"), "{stdout}");
    assert_eq!(losses(&root.join("out")).len(), 6);
}

/// A preference method under mpirun: 2 ranks × accumulation 1 end like 1 rank × accumulation 2
/// (loss counts, metric sums and gradients are summed over the ranks). `method` is the config's
/// `[method]` section. The model speaks ChatML through the byte-level tokenizer fixture.
fn preference_on_two_ranks_matches_one_rank(method: &str, metric: &str) {
    let root = tempfile::tempdir().unwrap();
    let root = root.path();
    let model = support::tiny_chat_model(root, "pref-model");
    let data = root.join("pairs.jsonl");
    let lines: Vec<String> = (0..16)
        .map(|i| serde_json::json!({"prompt": format!("Is {i} even?"), "chosen": format!("{}", i % 2 == 0), "rejected": "maybe"}).to_string())
        .collect();
    std::fs::write(&data, lines.join("\n")).unwrap();
    let config = |accum: usize, out: &Path| {
        let path = root.join(format!("pref-{accum}.toml"));
        let text = format!(
            "[model]\npath = {:?}\nbackend = \"cpu\"\n[lora]\nr = 4\nalpha = 8.0\n[data]\ntrain = [{:?}]\n\
             [train]\nbatch_size = 2\ngrad_accum = {accum}\nepochs = 1.0\nlr = 0.001\n\
             gradient_checkpointing = false\nseed = 5\n[method]\n{method}\nmax_prompt_len = 32\nmax_len = 64\n[output]\ndir = {:?}\n",
            model.display().to_string(),
            data.display().to_string(),
            out.display().to_string()
        );
        std::fs::write(&path, text).unwrap();
        path
    };
    let (two_out, one_out) = (root.join("pref-two"), root.join("pref-one"));
    for (ranks, accum, out) in [(2, 1, &two_out), (1, 2, &one_out)] {
        let result = run_with_limit(
            &mut mpirun(ranks, &config(accum, out), &[]),
            Duration::from_secs(240),
        );
        assert!(
            result.status.success(),
            "{ranks} ranks: {}",
            String::from_utf8_lossy(&result.stderr)
        );
    }
    let (two, one) = (losses(&two_out), losses(&one_out));
    assert_eq!(
        two.len(),
        4,
        "16 pairs, 2 per micro-batch, 2 micro-batches a step: {two:?}"
    );
    for (a, b) in two.iter().zip(&one) {
        assert!((a - b).abs() <= 1e-6 * b.abs(), "losses {two:?} vs {one:?}");
    }
    let (two_m, one_m) = (
        metric_values(&two_out, metric),
        metric_values(&one_out, metric),
    );
    assert_eq!(two_m.len(), 4, "{metric} is logged every step");
    for (a, b) in two_m.iter().zip(&one_m) {
        assert!(
            (a - b).abs() <= 1e-6 * b.abs().max(1e-3),
            "{metric} {two_m:?} vs {one_m:?}"
        );
    }
    let mut moved = 0;
    for ((name, a), (_, b)) in adapter(&two_out).iter().zip(&adapter(&one_out)) {
        let rel = relative_difference(a, b);
        assert!(rel <= 1e-6, "{name}: relative difference {rel:e}");
        moved += usize::from(name.contains("lora_B") && b.iter().any(|&x| x != 0.0));
    }
    assert_eq!(
        moved, 21,
        "every B moved away from zero: the method trained"
    );
}

/// The values of `key` in every step record.
fn metric_values(out: &Path, key: &str) -> Vec<f64> {
    std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|v| v.get("loss").is_some())
        .filter_map(|v| v.get(key).and_then(|x| x.as_f64()))
        .collect()
}

#[test]
fn dpo_on_two_ranks_matches_one_rank() {
    preference_on_two_ranks_matches_one_rank("name = \"dpo\"", "rewards/margins");
}

#[test]
fn orpo_on_two_ranks_matches_one_rank() {
    preference_on_two_ranks_matches_one_rank("name = \"orpo\"\nbeta = 0.2", "nll_loss");
}
