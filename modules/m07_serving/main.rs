//! m07_serving — a generation engine with continuous batching and an OpenAI-compatible server.
//!
//! SmolLM2-135M-Instruct (m06's model and kernels) behind `course::infer::engine` (one thread
//! owning the model and its KV slots; requests join and leave the running batch between decode
//! steps) and `course::infer::serve` (axum: `/v1/chat/completions`, `/v1/completions`,
//! `/v1/models`, `/health`, `/metrics`, the chat page at `/`). Alone, the binary runs the lesson
//! (notes/m07_serving.md): batch-1 speed per weight format, batched answers against solo ones,
//! a load sweep over HTTP at 1, 2, 4 and 8 concurrent streams, charts and metrics; then it serves
//! until Ctrl-C. `serve` starts just the server.

use anyhow::{bail, ensure, Context, Result};
use clap::{Parser, Subcommand};
use course::infer::engine::complete;
use course::infer::generate::{generate_cached, GenerateConfig};
use course::infer::loadgen::{self, Target};
use course::infer::serve::{self, AppState, Backend, ServeConfig};
use course::infer::{ChatModel, Engine, EngineConfig, LlamaSlots, Message, Params, Request, Sampling};
use course::io::peft::read_adapter;
use course::models::llama::{RunFormat, WeightFormat};
use course::run::charts::{LineChart, Series};
use course::run::{CommonArgs, Op, Run, Setup};
use course::sys::runtime::on_fresh_thread;
use serde::Serialize;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tch::Kind;

const DEFAULT_MODEL: &str = "data/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf";

/// Module 7: serving. A generation engine that batches concurrent requests (continuous
/// batching over KV-cache slots) behind an OpenAI-compatible HTTP server with a chat page.
///
/// Alone it runs the lesson: (1) prefill and decode speed of one request per weight format,
/// (2) greedy answers of requests side by side against the same requests alone (they must be
/// equal), (3) a load sweep over HTTP on 127.0.0.1 at 1, 2, 4 and 8 concurrent streams (time to
/// first token, time between tokens, aggregate tokens/s), then it prints the URL and serves until
/// Ctrl-C (not with --quick or --no-serve). `serve` starts just the server.
///
/// Writes outputs/m07_serving/: metrics.json, load.png (aggregate tokens/s and time to first
/// token against concurrency), formats.png (batch-1 decode tokens/s per format).
#[derive(Parser, Debug)]
#[command(version, about, long_about, after_long_help = LESSON)]
struct Args {
    #[command(flatten)]
    common: CommonArgs,
    #[command(flatten)]
    server: ServerArgs,
    /// Lesson: weight formats whose batch-1 speed is measured, comma-separated
    #[arg(long, default_value = "f32,bf16,int8,nf4_x8,q4_1,q4_1_x8")]
    formats: String,
    /// Lesson: requests per concurrency level of the load sweep
    #[arg(long, default_value_t = 16, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=10_000))]
    requests: usize,
    /// Lesson: new tokens per request of the load sweep
    #[arg(long, default_value_t = 64, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=4096))]
    sweep_tokens: usize,
    /// Lesson: do not serve at the end
    #[arg(long)]
    no_serve: bool,
    #[command(subcommand)]
    cmd: Option<Cmd>,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Start the server only (until Ctrl-C)
    Serve,
}

#[derive(clap::Args, Debug, Clone, Serialize)]
struct ServerArgs {
    /// A .gguf file (q4_1 keeps its blocks; the other formats start from its numbers)
    #[arg(long, default_value = DEFAULT_MODEL)]
    model: PathBuf,
    /// Weight format served: f32, bf16, int8, nf4, q4_1 (the file's own blocks); nf4_x8 and
    /// q4_1_x8 decode with int8 activations (m06's fastest decode on a CPU with VNNI)
    #[arg(long, default_value = "q4_1_x8")]
    format: String,
    /// A peft adapter folder (m06 `train` writes one), merged into the weights before any
    /// quantization (not with q4_1, whose blocks are the file's)
    #[arg(long)]
    adapter: Option<PathBuf>,
    /// KV-cache slots: the most requests decoded together (each holds --context positions)
    #[arg(long, default_value_t = 8, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=64))]
    slots: usize,
    /// Positions per slot: prompt plus answer (at most the model's 8192)
    #[arg(long, default_value_t = 2048, value_parser = clap::value_parser!(i64).range(16..=8192))]
    context: i64,
    /// Requests that may wait for a slot; more get 429 with Retry-After
    #[arg(long, default_value_t = 64, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(0..=100_000))]
    queue: usize,
    /// Address to listen on (127.0.0.1: this machine only; 0.0.0.0 opens it to the network)
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    /// Port (0 picks a free one)
    #[arg(long, default_value_t = 8080)]
    port: u16,
    /// Require `Authorization: Bearer <KEY>` on /v1/* (also read from COURSE_API_KEY)
    #[arg(long)]
    #[serde(skip)]
    api_key: Option<String>,
    /// Largest request body in bytes
    #[arg(long, default_value_t = 1 << 20)]
    body_limit: usize,
    /// Seconds a request may take before it is cancelled
    #[arg(long, default_value_t = 600, value_parser = clap::value_parser!(u64).range(1..=86_400))]
    deadline_s: u64,
}

const LESSON: &str = "\
The lesson (notes/m07_serving.md):
  1. Prefill is compute-bound (a prompt's tokens share each weight read), decode memory-bound
     (each new token reads every weight once): the KV cache keeps past keys and values so a
     token costs one pass, not a re-read of the whole prompt.
  2. Continuous batching: sequences join the running batch between decode steps and leave when
     done, so 8 streams read the weights once per step for all 8.
  3. Sampling: temperature, top-k, top-p, seed, stop strings, presence/frequency penalties.
  4. The API: OpenAI's chat completions (whole and streamed), errors in its envelope, limits
     that keep the server up (body size, prompt length, queue, deadline).

Try: m07_serving serve            then open http://127.0.0.1:8080/
     curl -N http://127.0.0.1:8080/v1/chat/completions -H 'Content-Type: application/json' \\
       -d '{\"messages\":[{\"role\":\"user\",\"content\":\"Hi!\"}],\"stream\":true}'
     python: OpenAI(base_url=\"http://127.0.0.1:8080/v1\", api_key=\"none\")";

/// A format by name (the library's table, without GPTQ's): storage, dtype, int8 activations.
fn format(name: &str) -> Result<(WeightFormat, Kind, bool)> {
    RunFormat::find(name, false).map(|f| (f.weights, f.kind, f.act8))
}

/// The model in `name`'s format, with the adapter merged if one is given.
fn load(a: &ServerArgs, name: &str, setup: &Setup) -> Result<ChatModel> {
    if !a.model.exists() {
        bail!("--model {}: no such file (python3 scripts/setup.py fetches the GGUF)", a.model.display());
    }
    let (fmt, kind, act8) = format(name)?;
    let mut m = match &a.adapter {
        None => ChatModel::load_as(&a.model, kind, setup.device, fmt)
            .with_context(|| format!("loading --model {} as {name}", a.model.display()))?,
        Some(dir) => {
            if fmt == WeightFormat::Q4_1 {
                bail!("--adapter with --format {name}: q4_1 serves the file's own blocks, and a merged adapter changes every weight; use f32, bf16, int8 or nf4");
            }
            let mut m = ChatModel::load_as(&a.model, kind, setup.device, WeightFormat::Dense)
                .with_context(|| format!("loading --model {}", a.model.display()))?;
            let adapter = read_adapter(dir).with_context(|| format!("--adapter {}", dir.display()))?;
            let mut avs = tch::nn::VarStore::new(setup.device);
            let summary = m.model.load_adapter(&mut avs, &adapter, &dir.display().to_string())?;
            m.model.merge_and_unload()?;
            if fmt != WeightFormat::Dense {
                m.model.quantize(fmt).with_context(|| format!("quantizing the merged model to {name}"))?;
            }
            eprintln!("adapter {}: {summary}; merged into the weights", dir.display());
            m
        }
    };
    m.model.set_int8_activations(act8);
    Ok(m)
}

/// An engine over `m` with the server's slots and limits; returns it with the tokenizer and
/// template the handlers need.
fn start_engine(m: ChatModel, a: &ServerArgs) -> Result<Backend> {
    let ChatModel { model, vs, tokenizer, template, stop_ids, .. } = m;
    let slots = LlamaSlots::new(model, Some(vs), a.slots, a.context)?;
    let engine = Engine::start(
        Box::new(slots),
        tokenizer.clone(),
        stop_ids,
        EngineConfig { queue: a.queue, prefill_chunk: 256 },
    );
    Ok(Backend { engine, tokenizer, template })
}

fn serve_config(a: &ServerArgs, port: u16) -> Result<ServeConfig> {
    let ip: std::net::IpAddr = a.host.parse().with_context(|| format!("--host {:?} is not an IP address", a.host))?;
    Ok(ServeConfig {
        addr: SocketAddr::new(ip, port),
        api_key: a.api_key.clone().or_else(|| std::env::var("COURSE_API_KEY").ok()).filter(|k| !k.is_empty()),
        body_limit: a.body_limit,
        max_prompt_tokens: (a.context - 1) as usize,
        deadline: Duration::from_secs(a.deadline_s),
        grace: Duration::from_secs(30),
        model_id: "SmolLM2-135M-Instruct".into(),
        info: serde_json::json!({
            "format": a.format,
            "adapter": a.adapter.as_ref().map(|p| p.display().to_string()),
            "file": a.model.display().to_string(),
        }),
    })
}

/// Serves until Ctrl-C; the model loads while /health answers 503.
fn serve_only(a: &ServerArgs, common: &CommonArgs) -> Result<()> {
    let setup = Setup::apply(common)?;
    let state = AppState::new(serve_config(a, a.port)?);
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    let (tx, rx) = tokio::sync::oneshot::channel();
    let st = state.clone();
    let server = rt.spawn(serve::serve(st, serve::ctrl_c(), Some(tx)));
    let addr = rt.block_on(rx).context("the server did not start")?;
    eprintln!("listening on http://{addr}/ (loading the model; /health says 503 until it is ready)");
    let t = Instant::now();
    let m = on_fresh_thread(|| load(a, &a.format, &setup))?;
    state.set_backend(start_engine(m, a)?);
    eprintln!(
        "ready in {:.1} s: {} as {}, {} slots of {} positions. Ctrl-C stops.",
        t.elapsed().as_secs_f64(),
        a.model.display(),
        a.format,
        a.slots,
        a.context
    );
    rt.block_on(server).context("the server task")??;
    eprintln!("stopped");
    Ok(())
}

#[derive(Debug, Serialize)]
struct FormatSpeed {
    format: String,
    weight_mb: f64,
    prefill_tok_s: f64,
    decode_tok_s: f64,
}

/// Batch-1 speed of `name`: a greedy answer to one question (prefill of the chat prompt, then
/// `new` tokens).
fn format_speed(a: &ServerArgs, name: &str, setup: &Setup, new: usize) -> Result<FormatSpeed> {
    // On a thread of its own, so its OpenMP pool is gone before the engine's starts.
    on_fresh_thread(|| format_speed_here(a, name, setup, new))
}

fn format_speed_here(a: &ServerArgs, name: &str, setup: &Setup, new: usize) -> Result<FormatSpeed> {
    let m = load(a, name, setup)?;
    let prompt = chat_prompt(&m, "Explain in a few sentences why the sky is blue.")?;
    let cfg = GenerateConfig {
        sampling: Sampling { temperature: 0.0, top_k: None, top_p: 1.0 },
        max_new_tokens: new,
        stop_ids: vec![],
        ..Default::default()
    };
    // A warm-up answer, then the timed one.
    generate_cached(
        &m.model,
        &m.tokenizer,
        &prompt,
        &GenerateConfig { max_new_tokens: 4, ..cfg.clone() },
        &mut |_| Ok(()),
    )?;
    let g = generate_cached(&m.model, &m.tokenizer, &prompt, &cfg, &mut |_| Ok(()))?;
    Ok(FormatSpeed {
        format: name.into(),
        weight_mb: m.model.weight_bytes() as f64 / 1e6,
        prefill_tok_s: g.prefill_tokens_per_sec(),
        decode_tok_s: g.decode_tokens_per_sec(),
    })
}

fn chat_prompt(m: &ChatModel, q: &str) -> Result<Vec<i64>> {
    m.encode(&m.template.render(&[Message::new("user", q)], true)?)
}

const QUESTIONS: &[&str] = &[
    "What is the capital of France?",
    "Give me three tips for staying healthy.",
    "Write a haiku about autumn.",
    "How do I make a cup of tea?",
    "What is a neural network?",
    "Name the planets of the solar system.",
    "Why do cats purr?",
    "Translate 'good morning' into Spanish and French.",
];

/// Greedy answers alone and side by side on one engine: the number of prompts whose tokens
/// agree, and the decode steps the side-by-side run took for its tokens.
fn batched_vs_solo(b: &Backend, n: usize, new: usize) -> Result<(usize, usize, u64, usize)> {
    let greedy = Params {
        sampling: Sampling { temperature: 0.0, top_k: None, top_p: 1.0 },
        max_tokens: new,
        ..Default::default()
    };
    let prompts: Vec<Vec<i64>> = QUESTIONS
        .iter()
        .take(n)
        .map(|q| {
            Ok(b.tokenizer
                .encode(b.template.render(&[Message::new("user", q)], true)?, false)
                .map_err(|e| anyhow::anyhow!("{e}"))?
                .get_ids()
                .iter()
                .map(|&i| i as i64)
                .collect())
        })
        .collect::<Result<_>>()?;
    let solo: Vec<Vec<i64>> = prompts
        .iter()
        .map(|p| {
            complete(&b.engine, Request { prompt: p.clone(), params: greedy.clone(), deadline: None }).map(|c| c.tokens)
        })
        .collect::<Result<_>>()?;
    let steps0 = b.engine.stats().steps.load(std::sync::atomic::Ordering::Relaxed);
    let rxs: Vec<_> = prompts
        .iter()
        .map(|p| {
            b.engine
                .submit(Request { prompt: p.clone(), params: greedy.clone(), deadline: None })
                .map_err(|e| anyhow::anyhow!("{e}"))
        })
        .collect::<Result<_>>()?;
    let mut same = 0;
    let mut tokens = 0;
    for (mut rx, want) in rxs.into_iter().zip(&solo) {
        let mut got = vec![];
        while let Some(ev) = rx.blocking_recv() {
            match ev {
                course::infer::Event::Text { token, .. } if token >= 0 => got.push(token),
                course::infer::Event::Done { .. } => break,
                course::infer::Event::Error(e) => bail!("engine: {e}"),
                _ => {}
            }
        }
        tokens += got.len();
        same += (&got == want) as usize;
    }
    let steps = b.engine.stats().steps.load(std::sync::atomic::Ordering::Relaxed) - steps0;
    Ok((same, prompts.len(), steps, tokens))
}

/// The sweep's requests: the questions in turn, sampled (temperature 0.7, seeded per request)
/// and run to `tokens` new tokens so every level decodes the same amount.
fn sweep_target(addr: SocketAddr, api_key: Option<String>, tokens: usize) -> Target {
    Target {
        addr,
        path: "/v1/chat/completions".into(),
        api_key,
        body: Arc::new(move |i| {
            serde_json::json!({
                "messages": [{"role": "user", "content": QUESTIONS[i % QUESTIONS.len()]}],
                "stream": true, "stream_options": {"include_usage": true},
                "max_tokens": tokens, "temperature": 0.7, "seed": i, "ignore_eos": true,
            })
        }),
        timeout: Duration::from_secs(600),
    }
}

fn lesson(args: &Args) -> Result<()> {
    let a = &args.server;
    let quick = args.common.quick;
    let mut run = Run::start(
        "m07_serving",
        &args.common,
        &serde_json::json!({"server": a, "formats": args.formats, "requests": args.requests}),
    )?;
    let setup = Setup::apply(&args.common)?;
    // 1. Batch-1 speed per format.
    let formats: Vec<String> = if quick {
        vec![a.format.clone()]
    } else {
        args.formats.split(',').map(|s| s.trim().to_string()).filter(|s| !s.is_empty()).collect()
    };
    for f in &formats {
        format(f).with_context(|| "--formats")?;
    }
    println!("== 1. one request at a time, per weight format (greedy, {} new tokens)", if quick { 8 } else { 64 });
    let mut speeds = vec![];
    for f in &formats {
        let s = format_speed(a, f, &setup, if quick { 8 } else { 64 })?;
        println!(
            "{:>8}: {:7.1} MB of weights, prefill {:6.0} tok/s, decode {:6.1} tok/s",
            s.format, s.weight_mb, s.prefill_tok_s, s.decode_tok_s
        );
        run.metric(&format!("{}_decode_tok_s", s.format), s.decode_tok_s);
        run.metric(&format!("{}_prefill_tok_s", s.format), s.prefill_tok_s);
        speeds.push(s);
    }
    let bars: Vec<(String, f64)> = speeds.iter().map(|s| (s.format.clone(), s.decode_tok_s)).collect();
    let p = run.path("formats.png");
    course::run::charts::bar_chart(&p, "Decode, one request (tokens/s)", "tokens/s", &bars)?;
    run.artifact(&p);

    // 2. The server's engine: batched against solo.
    let m = on_fresh_thread(|| load(a, &a.format, &setup))?;
    let backend = start_engine(m, a)?;
    let n = if quick { 2 } else { a.slots.min(QUESTIONS.len()) };
    let (same, total, steps, tokens) = batched_vs_solo(&backend, n, if quick { 6 } else { 32 })?;
    println!("== 2. greedy answers side by side: {same} of {total} equal their solo answers ({tokens} tokens in {steps} decode steps)");
    run.target("batched_equals_solo", (same == total) as u8 as f64, Op::Ge, 1.0);
    run.metric("batched_tokens_per_step", tokens as f64 / steps.max(1) as f64);

    // 3. The load sweep over HTTP.
    let state = AppState::new(serve_config(a, if quick || args.no_serve { 0 } else { a.port })?);
    state.set_backend(backend);
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    let server = serve::start_on(&rt, state.clone())?;
    let addr = server.addr;
    let levels: &[usize] = if quick { &[1, 2] } else { &[1, 2, 4, 8] };
    let requests = if quick { 2 } else { args.requests };
    let tokens = if quick { 8 } else { args.sweep_tokens };
    println!("== 3. load sweep on http://{addr}: {requests} requests per level, {tokens} new tokens each");
    println!(
        "{:>5} {:>8} {:>7} {:>10} {:>10} {:>10} {:>10} {:>10}",
        "conc", "requests", "failed", "tok/s", "ttft p50", "ttft p90", "itl p50", "itl p90"
    );
    let target = sweep_target(addr, state.cfg.api_key.clone(), tokens);
    let mut results = vec![];
    for &c in levels {
        let l = rt.block_on(loadgen::level(&target, c, requests.max(c)));
        println!(
            "{:>5} {:>8} {:>7} {:>10.1} {:>8.0}ms {:>8.0}ms {:>8.1}ms {:>8.1}ms",
            l.concurrency,
            l.requests,
            l.failed,
            l.aggregate_tok_s,
            l.ttft_p50_ms,
            l.ttft_p90_ms,
            l.itl_p50_ms,
            l.itl_p90_ms
        );
        if let Some(e) = &l.first_error {
            eprintln!("   first failure at concurrency {c}: {e}");
        }
        results.push(l);
    }
    let failed: usize = results.iter().map(|l| l.failed).sum();
    run.target("load_failed_requests", failed as f64, Op::Le, 0.0);
    let one = results.first().map_or(1.0, |l| l.aggregate_tok_s).max(1e-9);
    let top = results.last().map_or(0.0, |l| l.aggregate_tok_s);
    let top_c = results.last().map_or(1, |l| l.concurrency);
    if !quick {
        run.target("aggregate_8_vs_1", top / one, Op::Ge, 4.0);
    } else {
        run.metric(&format!("aggregate_{top_c}_vs_1"), top / one);
    }
    for l in &results {
        run.metric(&format!("c{}_aggregate_tok_s", l.concurrency), l.aggregate_tok_s);
        run.metric(&format!("c{}_ttft_p50_ms", l.concurrency), l.ttft_p50_ms);
        run.metric(&format!("c{}_itl_p50_ms", l.concurrency), l.itl_p50_ms);
    }
    let p = run.path("load.png");
    LineChart::new("Load sweep: aggregate decode speed", "concurrent streams", "tokens/s")
        .series(Series::line(
            "aggregate tokens/s",
            results.iter().map(|l| (l.concurrency as f64, l.aggregate_tok_s)).collect(),
        ))
        .series(Series::dashed(
            "linear in streams",
            results.iter().map(|l| (l.concurrency as f64, one * l.concurrency as f64)).collect(),
        ))
        .save(&p)?;
    run.artifact(&p);
    let p = run.path("ttft.png");
    LineChart::new("Load sweep: latency", "concurrent streams", "milliseconds")
        .series(Series::line(
            "time to first token, median",
            results.iter().map(|l| (l.concurrency as f64, l.ttft_p50_ms)).collect(),
        ))
        .series(Series::line(
            "time between tokens, median",
            results.iter().map(|l| (l.concurrency as f64, l.itl_p50_ms)).collect(),
        ))
        .save(&p)?;
    run.artifact(&p);
    course::sys::fsutil::write_json_atomic(&run.path("load.json"), &results)?;
    let serve_on = !quick && !args.no_serve;
    run.finish()?;
    if serve_on {
        println!("serving on http://{addr}/ (the chat page; the API under /v1). Ctrl-C stops.");
        rt.block_on(serve::ctrl_c());
    }
    server.stop(&rt)
}

fn main() -> Result<()> {
    let args = Args::parse();
    format(&args.server.format).context("--format")?;
    ensure!(args.server.context >= 16, "--context must be at least 16");
    match args.cmd {
        Some(Cmd::Serve) => serve_only(&args.server, &args.common),
        None => lesson(&args),
    }
}
