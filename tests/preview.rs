//! `fuselora preview`: the first examples as the run tokenizes them, trained text marked.

mod support;

use std::process::Command;
use support::tiny_chat_model;

fn preview(config: &std::path::Path, extra: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_fuselora"))
        .args(["preview", "--config", config.to_str().unwrap()])
        .args(extra)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    text
}

#[test]
fn trained_text_is_marked_and_long_texts_show_their_chunks() {
    let dir = tempfile::tempdir().unwrap();
    let (chat, text) = (dir.path().join("chat.jsonl"), dir.path().join("d.txt"));
    std::fs::write(
        &chat,
        "{\"messages\": [{\"role\": \"user\", \"content\": \"2+2?\"}, {\"role\": \"assistant\", \"content\": \"4.\"}]}\n",
    )
    .unwrap();
    std::fs::write(
        &text,
        "abcdefghijklmnopqrstuvwxyzabcdefghijklmnopqrstuvwxyz0123456789ABCDEFGH",
    )
    .unwrap();
    let config = dir.path().join("run.toml");
    std::fs::write(
        &config,
        format!(
            "[model]\npath = {:?}\n[data]\ntrain = [{:?}, {:?}]\nmax_seq_len = 32\n[output]\ndir = {:?}\n",
            tiny_chat_model(dir.path(), "model"),
            chat,
            text,
            dir.path().join("out")
        ),
    )
    .unwrap();
    let text = preview(&config, &["-n", "3", "--color", "never"]);
    // The byte-level tokenizer: one token per byte, special tokens whole.
    assert!(
        text.contains("<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n⟦4.<|im_end|>\n⟧"),
        "{text}"
    );
    // 70 characters + EOS = 71 tokens in rows of 32: chunks of 32, 32, 7; the first token of
    // each chunk has nothing before it in its row, so it is not trained.
    assert!(
        text.contains("d.txt:1 chunk 1/3 · 32 tokens, 31 trained · split into 3 chunks"),
        "{text}"
    );
    assert!(
        text.contains("a⟦bcdefghijklmnopqrstuvwxyzabcdef⟧"),
        "{text}"
    );
    assert!(text.contains("d.txt:1 chunk 2/3"), "{text}");
    assert!(
        !text.contains("chunk 3/3"),
        "-n 3 stops after three examples: {text}"
    );
}
