//! m04_amp: a GPT trained from scratch on Shakespeare, and the tools that make training fast and
//! stable: autocast (bf16/fp16 on CPU and CUDA), a GradScaler, clipping, gradient accumulation,
//! fused kernels, activation recomputation, NaN detection and the profiler. The lesson is
//! notes/m04_amp.md.

use anyhow::{bail, ensure, Context, Result};
use clap::Parser;
use course::data::lm::{self as lmdata, TokenData, TokenizerChoice};
use course::infer::{generate, Sampling};
use course::io::hf::ModelDir;
use course::models::gpt::{AttentionImpl, Gpt, GptConfig, Kernels, Preset};
use course::run::charts::{self, LineChart, Series};
use course::run::{relaunch, CommonArgs, Op, Run};
use course::sys::rng::Rng;
use course::train::amp::{self, Precision};
use course::train::hooks::ProfileWindow;
use course::train::lm::{self as lmtrain, Inject, LmTrainConfig, OnNonFinite, TrainOptions};
use serde::{Deserialize, Serialize};
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use tch::nn::VarStore;

/// Module 4: training optimisation and stability. Trains a GPT (nanoGPT's model) on the
/// Shakespeare works, character by character (or with a BPE tokenizer), and writes samples of
/// generated text. `--compare fp32,bf16,fp16` trains the same model, seed, data and steps under
/// each precision and draws tokens/s, peak memory, validation loss and the loss curves side by
/// side.
///
/// Writes outputs/m04_amp/: metrics.json, loss.png, samples.txt, run/ (last/ and best/
/// checkpoints with config.json and the vocabulary, tb/ logs), and with --profile a Chrome
/// trace (trace.json) and top_ops.txt; with --compare, compare/ with one folder per precision,
/// tokens_per_s.png, peak_memory.png, val_loss.png, loss_curves.png and compare.md.
#[derive(Parser, Debug, Serialize, Clone)]
#[command(version, about, long_about, after_long_help = LESSON, args_conflicts_with_subcommands = true)]
struct Args {
    #[command(subcommand)]
    #[serde(skip)]
    command: Option<Command>,
    #[command(flatten)]
    common: CommonArgs,
    /// Forward-pass precision: fp32, bf16 (autocast; no scaler needed) or fp16 (autocast +
    /// GradScaler). Weights and optimizer state stay fp32 ("master weights") either way
    #[arg(long, value_enum, default_value_t = Precision::Fp32)]
    precision: Precision,
    /// Train once per listed precision (e.g. fp32,bf16,fp16) with everything else equal, then
    /// compare them in a table and charts
    #[arg(long)]
    compare: Option<String>,
    /// Model size: tiny (tests), cpu (4 layers x 256 wide, 64-token context; the default) or
    /// gpt2 (124M, for GPUs)
    #[arg(long, value_enum)]
    preset: Option<Preset>,
    /// Tokens: char (one per character) or bpe (byte-level BPE trained on the training split)
    #[arg(long, value_enum, default_value_t = TokenizerChoice::Char)]
    tokenizer: TokenizerChoice,
    /// Vocabulary size of the BPE tokenizer
    #[arg(long, default_value_t = 2048, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(300..=65_536))]
    bpe_vocab: usize,
    /// Optimizer steps (default: the recipe's 2500; 40 with --quick)
    #[arg(long)]
    steps: Option<usize>,
    /// Blocks per micro-batch
    #[arg(long, default_value_t = LmTrainConfig::shakespeare_char().batch_size, value_parser = clap::value_parser!(i64).range(1..=4096))]
    batch_size: i64,
    /// Micro-batches per optimizer step (gradient accumulation): the step sees
    /// batch-size x grad-accum blocks
    #[arg(long, default_value_t = 1, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=1024))]
    grad_accum: usize,
    /// Context length (default: the preset's)
    #[arg(long)]
    block_size: Option<i64>,
    /// Transformer blocks (default: the preset's)
    #[arg(long)]
    n_layer: Option<i64>,
    /// Attention heads (default: the preset's)
    #[arg(long)]
    n_head: Option<i64>,
    /// Model width (default: the preset's)
    #[arg(long)]
    n_embd: Option<i64>,
    /// Dropout (default: the preset's, 0 for cpu)
    #[arg(long)]
    dropout: Option<f64>,
    /// Peak learning rate, reached after the warmup
    #[arg(long, default_value_t = LmTrainConfig::shakespeare_char().lr)]
    lr: f64,
    /// Learning rate at the end of the cosine decay
    #[arg(long, default_value_t = LmTrainConfig::shakespeare_char().min_lr)]
    min_lr: f64,
    /// Linear warmup steps
    #[arg(long, default_value_t = LmTrainConfig::shakespeare_char().warmup)]
    warmup: usize,
    /// AdamW weight decay on matrices and embeddings (never biases or LayerNorm scales)
    #[arg(long, default_value_t = LmTrainConfig::shakespeare_char().weight_decay)]
    weight_decay: f64,
    /// AdamW beta2 (0.99 for small data, nanoGPT's Shakespeare setting)
    #[arg(long, default_value_t = LmTrainConfig::shakespeare_char().beta2)]
    beta2: f64,
    /// Clip the global gradient norm to this (0 turns clipping off)
    #[arg(long, default_value_t = LmTrainConfig::shakespeare_char().grad_clip)]
    grad_clip: f64,
    /// Evaluate every this many steps
    #[arg(long, default_value_t = LmTrainConfig::shakespeare_char().eval_interval)]
    eval_interval: usize,
    /// Batches per split in each evaluation
    #[arg(long, default_value_t = LmTrainConfig::shakespeare_char().eval_iters)]
    eval_iters: usize,
    /// Stop a training run after this many seconds (it still evaluates and saves)
    #[arg(long)]
    max_time: Option<f64>,
    /// With --compare: seconds allowed to fp16 on a CPU without native fp16 arithmetic, where it
    /// is emulated and ~500x slower than bf16 (ignored when --max-time is given)
    #[arg(long, default_value_t = 60.0)]
    slow_fp16_budget: f64,
    /// On an inf/NaN loss or gradient: stop (with the first bad parameter named) or skip the step
    #[arg(long, value_enum, default_value_t = OnNonFinite::Stop)]
    on_nonfinite: OnNonFinite,
    /// Poison one gradient with NaN at this step, to watch the non-finite check work
    #[arg(long)]
    inject_nan: Option<usize>,
    /// Attention: sdpa (libtorch's fused kernel) or scratch (course::nn::attention by hand)
    #[arg(long, value_enum, default_value_t = AttentionImpl::Sdpa)]
    attention: AttentionImpl,
    /// The MLP's bias + GELU through the fused kernel from kernels/ (default on: faster on the
    /// CPUs measured; `--fused-gelu false` runs the two tch ops)
    #[arg(long, default_value_t = Kernels::lesson_default().fused_bias_gelu, action = clap::ArgAction::Set, num_args = 0..=1, default_missing_value = "true")]
    fused_gelu: bool,
    /// The loss through the fused softmax-cross-entropy kernel from kernels/ (`--fused-loss` or
    /// `--fused-loss true`; the default is the recipe's)
    #[arg(long, default_value_t = LmTrainConfig::shakespeare_char().fused_loss, action = clap::ArgAction::Set, num_args = 0..=1, default_missing_value = "true")]
    fused_loss: bool,
    /// Under bf16/fp16 autocast on the CPU, run attention in fp32 (default: on unless the CPU has
    /// AMX-BF16; libtorch's CPU flash attention is slower in bf16 than in fp32 without it)
    #[arg(long, default_value_t = Kernels::lesson_default().fp32_cpu_attention, action = clap::ArgAction::Set, num_args = 0..=1, default_missing_value = "true")]
    fp32_attention: bool,
    /// The linear layers through course::ops::linear: oneDNN's GEMM for the forward and the
    /// input gradient on the CPU in fp32 (default: on where the CPU has AVX-512, where it beat
    /// MKL's; `--onednn-linear false` keeps tch's linear)
    #[arg(long, default_value_t = Kernels::lesson_default().onednn_linear, action = clap::ArgAction::Set, num_args = 0..=1, default_missing_value = "true")]
    onednn_linear: bool,
    /// Recompute each block's activations in backward instead of keeping them (known as gradient
    /// checkpointing)
    #[arg(long)]
    recompute_activations: bool,
    /// Capture forward+backward of a training step as a CUDA graph and replay it (CUDA only; the
    /// stand-in for torch.compile's reduce-overhead mode)
    #[arg(long)]
    cuda_graph: bool,
    /// Profile N training steps (after 5 warm-up steps): a Chrome trace and a top-ops table
    #[arg(long)]
    profile: Option<usize>,
    /// Continue from outputs/m04_amp/run/last if it is there
    #[arg(long)]
    resume: bool,
    /// Samples of generated text written after training
    #[arg(long, default_value_t = 3)]
    samples: usize,
    /// Tokens per sample
    #[arg(long, default_value_t = 400)]
    sample_tokens: usize,
    #[command(flatten)]
    sampling: SampleArgs,
    /// (internal) run as one leg of --compare, writing into compare/<precision>/
    #[arg(long, hide = true)]
    compare_leg: bool,
}

/// How generated text is sampled.
#[derive(clap::Args, Debug, Clone, Serialize)]
struct SampleArgs {
    /// Sampling temperature (0: greedy)
    #[arg(long, default_value_t = 0.8)]
    temperature: f64,
    /// Sample only from the k most likely tokens (0: all)
    #[arg(long, default_value_t = 200)]
    top_k: usize,
    /// Nucleus sampling: the smallest set of tokens whose probability reaches p
    #[arg(long, default_value_t = 1.0)]
    top_p: f64,
}

impl SampleArgs {
    fn sampling(&self) -> Sampling {
        Sampling { temperature: self.temperature, top_k: (self.top_k > 0).then_some(self.top_k), top_p: self.top_p }
    }
}

#[derive(clap::Subcommand, Debug, Clone)]
enum Command {
    /// Generate text from a saved model directory (config.json + model.safetensors + vocab.json
    /// or tokenizer.json), e.g. outputs/m04_amp/run/best
    Sample {
        /// The model directory
        #[arg(long, default_value = "outputs/m04_amp/run/best")]
        model: PathBuf,
        /// Text to continue
        #[arg(long, default_value = "\n")]
        prompt: String,
        /// Tokens to generate
        #[arg(long, default_value_t = 300)]
        tokens: usize,
        #[command(flatten)]
        sampling: SampleArgs,
        /// Seed of the sampler
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Where to run: auto, cpu, cuda or cuda:N
        #[arg(long, default_value = "auto", value_parser = |s: &str| s.parse::<course::DeviceChoice>())]
        device: course::DeviceChoice,
    },
}

/// Rebuilds a model from a directory written by a run and continues `prompt`.
fn sample_from_dir(cmd: &Command) -> Result<()> {
    let Command::Sample { model, prompt, tokens, sampling, seed, device } = cmd;
    let device = device.resolve()?;
    let dir = ModelDir::open(model)?;
    dir.expect_type(&[GptConfig::MODEL_TYPE])?;
    let cfg: GptConfig = dir.config_as()?;
    cfg.check().with_context(|| dir.path.join("config.json").display().to_string())?;
    let tok = lmdata::LmTokenizer::load_from(model)?;
    if tok.vocab_size() != cfg.vocab_size {
        bail!(
            "{}: the vocabulary has {} tokens but config.json says {}",
            model.display(),
            tok.vocab_size(),
            cfg.vocab_size
        );
    }
    let vs = VarStore::new(device);
    let gpt = Gpt::new(&vs.root(), &cfg)?;
    course::io::safetensors::load_into(&vs, &dir.weights())?;
    let ids = tok.encode(prompt).with_context(|| format!("--prompt {prompt:?}"))?;
    let out = generate(&gpt, &ids, *tokens, &sampling.sampling(), &mut Rng::new(*seed))?;
    println!("{}", tok.decode(&out));
    Ok(())
}

const LESSON: &str = "\
What happens, in order (notes/m04_amp.md has the lesson):
  1. data       the 42 Shakespeare texts, split 90/10, tokenized once into data/lm/ and
                memory-mapped; random 64-token windows drawn with a seeded RNG
  2. model      GPT: token + position embeddings, pre-LN blocks (causal attention, GELU MLP),
                head tied to the embedding, GPT-2 initialisation
  3. training   AdamW (decay groups), warmup + cosine, grad accumulation, autocast, GradScaler
                (fp16), clipping, inf/NaN check every step, eval every 250 steps, checkpoints
  4. samples    generated text with temperature / top-k / top-p, seeded
  5. compare    --compare fp32,bf16,fp16: the same run per precision, in child processes so
                each one's memory is its own

Try: m04_amp --compare fp32,bf16
     m04_amp --precision bf16 --fused-gelu --fused-loss --profile 10
     m04_amp --quick --inject-nan 3              (watch the check name the parameter)
     m04_amp sample --prompt 'ROMEO.' --temperature 0.6";

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Leg {
    precision: Precision,
    steps: usize,
    tokens_per_s: f64,
    train_seconds: f64,
    peak_memory_bytes: u64,
    memory_measure: String,
    final_val_loss: f64,
    final_train_loss: f64,
    stopped_by_time: bool,
    skipped_steps: usize,
    evals: Vec<(usize, f64, f64)>,
    losses: Vec<(usize, f64)>,
}

fn preset(args: &Args) -> Preset {
    args.preset.unwrap_or(if args.common.quick { Preset::Tiny } else { Preset::Cpu })
}

fn train_config(args: &Args, block_size: i64) -> LmTrainConfig {
    let quick = args.common.quick;
    let steps = args.steps.unwrap_or(if quick { 40 } else { LmTrainConfig::shakespeare_char().steps });
    // The recipe, with what the flags change (their defaults are the recipe's own numbers).
    let cfg = LmTrainConfig {
        steps,
        batch_size: args.batch_size,
        grad_accum: args.grad_accum,
        block_size,
        lr: args.lr,
        min_lr: args.min_lr,
        warmup: args.warmup.min(steps / 2),
        weight_decay: args.weight_decay,
        beta2: args.beta2,
        grad_clip: args.grad_clip,
        eval_interval: args.eval_interval,
        eval_iters: args.eval_iters,
        precision: args.precision,
        on_nonfinite: args.on_nonfinite,
        fused_loss: args.fused_loss,
        max_time: args.max_time,
        seed: args.common.seed,
        cuda_graph: args.cuda_graph,
        ..LmTrainConfig::shakespeare_char()
    };
    if quick {
        cfg.quick(steps)
    } else {
        cfg
    }
}

fn load_data(args: &Args) -> Result<TokenData> {
    let text = lmdata::shakespeare_text()?;
    lmdata::prepare(
        &course::data::registry::data_root().join("lm"),
        "shakespeare",
        &text,
        args.tokenizer,
        args.bpe_vocab,
    )
}

/// One training run: data, model, loop, samples. Returns the leg summary.
fn train_run(run: &mut Run, args: &Args) -> Result<Leg> {
    let data = load_data(args)?;
    let mut cfg = preset(args).config(data.meta.vocab_size);
    cfg.attention = args.attention;
    for (v, field) in [
        (args.block_size, &mut cfg.block_size),
        (args.n_layer, &mut cfg.n_layer),
        (args.n_head, &mut cfg.n_head),
        (args.n_embd, &mut cfg.n_embd),
    ] {
        if let Some(v) = v {
            *field = v;
        }
    }
    if let Some(d) = args.dropout {
        cfg.dropout = d;
    }
    cfg.check()?;
    let tc = train_config(args, cfg.block_size);
    println!(
        "{}: {} tokens for training, {} for validation ({} vocabulary, {})",
        data.meta.corpus,
        data.meta.train_tokens,
        data.meta.val_tokens,
        data.meta.vocab_size,
        data.dir.display()
    );
    println!(
        "GPT {} layers x {} wide, {} heads, {}-token context: {:.2}M parameters; {} precision, {} tokens/step",
        cfg.n_layer,
        cfg.n_embd,
        cfg.n_head,
        cfg.block_size,
        cfg.num_params() as f64 / 1e6,
        tc.precision.name(),
        tc.tokens_per_step()
    );
    if !run.device.is_cuda() && tc.precision == Precision::Fp16 && !course::run::report::cpu_has_native_fp16() {
        println!("note: this CPU has no native fp16 arithmetic (no AVX512-FP16/AMX-FP16): libtorch emulates fp16 matmuls at well under 1 GFLOP/s, hundreds of times slower than bf16. fp16 is a GPU format; on CPUs use bf16");
    }
    if args.cuda_graph && args.recompute_activations {
        bail!("--cuda-graph cannot capture --recompute-activations: the recompute saves the CUDA generator's state, which capture forbids");
    }
    let vs = VarStore::new(run.device);
    let mut model = Gpt::new(&vs.root(), &cfg)?;
    model.kernels = Kernels {
        fused_bias_gelu: args.fused_gelu,
        recompute: args.recompute_activations,
        fp32_cpu_attention: args.fp32_attention,
        onednn_linear: args.onednn_linear,
    };
    let dir = run.path("run");
    let model_config = course::io::hf::tagged_config(GptConfig::MODEL_TYPE, &cfg)?;
    let opts = TrainOptions {
        dir: dir.clone(),
        resume: args.resume,
        model_config: model_config.clone(),
        name: tc.precision.name(),
        inject: args.inject_nan.map(|step| Inject {
            step,
            param: "transformer.h.0.attn.c_attn.weight".into(),
            value: f64::NAN,
        }),
        stop_after: None,
    };
    let mut hooks = args.profile.filter(|&n| n > 0).map(|n| {
        ProfileWindow::new(
            5.min(tc.steps.saturating_sub(n)),
            n.min(tc.steps),
            run.path("trace.json"),
            run.device.is_cuda(),
        )
    });
    let out =
        lmtrain::train(&vs, &model, &lmdata::LmData { train: &data.train, val: &data.val }, &tc, &opts, &mut hooks)?;
    let p = &out.progress;
    if out.stopped_by_time {
        println!("stopped by the time budget after {} of {} steps", p.step, tc.steps);
    }
    println!(
        "{}: {} steps, val loss {:.4}, train loss {:.4}, {:.0} tokens/s, peak memory +{:.0} MB ({})",
        tc.precision.name(),
        p.step,
        out.final_val_loss,
        out.final_train_loss,
        out.tokens_per_s,
        p.peak_memory_bytes as f64 / 1e6,
        out.memory_measure
    );
    for s in &p.skipped {
        println!("skipped step {} ({}): {}", s.step, s.reason, s.detail);
    }
    // best/: the final weights with config.json and the vocabulary, ready for generation.
    let files = course::train::checkpoint::ModelFiles {
        config: model_config,
        generation: Some(args.sampling.sampling().generation_config(args.sample_tokens)),
        extra: Some(&|d: &Path| data.tokenizer.save_to(d)),
    };
    course::train::checkpoint::save_best(&dir, &vs, &files, None)?;

    if args.profile.is_some() {
        let trace = run.path("trace.json");
        let ops = course::sys::profile::top_ops(&trace, 15)?;
        let table = course::sys::profile::format_table(&ops);
        println!("\nTop ops by self time over the profiled steps:\n{table}");
        let path = run.path("top_ops.txt");
        course::sys::fsutil::write_atomic(&path, table.as_bytes())?;
        run.artifact(&trace);
        run.artifact(&path);
    }
    if !args.compare_leg && args.samples > 0 {
        write_samples(run, args, &model, &data)?;
    }
    Ok(Leg {
        precision: tc.precision,
        steps: p.step,
        tokens_per_s: out.tokens_per_s,
        train_seconds: p.train_seconds,
        peak_memory_bytes: p.peak_memory_bytes,
        memory_measure: out.memory_measure.into(),
        final_val_loss: out.final_val_loss,
        final_train_loss: out.final_train_loss,
        stopped_by_time: out.stopped_by_time,
        skipped_steps: p.skipped.len(),
        evals: p.evals.iter().map(|e| (e.step, e.train_loss, e.val_loss)).collect(),
        losses: p.logs.iter().map(|l| (l.step, l.loss)).collect(),
    })
}

fn write_samples(run: &mut Run, args: &Args, model: &Gpt, data: &TokenData) -> Result<()> {
    let s = args.sampling.sampling();
    let mut rng = Rng::new(args.common.seed ^ 0x5a3b1e);
    let prompts = ["\n", "ROMEO.\n", "To be, or not to be"];
    let mut out = String::new();
    for i in 0..args.samples {
        let prompt = prompts[i % prompts.len()];
        let ids = data.tokenizer.encode(prompt)?;
        let ids = if ids.is_empty() { vec![0] } else { ids };
        let gen = generate(model, &ids, args.sample_tokens, &s, &mut rng)?;
        let text = data.tokenizer.decode(&gen);
        out.push_str(&format!(
            "--- sample {} (prompt {:?}, temperature {}, top-k {}, top-p {})\n{}\n\n",
            i + 1,
            prompt,
            s.temperature,
            s.top_k.map_or("all".to_string(), |k| k.to_string()),
            s.top_p,
            text
        ));
    }
    println!("\n{}", out.lines().take(24).collect::<Vec<_>>().join("\n"));
    let p = run.path("samples.txt");
    course::sys::fsutil::write_atomic(&p, out.as_bytes())?;
    run.artifact(&p);
    Ok(())
}

fn loss_chart(run: &mut Run, legs: &[Leg], file: &str, title: &str) -> Result<()> {
    let mut chart = LineChart::new(title, "step", "cross-entropy (nats/token)");
    for l in legs {
        let name = if legs.len() > 1 { format!("{} ", l.precision.name()) } else { String::new() };
        // The per-step training loss is noisy; a 20-step moving mean reads better.
        let raw: Vec<(f64, f64)> = l.losses.iter().map(|&(s, v)| (s as f64, v)).collect();
        let smooth = charts::moving_mean(&raw, 20);
        chart = chart.series(Series::line(&format!("{name}train (mean of 20 steps)"), smooth));
        chart = chart.series(Series::dashed(
            &format!("{name}validation"),
            l.evals.iter().map(|&(s, _, v)| (s as f64, v)).collect(),
        ));
    }
    let p = run.path(file);
    chart.save(&p)?;
    run.artifact(&p);
    Ok(())
}

fn single(args: &Args) -> Result<()> {
    let module = if args.compare_leg { format!("m04_amp/compare/{}", args.precision.name()) } else { "m04_amp".into() };
    let mut run = Run::start(&module, &args.common, args)?;
    let leg = train_run(&mut run, args)?;
    if !args.compare_leg {
        loss_chart(&mut run, std::slice::from_ref(&leg), "loss.png", "GPT on Shakespeare: loss")?;
    }
    run.metric("val_loss", leg.final_val_loss);
    run.metric("train_loss", leg.final_train_loss);
    run.metric("tokens_per_s", leg.tokens_per_s);
    run.metric("train_seconds", leg.train_seconds);
    run.metric("steps", leg.steps as f64);
    run.metric("peak_memory_mb", leg.peak_memory_bytes as f64 / 1e6);
    run.metric("skipped_steps", leg.skipped_steps as f64);
    let default_setup = args.preset.is_none()
        && args.tokenizer == TokenizerChoice::Char
        && args.steps.is_none()
        && args.block_size.is_none()
        && args.n_layer.is_none()
        && args.n_head.is_none()
        && args.n_embd.is_none();
    if !args.compare_leg && default_setup {
        run.target("char_val_loss", leg.final_val_loss, Op::Le, 1.90);
        run.target("train_minutes", leg.train_seconds / 60.0, Op::Le, 10.0);
    }
    if let Some(p) = &args.common.result {
        relaunch::report(p, &leg)?;
    }
    let m = run.finish()?;
    ensure!(m.quick || m.all_targets_met() || m.targets.is_empty(), "not every target was met (see the table above)");
    Ok(())
}

fn compare(args: &Args, list: &str) -> Result<()> {
    let precisions = amp::parse_list(list)?;
    let mut run = Run::start("m04_amp/compare", &args.common, args)?;
    let mut legs = vec![];
    for &p in &precisions {
        // Each precision in its own process: peak memory and allocator state are its own, and a
        // crash in one leg is reported without losing the others.
        let mut leg_args = relaunch::args_without(&[("--compare", true), ("--precision", true)]);
        leg_args.extend(["--precision", p.name(), "--compare-leg", "--samples", "0"].map(OsString::from));
        let slow = !run.device.is_cuda() && p == Precision::Fp16 && !course::run::report::cpu_has_native_fp16();
        if slow && args.max_time.is_none() {
            println!("fp16 on this CPU is emulated (no native fp16 arithmetic): its run is capped at {} s (--slow-fp16-budget)", args.slow_fp16_budget);
            leg_args.extend(["--max-time".into(), args.slow_fp16_budget.to_string().into()]);
        }
        println!("\n=== {} ===", p.name());
        legs.push(relaunch::Child::new(leg_args).run::<Leg>(&format!("the {} run", p.name()))?);
    }
    let base = legs.iter().find(|l| l.precision == Precision::Fp32).or(legs.first()).cloned().context("no legs")?;
    let mut table = String::from("| precision | steps | tokens/s | vs fp32 | peak memory (MB) | final val loss | vs fp32 | skipped steps |\n|---|---|---|---|---|---|---|---|\n");
    for l in &legs {
        table.push_str(&format!(
            "| {} | {}{} | {:.0} | {:.2}x | {:.0} | {:.4} | {:+.1}% | {} |\n",
            l.precision.name(),
            l.steps,
            if l.stopped_by_time { " (time budget)" } else { "" },
            l.tokens_per_s,
            l.tokens_per_s / base.tokens_per_s,
            l.peak_memory_bytes as f64 / 1e6,
            l.final_val_loss,
            100.0 * (l.final_val_loss / base.final_val_loss - 1.0),
            l.skipped_steps
        ));
        run.metric(&format!("{}_tokens_per_s", l.precision.name()), l.tokens_per_s);
        run.metric(&format!("{}_val_loss", l.precision.name()), l.final_val_loss);
        run.metric(&format!("{}_peak_memory_mb", l.precision.name()), l.peak_memory_bytes as f64 / 1e6);
        run.metric(&format!("{}_steps", l.precision.name()), l.steps as f64);
    }
    println!("\n{table}\npeak memory: {}", base.memory_measure);
    let md = run.path("compare.md");
    course::sys::fsutil::write_atomic(&md, format!("{table}\npeak memory: {}\n", base.memory_measure).as_bytes())?;
    run.artifact(&md);
    let bars =
        |f: &dyn Fn(&Leg) -> f64| legs.iter().map(|l| (l.precision.name().to_string(), f(l))).collect::<Vec<_>>();
    for (file, title, unit, vals) in [
        ("tokens_per_s.png", "Training throughput", "tokens/s", bars(&|l| l.tokens_per_s)),
        ("peak_memory.png", "Peak memory of training", "MB", bars(&|l| l.peak_memory_bytes as f64 / 1e6)),
        ("val_loss.png", "Final validation loss", "nats/token", bars(&|l| l.final_val_loss)),
    ] {
        let p = run.path(file);
        charts::bar_chart(&p, title, unit, &vals)?;
        run.artifact(&p);
    }
    loss_chart(&mut run, &legs, "loss_curves.png", "Loss by precision")?;
    let full = |l: &Leg| !l.stopped_by_time;
    if let (Some(f), Some(b)) = (
        legs.iter().find(|l| l.precision == Precision::Fp32 && full(l)),
        legs.iter().find(|l| l.precision == Precision::Bf16 && full(l)),
    ) {
        if !args.common.quick {
            run.target("bf16_speedup_vs_fp32", b.tokens_per_s / f.tokens_per_s, Op::Ge, 1.3);
            run.target("bf16_val_loss_gap_pct", 100.0 * (b.final_val_loss / f.final_val_loss - 1.0).abs(), Op::Le, 2.0);
        }
    }
    let m = run.finish()?;
    ensure!(m.quick || m.targets.is_empty() || m.all_targets_met(), "not every target was met (see the table above)");
    Ok(())
}

fn main() -> Result<()> {
    let args = Args::parse();
    if let Some(cmd) = &args.command {
        return sample_from_dir(cmd);
    }
    ensure!(args.lr.is_finite() && args.lr > 0.0, "--lr must be a finite number > 0");
    ensure!(args.dropout.is_none_or(|d| (0.0..1.0).contains(&d)), "--dropout must be in [0, 1)");
    ensure!(args.steps != Some(0), "--steps must be at least 1");
    ensure!(args.profile != Some(0), "--profile needs at least 1 step");
    ensure!(args.slow_fp16_budget > 0.0, "--slow-fp16-budget must be positive");
    match &args.compare {
        Some(list) if !args.compare_leg => compare(&args, list),
        _ => single(&args),
    }
}
