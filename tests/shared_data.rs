//! Training on the real datasets in ../shared/data (alpaca, sharegpt with tool calls, raw text):
//! every record is read, tokenized and trained on for a couple of steps. These files may not be
//! committed, so the test skips with a printed reason where ../shared is absent (CI has it).

mod support;

use kernels::cpu::CpuBackend;
use std::path::PathBuf;
use support::{fixtures, tiny_chat_model};
use trainer::data::batching::{epoch_fill, Batching};
use trainer::data::records::{read_file, Format, Sample};
use trainer::data::tokenize::{encode_sample, tokenize_records, Formatting};
use trainer::tokenizer::Tokenizer;
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
        if format == "text" {
            assert!(
                s.train.texts_chunked > 0 && s.train.truncated == 0,
                "{file}: long texts are chunked at 128 tokens: {:?}",
                s.train
            );
        } else {
            assert!(
                s.train.truncated > 0,
                "{file}: long records are truncated at 128 tokens"
            );
        }
    }
}

/// Best-fit-decreasing packing fills ≥ 98% of the token slots of the micro-batches (rows of 2, the
/// bench's shape) on every shared dataset, at rows of 512 and 2048 tokens, and chunking keeps
/// every token of the long texts.
#[test]
fn packing_fills_rows_and_chunking_keeps_every_text_token() {
    let Some(data) = shared_data() else { return };
    let tok = Tokenizer::load(&fixtures().join("smollm2-tokenizer")).unwrap();
    let none = Default::default();
    for (file, format) in [
        ("alpaca_en_demo.json", Format::Alpaca),
        ("glaive_toolcall_en_demo.json", Format::ShareGpt),
        ("c4_demo.jsonl", Format::Text),
    ] {
        let records = read_file(&data.join(file), Some(format), &none, false)
            .unwrap()
            .records;
        for max_seq_len in [512, 2048] {
            let f = Formatting {
                alpaca_as_chat: true,
                train_on_prompt: false,
                max_seq_len,
                drop_long: false,
                text_overlap: 0,
            };
            let (examples, stats) = tokenize_records(&tok, &records, &f).unwrap();
            let b = Batching {
                rows: 2,
                max_seq_len,
                packing: true,
                pad_id: 0,
            };
            let fill = epoch_fill(&examples, &b, 42);
            eprintln!(
                "{file} at {max_seq_len}: {} examples, {} tokens, {:.2}% filled",
                examples.len(),
                stats.tokens,
                100.0 * fill
            );
            assert!(fill >= 0.98, "{file} at {max_seq_len}: {fill}");
            if format == Format::Text {
                let document_tokens: usize = records
                    .iter()
                    .map(|r| encode_sample(&tok, &r.sample, &f).unwrap().0.len())
                    .sum();
                assert!(stats.texts_chunked > 0 && stats.truncated == 0);
                assert!(records.iter().all(|r| matches!(r.sample, Sample::Text(_))));
                // Every token is in a chunk, but for one-token tails (no target) dropped.
                assert_eq!(
                    stats.tokens + stats.dropped_no_target,
                    document_tokens,
                    "{file} at {max_seq_len}"
                );
            }
        }
    }
}
