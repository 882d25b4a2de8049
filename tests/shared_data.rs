//! Training on the real datasets in ../shared/data (alpaca, sharegpt with tool calls, raw text):
//! every record is read, tokenized and trained on for a couple of steps. These files may not be
//! committed, so the test skips with a printed reason where ../shared is absent (CI has it).

mod support;

use kernels::cpu::CpuBackend;
use std::path::PathBuf;
use support::tiny_chat_model;
use trainer::data::records::{read_file, Format};
use trainer::train::checkpoint::Resume;
use trainer::train::config::RunConfig;
use trainer::train::run::train;

fn shared_data() -> Option<PathBuf> {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared/data");
    if p.join("alpaca_en_demo.json").exists() {
        Some(p)
    } else {
        eprintln!(
            "SKIPPED: {} is absent (the shared datasets are not part of the repository)",
            p.display()
        );
        None
    }
}

#[test]
fn every_shared_dataset_is_read_in_full() {
    let Some(data) = shared_data() else { return };
    let none = Default::default();
    for (file, format, n) in [
        ("alpaca_en_demo.json", Format::Alpaca, 999),
        ("glaive_toolcall_en_demo.json", Format::ShareGpt, 300),
        ("c4_demo.jsonl", Format::Text, 300),
    ] {
        let detected = read_file(&data.join(file), None, &none, false).unwrap();
        let named = read_file(&data.join(file), Some(format), &none, false).unwrap();
        assert_eq!(
            (detected.records.len(), detected.skipped.len()),
            (n, 0),
            "{file}"
        );
        assert_eq!(named.records.len(), n, "{file}");
    }
}

#[test]
fn each_shared_dataset_trains() {
    let Some(data) = shared_data() else { return };
    for (file, format) in [
        ("alpaca_en_demo.json", "alpaca"),
        ("glaive_toolcall_en_demo.json", "sharegpt"),
        ("c4_demo.jsonl", "text"),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let cfg = format!(
            "[model]\npath = \"{}\"\nbackend = \"cpu\"\n[lora]\nr = 4\n[data]\ntrain = [\"{}\"]\nformat = \"{format}\"\nmax_seq_len = 128\n\
             [train]\nbatch_size = 2\nmax_steps = 2\nlr = 1e-3\n[output]\ndir = \"{}\"\n",
            tiny_chat_model(dir.path(), "model").display(),
            data.join(file).display(),
            dir.path().join("out").display()
        );
        std::fs::write(dir.path().join("run.toml"), cfg).unwrap();
        let cfg = RunConfig::load(&dir.path().join("run.toml"), &[]).unwrap();
        let s = train(&CpuBackend::new(), &cfg, Resume::No).unwrap();
        assert_eq!(s.steps, 2, "{file}");
        assert!(
            s.final_loss.unwrap().is_finite() && s.train.examples > 150,
            "{file}: {:?}",
            s.train
        );
        assert!(
            s.train.truncated > 0,
            "{file}: long records are truncated at 128 tokens"
        );
    }
}
