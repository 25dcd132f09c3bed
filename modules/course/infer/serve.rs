//! An OpenAI-compatible HTTP server over the [`Engine`] (axum on tokio): `POST
//! /v1/chat/completions` and `POST /v1/completions` (whole or streamed as server-sent events),
//! `GET /v1/models`, `GET /health` (503 while the model loads), `GET /metrics` (Prometheus text,
//! vLLM's names where they exist), `GET /info` (model, format, memory) and `GET /` (the chat page,
//! one static file in the binary).
//!
//! Every failure answers in OpenAI's envelope `{"error": {"message", "type", "param", "code"}}`
//! with its status, malformed JSON and oversized bodies included; an error after a stream began
//! goes out as `data: {"error": ...}`. Safe by default: 127.0.0.1, an optional API key, a body
//! limit, a prompt limit, a deadline per request and the engine's slot and queue limits (429 with
//! `Retry-After` when full). Ctrl-C stops taking requests, lets the streams in flight finish for
//! a grace period, then cancels the rest.

use super::chat::{ChatTemplate, Message};
use super::engine::{retry_after, Engine, Event, Finish, Params, Request, SubmitError, Timings, TokenLogprob};
use super::sampling::Sampling;
use anyhow::{Context, Result};
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use serde_json::{json, Map, Value};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokenizers::Tokenizer;

/// The chat page: one HTML file with its script, no CDN.
pub const CHAT_PAGE: &str = include_str!("../assets/chat.html");

/// How the server listens and what it allows.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    pub addr: SocketAddr,
    /// Required as `Authorization: Bearer <key>` on `/v1/*` when set.
    pub api_key: Option<String>,
    /// Largest request body, in bytes.
    pub body_limit: usize,
    /// Most prompt tokens (after the chat template); a slot must also hold the answer.
    pub max_prompt_tokens: usize,
    /// Most time a request may take from its arrival; then it is cancelled.
    pub deadline: Duration,
    /// After Ctrl-C, how long streams in flight may go on before they are cancelled.
    pub grace: Duration,
    /// The model's id in `/v1/models` and in replies.
    pub model_id: String,
    /// What `/info` and the page show: format, adapter, and the like.
    pub info: Value,
}

impl Default for ServeConfig {
    fn default() -> Self {
        Self {
            addr: SocketAddr::from(([127, 0, 0, 1], 8080)),
            api_key: None,
            body_limit: 1 << 20,
            max_prompt_tokens: 4096,
            deadline: Duration::from_secs(600),
            grace: Duration::from_secs(30),
            model_id: "SmolLM2-135M-Instruct".into(),
            info: json!({}),
        }
    }
}

/// The model side of the server, set once it has loaded.
pub struct Backend {
    pub engine: Engine,
    pub tokenizer: Tokenizer,
    pub template: ChatTemplate,
}

/// Shared by the handlers.
pub struct AppState {
    pub cfg: ServeConfig,
    backend: OnceLock<Backend>,
    /// Responses by status code.
    statuses: Mutex<HashMap<u16, u64>>,
    created: u64,
}

impl AppState {
    pub fn new(cfg: ServeConfig) -> Arc<Self> {
        let created = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
        Arc::new(Self { cfg, backend: OnceLock::new(), statuses: Mutex::new(HashMap::new()), created })
    }

    /// Makes the model available (until then `/health` and `/v1/*` answer 503).
    pub fn set_backend(&self, b: Backend) {
        let _ = self.backend.set(b);
    }

    pub fn backend(&self) -> Option<&Backend> {
        self.backend.get()
    }

    fn count(&self, status: StatusCode) {
        if let Ok(mut m) = self.statuses.lock() {
            *m.entry(status.as_u16()).or_insert(0) += 1;
        }
    }
}

/// An error in OpenAI's envelope.
#[derive(Debug, Clone)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    pub kind: &'static str,
    pub param: Option<String>,
    pub code: Option<&'static str>,
    retry_after: Option<u64>,
}

impl ApiError {
    fn new(status: StatusCode, kind: &'static str, message: impl Into<String>) -> Self {
        Self { status, message: message.into(), kind, param: None, code: None, retry_after: None }
    }
    /// 400 `invalid_request_error` about `param`.
    pub fn invalid(param: &str, message: impl Into<String>) -> Self {
        let mut e = Self::new(StatusCode::BAD_REQUEST, "invalid_request_error", message);
        e.param = Some(param.into());
        e
    }
    fn code(mut self, code: &'static str) -> Self {
        self.code = Some(code);
        self
    }
    fn body(&self) -> Value {
        json!({"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}})
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut r = (self.status, axum::Json(self.body())).into_response();
        if let Some(s) = self.retry_after {
            if let Ok(v) = HeaderValue::from_str(&s.to_string()) {
                r.headers_mut().insert(header::RETRY_AFTER, v);
            }
        }
        r
    }
}

/// The router with every route, the body limit and the status counter.
pub fn router(state: Arc<AppState>) -> Router {
    let limit = state.cfg.body_limit;
    let counted = state.clone();
    Router::new()
        .route("/", get(|| async { Html(CHAT_PAGE) }))
        .route("/health", get(health))
        .route("/info", get(info))
        .route("/metrics", get(metrics))
        .route("/v1/models", get(models))
        .route("/v1/chat/completions", post(endpoint::<true>))
        .route("/v1/completions", post(endpoint::<false>))
        .fallback(|| async {
            ApiError::new(StatusCode::NOT_FOUND, "invalid_request_error", "no such route").code("not_found")
        })
        .method_not_allowed_fallback(|| async {
            ApiError::new(StatusCode::METHOD_NOT_ALLOWED, "invalid_request_error", "method not allowed for this route")
        })
        .layer(DefaultBodyLimit::max(limit))
        .layer(axum::middleware::map_response(move |r: Response| {
            let st = counted.clone();
            async move {
                st.count(r.status());
                r
            }
        }))
        .with_state(state)
}

/// Serves `state` on its address until Ctrl-C (or `stop` resolves); then new requests get 503,
/// streams in flight have `grace` to finish, and the engine is stopped. `ready` receives the
/// bound address (port 0 picks a free one).
/// A server running on a tokio runtime the caller owns (the lesson and the benchmark drive their
/// load client on the same runtime): its address, and [`Running::stop`].
pub struct Running {
    pub addr: SocketAddr,
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<Result<()>>,
}

/// Starts [`serve`] on `rt` and waits until it listens; a failure to bind comes back as the error.
pub fn start_on(rt: &tokio::runtime::Runtime, state: Arc<AppState>) -> Result<Running> {
    let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
    let (stop, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let task = rt.spawn(serve(
        state,
        async move {
            let _ = stop_rx.await;
        },
        Some(ready_tx),
    ));
    match rt.block_on(ready_rx) {
        Ok(addr) => Ok(Running { addr, stop, task }),
        // The ready sender went away unused: the task ended, with its reason.
        Err(_) => Err(rt
            .block_on(task)
            .context("the server task")?
            .err()
            .unwrap_or_else(|| anyhow::anyhow!("the server stopped before it listened"))),
    }
}

impl Running {
    /// Stops the server (streams in flight get the configured grace) and waits for it.
    pub fn stop(self, rt: &tokio::runtime::Runtime) -> Result<()> {
        let _ = self.stop.send(());
        rt.block_on(self.task).context("the server task")?
    }
}

pub async fn serve(
    state: Arc<AppState>,
    stop: impl std::future::Future<Output = ()> + Send + 'static,
    ready: Option<tokio::sync::oneshot::Sender<SocketAddr>>,
) -> Result<()> {
    let listener = tokio::net::TcpListener::bind(state.cfg.addr)
        .await
        .with_context(|| format!("binding {} (is another server on that port?)", state.cfg.addr))?;
    let addr = listener.local_addr()?;
    if let Some(r) = ready {
        let _ = r.send(addr);
    }
    let app = router(state.clone());
    let st = state.clone();
    let shutdown = async move {
        stop.await;
        if let Some(b) = st.backend() {
            b.engine.begin_shutdown();
            // Streams in flight get the grace period; then the engine cancels what is left.
            let engine = b.engine.clone();
            let grace = st.cfg.grace;
            tokio::spawn(async move {
                tokio::time::sleep(grace).await;
                tokio::task::spawn_blocking(move || engine.shutdown());
            });
        }
    };
    axum::serve(listener, app).with_graceful_shutdown(shutdown).await.context("serving")?;
    if let Some(b) = state.backend() {
        let engine = b.engine.clone();
        tokio::task::spawn_blocking(move || engine.shutdown()).await.ok();
    }
    Ok(())
}

/// Ctrl-C (SIGINT) or SIGTERM.
pub async fn ctrl_c() {
    let int = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(t) => t,
            Err(_) => {
                let _ = int.await;
                return;
            }
        };
        tokio::select! {
            _ = int => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = int.await;
    }
}

fn ready(st: &AppState) -> Result<&Backend, ApiError> {
    let b = st.backend().ok_or_else(|| {
        ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "server_error", "the model is still loading").code("loading")
    })?;
    if b.engine.is_shutting_down() {
        return Err(ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "server_error", "the server is shutting down")
            .code("shutting_down"));
    }
    Ok(b)
}

fn authorize(st: &AppState, headers: &HeaderMap) -> Result<(), ApiError> {
    let Some(key) = &st.cfg.api_key else { return Ok(()) };
    let given =
        headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()).and_then(|v| v.strip_prefix("Bearer "));
    match given {
        Some(g) if constant_time_eq(g.as_bytes(), key.as_bytes()) => Ok(()),
        Some(_) => Err(ApiError::new(StatusCode::UNAUTHORIZED, "authentication_error", "incorrect API key")
            .code("invalid_api_key")),
        None => Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "authentication_error",
            "an API key is required: send it as \"Authorization: Bearer <key>\"",
        )
        .code("missing_api_key")),
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

async fn health(State(st): State<Arc<AppState>>) -> Response {
    match ready(&st) {
        Ok(_) => axum::Json(json!({"status": "ok"})).into_response(),
        Err(e) => e.into_response(),
    }
}

async fn info(State(st): State<Arc<AppState>>) -> Response {
    let mut v = json!({
        "model": st.cfg.model_id,
        "rss_bytes": crate::sys::runtime::current_rss_bytes(),
        "peak_rss_bytes": crate::sys::runtime::peak_rss_bytes(),
        "loaded": st.backend().is_some(),
    });
    if let (Some(m), Some(extra)) = (v.as_object_mut(), st.cfg.info.as_object()) {
        for (k, x) in extra {
            m.insert(k.clone(), x.clone());
        }
    }
    if let (Some(m), Some(b)) = (v.as_object_mut(), st.backend()) {
        m.insert("slots".into(), json!(b.engine.slots()));
        m.insert("context".into(), json!(b.engine.capacity()));
        m.insert("running".into(), json!(b.engine.stats().running.load(Ordering::Relaxed)));
        m.insert("waiting".into(), json!(b.engine.stats().waiting.load(Ordering::Relaxed)));
    }
    axum::Json(v).into_response()
}

async fn models(State(st): State<Arc<AppState>>, headers: HeaderMap) -> Response {
    if let Err(e) = authorize(&st, &headers) {
        return e.into_response();
    }
    axum::Json(json!({
        "object": "list",
        "data": [{"id": st.cfg.model_id, "object": "model", "created": st.created, "owned_by": "llm-course"}],
    }))
    .into_response()
}

/// Prometheus text: request counts by status, queue depth, running slots, time to first token
/// and between tokens, tokens in and out.
async fn metrics(State(st): State<Arc<AppState>>) -> Response {
    let mut out = String::new();
    let mut gauge = |name: &str, help: &str, v: f64| {
        out.push_str(&format!("# HELP {name} {help}\n# TYPE {name} gauge\n{name} {v}\n"));
    };
    let (running, waiting) = st.backend().map_or((0, 0), |b| {
        let s = b.engine.stats();
        (s.running.load(Ordering::Relaxed), s.waiting.load(Ordering::Relaxed))
    });
    gauge("vllm:num_requests_running", "Requests in the engine's KV slots.", running as f64);
    gauge("vllm:num_requests_waiting", "Requests waiting for a slot.", waiting as f64);
    if let Some(b) = st.backend() {
        let s = b.engine.stats();
        let counter = |out: &mut String, name: &str, help: &str, v: u64| {
            out.push_str(&format!("# HELP {name} {help}\n# TYPE {name} counter\n{name} {v}\n"));
        };
        counter(
            &mut out,
            "vllm:prompt_tokens_total",
            "Prompt tokens prefilled.",
            s.prompt_tokens.load(Ordering::Relaxed),
        );
        counter(
            &mut out,
            "vllm:generation_tokens_total",
            "Tokens generated.",
            s.generation_tokens.load(Ordering::Relaxed),
        );
        counter(&mut out, "course:decode_steps_total", "Batched decode steps.", s.steps.load(Ordering::Relaxed));
        if let Ok(m) = s.finished.lock() {
            let m: Vec<(String, u64)> = m.iter().map(|(k, v)| (k.to_string(), *v)).collect();
            labelled(
                &mut out,
                "vllm:request_success_total",
                "Finished requests by finish reason.",
                "finished_reason",
                m,
            );
        }
        for (name, help, h) in [
            ("vllm:time_to_first_token_seconds", "Time from arrival to the first token.", &s.ttft),
            ("vllm:inter_token_latency_seconds", "Time between two tokens of a stream.", &s.itl),
        ] {
            let h = h.lock().map(|h| h.clone()).unwrap_or_default();
            out.push_str(&format!("# HELP {name} {help}\n# TYPE {name} histogram\n"));
            for (b, c) in h.bounds.iter().zip(&h.counts) {
                out.push_str(&format!("{name}_bucket{{le=\"{b}\"}} {c}\n"));
            }
            out.push_str(&format!(
                "{name}_bucket{{le=\"+Inf\"}} {}\n{name}_sum {}\n{name}_count {}\n",
                h.count, h.sum, h.count
            ));
        }
    }
    if let Ok(m) = st.statuses.lock() {
        let m: Vec<(String, u64)> = m.iter().map(|(k, v)| (k.to_string(), *v)).collect();
        labelled(&mut out, "course:http_responses_total", "HTTP responses by status code.", "code", m);
    }
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], out).into_response()
}

/// A Prometheus counter family, one line per `label` value, sorted.
fn labelled(out: &mut String, name: &str, help: &str, label: &str, mut values: Vec<(String, u64)>) {
    values.sort();
    out.push_str(&format!("# HELP {name} {help}\n# TYPE {name} counter\n"));
    for (v, n) in values {
        out.push_str(&format!("{name}{{{label}=\"{v}\"}} {n}\n"));
    }
}

/// The request fields both endpoints share, checked.
#[derive(Debug, Clone)]
struct Common {
    stream: bool,
    include_usage: bool,
    max_tokens: Option<usize>,
    params: Params,
}

fn parse_body(body: Result<Bytes, BytesRejection>) -> Result<Map<String, Value>, ApiError> {
    let bytes = body.map_err(|r| {
        if r.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, "invalid_request_error", "the request body is too large")
                .code("request_too_large")
        } else {
            ApiError::new(r.status(), "invalid_request_error", format!("reading the request body: {}", r.body_text()))
        }
    })?;
    let v: Value = serde_json::from_slice(&bytes).map_err(|e| {
        ApiError::new(StatusCode::BAD_REQUEST, "invalid_request_error", format!("the body is not valid JSON: {e}"))
            .code("invalid_json")
    })?;
    match v {
        Value::Object(m) => Ok(m),
        other => Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            format!("the body must be a JSON object, got {}", type_name(&other)),
        )),
    }
}

fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// `m[key]` as a number in `lo..=hi`, or `None` when absent or null.
fn number(m: &Map<String, Value>, key: &str, lo: f64, hi: f64) -> Result<Option<f64>, ApiError> {
    match m.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Number(n)) => {
            let x = n.as_f64().unwrap_or(f64::NAN);
            if !(lo..=hi).contains(&x) {
                return Err(ApiError::invalid(key, format!("{key} must be between {lo} and {hi}, got {x}")));
            }
            Ok(Some(x))
        }
        Some(other) => Err(ApiError::invalid(key, format!("{key} must be a number, got {}", type_name(other)))),
    }
}

fn integer(m: &Map<String, Value>, key: &str, lo: i64, hi: i64) -> Result<Option<i64>, ApiError> {
    match m.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Number(n)) => match n.as_i64() {
            Some(x) if (lo..=hi).contains(&x) => Ok(Some(x)),
            Some(x) => Err(ApiError::invalid(key, format!("{key} must be between {lo} and {hi}, got {x}"))),
            None => Err(ApiError::invalid(key, format!("{key} must be an integer, got {n}"))),
        },
        Some(other) => Err(ApiError::invalid(key, format!("{key} must be an integer, got {}", type_name(other)))),
    }
}

fn boolean(m: &Map<String, Value>, key: &str) -> Result<Option<bool>, ApiError> {
    match m.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Bool(b)) => Ok(Some(*b)),
        Some(other) => Err(ApiError::invalid(key, format!("{key} must be a boolean, got {}", type_name(other)))),
    }
}

fn common(st: &AppState, m: &Map<String, Value>, chat: bool) -> Result<Common, ApiError> {
    if let Some(v) = m.get("model") {
        match v {
            Value::String(s) if s == &st.cfg.model_id || s.is_empty() => {}
            Value::String(s) => {
                return Err(ApiError::new(
                    StatusCode::NOT_FOUND,
                    "invalid_request_error",
                    format!("the model {s:?} does not exist; this server serves {:?}", st.cfg.model_id),
                )
                .code("model_not_found"))
            }
            Value::Null => {}
            other => {
                return Err(ApiError::invalid("model", format!("model must be a string, got {}", type_name(other))))
            }
        }
    }
    let stream = boolean(m, "stream")?.unwrap_or(false);
    let include_usage = match m.get("stream_options") {
        None | Some(Value::Null) => false,
        Some(Value::Object(o)) => {
            if !stream {
                return Err(ApiError::invalid("stream_options", "stream_options is only allowed when stream is true"));
            }
            boolean(o, "include_usage")
                .map_err(|mut e| {
                    e.param = Some("stream_options.include_usage".into());
                    e
                })?
                .unwrap_or(false)
        }
        Some(other) => {
            return Err(ApiError::invalid(
                "stream_options",
                format!("stream_options must be an object, got {}", type_name(other)),
            ))
        }
    };
    let n = integer(m, "n", 1, 128)?.unwrap_or(1);
    if n != 1 {
        return Err(ApiError::invalid("n", format!("n must be 1 (one answer per request), got {n}")));
    }
    let temperature = number(m, "temperature", 0.0, 2.0)?.unwrap_or(1.0);
    let top_p = number(m, "top_p", 0.0, 1.0)?.unwrap_or(1.0);
    if top_p == 0.0 {
        return Err(ApiError::invalid("top_p", "top_p must be above 0 (1 keeps every token)"));
    }
    // top_k is not OpenAI's, but vLLM's and llama.cpp's: -1 or 0 is off.
    let top_k = integer(m, "top_k", -1, 1 << 20)?.filter(|&k| k > 0).map(|k| k as usize);
    let mut max_tokens = integer(m, "max_tokens", 1, 1 << 30)?;
    if chat {
        if let Some(x) = integer(m, "max_completion_tokens", 1, 1 << 30)? {
            max_tokens = Some(x);
        }
    }
    let stop = match m.get("stop") {
        None | Some(Value::Null) => vec![],
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(a)) => {
            if a.len() > 4 {
                return Err(ApiError::invalid("stop", format!("stop takes at most 4 strings, got {}", a.len())));
            }
            a.iter()
                .map(|x| x.as_str().map(str::to_string))
                .collect::<Option<Vec<_>>>()
                .ok_or_else(|| ApiError::invalid("stop", "stop must be a string or an array of strings"))?
        }
        Some(other) => {
            return Err(ApiError::invalid(
                "stop",
                format!("stop must be a string or an array of strings, got {}", type_name(other)),
            ))
        }
    };
    if stop.iter().any(|s| s.is_empty()) {
        return Err(ApiError::invalid("stop", "stop strings must not be empty"));
    }
    let seed = match m.get("seed") {
        None | Some(Value::Null) => None,
        Some(Value::Number(n)) => Some(
            n.as_i64()
                .map(|x| x as u64)
                .or(n.as_u64())
                .ok_or_else(|| ApiError::invalid("seed", format!("seed must be an integer, got {n}")))?,
        ),
        Some(other) => {
            return Err(ApiError::invalid("seed", format!("seed must be an integer, got {}", type_name(other))))
        }
    };
    let presence_penalty = number(m, "presence_penalty", -2.0, 2.0)?.unwrap_or(0.0);
    let frequency_penalty = number(m, "frequency_penalty", -2.0, 2.0)?.unwrap_or(0.0);
    let logprobs = if chat {
        let on = boolean(m, "logprobs")?.unwrap_or(false);
        let top = integer(m, "top_logprobs", 0, 20)?;
        if top.is_some() && !on {
            return Err(ApiError::invalid("top_logprobs", "top_logprobs needs logprobs set to true"));
        }
        on.then_some(top.unwrap_or(0) as usize)
    } else {
        integer(m, "logprobs", 0, 20)?.map(|x| x as usize)
    };
    if let Some(rf) = m.get("response_format") {
        let ty = rf.get("type").and_then(|t| t.as_str());
        match (rf, ty) {
            (Value::Null, _) | (_, Some("text")) => {}
            (_, Some(other)) => {
                return Err(ApiError::invalid(
                    "response_format",
                    format!("response_format {other:?} is not supported (only \"text\")"),
                )
                .code("unsupported_response_format"))
            }
            _ => return Err(ApiError::invalid("response_format", "response_format must be an object with a \"type\"")),
        }
    }
    for key in ["tools", "functions"] {
        if m.get(key).is_some_and(|v| !v.is_null() && v.as_array().is_none_or(|a| !a.is_empty())) {
            return Err(ApiError::invalid(key, format!("{key} (function calling) is not supported")));
        }
    }
    if !chat {
        for key in ["echo", "best_of", "suffix"] {
            let set = match m.get(key) {
                None | Some(Value::Null) | Some(Value::Bool(false)) => false,
                Some(Value::Number(n)) => n.as_i64() != Some(1),
                _ => true,
            };
            if set {
                return Err(ApiError::invalid(key, format!("{key} is not supported")));
            }
        }
    }
    // vLLM's extension: generate to max_tokens whatever the model says.
    let ignore_eos = boolean(m, "ignore_eos")?.unwrap_or(false);
    let sampling = Sampling { temperature, top_k, top_p };
    let params = Params {
        sampling,
        max_tokens: 0,
        stop,
        seed: seed.unwrap_or_else(|| SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64)),
        presence_penalty,
        frequency_penalty,
        logprobs,
        stop_at_eos: !ignore_eos,
    };
    Ok(Common { stream, include_usage, max_tokens: max_tokens.map(|x| x as usize), params })
}

/// A message's content: a string, or OpenAI's parts (`[{"type": "text", "text": ...}]`).
fn content(v: &Value, i: usize) -> Result<String, ApiError> {
    let param = format!("messages[{i}].content");
    match v {
        Value::String(s) => Ok(s.clone()),
        Value::Null => Ok(String::new()),
        Value::Array(parts) => {
            let mut out = String::new();
            for (j, p) in parts.iter().enumerate() {
                match (p.get("type").and_then(|t| t.as_str()), p.get("text").and_then(|t| t.as_str())) {
                    (Some("text"), Some(t)) => out.push_str(t),
                    (Some(other), _) if other != "text" => {
                        return Err(ApiError::invalid(
                            &param,
                            format!("content part {j} is {other:?}; only text parts are supported"),
                        ))
                    }
                    _ => {
                        return Err(ApiError::invalid(
                            &param,
                            format!("content part {j} must be {{\"type\": \"text\", \"text\": string}}"),
                        ))
                    }
                }
            }
            Ok(out)
        }
        other => Err(ApiError::invalid(
            &param,
            format!("content must be a string or an array of parts, got {}", type_name(other)),
        )),
    }
}

fn messages(m: &Map<String, Value>) -> Result<Vec<Message>, ApiError> {
    let list = match m.get("messages") {
        Some(Value::Array(a)) if !a.is_empty() => a,
        Some(Value::Array(_)) => return Err(ApiError::invalid("messages", "messages must not be empty")),
        None | Some(Value::Null) => return Err(ApiError::invalid("messages", "messages is required")),
        Some(other) => {
            return Err(ApiError::invalid("messages", format!("messages must be an array, got {}", type_name(other))))
        }
    };
    let mut out = Vec::with_capacity(list.len());
    for (i, msg) in list.iter().enumerate() {
        let Some(obj) = msg.as_object() else {
            return Err(ApiError::invalid(
                &format!("messages[{i}]"),
                format!("a message must be an object, got {}", type_name(msg)),
            ));
        };
        let role = match obj.get("role").and_then(|r| r.as_str()) {
            Some("system") | Some("developer") => "system",
            Some("user") => "user",
            Some("assistant") => "assistant",
            Some(other) => {
                return Err(ApiError::invalid(
                    &format!("messages[{i}].role"),
                    format!("role {other:?} is not supported (system, developer, user or assistant)"),
                ))
            }
            None => {
                return Err(ApiError::invalid(&format!("messages[{i}].role"), "role is required and must be a string"))
            }
        };
        let text = content(obj.get("content").unwrap_or(&Value::Null), i)?;
        out.push(Message { role: role.into(), content: text });
    }
    Ok(out)
}

/// The prompt's token ids, checked against the limits; and `max_tokens` settled.
fn admit(st: &AppState, b: &Backend, text: &str, c: &mut Common, param: &str) -> Result<Vec<i64>, ApiError> {
    let enc = b
        .tokenizer
        .encode(text, false)
        .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, "invalid_request_error", format!("tokenizing: {e}")))?;
    let ids: Vec<i64> = enc.get_ids().iter().map(|&i| i as i64).collect();
    if ids.is_empty() {
        return Err(ApiError::invalid(param, "the prompt is empty"));
    }
    let ctx = b.engine.capacity() as usize;
    let limit = st.cfg.max_prompt_tokens.min(ctx.saturating_sub(1));
    if ids.len() > limit {
        return Err(ApiError::invalid(
            param,
            format!("the prompt has {} tokens; this server takes at most {limit}", ids.len()),
        )
        .code("context_length_exceeded"));
    }
    let room = ctx - ids.len();
    let max = c.max_tokens.unwrap_or(room);
    if max > room {
        let key = if c.max_tokens.is_some() { "max_tokens" } else { param };
        return Err(ApiError::invalid(
            key,
            format!(
                "max_tokens is {max}, but the prompt's {} tokens leave room for {room} in a context of {ctx}",
                ids.len()
            ),
        )
        .code("context_length_exceeded"));
    }
    c.params.max_tokens = max;
    Ok(ids)
}

fn submit(
    st: &AppState,
    b: &Backend,
    ids: Vec<i64>,
    c: &Common,
) -> Result<tokio::sync::mpsc::UnboundedReceiver<Event>, ApiError> {
    let req = Request { prompt: ids, params: c.params.clone(), deadline: Some(Instant::now() + st.cfg.deadline) };
    b.engine.submit(req).map_err(|e| match e {
        SubmitError::QueueFull { .. } => {
            let mut err = ApiError::new(StatusCode::TOO_MANY_REQUESTS, "rate_limit_error", format!("{e}; retry later"))
                .code("rate_limit_exceeded");
            err.retry_after = Some(retry_after(&b.engine).as_secs());
            err
        }
        SubmitError::ShuttingDown => {
            ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "server_error", e.to_string()).code("shutting_down")
        }
        SubmitError::Invalid(m) => ApiError::new(StatusCode::BAD_REQUEST, "invalid_request_error", m),
    })
}

fn request_id(prefix: &str) -> String {
    use std::sync::atomic::AtomicU64;
    static N: AtomicU64 = AtomicU64::new(0);
    let t = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64);
    format!("{prefix}-{:x}{:04x}", t, N.fetch_add(1, Ordering::Relaxed) & 0xffff)
}

fn finish_reason(f: Finish) -> &'static str {
    match f {
        Finish::Stop => "stop",
        Finish::Length => "length",
        Finish::Cancelled => "cancelled",
    }
}

fn usage(t: &Timings) -> Value {
    json!({"prompt_tokens": t.prompt_tokens, "completion_tokens": t.completion_tokens, "total_tokens": t.prompt_tokens + t.completion_tokens})
}

/// llama.cpp's `timings` object, plus the queue and first-token times.
fn timings(t: &Timings) -> Value {
    json!({
        "prompt_n": t.prompt_tokens,
        "prompt_ms": t.prefill_ms,
        "prompt_per_second": t.prefill_tokens_per_sec(),
        "predicted_n": t.completion_tokens,
        "predicted_ms": t.decode_ms,
        "predicted_per_second": t.decode_tokens_per_sec(),
        "queue_ms": t.queue_ms,
        "ttft_ms": t.ttft_ms,
    })
}

fn token_text(tok: &Tokenizer, id: i64) -> String {
    tok.decode(&[id as u32], false).unwrap_or_default()
}

/// OpenAI's chat `logprobs.content` entries.
fn chat_logprobs(tok: &Tokenizer, lps: &[TokenLogprob]) -> Value {
    let entry = |id: i64, lp: f32| {
        let t = token_text(tok, id);
        json!({"token": t, "logprob": lp, "bytes": t.as_bytes()})
    };
    Value::Array(
        lps.iter()
            .map(|l| {
                let mut e = entry(l.id, l.logprob);
                e["top_logprobs"] = Value::Array(l.top.iter().map(|&(i, p)| entry(i, p)).collect());
                e
            })
            .collect(),
    )
}

/// Legacy completions' `logprobs` object.
fn text_logprobs(tok: &Tokenizer, lps: &[TokenLogprob]) -> Value {
    let tokens: Vec<String> = lps.iter().map(|l| token_text(tok, l.id)).collect();
    let top: Vec<Value> = lps
        .iter()
        .map(|l| Value::Object(l.top.iter().map(|&(i, p)| (token_text(tok, i), json!(p))).collect()))
        .collect();
    json!({"tokens": tokens, "token_logprobs": lps.iter().map(|l| l.logprob).collect::<Vec<_>>(), "top_logprobs": top})
}

/// What the two endpoints differ in.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Api {
    Chat,
    Text,
}

/// `POST /v1/chat/completions` (`CHAT`) and `POST /v1/completions`.
async fn endpoint<const CHAT: bool>(
    State(st): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let api = if CHAT { Api::Chat } else { Api::Text };
    handle(st, headers, body, api).await.unwrap_or_else(|e| e.into_response())
}

async fn handle(
    st: Arc<AppState>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
    api: Api,
) -> Result<Response, ApiError> {
    authorize(&st, &headers)?;
    let b = ready(&st)?;
    let m = parse_body(body)?;
    let mut c = common(&st, &m, api == Api::Chat)?;
    let (text, param) = match api {
        Api::Chat => {
            let msgs = messages(&m)?;
            let text = b.template.render(&msgs, true).map_err(|e| ApiError::invalid("messages", format!("{e:#}")))?;
            (text, "messages")
        }
        Api::Text => {
            let text = match m.get("prompt") {
                Some(Value::String(s)) => s.clone(),
                Some(Value::Array(a)) if a.len() == 1 && a[0].is_string() => a[0].as_str().unwrap_or("").to_string(),
                Some(Value::Array(_)) => {
                    return Err(ApiError::invalid("prompt", "prompt must be one string (or an array of one string)"))
                }
                None | Some(Value::Null) => return Err(ApiError::invalid("prompt", "prompt is required")),
                Some(other) => {
                    return Err(ApiError::invalid(
                        "prompt",
                        format!("prompt must be a string, got {}", type_name(other)),
                    ))
                }
            };
            (text, "prompt")
        }
    };
    let ids = admit(&st, b, &text, &mut c, param)?;
    let rx = submit(&st, b, ids, &c)?;
    let id = request_id(if api == Api::Chat { "chatcmpl" } else { "cmpl" });
    let created = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    if c.stream {
        let s = Streamer {
            st: st.clone(),
            rx,
            c,
            api,
            id,
            created,
            started: false,
            pending: Default::default(),
            done: false,
        };
        return Ok(stream(s));
    }
    whole(&st, rx, api, id, created, c.params.logprobs.is_some()).await
}

async fn whole(
    st: &AppState,
    mut rx: tokio::sync::mpsc::UnboundedReceiver<Event>,
    api: Api,
    id: String,
    created: u64,
    want_logprobs: bool,
) -> Result<Response, ApiError> {
    let b = st.backend().expect("checked by ready");
    let (mut text, mut lps) = (String::new(), vec![]);
    loop {
        match rx.recv().await {
            Some(Event::Text { text: t, logprob, .. }) => {
                text.push_str(&t);
                lps.extend(logprob);
            }
            Some(Event::Done { finish: Finish::Cancelled, .. }) => {
                return Err(ApiError::new(
                    StatusCode::GATEWAY_TIMEOUT,
                    "server_error",
                    format!("the request took longer than its deadline of {} s", st.cfg.deadline.as_secs()),
                )
                .code("timeout"))
            }
            Some(Event::Done { finish, timings: t }) => {
                let reason = finish_reason(finish);
                let choice = match api {
                    Api::Chat => json!({
                        "index": 0,
                        "message": {"role": "assistant", "content": text},
                        "logprobs": if want_logprobs { json!({"content": chat_logprobs(&b.tokenizer, &lps)}) } else { Value::Null },
                        "finish_reason": reason,
                    }),
                    Api::Text => json!({
                        "index": 0,
                        "text": text,
                        "logprobs": if want_logprobs { text_logprobs(&b.tokenizer, &lps) } else { Value::Null },
                        "finish_reason": reason,
                    }),
                };
                let object = if api == Api::Chat { "chat.completion" } else { "text_completion" };
                return Ok(axum::Json(json!({
                    "id": id, "object": object, "created": created, "model": st.cfg.model_id,
                    "choices": [choice], "usage": usage(&t), "timings": timings(&t),
                }))
                .into_response());
            }
            Some(Event::Error(e)) => {
                return Err(ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "server_error", e).code("engine_error"))
            }
            None => return Err(ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "server_error", "the engine stopped")),
        }
    }
}

/// State of one SSE stream.
struct Streamer {
    st: Arc<AppState>,
    rx: tokio::sync::mpsc::UnboundedReceiver<Event>,
    c: Common,
    api: Api,
    id: String,
    created: u64,
    /// Sent the role chunk (chat) yet?
    started: bool,
    /// Chunks waiting to go out, in order.
    pending: std::collections::VecDeque<String>,
    done: bool,
}

impl Streamer {
    fn chunk(&self, choices: Value, extra: Option<(&str, Value)>) -> String {
        let object = if self.api == Api::Chat { "chat.completion.chunk" } else { "text_completion" };
        let mut v = json!({"id": self.id, "object": object, "created": self.created, "model": self.st.cfg.model_id, "choices": choices});
        if self.c.include_usage {
            v["usage"] = Value::Null;
        }
        if let Some((k, x)) = extra {
            v[k] = x;
        }
        v.to_string()
    }

    fn choice(&self, text: Option<&str>, logprobs: Value, finish: Option<&str>) -> Value {
        match self.api {
            Api::Chat => {
                let delta = match text {
                    Some(t) => json!({"content": t}),
                    None => json!({}),
                };
                json!([{"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish}])
            }
            Api::Text => {
                json!([{"index": 0, "text": text.unwrap_or(""), "logprobs": logprobs, "finish_reason": finish}])
            }
        }
    }

    /// The chunks for one engine event (none for a token whose text is held back).
    fn on(&mut self, ev: Option<Event>) {
        if !self.started && self.api == Api::Chat {
            self.started = true;
            let first = json!([{"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": null, "finish_reason": null}]);
            let c = self.chunk(first, None);
            self.pending.push_back(c);
        }
        let tok = &self.st.backend().expect("checked").tokenizer;
        match ev {
            Some(Event::Text { text, logprob, .. }) => {
                let lp = match (&logprob, self.api) {
                    (Some(l), Api::Chat) => json!({"content": chat_logprobs(tok, std::slice::from_ref(l))}),
                    (Some(l), Api::Text) => text_logprobs(tok, std::slice::from_ref(l)),
                    (None, _) => Value::Null,
                };
                if !text.is_empty() || logprob.is_some() {
                    let c = self.chunk(self.choice(Some(&text), lp, None), None);
                    self.pending.push_back(c);
                }
            }
            Some(Event::Done { finish, timings: t }) => {
                let err = (finish == Finish::Cancelled).then(|| {
                    ApiError::new(
                        StatusCode::GATEWAY_TIMEOUT,
                        "server_error",
                        "the request was cancelled (its deadline passed or the server is stopping)",
                    )
                    .code("timeout")
                });
                match err {
                    Some(e) => self.pending.push_back(e.body().to_string()),
                    None => {
                        let last = self.chunk(
                            self.choice(None, Value::Null, Some(finish_reason(finish))),
                            Some(("timings", timings(&t))),
                        );
                        self.pending.push_back(last);
                        if self.c.include_usage {
                            let u = self.chunk(json!([]), Some(("usage", usage(&t))));
                            self.pending.push_back(u);
                        }
                    }
                }
                self.pending.push_back("[DONE]".into());
                self.done = true;
            }
            Some(Event::Error(e)) => {
                let body =
                    ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "server_error", e).code("engine_error").body();
                self.pending.push_back(body.to_string());
                self.pending.push_back("[DONE]".into());
                self.done = true;
            }
            None => {
                let body =
                    ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "server_error", "the engine stopped").body();
                self.pending.push_back(body.to_string());
                self.pending.push_back("[DONE]".into());
                self.done = true;
            }
        }
    }
}

/// The SSE response that `s` feeds.
fn stream(s: Streamer) -> Response {
    let events = futures_util::stream::unfold(s, |mut s| async move {
        loop {
            if let Some(data) = s.pending.pop_front() {
                return Some((Ok::<_, std::convert::Infallible>(SseEvent::default().data(data)), s));
            }
            if s.done {
                return None;
            }
            let ev = s.rx.recv().await;
            s.on(ev);
        }
    });
    Sse::new(events).keep_alive(KeepAlive::default()).into_response()
}
