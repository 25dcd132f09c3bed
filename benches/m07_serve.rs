//! Benchmark (not a test): m07's server against llama.cpp's own server on the same GGUF, the load
//! sweep of the lesson (streamed chat requests, `concurrency` at a time) with both servers up and
//! taking turns level by level and round by round.
//!
//! `cargo bench --bench m07_serve [-- --rounds N] [-- --threads N] [-- --requests N] [-- --tokens N]`
//!
//! The peer is llama-cpp-python's server (`python -m llama_cpp.server`, which answers one request
//! at a time and queues the rest), an optional set-up step:
//! `python3 scripts/setup.py --llama-cpp --no-data` (7-17 min). Without it only ours runs.
//! Both decode the same number of tokens per request: ours with `ignore_eos`, the peer with a
//! -100 logit bias on the end-of-turn tokens. Both sample at temperature 0.7; the figures are
//! client-side: time to first token, gaps between streamed tokens, completion tokens over wall time.

use anyhow::{bail, Context, Result};
mod benchkit;
use course::infer::loadgen::{self, Level, Target};
use course::infer::serve::{self, AppState, Backend, ServeConfig};
use course::infer::{ChatModel, Engine, EngineConfig, LlamaSlots};
use course::models::llama::WeightFormat;
use serde_json::json;
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tch::{Device, Kind};

const MODEL: &str = "data/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf";
const QUESTION: &str = "Write a long story about a lighthouse keeper and the ships she guides home.";

struct Peer(Child);

impl Drop for Peer {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn peer_installed() -> bool {
    Command::new(".venv/bin/python")
        .args(["-c", "import llama_cpp, llama_cpp.server, uvicorn"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// llama.cpp's server on `port`, waited for until /v1/models answers.
fn start_peer(threads: usize) -> Result<(Peer, SocketAddr)> {
    let port = free_port()?;
    let child = Command::new(".venv/bin/python")
        .args(["-m", "llama_cpp.server", "--model", MODEL, "--host", "127.0.0.1"])
        .args(["--port", &port.to_string(), "--n_threads", &threads.to_string()])
        .args(["--n_threads_batch", &threads.to_string(), "--n_ctx", "2048"])
        // By default a new request interrupts the running one (its stream ends at once, empty):
        // queue them instead, as a server under load should.
        .args(["--interrupt_requests", "False"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("starting python -m llama_cpp.server")?;
    let peer = Peer(child);
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse()?;
    let t0 = Instant::now();
    loop {
        if let Ok(mut c) = std::net::TcpStream::connect(addr) {
            use std::io::{Read, Write};
            let _ = c.write_all(b"GET /v1/models HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
            let mut s = String::new();
            let _ = c.read_to_string(&mut s);
            if s.starts_with("HTTP/1.1 200") {
                return Ok((peer, addr));
            }
        }
        if t0.elapsed() > Duration::from_secs(120) {
            bail!("llama_cpp.server did not answer /v1/models within 120 s");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn target(addr: SocketAddr, tokens: usize, ours: bool, bias: &[i64]) -> Target {
    let bias: serde_json::Map<String, serde_json::Value> = bias.iter().map(|t| (t.to_string(), json!(-100))).collect();
    Target {
        addr,
        path: "/v1/chat/completions".into(),
        api_key: None,
        body: Arc::new(move |i| {
            let mut b = json!({
                "model": "SmolLM2-135M-Instruct",
                "messages": [{"role": "user", "content": QUESTION}],
                "stream": true, "stream_options": {"include_usage": true},
                "max_tokens": tokens, "temperature": 0.7, "seed": i,
            });
            if ours {
                b["ignore_eos"] = json!(true);
            } else {
                b["logit_bias"] = json!(bias.clone());
            }
            b
        }),
        timeout: Duration::from_secs(900),
    }
}

fn main() -> Result<()> {
    let b = benchkit::BenchArgs::from_env(2);
    let rounds = b.rounds;
    let tokens = b.get("--tokens").unwrap_or(64);
    let requests = b.get("--requests").unwrap_or(16);
    let levels = [1usize, 2, 4, 8];
    let slots = 8;

    // Ours: the lesson's server, q4_1 with int8 activations, 8 slots.
    // Loaded on a thread that exits, so the engine's OpenMP pool is the only one (see
    // `runtime::on_fresh_thread`).
    let m = course::sys::runtime::on_fresh_thread(|| -> Result<ChatModel> {
        let mut m = ChatModel::load_as(Path::new(MODEL), Kind::Float, Device::Cpu, WeightFormat::Q4_1)?;
        m.model.set_int8_activations(true);
        Ok(m)
    })?;
    let ChatModel { model, vs, tokenizer, template, stop_ids, .. } = m;
    let bias = stop_ids.clone();
    let engine = Engine::start(
        Box::new(LlamaSlots::new(model, Some(vs), slots, 1024)?),
        tokenizer.clone(),
        stop_ids,
        EngineConfig { queue: 64, prefill_chunk: 256 },
    );
    let state = AppState::new(ServeConfig { addr: "127.0.0.1:0".parse()?, ..Default::default() });
    state.set_backend(Backend { engine, tokenizer, template });
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    let server = serve::start_on(&rt, state).context("starting our server")?;
    let ours_addr = server.addr;

    let peer = if peer_installed() {
        Some(start_peer(b.threads)?)
    } else {
        println!(
            "llama.cpp's server is not installed: only ours runs (python3 scripts/setup.py --llama-cpp --no-data)\n"
        );
        None
    };
    let sides: Vec<(&str, Target)> = std::iter::once(("ours", target(ours_addr, tokens, true, &bias)))
        .chain(peer.as_ref().map(|(_, a)| ("llama.cpp", target(*a, tokens, false, &bias))))
        .collect();
    println!(
        "{} threads, {requests} requests per level, {tokens} tokens each, medians of {rounds} rounds, sides taking turns",
        b.threads
    );
    // Warm-up: one request each.
    for (_, t) in &sides {
        let l = rt.block_on(loadgen::level(t, 1, 1));
        if l.failed > 0 {
            bail!("warm-up failed: {:?}", l.first_error);
        }
    }
    println!("\n{:>5} {:<10} {:>10} {:>10} {:>10} {:>8}", "conc", "server", "tok/s", "ttft p50", "itl p50", "failed");
    let mut table = vec![];
    for &c in &levels {
        let mut got: Vec<Vec<Level>> = vec![vec![]; sides.len()];
        for round in 0..rounds {
            for k in 0..sides.len() {
                let side = (round + k) % sides.len();
                got[side].push(rt.block_on(loadgen::level(&sides[side].1, c, requests.max(c))));
            }
        }
        let med = |v: &[Level], f: fn(&Level) -> f64| benchkit::median(v.iter().map(f).collect());
        let mut rates = vec![];
        for (side, (name, _)) in sides.iter().enumerate() {
            let v = &got[side];
            let rate = med(v, |l| l.aggregate_tok_s);
            rates.push(rate);
            let failed: usize = v.iter().map(|l| l.failed).sum();
            println!(
                "{c:>5} {name:<10} {rate:>10.1} {:>8.0}ms {:>8.1}ms {failed:>8}",
                med(v, |l| l.ttft_p50_ms),
                med(v, |l| l.itl_p50_ms)
            );
            if let Some(e) = v.iter().find_map(|l| l.first_error.clone()) {
                println!("      first failure: {e}");
            }
        }
        table.push((c, rates));
    }
    println!("\naggregate tokens/s, ours / llama.cpp and each side's c8 / c1:");
    for (c, r) in &table {
        match r.as_slice() {
            [o, p] => println!("  c{c}: {:.2}x", o / p),
            [o] => println!("  c{c}: ours {o:.1} tok/s"),
            _ => {}
        }
    }
    if let (Some((_, first)), Some((_, last))) = (table.first(), table.last()) {
        for (k, (name, _)) in sides.iter().enumerate() {
            println!("  {name}: 8 streams / 1 = {:.2}x", last[k] / first[k]);
        }
    }
    drop(peer);
    server.stop(&rt)
}
