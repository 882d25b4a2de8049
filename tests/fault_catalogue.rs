//! The fault catalogue (issue 16): each case a new user hit with bad inputs and faults, run through
//! the `fuselora` binary as they ran it, with the behaviour now guaranteed (docs/reliability.md).
//! Every command of every case goes through [`fuselora`], which fails the test if the binary
//! panicked — so no input in the catalogue reaches a `panicked at`.

mod support;

use std::path::{Path, PathBuf};
use std::process::Command;
use support::{fixtures, tiny_chat_model};

/// Runs `fuselora ARGS`; returns success and stderr + stdout. Fails the test on a panic.
fn fuselora(args: &[&str]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_fuselora"))
        .args(args)
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stderr).into_owned() + &String::from_utf8_lossy(&out.stdout);
    assert!(
        !text.contains("panicked at") && out.status.code() != Some(101),
        "fuselora {args:?} panicked:\n{text}"
    );
    (out.status.success(), text)
}

/// `fuselora train --config CFG [EXTRA...]`.
fn train(cfg: &Path, extra: &[&str]) -> (bool, String) {
    let mut args = vec!["train", "--config", cfg.to_str().unwrap()];
    args.extend_from_slice(extra);
    fuselora(&args)
}

/// 40 alpaca records.
fn dataset(dir: &Path) -> PathBuf {
    let lines: Vec<String> = (0..40)
        .map(|i| format!(r#"{{"instruction": "Colour {i}?", "output": "It is red."}}"#))
        .collect();
    let p = dir.join("data.jsonl");
    std::fs::write(&p, lines.join("\n")).unwrap();
    p
}

/// `dir/run.toml`: the tiny chat model on [`dataset`], 2 steps, a checkpoint every step, into `dir/out`.
fn run_config(dir: &Path) -> PathBuf {
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
[train]
batch_size = 4
max_steps = 2
save_steps = 1
seed = 3
[output]
dir = "{out}"
"#,
        model = tiny_chat_model(dir, "model").display(),
        data = dataset(dir).display(),
        out = dir.join("out").display()
    );
    let path = dir.join("run.toml");
    std::fs::write(&path, text).unwrap();
    path
}

fn read(p: &Path) -> Vec<u8> {
    std::fs::read(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

fn entries(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

/// Rewrites `dir/config.json` with `edit`.
fn edit_config(dir: &Path, edit: impl Fn(&mut serde_json::Value)) {
    let path = dir.join("config.json");
    let mut v: serde_json::Value = serde_json::from_slice(&read(&path)).unwrap();
    edit(&mut v);
    std::fs::write(&path, serde_json::to_string_pretty(&v).unwrap()).unwrap();
}

/// Rewrites `dir/model.safetensors` with `edit` applied to its f32 tensors.
fn edit_weights(dir: &Path, edit: impl Fn(&mut Vec<(String, Vec<usize>, Vec<f32>)>)) {
    let path = dir.join("model.safetensors");
    let bytes = read(&path);
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut tensors: Vec<(String, Vec<usize>, Vec<f32>)> = st
        .tensors()
        .into_iter()
        .map(|(name, view)| {
            assert_eq!(view.dtype(), safetensors::Dtype::F32);
            let values = view
                .data()
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
                .collect();
            (name, view.shape().to_vec(), values)
        })
        .collect();
    edit(&mut tensors);
    trainer::io::write_safetensors_f32(&path, &tensors).unwrap();
}

/// Case 1: a fresh run into another run's folder is refused (naming --resume and --overwrite),
/// leaves it untouched, and `--overwrite` replaces it whole — never when it holds an input.
#[test]
fn case01_a_fresh_run_refuses_another_runs_folder() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = run_config(dir.path());
    let out = dir.path().join("out");
    assert!(train(&cfg, &[]).0);
    let metrics = read(&out.join("metrics.jsonl"));
    let before = entries(&out);
    assert!(before.contains(&"checkpoint-2".to_string()), "{before:?}");

    let (ok, text) = train(&cfg, &["--set", "train.max_steps=1"]);
    assert!(!ok, "{text}");
    assert!(
        text.contains("holds another run") && text.contains("checkpoint-2"),
        "{text}"
    );
    assert!(
        text.contains("--resume") && text.contains("--overwrite"),
        "{text}"
    );
    assert_eq!(entries(&out), before);
    assert_eq!(read(&out.join("metrics.jsonl")), metrics);

    let (ok, text) = train(&cfg, &["--overwrite", "--set", "train.max_steps=1"]);
    assert!(ok, "{text}");
    let after = entries(&out);
    assert!(
        after.contains(&"checkpoint-1".to_string()) && !after.contains(&"checkpoint-2".to_string()),
        "{after:?}"
    );

    // The folder holding the model is never deleted, --overwrite or not.
    let model = dir.path().join("model");
    let set = format!("output.dir=\"{}\"", dir.path().display());
    let (ok, text) = train(&cfg, &["--overwrite", "--set", &set]);
    assert!(
        !ok && text.contains("model.path") && text.contains("destroy"),
        "{text}"
    );
    assert!(model.join("model.safetensors").exists());
}

/// Case 2: `--resume` refuses every change of the adapter's layout, and writes nothing.
#[test]
fn case02_resume_refuses_a_changed_adapter_layout() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = run_config(dir.path());
    let out = dir.path().join("out");
    assert!(train(&cfg, &["--set", "train.save_steps=0"]).0);
    let ckpt = out.join("checkpoint-2/adapter_model.safetensors");
    let (ckpt_bytes, adapter_bytes) = (
        read(&ckpt),
        read(&out.join("adapter/adapter_model.safetensors")),
    );
    for (set, key) in [
        ("lora.targets=[\"q_proj\"]", "lora.targets"),
        ("lora.r=2", "lora.r"),
        ("lora.alpha=16", "lora.alpha"),
        ("lora.rslora=true", "lora.rslora"),
        ("train.seed=4", "seed"),
    ] {
        let (ok, text) = train(
            &cfg,
            &["--resume", "--set", "train.max_steps=4", "--set", set],
        );
        assert!(!ok && text.contains(key), "--set {set}: {text}");
    }
    assert_eq!(read(&ckpt), ckpt_bytes);
    assert_eq!(
        read(&out.join("adapter/adapter_model.safetensors")),
        adapter_bytes
    );
    assert_eq!(
        entries(&out)
            .iter()
            .filter(|n| n.starts_with("checkpoint-"))
            .count(),
        1
    );
}

/// Case 3: merge and import-gguf never write in place, refuse a non-empty folder unless told,
/// and replace it whole (no stale index left for the loader to prefer).
#[test]
fn case03_merge_and_import_refuse_in_place_and_leave_no_stale_files() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("base");
    std::fs::create_dir_all(&model).unwrap();
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(fixtures().join("tiny-llama/model").join(f), model.join(f)).unwrap();
    }
    let weights = read(&model.join("model.safetensors"));
    let adapter = fixtures().join("tiny-llama/adapter");
    let merge = |out: &Path, extra: &[&str]| {
        let mut args = vec![
            "merge",
            "--model",
            model.to_str().unwrap(),
            "--adapter",
            adapter.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        fuselora(&args)
    };
    for extra in [&[][..], &["--overwrite"][..]] {
        let (ok, text) = merge(&model, extra);
        assert!(
            !ok && text.contains("--model") && text.contains("destroy"),
            "{text}"
        );
        let (ok, text) = merge(dir.path(), extra);
        assert!(!ok && text.contains("contains the input --model"), "{text}");
    }
    assert_eq!(read(&model.join("model.safetensors")), weights);

    let out = dir.path().join("merged");
    std::fs::create_dir_all(&out).unwrap();
    std::fs::write(
        out.join("model.safetensors.index.json"),
        "{\"weight_map\": {}}",
    )
    .unwrap();
    let (ok, text) = merge(&out, &[]);
    assert!(
        !ok && text.contains("not empty")
            && text.contains("model.safetensors.index.json")
            && text.contains("--overwrite"),
        "{text}"
    );
    let (ok, text) = merge(&out, &["--overwrite"]);
    assert!(ok, "{text}");
    assert_eq!(entries(&out), vec!["config.json", "model.safetensors"]);

    let gguf_dir = dir.path().join("gguf");
    std::fs::create_dir_all(&gguf_dir).unwrap();
    let gguf = gguf_dir.join("tiny.gguf");
    std::fs::copy(fixtures().join("gguf/tiny-llama.gguf"), &gguf).unwrap();
    let import = |out: &Path, extra: &[&str]| {
        let mut args = vec![
            "import-gguf",
            gguf.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        fuselora(&args)
    };
    let (ok, text) = import(&gguf_dir, &["--overwrite"]);
    assert!(
        !ok && text.contains("GGUF file") && text.contains("destroy"),
        "{text}"
    );
    assert!(gguf.exists());
    let (ok, text) = import(&out, &[]);
    assert!(!ok && text.contains("not empty"), "{text}");
    let (ok, text) = import(&out, &["--overwrite"]);
    assert!(ok, "{text}");
    let names = entries(&out);
    assert!(
        names.contains(&"tokenizer.json".to_string())
            && !names.contains(&"model.safetensors.index.json".to_string()),
        "{names:?}"
    );
}

/// Case 4: NaN never trains. Non-finite weights and settings that make NaN are refused at load;
/// steps whose loss is not finite are skipped, stop the run after `train.max_nonfinite_steps`,
/// and the good checkpoint and adapter stay as they were.
#[test]
fn case04_nan_is_refused_at_load_or_stops_the_run_keeping_the_good_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = run_config(dir.path());
    let model = dir.path().join("model");
    let out = dir.path().join("out");
    let original_config = read(&model.join("config.json"));
    for (edit, key) in [
        (
            (
                "rope_parameters",
                serde_json::json!({"rope_theta": 0.0, "rope_type": "default"}),
            ),
            "rope_theta",
        ),
        (("rms_norm_eps", serde_json::json!(-1e-5)), "rms_norm_eps"),
        (
            (
                "rope_parameters",
                serde_json::json!({"rope_theta": 1e4, "rope_type": "linear", "factor": 0.0}),
            ),
            "rope_scaling.factor",
        ),
    ] {
        edit_config(&model, |v| v[edit.0] = edit.1.clone());
        let (ok, text) = train(&cfg, &[]);
        assert!(
            !ok && text.contains(key) && text.contains("config.json"),
            "{text}"
        );
        std::fs::write(model.join("config.json"), &original_config).unwrap();
    }
    let good_weights = read(&model.join("model.safetensors"));
    edit_weights(&model, |t| {
        let norm = t
            .iter_mut()
            .find(|(n, ..)| n == "model.layers.1.input_layernorm.weight")
            .unwrap();
        norm.2[5] = f32::NAN;
    });
    let (ok, text) = train(&cfg, &[]);
    assert!(
        !ok && text.contains("model.layers.1.input_layernorm.weight") && text.contains("NaN"),
        "{text}"
    );
    assert!(!out.exists(), "a run that fails at load leaves no folder");

    std::fs::write(model.join("model.safetensors"), &good_weights).unwrap();
    assert!(train(&cfg, &["--set", "train.save_total_limit=1"]).0);
    let adapter = out.join("adapter/adapter_model.safetensors");
    let ckpt_bytes = read(&out.join("checkpoint-2/adapter_model.safetensors"));
    let adapter_bytes = read(&adapter);
    // Finite weights whose products overflow: the final norm at f32's largest value.
    edit_weights(&model, |t| {
        let norm = t
            .iter_mut()
            .find(|(n, ..)| n == "model.norm.weight")
            .unwrap();
        norm.2.iter_mut().for_each(|x| *x = f32::MAX);
    });
    let (ok, text) = train(
        &cfg,
        &[
            "--resume",
            "--set",
            "train.max_steps=8",
            "--set",
            "train.save_total_limit=1",
        ],
    );
    assert!(!ok, "{text}");
    assert!(
        text.contains("step 5")
            && text.contains("3 steps in a row")
            && text.contains("train.max_nonfinite_steps = 3"),
        "{text}"
    );
    // Skipped steps change nothing: the one checkpoint kept holds the good adapter.
    let kept: Vec<String> = entries(&out)
        .into_iter()
        .filter(|n| n.starts_with("checkpoint-"))
        .collect();
    assert_eq!(kept.len(), 1, "{kept:?}");
    assert_eq!(
        read(&out.join(&kept[0]).join("adapter_model.safetensors")),
        ckpt_bytes
    );
    assert_eq!(read(&adapter), adapter_bytes);
}

/// Case 4 for the preference methods: the guard sits in the one training loop, so DPO and ORPO
/// skip non-finite steps and stop after `train.max_nonfinite_steps` as SFT does: the adapter is
/// never written and the checkpoints of skipped steps hold the adapter unchanged.
#[test]
fn case04_dpo_and_orpo_stop_on_non_finite_steps_too() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = run_config(dir.path());
    let pairs: Vec<String> = (0..8)
        .map(|i| {
            serde_json::json!({"prompt": format!("Is {i} odd?"), "chosen": format!("{}", i % 2 == 1), "rejected": "who knows"})
                .to_string()
        })
        .collect();
    let data = dir.path().join("pairs.jsonl");
    std::fs::write(&data, pairs.join("\n")).unwrap();
    edit_weights(&dir.path().join("model"), |t| {
        let norm = t
            .iter_mut()
            .find(|(n, ..)| n == "model.norm.weight")
            .unwrap();
        norm.2.iter_mut().for_each(|x| *x = f32::MAX);
    });
    let out = dir.path().join("out");
    for method in ["dpo", "orpo"] {
        let train_set = format!("data.train=[\"{}\"]", data.display());
        let (ok, text) = train(
            &cfg,
            &[
                "--method",
                method,
                "--set",
                &train_set,
                "--set",
                "train.max_steps=6",
            ],
        );
        assert!(
            !ok && text.contains("step 3")
                && text.contains("3 steps in a row")
                && text.contains("train.max_nonfinite_steps = 3"),
            "{method}: {text}"
        );
        // Skipped steps change nothing: the checkpoints (save_steps = 1) hold the initial adapter.
        assert!(!out.join("adapter").exists(), "{method}");
        assert_eq!(
            read(&out.join("checkpoint-2/adapter_model.safetensors")),
            read(&out.join("checkpoint-1/adapter_model.safetensors")),
            "{method}"
        );
        std::fs::remove_dir_all(&out).unwrap();
    }
}

/// Case 5: a zero head count is a config error naming the key, not a division by zero.
#[test]
fn case05_zero_heads_are_refused_by_key() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = run_config(dir.path());
    edit_config(&dir.path().join("model"), |v| {
        v["num_attention_heads"] = 0.into()
    });
    let (ok, text) = train(&cfg, &[]);
    assert!(
        !ok && text.contains("num_attention_heads: 0") && text.contains("positive integer"),
        "{text}"
    );
}

/// Case 6: an empty target list is refused before anything trains.
#[test]
fn case06_an_empty_target_list_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = run_config(dir.path());
    let (ok, text) = train(&cfg, &["--set", "lora.targets=[]"]);
    assert!(!ok && text.contains("`lora.targets` is empty"), "{text}");
    assert!(!dir.path().join("out").exists());
}

/// Case 7: tensors the config does not use (layers beyond num_hidden_layers, biases) are refused.
#[test]
fn case07_unused_tensors_are_refused_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = run_config(dir.path());
    let model = dir.path().join("model");
    edit_config(&model, |v| v["num_hidden_layers"] = 2.into());
    let (ok, text) = train(&cfg, &[]);
    assert!(
        !ok && text.contains("model.layers.2.") && text.contains("num_hidden_layers"),
        "{text}"
    );
    edit_config(&model, |v| v["num_hidden_layers"] = 3.into());
    edit_weights(&model, |t| {
        t.push((
            "model.layers.0.self_attn.q_proj.bias".into(),
            vec![64],
            vec![0.0; 64],
        ))
    });
    let (ok, text) = train(&cfg, &[]);
    assert!(
        !ok && text.contains("q_proj.bias") && text.contains("no biases"),
        "{text}"
    );
}

/// Case 8: an adapter with fully trained modules (`modules_to_save`) is refused, not half-merged.
#[test]
fn case08_an_adapter_with_modules_to_save_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let adapter = dir.path().join("adapter");
    std::fs::create_dir_all(&adapter).unwrap();
    for f in ["adapter_config.json", "adapter_model.safetensors"] {
        std::fs::copy(
            fixtures().join("tiny-llama/adapter").join(f),
            adapter.join(f),
        )
        .unwrap();
    }
    edit_config_file(&adapter.join("adapter_config.json"), |v| {
        v["modules_to_save"] = serde_json::json!(["lm_head"])
    });
    let out = dir.path().join("merged");
    let model = fixtures().join("tiny-llama/model");
    let (ok, text) = fuselora(&[
        "merge",
        "--model",
        model.to_str().unwrap(),
        "--adapter",
        adapter.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(
        !ok && text.contains("modules_to_save") && text.contains("lm_head"),
        "{text}"
    );
    assert!(
        !out.exists() && entries(dir.path()) == vec!["adapter"],
        "nothing is left behind"
    );
}

fn edit_config_file(path: &Path, edit: impl Fn(&mut serde_json::Value)) {
    let mut v: serde_json::Value = serde_json::from_slice(&read(path)).unwrap();
    edit(&mut v);
    std::fs::write(path, serde_json::to_string_pretty(&v).unwrap()).unwrap();
}

/// Writes a token shard of `examples` `(ids, labels)` at `path`.
fn shard(path: &Path, examples: &[(Vec<i32>, Vec<i32>)]) {
    let examples: Vec<trainer::data::batching::Example> = examples
        .iter()
        .map(|(ids, labels)| trainer::data::batching::Example {
            ids: ids.clone(),
            labels: labels.clone(),
        })
        .collect();
    trainer::data::token_shards::write_shard(path, &examples, 0).unwrap();
}

/// Case 9 (and 11's out-of-vocabulary id): a token shard with nothing to train on, or with an id
/// the model does not have, is refused before the first step, naming the file and example.
#[test]
fn case09_token_shards_without_labels_or_with_foreign_ids_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = run_config(dir.path());
    let unlabelled = dir.path().join("unlabelled.tokens");
    shard(&unlabelled, &vec![((1..20).collect(), vec![-100; 19]); 8]);
    let set = format!("data.train=[\"{}\"]", unlabelled.display());
    let (ok, text) = train(&cfg, &["--set", &set]);
    assert!(
        !ok && text.contains("no token to train on") && text.contains("-100"),
        "{text}"
    );

    let foreign = dir.path().join("foreign.tokens");
    let mut examples = vec![((1..20).collect::<Vec<i32>>(), (1..20).collect::<Vec<i32>>()); 8];
    examples[6].0[3] = 5000;
    shard(&foreign, &examples);
    let set = format!("data.train=[\"{}\"]", foreign.display());
    let (ok, text) = train(&cfg, &["--set", &set]);
    assert!(
        !ok && text.contains("foreign.tokens example 6")
            && text.contains("token id 5000")
            && text.contains("vocab_size 320"),
        "{text}"
    );
}

/// Case 10: generate refuses sampling settings that cannot sample, and an empty prompt.
#[test]
fn case10_generate_refuses_bad_sampling_and_an_empty_prompt() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_chat_model(dir.path(), "model");
    let generate = |extra: &[&str]| {
        let mut args = vec![
            "generate",
            "--model",
            model.to_str().unwrap(),
            "--max-new-tokens",
            "2",
        ];
        args.extend_from_slice(extra);
        fuselora(&args)
    };
    for t in ["NaN", "-1", "inf"] {
        let (ok, text) = generate(&["--prompt", "hi", &format!("--temperature={t}")]);
        assert!(
            !ok && text.contains("--temperature") && text.contains("≥ 0"),
            "{t}: {text}"
        );
    }
    for p in ["0", "2"] {
        let (ok, text) = generate(&["--prompt", "hi", "--temperature", "1", "--top-p", p]);
        assert!(
            !ok && text.contains("--top-p") && text.contains("(0, 1]"),
            "{p}: {text}"
        );
    }
    let (ok, text) = generate(&["--prompt", "", "--raw"]);
    assert!(!ok && text.contains("--prompt is empty"), "{text}");
    let (ok, text) = generate(&["--prompt", "hi"]);
    assert!(ok, "{text}");
}

/// Case 11: unclear messages now say what and where.
#[test]
fn case11_bad_data_and_settings_get_messages_that_say_what_and_where() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = run_config(dir.path());
    let data = |name: &str, bytes: &[u8]| {
        let p = dir.path().join(name);
        std::fs::write(&p, bytes).unwrap();
        format!("data.train=[\"{}\"]", p.display())
    };
    let pretty = data(
        "pretty.json",
        b"{\n  \"instruction\": \"Hi\",\n  \"output\": \"Hello\"\n}\n",
    );
    let (ok, text) = train(&cfg, &["--set", &pretty]);
    assert!(
        !ok && text.contains("pretty.json holds one JSON object over 4 lines")
            && text.contains("JSON Lines"),
        "{text}"
    );

    // A byte-order mark is read through: the run trains.
    let mut with_bom = b"\xef\xbb\xbf".to_vec();
    with_bom.extend(read(&dir.path().join("data.jsonl")));
    let bom = data("bom.jsonl", &with_bom);
    let (ok, text) = train(&cfg, &["--set", &bom, "--set", "train.max_steps=1"]);
    assert!(ok, "{text}");
    std::fs::remove_dir_all(dir.path().join("out")).unwrap();

    let mut latin1 = read(&dir.path().join("data.jsonl"));
    latin1.extend(b"\n{\"instruction\": \"Caf\xe9?\", \"output\": \"Oui.\"}\n");
    let latin1 = data("latin1.jsonl", &latin1);
    let (ok, text) = train(&cfg, &["--set", &latin1]);
    assert!(
        !ok && text.contains("latin1.jsonl:41: not valid UTF-8")
            && text.contains("skip_bad_records"),
        "{text}"
    );
    let (ok, text) = train(
        &cfg,
        &[
            "--set",
            &latin1,
            "--set",
            "data.skip_bad_records=true",
            "--set",
            "train.max_steps=1",
        ],
    );
    assert!(
        ok && text.contains("latin1.jsonl:41: not valid UTF-8")
            && text.contains("1 bad records skipped"),
        "{text}"
    );
    std::fs::remove_dir_all(dir.path().join("out")).unwrap();

    let model = dir.path().join("model");
    let tokenizer = read(&model.join("tokenizer.json"));
    std::fs::write(
        model.join("tokenizer.json"),
        b"{\"version\": \"1.0\", \"model\": 3}",
    )
    .unwrap();
    let (ok, text) = train(&cfg, &[]);
    assert!(
        !ok && text.contains("tokenizer.json is not a tokenizer file")
            && text.contains("save_pretrained"),
        "{text}"
    );
    std::fs::write(model.join("tokenizer.json"), tokenizer).unwrap();

    let (ok, text) = train(&cfg, &["--set", "train.learning_rate=1e-4"]);
    assert!(
        !ok && text.contains("in --set train.learning_rate=1e-4") && !text.contains("run.toml"),
        "{text}"
    );
}

/// Case 12: resuming a finished run changes nothing; a failed run leaves no empty folder; an
/// oversized rank is refused instead of writing gigabytes.
#[test]
fn case12_finished_runs_failed_starts_and_oversized_ranks() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = run_config(dir.path());
    let out = dir.path().join("out");
    let (ok, text) = train(&cfg, &["--set", "lora.r=100000"]);
    assert!(
        !ok && text.contains("lora.r = 100000") && text.contains("k_proj") && text.contains("≤ 32"),
        "{text}"
    );
    assert!(!out.exists(), "a failed start leaves no folder");

    assert!(train(&cfg, &[]).0);
    let summary = read(&out.join("summary.json"));
    let (ok, text) = train(&cfg, &["--resume"]);
    assert!(
        !ok && text.contains("has finished") && text.contains("train.max_steps"),
        "{text}"
    );
    assert_eq!(read(&out.join("summary.json")), summary);
    let (ok, text) = train(&cfg, &["--resume", "--set", "train.max_steps=3"]);
    assert!(ok, "{text}");
    let summary: serde_json::Value =
        serde_json::from_slice(&read(&out.join("summary.json"))).unwrap();
    assert_eq!(summary["steps"], 3);
    assert!(
        summary["final_loss"].as_f64().is_some_and(f64::is_finite),
        "{summary}"
    );
}

/// prepare-data stages its shards and refuses a folder that is not empty.
#[test]
fn prepare_data_writes_a_folder_whole_and_refuses_a_non_empty_one() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = run_config(dir.path());
    let shards = dir.path().join("shards");
    let prepare = |extra: &[&str]| {
        let mut args = vec![
            "prepare-data",
            "--config",
            cfg.to_str().unwrap(),
            "--out",
            shards.to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        fuselora(&args)
    };
    assert!(prepare(&["--examples-per-shard", "10"]).0);
    assert_eq!(
        entries(&shards),
        vec![
            "train-00000.tokens",
            "train-00001.tokens",
            "train-00002.tokens",
            "train-00003.tokens"
        ]
    );
    let (ok, text) = prepare(&[]);
    assert!(
        !ok && text.contains("not empty") && text.contains("--overwrite"),
        "{text}"
    );
    let (ok, text) = prepare(&["--overwrite"]);
    assert!(ok && text.contains("train-00000.tokens"), "{text}");
    assert_eq!(
        entries(&shards),
        vec!["train-00000.tokens"],
        "no stale shard is left"
    );
    let (ok, text) = fuselora(&[
        "prepare-data",
        "--config",
        cfg.to_str().unwrap(),
        "--out",
        dir.path().to_str().unwrap(),
        "--overwrite",
    ]);
    assert!(!ok && text.contains("destroy"), "{text}");
}
