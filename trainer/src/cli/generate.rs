//! `fuselora generate --model DIR [--adapter DIR] --prompt TEXT`: streams the answer to stdout.

use anyhow::{bail, Context, Result};
use kernels::cpu::CpuBackend;
use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use trainer::generate::{generate, Sampling};
use trainer::lora::peft;
use trainer::model::weights::WeightFiles;
use trainer::model::{Decoder, ModelConfig};
use trainer::tokenizer::{ChatMessage, Tokenizer};

#[derive(clap::Args)]
pub struct Args {
    /// A Hugging Face model folder.
    #[arg(long)]
    model: PathBuf,
    /// A PEFT LoRA adapter folder to apply.
    #[arg(long)]
    adapter: Option<PathBuf>,
    /// The prompt; for chat models it becomes a user message in the chat template.
    #[arg(long)]
    prompt: String,
    /// A system message (chat models).
    #[arg(long)]
    system: Option<String>,
    /// Use the prompt as raw text, without the chat template.
    #[arg(long)]
    raw: bool,
    #[arg(long, default_value_t = 256)]
    max_new_tokens: usize,
    /// 0 = greedy decoding.
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    #[arg(long, default_value_t = 1.0)]
    top_p: f32,
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

pub fn run(args: Args) -> Result<ExitCode> {
    if args.prompt.trim().is_empty() {
        bail!("--prompt is empty: give the text to answer or continue");
    }
    let be = CpuBackend::new();
    let config = ModelConfig::load(&args.model)?;
    let tok = Tokenizer::load(&args.model)?;
    let model = Decoder::load(&be, config.clone(), &WeightFiles::open(&args.model)?)?;
    let lora = match &args.adapter {
        Some(dir) => Some(
            peft::load(&be, &config, dir)
                .with_context(|| format!("loading the adapter {}", dir.display()))?,
        ),
        None => None,
    };
    let prompt = if args.raw || tok.chat_template().is_none() {
        tok.encode(&args.prompt, true)?
    } else {
        let mut messages = Vec::new();
        if let Some(s) = &args.system {
            messages.push(ChatMessage::new("system", s));
        }
        messages.push(ChatMessage::new("user", &args.prompt));
        tok.encode_chat(&messages, true)?
    };
    let mut stop: Vec<u32> = config.eos_token_ids.clone();
    stop.extend(tok.eos_id());
    let sampling = Sampling {
        max_new_tokens: args.max_new_tokens,
        temperature: args.temperature,
        top_p: args.top_p,
        seed: args.seed,
    };
    let mut stream = tok.stream_decoder(true);
    let mut stdout = std::io::stdout().lock();
    generate(
        &be,
        &model,
        lora.as_ref(),
        &prompt,
        &stop,
        &sampling,
        |id| {
            if let Some(text) = stream.step(id)? {
                stdout.write_all(text.as_bytes())?;
                stdout.flush()?;
            }
            Ok(())
        },
    )?;
    writeln!(stdout)?;
    Ok(ExitCode::SUCCESS)
}
