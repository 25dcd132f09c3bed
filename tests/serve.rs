//! The OpenAI-compatible server (`infer::serve`) over raw HTTP/1.1 on 127.0.0.1, as a hostile
//! client would use it: OpenAI's shapes for whole and streamed answers, its error envelope for
//! malformed JSON, wrong types, out-of-range values, oversized bodies and prompts, invalid
//! UTF-8, unknown routes, a full queue (429 + Retry-After) and a missing API key; a client that
//! vanishes mid-stream frees its slot; and the server answers a normal request after all of it.

use course::infer::serve::{self, AppState, Backend, ServeConfig};
use course::infer::{ChatModel, Engine, EngineConfig, LlamaSlots};
use course::models::llama::WeightFormat;
use serde_json::{json, Value};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tch::{Device, Kind};

const MODEL: &str = "data/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf";

struct Server {
    addr: SocketAddr,
    state: Arc<AppState>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn start(slots: usize, queue: usize, api_key: Option<&str>) -> Server {
    let m = ChatModel::load_as(Path::new(MODEL), Kind::Float, Device::Cpu, WeightFormat::Q4_1).unwrap();
    let ChatModel { model, vs, tokenizer, template, stop_ids, .. } = m;
    let engine = Engine::start(
        Box::new(LlamaSlots::new(model, Some(vs), slots, 256).unwrap()),
        tokenizer.clone(),
        stop_ids,
        EngineConfig { queue, prefill_chunk: 64 },
    );
    let cfg = ServeConfig {
        addr: "127.0.0.1:0".parse().unwrap(),
        api_key: api_key.map(str::to_string),
        body_limit: 64 * 1024,
        max_prompt_tokens: 200,
        grace: Duration::from_secs(5),
        ..Default::default()
    };
    let state = AppState::new(cfg);
    state.set_backend(Backend { engine, tokenizer, template });
    let (tx, rx) = std::sync::mpsc::channel();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let st = state.clone();
    let thread = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
        let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
        let server = rt.spawn(serve::serve(
            st,
            async move {
                let _ = stop_rx.await;
            },
            Some(ready_tx),
        ));
        tx.send(rt.block_on(ready_rx).unwrap()).unwrap();
        rt.block_on(server).unwrap().unwrap();
    });
    let addr = rx.recv().unwrap();
    Server { addr, state, stop: Some(stop_tx), thread: Some(thread) }
}

/// A response: status, headers (lower-case names) and the body, de-chunked.
struct Reply {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Reply {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&self.body)))
    }
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
    }
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

fn dechunk(mut b: &[u8]) -> Vec<u8> {
    let mut out = vec![];
    loop {
        let Some(eol) = b.windows(2).position(|w| w == b"\r\n") else { return out };
        let size = usize::from_str_radix(std::str::from_utf8(&b[..eol]).unwrap().trim(), 16).unwrap_or(0);
        if size == 0 {
            return out;
        }
        out.extend_from_slice(&b[eol + 2..eol + 2 + size]);
        b = &b[eol + 2 + size + 2..];
    }
}

/// Sends `head` (request line and headers, no blank line) with `body`; reads to the end.
fn raw(addr: SocketAddr, head: &str, body: &[u8]) -> Reply {
    let mut c = TcpStream::connect(addr).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
    let mut req =
        format!("{head}\r\nHost: {addr}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n", body.len()).into_bytes();
    req.extend_from_slice(body);
    c.write_all(&req).unwrap();
    let mut all = vec![];
    c.read_to_end(&mut all).unwrap();
    let split = all.windows(4).position(|w| w == b"\r\n\r\n").expect("a header block");
    let head = String::from_utf8_lossy(&all[..split]).into_owned();
    let mut lines = head.lines();
    let status = lines.next().unwrap().split(' ').nth(1).unwrap().parse().unwrap();
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':').map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string())))
        .collect();
    let mut body = all[split + 4..].to_vec();
    if headers.iter().any(|(k, v)| k == "transfer-encoding" && v.contains("chunked")) {
        body = dechunk(&body);
    }
    Reply { status, headers, body }
}

fn post(addr: SocketAddr, path: &str, body: &Value) -> Reply {
    raw(addr, &format!("POST {path} HTTP/1.1\r\nContent-Type: application/json"), body.to_string().as_bytes())
}

fn get(addr: SocketAddr, path: &str) -> Reply {
    raw(addr, &format!("GET {path} HTTP/1.1"), b"")
}

/// The error envelope with this status, naming `param` (if given) and saying `says`.
fn refused(r: &Reply, status: u16, param: Option<&str>, says: &str) {
    assert_eq!(r.status, status, "{}", r.text());
    let v = r.json();
    let e = &v["error"];
    assert!(e["message"].as_str().is_some_and(|m| m.contains(says)), "message {:?} lacks {says:?}", e["message"]);
    assert!(e["type"].is_string() && e.get("code").is_some() && e.get("param").is_some(), "envelope: {v}");
    if let Some(p) = param {
        assert_eq!(e["param"], p, "{v}");
    }
}

fn hello(extra: Value) -> Value {
    let mut v = json!({"messages": [{"role": "user", "content": "Say hello."}], "max_tokens": 8, "temperature": 0});
    if let (Some(m), Some(x)) = (v.as_object_mut(), extra.as_object()) {
        for (k, x) in x {
            m.insert(k.clone(), x.clone());
        }
    }
    v
}

/// The `data:` payloads of an SSE body.
fn events(r: &Reply) -> Vec<String> {
    r.text().lines().filter_map(|l| l.strip_prefix("data: ").map(str::to_string)).collect()
}

#[test]
fn openai_shapes_and_every_bad_request_answered_in_the_envelope() {
    let s = start(2, 4, None);
    let a = s.addr;
    assert_eq!(get(a, "/health").status, 200);
    let models = get(a, "/v1/models").json();
    assert_eq!(
        (models["object"].as_str(), models["data"][0]["id"].as_str()),
        (Some("list"), Some("SmolLM2-135M-Instruct"))
    );
    let page = get(a, "/");
    assert!(page.status == 200 && page.text().contains("TextDecoder") && page.text().contains("/v1/chat/completions"));

    // A whole answer.
    let r = post(a, "/v1/chat/completions", &hello(json!({})));
    assert_eq!(r.status, 200, "{}", r.text());
    let v = r.json();
    assert_eq!(v["object"], "chat.completion");
    assert_eq!(v["choices"][0]["message"]["role"], "assistant");
    assert!(!v["choices"][0]["message"]["content"].as_str().unwrap().is_empty());
    assert!(matches!(v["choices"][0]["finish_reason"].as_str(), Some("stop" | "length")));
    let u = &v["usage"];
    assert_eq!(
        u["total_tokens"].as_u64(),
        Some(u["prompt_tokens"].as_u64().unwrap() + u["completion_tokens"].as_u64().unwrap())
    );
    assert!(v["timings"]["predicted_per_second"].as_f64().is_some());
    // Content as parts, and developer as system, give the same greedy answer as the plain form.
    let parts = post(
        a,
        "/v1/chat/completions",
        &hello(json!({"messages": [{"role": "user", "content": [{"type": "text", "text": "Say "}, {"type": "text", "text": "hello."}]}]})),
    )
    .json();
    assert_eq!(parts["choices"][0]["message"]["content"], v["choices"][0]["message"]["content"]);

    // A stream: the role first, finish_reason null until the last chunk, usage only when asked, then [DONE].
    let r = post(a, "/v1/chat/completions", &hello(json!({"stream": true, "stream_options": {"include_usage": true}})));
    assert_eq!(r.status, 200);
    assert!(r.header("content-type").is_some_and(|c| c.starts_with("text/event-stream")));
    let ev = events(&r);
    assert_eq!(ev.last().map(String::as_str), Some("[DONE]"));
    let chunks: Vec<Value> = ev[..ev.len() - 1].iter().map(|e| serde_json::from_str(e).unwrap()).collect();
    assert_eq!(chunks[0]["choices"][0]["delta"], json!({"role": "assistant", "content": ""}));
    let usage = chunks.last().unwrap();
    assert_eq!(usage["choices"], json!([]));
    assert!(usage["usage"]["completion_tokens"].as_u64().unwrap() >= 1);
    let fin = &chunks[chunks.len() - 2];
    assert!(fin["choices"][0]["finish_reason"].is_string());
    for c in &chunks[..chunks.len() - 2] {
        assert!(c["choices"][0]["finish_reason"].is_null() && c["usage"].is_null(), "{c}");
    }
    let streamed: String = chunks.iter().filter_map(|c| c["choices"][0]["delta"]["content"].as_str()).collect();
    assert_eq!(streamed, v["choices"][0]["message"]["content"].as_str().unwrap());
    // Without include_usage, no usage chunk.
    let plain = events(&post(a, "/v1/chat/completions", &hello(json!({"stream": true}))));
    assert!(plain.iter().all(|e| !e.contains("\"usage\"")));
    // The legacy completions endpoint.
    let t =
        post(a, "/v1/completions", &json!({"prompt": "The capital of France is", "max_tokens": 5, "temperature": 0}))
            .json();
    assert_eq!(t["object"], "text_completion");
    assert!(t["choices"][0]["text"].is_string());

    // Bad requests, each in the envelope with its status.
    let chat = "POST /v1/chat/completions HTTP/1.1\r\nContent-Type: application/json";
    refused(&raw(a, chat, b"{\"messages\": [{\"role\": \"user\""), 400, None, "not valid JSON");
    refused(&raw(a, chat, b"{\"messages\": \"\xff\xfe\"}"), 400, None, "not valid JSON");
    refused(&raw(a, chat, b"[1, 2]"), 400, None, "must be a JSON object");
    refused(
        &post(a, "/v1/chat/completions", &hello(json!({"temperature": "hot"}))),
        400,
        Some("temperature"),
        "must be a number",
    );
    refused(
        &post(a, "/v1/chat/completions", &hello(json!({"temperature": 2.5}))),
        400,
        Some("temperature"),
        "between 0 and 2",
    );
    refused(&post(a, "/v1/chat/completions", &hello(json!({"top_p": 1.5}))), 400, Some("top_p"), "between 0 and 1");
    refused(&post(a, "/v1/chat/completions", &hello(json!({"n": 2}))), 400, Some("n"), "n must be 1");
    refused(&post(a, "/v1/chat/completions", &hello(json!({"max_tokens": 0}))), 400, Some("max_tokens"), "between 1");
    refused(
        &post(a, "/v1/chat/completions", &hello(json!({"max_tokens": 100000}))),
        400,
        Some("max_tokens"),
        "leave room for",
    );
    refused(
        &post(a, "/v1/chat/completions", &hello(json!({"stream_options": {"include_usage": true}}))),
        400,
        Some("stream_options"),
        "only allowed when stream is true",
    );
    refused(
        &post(a, "/v1/chat/completions", &hello(json!({"response_format": {"type": "json_object"}}))),
        400,
        Some("response_format"),
        "not supported",
    );
    refused(
        &post(a, "/v1/chat/completions", &hello(json!({"stop": ["a", "b", "c", "d", "e"]}))),
        400,
        Some("stop"),
        "at most 4",
    );
    refused(
        &post(a, "/v1/chat/completions", &hello(json!({"messages": []}))),
        400,
        Some("messages"),
        "must not be empty",
    );
    refused(
        &post(a, "/v1/chat/completions", &hello(json!({"messages": [{"role": "tool", "content": "x"}]}))),
        400,
        Some("messages[0].role"),
        "not supported",
    );
    refused(
        &post(a, "/v1/chat/completions", &hello(json!({"messages": [{"role": "user", "content": 7}]}))),
        400,
        Some("messages[0].content"),
        "string or an array",
    );
    refused(&post(a, "/v1/chat/completions", &hello(json!({"model": "gpt-4"}))), 404, None, "does not exist");
    let long = "word ".repeat(10_000);
    refused(
        &post(a, "/v1/chat/completions", &hello(json!({"messages": [{"role": "user", "content": long}]}))),
        400,
        Some("messages"),
        "at most 200",
    );
    let huge = format!("{{\"messages\": [{{\"role\": \"user\", \"content\": \"{}\"}}]}}", "x".repeat(100 * 1024));
    refused(&raw(a, chat, huge.as_bytes()), 413, None, "too large");
    refused(&get(a, "/v1/nothing"), 404, None, "no such route");
    refused(&get(a, "/v1/chat/completions"), 405, None, "method not allowed");

    // A client that reads the first bytes of a stream and disconnects: its slot comes back.
    {
        let mut c = TcpStream::connect(a).unwrap();
        let body = hello(json!({"stream": true, "max_tokens": 200, "ignore_eos": true})).to_string();
        let req = format!("POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}", body.len());
        c.write_all(req.as_bytes()).unwrap();
        let mut buf = [0u8; 512];
        let _ = c.read(&mut buf).unwrap();
    }
    let engine = &s.state.backend().unwrap().engine;
    let t0 = Instant::now();
    let cancelled = || engine.stats().finished.lock().unwrap().get("cancelled").copied().unwrap_or(0);
    while cancelled() < 1 || engine.stats().running.load(Ordering::Relaxed) != 0 {
        assert!(t0.elapsed() < Duration::from_secs(60), "the dropped stream was not cancelled, or holds its slot");
        std::thread::sleep(Duration::from_millis(20));
    }
    // A client that never reads its stream: the others are served meanwhile, and its answer
    // runs to its end (the engine never waits on a socket), so its slot comes back too.
    let finished = || engine.stats().finished.lock().unwrap().values().sum::<u64>();
    let before = finished();
    let sleeper = {
        let mut c = TcpStream::connect(a).unwrap();
        let body = hello(json!({"stream": true, "max_tokens": 40, "ignore_eos": true})).to_string();
        let req = format!("POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}", body.len());
        c.write_all(req.as_bytes()).unwrap();
        c
    };
    assert_eq!(post(a, "/v1/chat/completions", &hello(json!({}))).status, 200);
    let t0 = Instant::now();
    while finished() < before + 2 || engine.stats().running.load(Ordering::Relaxed) != 0 {
        assert!(t0.elapsed() < Duration::from_secs(60), "the unread stream did not finish, or holds its slot");
        std::thread::sleep(Duration::from_millis(20));
    }
    drop(sleeper);
    // /metrics counts what happened, in Prometheus text.
    let m = get(a, "/metrics").text();
    for want in [
        "vllm:num_requests_running 0",
        "course:http_responses_total{code=\"400\"}",
        "vllm:time_to_first_token_seconds_bucket",
        "vllm:request_success_total{finished_reason=\"cancelled\"} 1",
    ] {
        assert!(m.contains(want), "/metrics lacks {want:?}:\n{m}");
    }
    // And it still answers.
    assert_eq!(post(a, "/v1/chat/completions", &hello(json!({}))).status, 200);
}

#[test]
fn a_full_queue_answers_429_and_a_key_is_required_when_set() {
    let s = start(1, 0, Some("sesame"));
    let a = s.addr;
    let auth = |body: &Value| {
        raw(
            a,
            "POST /v1/chat/completions HTTP/1.1\r\nContent-Type: application/json\r\nAuthorization: Bearer sesame",
            body.to_string().as_bytes(),
        )
    };
    refused(&post(a, "/v1/chat/completions", &hello(json!({}))), 401, None, "API key is required");
    refused(&raw(a, "GET /v1/models HTTP/1.1\r\nAuthorization: Bearer nope", b""), 401, None, "incorrect API key");
    assert_eq!(auth(&hello(json!({}))).status, 200);
    // One slot, no queue: while a long answer streams, the next request is refused with 429.
    let first = std::thread::spawn(move || {
        raw(
            a,
            "POST /v1/chat/completions HTTP/1.1\r\nContent-Type: application/json\r\nAuthorization: Bearer sesame",
            hello(json!({"stream": true, "max_tokens": 120, "ignore_eos": true})).to_string().as_bytes(),
        )
    });
    let engine = &s.state.backend().unwrap().engine;
    let t0 = Instant::now();
    while engine.stats().running.load(Ordering::Relaxed) == 0 {
        assert!(t0.elapsed() < Duration::from_secs(60));
        std::thread::sleep(Duration::from_millis(5));
    }
    let r = auth(&hello(json!({})));
    refused(&r, 429, None, "at capacity");
    assert!(r.header("retry-after").is_some_and(|v| v.parse::<u64>().is_ok()), "no Retry-After");
    assert_eq!(first.join().unwrap().status, 200);
    assert_eq!(auth(&hello(json!({}))).status, 200);
}

/// Runs a Python fixture with `args`; its last stdout line is a JSON object.
fn python(script: &str, args: &[&str]) -> Value {
    let out = std::process::Command::new(".venv/bin/python")
        .arg(script)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("running .venv/bin/python {script} ({e}): run python3 scripts/setup.py"));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{script} failed ({}):\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let last = stdout.lines().last().unwrap_or("");
    serde_json::from_str(last).unwrap_or_else(|e| panic!("{script}'s last line is not JSON ({e}): {last}"))
}

fn chat_once(a: SocketAddr, key: Option<&str>, body: &Value) -> Value {
    let auth = key.map(|k| format!("\r\nAuthorization: Bearer {k}")).unwrap_or_default();
    let r = raw(
        a,
        &format!("POST /v1/chat/completions HTTP/1.1\r\nContent-Type: application/json{auth}"),
        body.to_string().as_bytes(),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    r.json()
}

const FRANCE: &str = "What is the capital of France?";

#[test]
fn the_official_openai_client_reads_every_shape() {
    let s = start(2, 8, Some("sk-course"));
    let a = s.addr;
    let v = python("tests/fixtures/openai_client.py", &[&format!("http://{a}/v1"), "sk-course"]);
    assert_eq!(v["model"], s.state.cfg.model_id, "{v}");
    // The client's whole, streamed and raw-HTTP answers are one greedy answer.
    let msgs =
        json!([{"role": "system", "content": "You are a helpful assistant."}, {"role": "user", "content": FRANCE}]);
    let ours = chat_once(a, Some("sk-course"), &json!({"messages": msgs, "temperature": 0, "max_tokens": 24}));
    let text = ours["choices"][0]["message"]["content"].as_str().unwrap();
    assert_eq!(v["chat"]["content"], text, "{v}");
    assert_eq!(v["stream"]["content"], text, "{v}");
    assert_eq!(v["stream"]["completion_tokens"], v["chat"]["completion_tokens"], "{v}");
    assert_eq!(v["stream"]["prompt_tokens"], ours["usage"]["prompt_tokens"], "{v}");
    assert!(text.contains("Paris"), "SmolLM2's greedy answer names Paris: {text}");
    // The stop string cut the answer just before it (and is not returned).
    let word = v["stop"]["word"].as_str().unwrap();
    let cut = &text[..text.find(word).unwrap()];
    assert_eq!(v["stop"]["content"], cut, "{v}");
    assert_eq!(v["stop"]["finish_reason"], "stop", "{v}");
    let e = &v["errors"];
    assert_eq!(e["temperature"]["status"], 400, "{v}");
    assert_eq!(e["temperature"]["param"], "temperature", "{v}");
    assert_eq!(e["temperature"]["type"], "invalid_request_error", "{v}");
    assert_eq!(e["stream_options"]["status"], 400, "{v}");
    assert_eq!(e["stream_options"]["param"], "stream_options", "{v}");
    assert_eq!(e["response_format"]["status"], 400, "{v}");
    assert_eq!(e["response_format"]["param"], "response_format", "{v}");
    assert_eq!(e["auth"]["status"], 401, "{v}");
    assert!(v["logprobs"].as_array().is_some_and(|l| !l.is_empty()), "{v}");
    assert!(v["completion"].as_str().is_some_and(|t| !t.is_empty()), "{v}");
}

#[test]
fn a_real_chromium_chats_through_the_page_and_stops() {
    let s = start(2, 8, None);
    let a = s.addr;
    let shot = Path::new("outputs/m07_serving/chat.png");
    let v = python("tests/fixtures/browser_chat.py", &[&format!("http://{a}"), shot.to_str().unwrap()]);
    // No script error and no failed load (the page asks for nothing it does not have).
    assert!(
        v["console"].as_array().is_some_and(|c| c.iter().all(|m| !m.as_str().unwrap().starts_with("error"))),
        "{v}"
    );
    assert!(v["header"].as_str().unwrap().contains(&s.state.cfg.model_id), "{v}");
    assert_eq!(v["user"], FRANCE, "{v}");
    assert_eq!(v["temperature_label"], "0", "{v}");
    // The page asks with the slider's temperature 0: the same greedy answer as raw HTTP (the
    // page also sends top_p/top_k, which greedy ignores).
    let msgs = json!([{"role": "user", "content": FRANCE}]);
    let ours = chat_once(a, None, &json!({"messages": msgs, "temperature": 0, "max_tokens": 24}));
    let text = ours["choices"][0]["message"]["content"].as_str().unwrap();
    assert_eq!(v["answer"].as_str().unwrap().trim(), text.trim(), "{v}");
    let tokens = ours["usage"]["completion_tokens"].as_u64().unwrap();
    let stats = v["stats"].as_str().unwrap();
    assert!(stats.starts_with("time to first token "), "{stats}");
    assert!(stats.contains(&format!(" · {tokens} tokens · ")), "{stats} vs {tokens} tokens");
    assert!(v["server"].as_str().unwrap().contains("server RSS "), "{v}");
    let png = std::fs::read(shot).unwrap();
    assert!(png.starts_with(b"\x89PNG\r\n\x1a\n") && png.len() > 10_000, "screenshot");
    // Stop cancelled the long answer: the page says so, and the server freed the slot.
    let stopped = v["stopped_stats"].as_str().unwrap();
    assert!(stopped.ends_with(" · stopped") && !stopped.contains(" · 0 tokens · "), "{v}");
    assert!(!v["stopped_answer"].as_str().unwrap().is_empty());
    assert_eq!((v["stop_disabled"].as_bool(), v["send_enabled"].as_bool()), (Some(true), Some(true)), "{v}");
    let engine = &s.state.backend().unwrap().engine;
    let t0 = Instant::now();
    while engine.stats().running.load(Ordering::Relaxed) != 0 {
        assert!(t0.elapsed() < Duration::from_secs(10), "the stopped stream's slot was not freed");
        std::thread::sleep(Duration::from_millis(10));
    }
    let done = engine.stats().finished.lock().unwrap().clone();
    assert!(done.get("cancelled").copied().unwrap_or(0) >= 1, "finished: {done:?}");
}
