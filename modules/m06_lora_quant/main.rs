//! m06_lora_quant — LoRA and QLoRA instruction tuning of SmolLM2 with quantization kernels.
//!
//! Today the module has its model: SmolLM2-135M-Instruct read from its GGUF (`course::io::gguf`),
//! built as Hugging Face's Llama (`course::models::llama`), with the tokenizer and the chat
//! template the file carries, answering through the KV-cache generator (`course::infer`).
//! `chat` asks it a question; `export` writes it out as a Hugging Face model folder. LoRA, QLoRA
//! and the 4-bit kernels come next (notes/m06_lora_quant.md).

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand, ValueEnum};
use course::infer::generate::{generate_cached, GenerateConfig};
use course::infer::{ChatModel, Message, Sampling};
use course::run::{CommonArgs, Setup};
use std::io::Write;
use std::path::PathBuf;
use std::time::Instant;
use tch::Kind;

const DEFAULT_MODEL: &str = "data/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf";

/// Module 6: LoRA and quantization on SmolLM2-135M-Instruct. This first part loads the model
/// from its GGUF file and lets you talk to it; the fine-tuning run comes next.
#[derive(Parser, Debug)]
#[command(version, about, long_about, after_long_help = LESSON)]
struct Args {
    #[command(flatten)]
    common: CommonArgs,
    #[command(subcommand)]
    cmd: Option<Cmd>,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Ask SmolLM2 one question through its chat template and stream the answer
    Chat(ChatArgs),
    /// Write the GGUF out as a Hugging Face model folder (config.json, model.safetensors,
    /// tokenizer.json, tokenizer_config.json with the chat template, generation_config.json)
    Export(ExportArgs),
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum Dtype {
    F32,
    Bf16,
}

impl Dtype {
    fn kind(self) -> Kind {
        match self {
            Dtype::F32 => Kind::Float,
            Dtype::Bf16 => Kind::BFloat16,
        }
    }
}

#[derive(clap::Args, Debug)]
struct ModelArgs {
    /// A .gguf file or a model folder written by `export`
    #[arg(long, default_value = DEFAULT_MODEL)]
    model: PathBuf,
    /// Weights' dtype once dequantized: f32 (exact to the file) or bf16 (half the memory)
    #[arg(long, value_enum, default_value_t = Dtype::F32)]
    dtype: Dtype,
}

#[derive(clap::Args, Debug)]
struct ChatArgs {
    /// The question
    question: String,
    #[command(flatten)]
    model: ModelArgs,
    /// A system prompt (default: the template's own, "You are a helpful AI assistant named SmolLM")
    #[arg(long)]
    system: Option<String>,
    /// Most tokens to generate, 1 to 4096
    #[arg(long, default_value_t = 256, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=4096))]
    max_new_tokens: usize,
    /// Sampling temperature; 0 is greedy (always the most likely token)
    #[arg(long, default_value_t = 0.0)]
    temperature: f64,
    /// Keep only the k most likely tokens (0: all)
    #[arg(long, default_value_t = 0)]
    top_k: usize,
    /// Nucleus sampling: keep the most likely tokens up to this probability mass, in (0, 1]
    #[arg(long, default_value_t = 1.0)]
    top_p: f64,
    /// Divide the logits of tokens already seen by this (> 1 repeats less; 1 is off)
    #[arg(long, default_value_t = 1.0)]
    repetition_penalty: f64,
    /// Stop when the answer would contain this string (may repeat)
    #[arg(long)]
    stop: Vec<String>,
}

#[derive(clap::Args, Debug)]
struct ExportArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// The folder to write (created; files in it are replaced)
    #[arg(long, default_value = "outputs/m06_lora_quant/smollm2-hf")]
    out: PathBuf,
    /// Write a GGUF file here instead of a folder (for llama.cpp, Ollama, transformers' gguf_file=)
    #[arg(long)]
    gguf: Option<PathBuf>,
    /// The GGUF's weight type: F32, F16, BF16, Q8_0, Q4_0 or Q4_1 (norms stay F32)
    #[arg(long, default_value = "Q8_0", value_parser = parse_ggml_type)]
    gguf_type: course::io::gguf::GgmlType,
}

fn parse_ggml_type(s: &str) -> Result<course::io::gguf::GgmlType, String> {
    course::io::gguf::GgmlType::from_name(s)
        .filter(|t| t.is_supported())
        .ok_or_else(|| format!("{s:?} is not one of F32, F16, BF16, Q8_0, Q4_0, Q4_1"))
}

const LESSON: &str = "\
What this module is, and will be (notes/m06_lora_quant.md):
  now    chat     SmolLM2-135M-Instruct from its 93 MB Q4_1 GGUF: the Llama block (RMSNorm,
                  rotary positions, grouped-query attention 9/3, SwiGLU), its byte-level BPE
                  tokenizer and Jinja chat template rebuilt from the file, a KV cache, greedy
                  or sampled decoding streamed token by token
         export   the same model as a Hugging Face folder, or (--gguf) as a GGUF file for
                  llama.cpp and Ollama, in F32, F16, BF16, Q8_0, Q4_0 or Q4_1
  next   LoRA and QLoRA instruction tuning on the CPU, adapters saved the way peft saves
         them, and the int8 / 4-bit weight kernels, each against its plain-tch reference

Examples:
  m06_lora_quant chat \"What is the capital of France?\"
  m06_lora_quant chat \"Write a haiku about Rust.\" --temperature 0.7 --top-p 0.9 --seed 3
  m06_lora_quant chat \"Explain RoPE in one sentence.\" --dtype bf16
  m06_lora_quant export --out /tmp/smollm2
  m06_lora_quant export --gguf /tmp/smollm2-q8_0.gguf --gguf-type Q8_0";

fn load(m: &ModelArgs, common: &CommonArgs) -> Result<(ChatModel, Setup, f64)> {
    let setup = Setup::apply(common)?;
    if !m.model.exists() {
        bail!("--model {}: no such file or folder (python3 scripts/setup.py fetches the GGUF)", m.model.display());
    }
    let t = Instant::now();
    let model = ChatModel::load(&m.model, m.dtype.kind(), setup.device)
        .with_context(|| format!("loading --model {}", m.model.display()))?;
    Ok((model, setup, t.elapsed().as_secs_f64()))
}

fn chat(a: &ChatArgs, common: &CommonArgs) -> Result<()> {
    let sampling = Sampling { temperature: a.temperature, top_k: (a.top_k > 0).then_some(a.top_k), top_p: a.top_p };
    sampling.check().context("--temperature/--top-k/--top-p")?;
    let (m, setup, secs) = load(&a.model, common)?;
    eprintln!(
        "{} ({} parameters, {:?}) loaded in {secs:.1} s; {}",
        a.model.model.display(),
        m.model.cfg.num_params(),
        m.kind,
        setup.summary()
    );
    let mut msgs = vec![];
    if let Some(s) = &a.system {
        msgs.push(Message::system(s));
    }
    msgs.push(Message::user(&a.question));
    let prompt = m.encode(&m.template.render(&msgs, true)?)?;
    let cfg = GenerateConfig {
        sampling,
        max_new_tokens: a.max_new_tokens,
        repetition_penalty: a.repetition_penalty,
        stop_ids: m.stop_ids.clone(),
        stop_strings: a.stop.clone(),
        seed: common.seed,
    };
    let mut out = std::io::stdout().lock();
    let g = generate_cached(&m.model, &m.tokenizer, &prompt, &cfg, &mut |t| {
        out.write_all(t.as_bytes())?;
        out.flush()?;
        Ok(())
    })?;
    writeln!(out)?;
    eprintln!(
        "prefill {} tokens at {:.0} tok/s, decode {} tokens at {:.1} tok/s ({:?}), peak RSS {:.0} MB",
        g.prompt_tokens,
        g.prefill_tokens_per_sec(),
        g.tokens.len(),
        g.decode_tokens_per_sec(),
        g.finish,
        course::sys::runtime::peak_rss_bytes() as f64 / 1e6
    );
    Ok(())
}

fn export(a: &ExportArgs, common: &CommonArgs) -> Result<()> {
    let (m, _, _) = load(&a.model, common)?;
    if let Some(path) = &a.gguf {
        m.save_gguf(path, a.gguf_type)?;
        println!("wrote {} ({}, {:.0} MB)", path.display(), a.gguf_type, std::fs::metadata(path)?.len() as f64 / 1e6);
        return Ok(());
    }
    m.save(&a.out)?;
    println!(
        "wrote {} (config.json, model.safetensors, tokenizer.json, tokenizer_config.json, generation_config.json)",
        a.out.display()
    );
    Ok(())
}

fn main() -> Result<()> {
    let args = Args::parse();
    match &args.cmd {
        Some(Cmd::Chat(c)) => chat(c, &args.common),
        Some(Cmd::Export(e)) => export(e, &args.common),
        None => bail!(
            "m06's training run is not built yet; today it has `chat` and `export` (see --help):\n  m06_lora_quant chat \"What is the capital of France?\""
        ),
    }
}
