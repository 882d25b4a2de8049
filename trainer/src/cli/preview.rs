//! `fuselora preview --config FILE.toml [-n N] [--color auto|always|never]`: prints the first N
//! training examples exactly as the run would tokenize them (chat template, tools, truncation,
//! chunking), with the tokens the model learns to write highlighted — green on a terminal,
//! between `⟦` and `⟧` otherwise. DPO and ORPO configs show each pair's prompt with both
//! completions.

use anyhow::{Context, Result};
use kernels::IGNORE_INDEX;
use std::io::{IsTerminal, Write};
use std::process::ExitCode;
use trainer::data::preference::{read_preference_file, tokenize_preferences, PairLimits};
use trainer::data::tokenize::{tokenize_record, TokenizeStats};
use trainer::tokenizer::Tokenizer;
use trainer::train::config::{PairLengths, RunConfig};
use trainer::train::sft::{formatting_for, read_records};

/// When to colour the trained tokens.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Color {
    /// On a terminal only.
    Auto,
    Always,
    /// Plain-text markers `⟦…⟧` instead.
    Never,
}

#[derive(clap::Args)]
pub struct Args {
    /// The run config whose model (tokenizer) and data section to preview.
    #[command(flatten)]
    run: super::run_config::RunConfigArgs,
    /// How many examples to print.
    #[arg(short = 'n', long, default_value_t = 3)]
    count: usize,
    #[arg(long, value_enum, default_value_t = Color::Auto)]
    color: Color,
}

/// How trained text is set apart.
struct Marks {
    open: &'static str,
    close: &'static str,
    legend: &'static str,
}

impl Marks {
    fn new(color: Color) -> Marks {
        let ansi = match color {
            Color::Auto => std::io::stdout().is_terminal(),
            Color::Always => true,
            Color::Never => false,
        };
        if ansi {
            Marks {
                open: "\x1b[1;32m",
                close: "\x1b[0m",
                legend: "trained tokens in \x1b[1;32mgreen\x1b[0m",
            }
        } else {
            Marks {
                open: "⟦",
                close: "⟧",
                legend: "trained tokens between ⟦ and ⟧",
            }
        }
    }
}

pub fn run(args: Args) -> Result<ExitCode> {
    let cfg = args.run.load(&[])?;
    let tok = Tokenizer::load(&cfg.model.path)?;
    let marks = Marks::new(args.color);
    let mut out = std::io::stdout().lock();
    writeln!(out, "{} ({})", args.run.config.display(), marks.legend)?;
    match cfg.pair_lengths() {
        Some(lengths) => preview_pairs(&cfg, lengths, &tok, args.count, &marks, &mut out)?,
        None => preview_examples(&cfg, &tok, args.count, &marks, &mut out)?,
    }
    Ok(ExitCode::SUCCESS)
}

fn preview_examples(
    cfg: &RunConfig,
    tok: &Tokenizer,
    count: usize,
    marks: &Marks,
    out: &mut impl Write,
) -> Result<()> {
    let (records, _) = read_records(&cfg.data.train, cfg)?;
    let formatting = formatting_for(cfg);
    let mut shown = 0;
    for r in &records {
        let mut stats = TokenizeStats::default();
        let examples = tokenize_record(tok, r, &formatting, &mut stats)?;
        let mut notes = Vec::new();
        if stats.texts_chunked > 0 {
            notes.push(format!("split into {} chunks", examples.len()));
        }
        if stats.truncated > 0 {
            notes.push(format!("truncated to {} tokens", formatting.max_seq_len));
        }
        if stats.dropped_too_long + stats.dropped_no_target > 0 && examples.is_empty() {
            notes.push("dropped (too long, or nothing to train)".to_string());
        }
        if examples.is_empty() {
            writeln!(out, "── {} · {}", r.origin, notes.join(", "))?;
        }
        for (k, e) in examples.iter().enumerate() {
            if shown == count {
                return Ok(());
            }
            shown += 1;
            let chunk = if examples.len() > 1 {
                format!(" chunk {}/{}", k + 1, examples.len())
            } else {
                String::new()
            };
            let trained = trained_mask(&e.labels);
            writeln!(
                out,
                "── {}{chunk} · {} tokens, {} trained{}",
                r.origin,
                e.ids.len(),
                trained.iter().filter(|&&t| t).count(),
                if notes.is_empty() {
                    String::new()
                } else {
                    format!(" · {}", notes.join(", "))
                }
            )?;
            writeln!(out, "{}", highlighted(tok, &e.ids, &trained, marks)?)?;
        }
        if shown == count {
            break;
        }
    }
    Ok(())
}

fn preview_pairs(
    cfg: &RunConfig,
    lengths: PairLengths,
    tok: &Tokenizer,
    count: usize,
    marks: &Marks,
    out: &mut impl Write,
) -> Result<()> {
    let mut records = Vec::new();
    for p in &cfg.data.train {
        let (r, _) = read_preference_file(p, &cfg.data.columns, cfg.data.skip_bad_records)?;
        records.extend(r);
        if records.len() >= count {
            break;
        }
    }
    records.truncate(count);
    let limits = PairLimits {
        max_prompt_len: lengths.max_prompt_len,
        max_len: lengths.max_len,
    };
    let (pairs, _) = tokenize_preferences(tok, &records, limits)?;
    for (r, p) in records.iter().zip(&pairs) {
        for (name, completion) in [("chosen", &p.chosen), ("rejected", &p.rejected)] {
            let ids: Vec<i32> = p.prompt.iter().chain(completion).copied().collect();
            let trained: Vec<bool> = (0..ids.len()).map(|i| i >= p.prompt.len()).collect();
            writeln!(
                out,
                "── {} {name} · {} prompt + {} completion tokens",
                r.origin,
                p.prompt.len(),
                completion.len()
            )?;
            writeln!(out, "{}", highlighted(tok, &ids, &trained, marks)?)?;
        }
    }
    Ok(())
}

/// Which tokens are next-token targets: a label is set and the token is not the first.
fn trained_mask(labels: &[i32]) -> Vec<bool> {
    labels
        .iter()
        .enumerate()
        .map(|(i, &l)| i > 0 && l != IGNORE_INDEX)
        .collect()
}

/// The decoded text, each run of trained tokens wrapped in the marks.
fn highlighted(tok: &Tokenizer, ids: &[i32], trained: &[bool], marks: &Marks) -> Result<String> {
    let mut text = String::new();
    let mut start = 0;
    while start < ids.len() {
        let end = start
            + trained[start..]
                .iter()
                .take_while(|&&t| t == trained[start])
                .count();
        let span: Vec<u32> = ids[start..end].iter().map(|&i| i as u32).collect();
        let piece = tok
            .decode(&span, false)
            .context("cannot decode the example")?;
        if trained[start] {
            text.push_str(marks.open);
            text.push_str(&piece);
            text.push_str(marks.close);
        } else {
            text.push_str(&piece);
        }
        start = end;
    }
    Ok(text)
}
