//! A bounded load generator for OpenAI-compatible streaming servers (ours, llama.cpp's, vLLM's):
//! `requests` streamed requests kept `concurrency` at a time, each timed as its client sees it —
//! time to the first content token, the gaps between content tokens, tokens from the final
//! `usage` chunk — and summed into aggregate tokens/s and latency percentiles.
//!
//! The client is a small HTTP/1.1 one on tokio's `TcpStream` (no client crate): it reads the
//! status line and headers, undoes chunked transfer encoding as bytes arrive, and parses the SSE
//! stream event by event (`\n` or `\r\n` line ends, as axum and sse-starlette write them), so a
//! token is timed when its event is complete, not when the last byte of the answer arrives.

use serde::Serialize;
use serde_json::Value;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// One streamed request as the client saw it.
#[derive(Debug, Clone, Default)]
pub struct Sample {
    /// 200, a complete stream ending in `data: [DONE]` with some content, and no error event.
    pub ok: bool,
    /// The HTTP status (0: no response).
    pub status: u16,
    /// Why it failed, when it did.
    pub error: Option<String>,
    /// Seconds from sending the request to the first content token.
    pub ttft: f64,
    /// Seconds between consecutive content events.
    pub gaps: Vec<f64>,
    /// Completion tokens: the `usage` chunk's count, else the content events counted.
    pub tokens: usize,
    /// The generated text.
    pub text: String,
}

/// Incremental HTTP/1.1 response reader: head, then the body de-chunked as it arrives.
#[derive(Default)]
struct Response {
    raw: Vec<u8>,
    head: Option<(u16, bool)>, // status, chunked
    body: Vec<u8>,
    // De-chunking: bytes of `raw` consumed and the bytes left in the current chunk.
    at: usize,
    left: usize,
    done: bool,
}

impl Response {
    fn feed(&mut self, bytes: &[u8]) -> Result<(), String> {
        self.raw.extend_from_slice(bytes);
        if self.head.is_none() {
            let Some(p) = self.raw.windows(4).position(|w| w == b"\r\n\r\n") else { return Ok(()) };
            let head = String::from_utf8_lossy(&self.raw[..p]).to_ascii_lowercase();
            let status = head
                .split_whitespace()
                .nth(1)
                .and_then(|s| s.parse().ok())
                .ok_or_else(|| format!("no HTTP status line in {:?}", head.lines().next().unwrap_or("")))?;
            let chunked = head.lines().any(|l| l.starts_with("transfer-encoding:") && l.contains("chunked"));
            self.head = Some((status, chunked));
            self.at = p + 4;
        }
        let Some((_, chunked)) = self.head else { return Ok(()) };
        if !chunked {
            self.body.extend_from_slice(&self.raw[self.at..]);
            self.at = self.raw.len();
            return Ok(());
        }
        while !self.done {
            if self.left > 0 {
                let n = self.left.min(self.raw.len() - self.at);
                if n == 0 {
                    break;
                }
                self.body.extend_from_slice(&self.raw[self.at..self.at + n]);
                self.at += n;
                self.left -= n;
                if self.left > 0 {
                    break;
                }
                // The CRLF after the chunk's data is skipped with the next size line.
                continue;
            }
            let rest = &self.raw[self.at..];
            let rest_trim = rest.strip_prefix(b"\r\n").unwrap_or(rest);
            let skipped = rest.len() - rest_trim.len();
            let Some(eol) = rest_trim.windows(2).position(|w| w == b"\r\n") else { break };
            let line = String::from_utf8_lossy(&rest_trim[..eol]);
            let size = usize::from_str_radix(line.split(';').next().unwrap_or("").trim(), 16)
                .map_err(|_| format!("bad chunk size line {line:?}"))?;
            self.at += skipped + eol + 2;
            if size == 0 {
                self.done = true;
            }
            self.left = size;
        }
        Ok(())
    }
}

/// Sends one streamed request (`body` is its JSON, with `"stream": true`) to `path` and times it.
pub async fn stream_request(addr: SocketAddr, path: &str, body: &str, api_key: Option<&str>) -> Sample {
    let t0 = Instant::now();
    let mut s = Sample::default();
    let fail = |mut s: Sample, why: String| {
        s.error = Some(why);
        s
    };
    let mut conn = match tokio::net::TcpStream::connect(addr).await {
        Ok(c) => c,
        Err(e) => return fail(s, format!("connect {addr}: {e}")),
    };
    let auth = api_key.map(|k| format!("Authorization: Bearer {k}\r\n")).unwrap_or_default();
    let req = format!(
        "POST {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nAccept: text/event-stream\r\n{auth}Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    if let Err(e) = conn.write_all(req.as_bytes()).await {
        return fail(s, format!("send: {e}"));
    }
    let mut r = Response::default();
    let mut buf = vec![0u8; 16 * 1024];
    let mut parsed = 0; // bytes of r.body already split into events
    let mut last: Option<Instant> = None;
    let mut events = 0usize;
    let mut usage_tokens = None;
    loop {
        let n = match conn.read(&mut buf).await {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) => return fail(s, format!("read: {e}")),
        };
        if let Err(e) = r.feed(&buf[..n]) {
            return fail(s, e);
        }
        let Some((status, _)) = r.head else { continue };
        s.status = status;
        if status != 200 {
            continue; // read the error body to its end
        }
        // Whole events: up to a blank line.
        loop {
            let body = &r.body[parsed..];
            let Some((end, sep)) = find_blank_line(body) else { break };
            let event = String::from_utf8_lossy(&body[..end]).into_owned();
            parsed += end + sep;
            for line in event.lines() {
                let Some(data) = line.strip_prefix("data:") else { continue };
                let data = data.trim();
                if data == "[DONE]" {
                    s.tokens = usage_tokens.unwrap_or(events);
                    // Every request asks for tokens: a stream that carries none was cut short
                    // (llama-cpp-python's server ends a stream empty when a newer one interrupts it).
                    if s.error.is_none() && events == 0 {
                        s.error = Some("the stream ended with no content".into());
                    }
                    s.ok = s.error.is_none();
                    return s;
                }
                let v: Value = match serde_json::from_str(data) {
                    Ok(v) => v,
                    Err(e) => return fail(s, format!("an SSE event that is not JSON ({e}): {data}")),
                };
                if let Some(e) = v.get("error") {
                    s.error = Some(e.to_string());
                }
                if let Some(t) = v.pointer("/usage/completion_tokens").and_then(Value::as_u64) {
                    usage_tokens = Some(t as usize);
                }
                let piece = v
                    .pointer("/choices/0/delta/content")
                    .or_else(|| v.pointer("/choices/0/text"))
                    .and_then(Value::as_str)
                    .unwrap_or("");
                if !piece.is_empty() {
                    let now = Instant::now();
                    match last {
                        None => s.ttft = (now - t0).as_secs_f64(),
                        Some(l) => s.gaps.push((now - l).as_secs_f64()),
                    }
                    last = Some(now);
                    events += 1;
                    s.text.push_str(piece);
                }
            }
        }
    }
    match r.head {
        None => fail(s, "the connection closed before a response".into()),
        Some((200, _)) => fail(s, "the stream ended without data: [DONE]".into()),
        Some((status, _)) => {
            let why = format!("HTTP {status}: {}", String::from_utf8_lossy(&r.body));
            fail(s, why)
        }
    }
}

/// The first blank line in `b`: (where the event ends, the separator's length).
fn find_blank_line(b: &[u8]) -> Option<(usize, usize)> {
    let mut i = 0;
    while i + 1 < b.len() {
        if b[i] == b'\n' && b[i + 1] == b'\n' {
            return Some((i, 2));
        }
        if b[i] == b'\r' && b[i + 1] == b'\n' && b.get(i + 2) == Some(&b'\r') && b.get(i + 3) == Some(&b'\n') {
            return Some((i, 4));
        }
        i += 1;
    }
    None
}

/// One concurrency level's summary.
#[derive(Debug, Clone, Serialize)]
pub struct Level {
    pub concurrency: usize,
    pub requests: usize,
    pub failed: usize,
    /// Completion tokens of the successful requests over the level's wall time.
    pub aggregate_tok_s: f64,
    pub ttft_p50_ms: f64,
    pub ttft_p90_ms: f64,
    pub itl_p50_ms: f64,
    pub itl_p90_ms: f64,
    pub seconds: f64,
    /// The first failure's reason, if any failed.
    pub first_error: Option<String>,
}

/// The `p` quantile (0..=1, nearest rank) of `v`; 0 for none.
pub fn percentile(v: &mut [f64], p: f64) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    v[((v.len() - 1) as f64 * p.clamp(0.0, 1.0)).round() as usize]
}

/// What to send: the server, the route, the key, and the JSON body of request `i`.
#[derive(Clone)]
pub struct Target {
    pub addr: SocketAddr,
    pub path: String,
    pub api_key: Option<String>,
    pub body: Arc<dyn Fn(usize) -> Value + Send + Sync>,
    /// A request that takes longer fails with this as its reason.
    pub timeout: Duration,
}

/// `requests` requests, `concurrency` at a time (each client starts its next when one ends).
pub async fn level(t: &Target, concurrency: usize, requests: usize) -> Level {
    let next = Arc::new(AtomicUsize::new(0));
    let t0 = Instant::now();
    let mut tasks = vec![];
    for _ in 0..concurrency.max(1) {
        let next = next.clone();
        let t = t.clone();
        tasks.push(tokio::spawn(async move {
            let mut out = vec![];
            loop {
                let i = next.fetch_add(1, Ordering::SeqCst);
                if i >= requests {
                    return out;
                }
                let body = (t.body)(i).to_string();
                let s =
                    match tokio::time::timeout(t.timeout, stream_request(t.addr, &t.path, &body, t.api_key.as_deref()))
                        .await
                    {
                        Ok(s) => s,
                        Err(_) => {
                            Sample { error: Some(format!("no answer within {:?}", t.timeout)), ..Default::default() }
                        }
                    };
                out.push(s);
            }
        }));
    }
    let mut all = vec![];
    for task in tasks {
        all.extend(task.await.unwrap_or_default());
    }
    summarize(concurrency, requests, &all, t0.elapsed().as_secs_f64())
}

/// The summary of `all` (`requests` were meant) over `seconds` of wall time.
pub fn summarize(concurrency: usize, requests: usize, all: &[Sample], seconds: f64) -> Level {
    let good = || all.iter().filter(|s| s.ok);
    let tokens: usize = good().map(|s| s.tokens).sum();
    let mut ttft: Vec<f64> = good().map(|s| s.ttft * 1e3).collect();
    let mut itl: Vec<f64> = good().flat_map(|s| s.gaps.iter().map(|g| g * 1e3)).collect();
    Level {
        concurrency,
        requests,
        failed: all.iter().filter(|s| !s.ok).count() + requests.saturating_sub(all.len()),
        aggregate_tok_s: tokens as f64 / seconds.max(1e-9),
        ttft_p50_ms: percentile(&mut ttft, 0.5),
        ttft_p90_ms: percentile(&mut ttft, 0.9),
        itl_p50_ms: percentile(&mut itl, 0.5),
        itl_p90_ms: percentile(&mut itl, 0.9),
        seconds,
        first_error: all.iter().find_map(|s| s.error.clone()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunked_bodies_are_undone_across_any_split() {
        let wire = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n7\r\n, world\r\n0\r\n\r\n";
        for split in 1..wire.len() {
            let mut r = Response::default();
            r.feed(&wire[..split]).unwrap();
            r.feed(&wire[split..]).unwrap();
            assert_eq!(r.body, b"hello, world", "split at {split}");
            assert!(r.done && r.head == Some((200, true)));
        }
    }

    #[test]
    fn blank_lines_end_events_in_both_line_ends() {
        assert_eq!(find_blank_line(b"data: 1\n\ndata: 2"), Some((7, 2)));
        assert_eq!(find_blank_line(b"data: 1\r\n\r\ndata: 2"), Some((7, 4)));
        assert_eq!(find_blank_line(b"data: 1\r\n"), None);
    }

    #[test]
    fn percentiles_are_nearest_rank() {
        let mut v = vec![5.0, 1.0, 3.0, 2.0, 4.0];
        assert_eq!(percentile(&mut v, 0.5), 3.0);
        assert_eq!(percentile(&mut v, 0.9), 5.0);
        assert_eq!(percentile(&mut v, 0.0), 1.0);
        assert_eq!(percentile(&mut [], 0.5), 0.0);
    }
}
