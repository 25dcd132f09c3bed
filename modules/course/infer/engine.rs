//! The generation engine: one thread owns the model, its KV-cache slots and the scheduler, and
//! serves any number of requests by continuous batching (Orca's iteration-level scheduling, as
//! vLLM and TGI do it). Between two decode steps, waiting requests take free slots and have their
//! prompts prefilled (in chunks, so a long prompt does not stall the others), finished and
//! cancelled ones leave, and every sequence in the decode phase advances by one token in one pass
//! over the weights ([`BatchModel::decode`]).
//!
//! Callers hold an [`Engine`] (cheap to clone, `Send + Sync`): [`Engine::submit`] queues a
//! [`Request`] and returns a channel of [`Event`]s for it. Dropping that receiver cancels the
//! request at the next step, queued or running, and frees its slot; so does its deadline.
//!
//! tch tensors are not `Sync` and grad mode is per thread, which is why the model lives on one
//! thread and everything else talks to it over channels.

use super::generate::TextStream;
use super::sampling::{apply_penalties, logprobs, sample_from, Sampling};
use crate::models::llama::{Llama, SlotCache};
use crate::sys::rng::Rng;
use anyhow::{bail, Context, Result};
use serde::Serialize;
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};
use tch::nn::VarStore;
use tch::Tensor;
use tokenizers::Tokenizer;
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver, UnboundedSender};

/// What the scheduler needs of a model: a fixed number of KV slots, a prefill into one slot and a
/// decode step over several. A faster decode step (a fused one, another backend) replaces this
/// and leaves the scheduler and the server as they are.
pub trait BatchModel: Send {
    fn vocab_size(&self) -> i64;
    /// Number of KV slots: the most sequences decoded together.
    fn slots(&self) -> usize;
    /// Positions one slot holds (prompt and answer together).
    fn capacity(&self) -> i64;
    /// Runs `ids` into `slot` after the positions it holds; the logits of the last, `(V)`.
    fn prefill(&mut self, slot: usize, ids: &[i64]) -> Result<Tensor>;
    /// One token for each of `slots` (distinct), at each one's next position; logits `(B, V)`.
    fn decode(&mut self, slots: &[usize], tokens: &[i64]) -> Result<Tensor>;
    /// Forgets `slot`'s sequence.
    fn free(&mut self, slot: usize);
    /// Bytes of the KV cache (0 before [`BatchModel::start`] made it).
    fn cache_bytes(&self) -> i64;
    /// Called once on the engine's thread before the first request: allocate what should be
    /// that thread's (the KV cache: zero-filling it runs an OpenMP region, and a region on the
    /// caller's thread would leave a second OpenMP pool alive; see `runtime::on_fresh_thread`).
    fn start(&mut self) -> Result<()> {
        Ok(())
    }
}

/// The library's Llama over a [`SlotCache`] (with the store that holds its weights, if given).
pub struct LlamaSlots {
    pub model: Llama,
    /// Made by [`BatchModel::start`] on the engine's thread.
    cache: Option<SlotCache>,
    slots: usize,
    capacity: i64,
    _vs: Option<VarStore>,
}

impl LlamaSlots {
    /// `slots` sequences of up to `capacity` positions each (capped at the model's context).
    pub fn new(model: Llama, vs: Option<VarStore>, slots: usize, capacity: i64) -> Result<Self> {
        if slots == 0 {
            bail!("engine: at least one KV slot is needed");
        }
        if capacity < 2 {
            bail!("engine: a slot must hold at least 2 positions, got {capacity}");
        }
        let capacity = capacity.min(model.cfg.max_position_embeddings);
        Ok(Self { model, cache: None, slots, capacity, _vs: vs })
    }
}

impl BatchModel for LlamaSlots {
    fn vocab_size(&self) -> i64 {
        self.model.cfg.vocab_size
    }
    fn slots(&self) -> usize {
        self.slots
    }
    fn capacity(&self) -> i64 {
        self.capacity
    }
    fn prefill(&mut self, slot: usize, ids: &[i64]) -> Result<Tensor> {
        let c = self.cache.as_mut().context("LlamaSlots: prefill before start()")?;
        self.model.prefill_slot(ids, c, slot)
    }
    fn decode(&mut self, slots: &[usize], tokens: &[i64]) -> Result<Tensor> {
        let c = self.cache.as_mut().context("LlamaSlots: decode before start()")?;
        self.model.decode_slots(tokens, c, slots)
    }
    fn free(&mut self, slot: usize) {
        if let Some(c) = self.cache.as_mut() {
            c.clear(slot)
        }
    }
    fn cache_bytes(&self) -> i64 {
        self.cache.as_ref().map_or(0, |c| c.bytes())
    }
    fn start(&mut self) -> Result<()> {
        if self.cache.is_none() {
            self.cache = Some(self.model.new_slot_cache(self.slots, self.capacity));
        }
        Ok(())
    }
}

/// How one request is answered.
#[derive(Debug, Clone, PartialEq)]
pub struct Params {
    pub sampling: Sampling,
    pub max_tokens: usize,
    /// Strings that end the answer (not returned; at most 4, as OpenAI allows).
    pub stop: Vec<String>,
    pub seed: u64,
    /// OpenAI's penalties, each in -2..=2.
    pub presence_penalty: f64,
    pub frequency_penalty: f64,
    /// Log-probabilities of the chosen tokens, with this many alternatives each (0..=20).
    pub logprobs: Option<usize>,
    /// Stop at the model's end-of-turn tokens (off: generate until `max_tokens`).
    pub stop_at_eos: bool,
}

impl Default for Params {
    fn default() -> Self {
        Self {
            sampling: Sampling { temperature: 1.0, top_k: None, top_p: 1.0 },
            max_tokens: 256,
            stop: vec![],
            seed: 0,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            logprobs: None,
            stop_at_eos: true,
        }
    }
}

/// A request for the engine: prompt token ids and how to answer them.
#[derive(Debug, Clone)]
pub struct Request {
    pub prompt: Vec<i64>,
    pub params: Params,
    /// Cancel (finish reason `cancelled`) if not finished by then.
    pub deadline: Option<Instant>,
}

/// The log-probability of a chosen token and of the most likely ones at its step.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TokenLogprob {
    pub id: i64,
    pub logprob: f32,
    pub top: Vec<(i64, f32)>,
}

/// Why an answer ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Finish {
    /// An end-of-turn token or a stop string.
    Stop,
    /// `max_tokens`, or the slot's capacity.
    Length,
    /// The receiver was dropped or the deadline passed.
    Cancelled,
}

/// Times and counts of one answer (llama.cpp's `timings`, vLLM's latencies).
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Timings {
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    /// From submit to its slot.
    pub queue_ms: f64,
    pub prefill_ms: f64,
    /// From the first token to the last.
    pub decode_ms: f64,
    /// From submit to the first token.
    pub ttft_ms: f64,
}

impl Timings {
    pub fn prefill_tokens_per_sec(&self) -> f64 {
        self.prompt_tokens as f64 / (self.prefill_ms / 1e3).max(1e-9)
    }
    pub fn decode_tokens_per_sec(&self) -> f64 {
        self.completion_tokens.saturating_sub(1) as f64 / (self.decode_ms / 1e3).max(1e-9)
    }
}

/// What the engine sends back for a request, in order: text as it becomes safe to show, then one
/// `Done` (or one `Error`).
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// New text (possibly empty: a token whose text is held back, the start of a character or of
    /// a stop string) and the token that brought it.
    Text {
        text: String,
        token: i64,
        logprob: Option<TokenLogprob>,
    },
    Done {
        finish: Finish,
        timings: Timings,
    },
    Error(String),
}

/// Why [`Engine::submit`] refused a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SubmitError {
    /// Every slot is busy and the queue holds its limit: try again later.
    QueueFull { limit: usize },
    /// The prompt and `max_tokens` do not fit a slot, or the request is malformed.
    Invalid(String),
    /// The engine is stopping or stopped.
    ShuttingDown,
}

impl std::fmt::Display for SubmitError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::QueueFull { limit } => {
                write!(f, "the server is at capacity: every slot is busy and the queue of {limit} is full")
            }
            Self::Invalid(m) => f.write_str(m),
            Self::ShuttingDown => f.write_str("the server is shutting down"),
        }
    }
}

impl std::error::Error for SubmitError {}

/// Limits of the scheduler.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EngineConfig {
    /// Most requests waiting for a slot.
    pub queue: usize,
    /// Most prompt tokens prefilled between two decode steps (a longer prompt takes several).
    pub prefill_chunk: usize,
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self { queue: 64, prefill_chunk: 256 }
    }
}

/// Histogram buckets in seconds (vLLM's for time to first token, a subset).
pub const TTFT_BUCKETS: &[f64] = &[0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0];
/// Histogram buckets in seconds for the time between two tokens of a stream.
pub const ITL_BUCKETS: &[f64] = &[0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0, 2.5];

/// A cumulative histogram for Prometheus.
#[derive(Debug, Clone, Default)]
pub struct Histogram {
    pub bounds: Vec<f64>,
    pub counts: Vec<u64>,
    pub sum: f64,
    pub count: u64,
}

impl Histogram {
    fn new(bounds: &[f64]) -> Self {
        Self { bounds: bounds.to_vec(), counts: vec![0; bounds.len()], sum: 0.0, count: 0 }
    }
    fn observe(&mut self, v: f64) {
        for (b, c) in self.bounds.iter().zip(self.counts.iter_mut()) {
            if v <= *b {
                *c += 1;
            }
        }
        self.sum += v;
        self.count += 1;
    }
}

/// What `/metrics` reports, updated by the engine thread.
#[derive(Debug, Default)]
pub struct Stats {
    pub running: AtomicUsize,
    pub waiting: AtomicUsize,
    pub prompt_tokens: AtomicU64,
    pub generation_tokens: AtomicU64,
    pub finished: Mutex<HashMap<&'static str, u64>>,
    pub ttft: Mutex<Histogram>,
    pub itl: Mutex<Histogram>,
    pub steps: AtomicU64,
}

enum Command {
    Submit(Box<Job>),
    Stop,
}

struct Job {
    req: Request,
    tx: UnboundedSender<Event>,
    submitted: Instant,
}

struct Shared {
    commands: Mutex<mpsc::Sender<Command>>,
    stats: Arc<Stats>,
    config: EngineConfig,
    /// Requests submitted and not yet finished, waiting or running (counted at submit: the
    /// limit `slots + queue` is checked against this).
    outstanding: AtomicUsize,
    stopping: AtomicBool,
    slots: usize,
    capacity: i64,
    vocab: i64,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
}

/// A handle on the engine thread.
#[derive(Clone)]
pub struct Engine {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Engine({} slots of {} positions)", self.shared.slots, self.shared.capacity)
    }
}

impl Engine {
    /// Starts the engine thread over `model`. `tokenizer` turns tokens into text; `stop_ids` end
    /// an answer (the model's end-of-turn tokens).
    pub fn start(model: Box<dyn BatchModel>, tokenizer: Tokenizer, stop_ids: Vec<i64>, config: EngineConfig) -> Self {
        let (tx, rx) = mpsc::channel();
        let stats = Arc::new(Stats {
            ttft: Mutex::new(Histogram::new(TTFT_BUCKETS)),
            itl: Mutex::new(Histogram::new(ITL_BUCKETS)),
            ..Default::default()
        });
        let shared = Arc::new(Shared {
            commands: Mutex::new(tx),
            stats: stats.clone(),
            config,
            outstanding: AtomicUsize::new(0),
            stopping: AtomicBool::new(false),
            slots: model.slots(),
            capacity: model.capacity(),
            vocab: model.vocab_size(),
            thread: Mutex::new(None),
        });
        let worker = shared.clone();
        let handle = std::thread::Builder::new()
            .name("engine".into())
            .spawn(move || {
                let _g = crate::sys::runtime::inference_mode();
                let mut s = Scheduler {
                    model,
                    tok: &tokenizer,
                    stop_ids,
                    shared: &worker,
                    waiting: VecDeque::new(),
                    running: vec![],
                    free: (0..worker.slots).rev().collect(),
                };
                s.run(rx);
            })
            .expect("spawning the engine thread");
        *shared.thread.lock().unwrap_or_else(|e| e.into_inner()) = Some(handle);
        Self { shared }
    }

    /// Number of KV slots.
    pub fn slots(&self) -> usize {
        self.shared.slots
    }

    /// Positions a slot holds: prompt plus answer.
    pub fn capacity(&self) -> i64 {
        self.shared.capacity
    }

    pub fn stats(&self) -> &Arc<Stats> {
        &self.shared.stats
    }

    pub fn config(&self) -> EngineConfig {
        self.shared.config
    }

    /// Queues `req`; its events arrive on the returned channel. Dropping the receiver cancels it.
    pub fn submit(&self, req: Request) -> Result<UnboundedReceiver<Event>, SubmitError> {
        let sh = &self.shared;
        if sh.stopping.load(Ordering::SeqCst) {
            return Err(SubmitError::ShuttingDown);
        }
        if req.prompt.is_empty() {
            return Err(SubmitError::Invalid("the prompt is empty".into()));
        }
        if let Some(&bad) = req.prompt.iter().find(|&&t| t < 0 || t >= sh.vocab) {
            return Err(SubmitError::Invalid(format!("token {bad} is outside the vocabulary of {}", sh.vocab)));
        }
        if req.params.max_tokens == 0 {
            return Err(SubmitError::Invalid("max_tokens must be at least 1".into()));
        }
        let need = req.prompt.len() as i64 + req.params.max_tokens as i64;
        if need > sh.capacity {
            return Err(SubmitError::Invalid(format!(
                "the prompt has {} tokens and max_tokens is {}: {need} positions, but a sequence holds {}",
                req.prompt.len(),
                req.params.max_tokens,
                sh.capacity
            )));
        }
        if let Err(e) = req.params.sampling.check() {
            return Err(SubmitError::Invalid(e.to_string()));
        }
        // Reserve a slot or a place in the queue, or refuse.
        let limit = sh.slots + sh.config.queue;
        if sh.outstanding.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |q| (q < limit).then_some(q + 1)).is_err() {
            return Err(SubmitError::QueueFull { limit: sh.config.queue });
        }
        let (tx, rx) = unbounded_channel();
        let job = Box::new(Job { req, tx, submitted: Instant::now() });
        let sent = sh.commands.lock().map(|c| c.send(Command::Submit(job)).is_ok()).unwrap_or(false);
        if !sent {
            sh.outstanding.fetch_sub(1, Ordering::SeqCst);
            return Err(SubmitError::ShuttingDown);
        }
        Ok(rx)
    }

    /// Refuses new requests from now on; the ones in flight run to their end.
    pub fn begin_shutdown(&self) {
        self.shared.stopping.store(true, Ordering::SeqCst);
    }

    pub fn is_shutting_down(&self) -> bool {
        self.shared.stopping.load(Ordering::SeqCst)
    }

    /// Stops the engine thread: requests still waiting or running are cancelled (their streams
    /// get `Done` with `cancelled`). Waits for the thread to end.
    pub fn shutdown(&self) {
        self.begin_shutdown();
        if let Ok(c) = self.shared.commands.lock() {
            let _ = c.send(Command::Stop);
        }
        if let Some(h) = self.shared.thread.lock().unwrap_or_else(|e| e.into_inner()).take() {
            let _ = h.join();
        }
    }
}

/// One request in a slot.
struct Seq<'t> {
    job: Job,
    slot: usize,
    /// Prompt tokens prefilled so far.
    done_prompt: usize,
    /// The last sampled token, to be fed at the next decode step.
    next: Option<i64>,
    tokens: Vec<i64>,
    counts: HashMap<i64, u32>,
    stream: TextStream<'t>,
    rng: Rng,
    started: Instant,
    first_token: Option<Instant>,
    last_token: Option<Instant>,
    prefill_secs: f64,
    finished: Option<Finish>,
    /// Ended by a stop string (the text held back is then not the answer's).
    cut: bool,
}

struct Scheduler<'t> {
    model: Box<dyn BatchModel>,
    tok: &'t Tokenizer,
    stop_ids: Vec<i64>,
    shared: &'t Shared,
    waiting: VecDeque<Job>,
    running: Vec<Seq<'t>>,
    free: Vec<usize>,
}

fn cancelled(job: &Job) -> bool {
    job.tx.is_closed() || job.req.deadline.is_some_and(|d| Instant::now() >= d)
}

impl<'t> Scheduler<'t> {
    fn run(&mut self, rx: mpsc::Receiver<Command>) {
        if let Err(e) = self.model.start() {
            // Nothing can be served: every request gets the reason, until the engine stops.
            let msg = format!("the model could not start: {e:#}");
            while let Ok(c) = rx.recv() {
                match c {
                    Command::Submit(job) => {
                        self.shared.outstanding.fetch_sub(1, Ordering::SeqCst);
                        count_finish(&self.shared.stats, "error");
                        let _ = job.tx.send(Event::Error(msg.clone()));
                    }
                    Command::Stop => return,
                }
            }
            return;
        }
        loop {
            // Commands: wait for one when idle, else take what has come.
            let idle = self.running.is_empty() && self.waiting.is_empty();
            let first = if idle {
                match rx.recv() {
                    Ok(c) => Some(c),
                    Err(_) => return,
                }
            } else {
                None
            };
            let mut stop = false;
            for c in first.into_iter().chain(std::iter::from_fn(|| rx.try_recv().ok())) {
                match c {
                    Command::Submit(job) => self.waiting.push_back(*job),
                    Command::Stop => stop = true,
                }
            }
            if stop {
                self.cancel_all();
                return;
            }
            self.drop_cancelled();
            self.admit();
            if let Err(e) = self.prefill_chunk() {
                self.fail_all(&format!("prefill: {e:#}"));
                continue;
            }
            if let Err(e) = self.decode_step() {
                self.fail_all(&format!("decode: {e:#}"));
                continue;
            }
            self.retire();
            self.publish();
        }
    }

    fn publish(&self) {
        let st = &self.shared.stats;
        st.running.store(self.running.len(), Ordering::Relaxed);
        st.waiting.store(self.waiting.len(), Ordering::Relaxed);
    }

    /// Requests whose receiver is gone or whose deadline passed leave, queued or running.
    fn drop_cancelled(&mut self) {
        let mut kept = VecDeque::with_capacity(self.waiting.len());
        for job in self.waiting.drain(..) {
            if cancelled(&job) {
                self.shared.outstanding.fetch_sub(1, Ordering::SeqCst);
                let _ = job.tx.send(Event::Done {
                    finish: Finish::Cancelled,
                    timings: Timings { prompt_tokens: job.req.prompt.len(), ..Default::default() },
                });
                count_finish(&self.shared.stats, "cancelled");
            } else {
                kept.push_back(job);
            }
        }
        self.waiting = kept;
        for s in &mut self.running {
            if s.finished.is_none() && cancelled(&s.job) {
                s.finished = Some(Finish::Cancelled);
            }
        }
        self.retire();
    }

    /// Waiting requests take free slots, oldest first.
    fn admit(&mut self) {
        while !self.free.is_empty() {
            let Some(job) = self.waiting.pop_front() else { break };
            let slot = self.free.pop().expect("checked");
            self.model.free(slot);
            let seed = job.req.params.seed;
            let stream = TextStream::new(self.tok, &job.req.params.stop);
            self.running.push(Seq {
                job,
                slot,
                done_prompt: 0,
                next: None,
                tokens: vec![],
                counts: HashMap::new(),
                stream,
                rng: Rng::new(seed),
                started: Instant::now(),
                first_token: None,
                last_token: None,
                prefill_secs: 0.0,
                finished: None,
                cut: false,
            });
        }
        self.publish();
    }

    /// Up to `prefill_chunk` prompt tokens of the oldest sequence still in its prompt; when its
    /// prompt is done, its first token is sampled.
    fn prefill_chunk(&mut self) -> Result<()> {
        let chunk = self.shared.config.prefill_chunk.max(1);
        let Some(i) = self.running.iter().position(|s| s.finished.is_none() && s.done_prompt < s.job.req.prompt.len())
        else {
            return Ok(());
        };
        let s = &mut self.running[i];
        let prompt = &s.job.req.prompt;
        let end = (s.done_prompt + chunk).min(prompt.len());
        let t0 = Instant::now();
        let logits = self.model.prefill(s.slot, &prompt[s.done_prompt..end])?;
        s.prefill_secs += t0.elapsed().as_secs_f64();
        s.done_prompt = end;
        if end == prompt.len() {
            let mut host = host_logits(&logits)?;
            let st = &self.shared.stats;
            st.prompt_tokens.fetch_add(prompt.len() as u64, Ordering::Relaxed);
            take_token(s, &mut host, &self.stop_ids, st)?;
        }
        Ok(())
    }

    /// One token for every sequence past its prompt, in one pass over the weights.
    fn decode_step(&mut self) -> Result<()> {
        let ready: Vec<usize> = (0..self.running.len())
            .filter(|&i| self.running[i].finished.is_none() && self.running[i].next.is_some())
            .collect();
        if ready.is_empty() {
            return Ok(());
        }
        let slots: Vec<usize> = ready.iter().map(|&i| self.running[i].slot).collect();
        let tokens: Vec<i64> = ready.iter().map(|&i| self.running[i].next.expect("filtered")).collect();
        let logits = self.model.decode(&slots, &tokens)?;
        self.shared.stats.steps.fetch_add(1, Ordering::Relaxed);
        // One copy of all rows to the host; each row is sampled (and penalised) in place.
        let mut all = host_logits(&logits)?;
        let vocab = all.len() / ready.len();
        for (row, &i) in all.chunks_exact_mut(vocab).zip(&ready) {
            take_token(&mut self.running[i], row, &self.stop_ids, &self.shared.stats)?;
        }
        Ok(())
    }

    /// Finished sequences send their last text and `Done`, and free their slots.
    fn retire(&mut self) {
        let mut i = 0;
        while i < self.running.len() {
            let Some(finish) = self.running[i].finished else {
                i += 1;
                continue;
            };
            let mut s = self.running.swap_remove(i);
            if finish != Finish::Cancelled && !s.cut {
                // Text held back as the possible start of a stop string is the answer's.
                let rest = s.stream.finish();
                if !rest.is_empty() {
                    let _ = s.job.tx.send(Event::Text { text: rest, token: -1, logprob: None });
                }
            }
            let now = Instant::now();
            let timings = Timings {
                prompt_tokens: s.job.req.prompt.len(),
                completion_tokens: s.tokens.len(),
                queue_ms: (s.started - s.job.submitted).as_secs_f64() * 1e3,
                prefill_ms: s.prefill_secs * 1e3,
                decode_ms: s.first_token.map_or(0.0, |f| (s.last_token.unwrap_or(now) - f).as_secs_f64() * 1e3),
                ttft_ms: s.first_token.map_or(0.0, |f| (f - s.job.submitted).as_secs_f64() * 1e3),
            };
            // The slot, the capacity count and the stats first: a client that sends its next
            // request on `Done` must find them free.
            self.model.free(s.slot);
            self.free.push(s.slot);
            self.shared.outstanding.fetch_sub(1, Ordering::SeqCst);
            count_finish(
                &self.shared.stats,
                match finish {
                    Finish::Stop => "stop",
                    Finish::Length => "length",
                    Finish::Cancelled => "cancelled",
                },
            );
            self.publish();
            let _ = s.job.tx.send(Event::Done { finish, timings });
        }
    }

    fn cancel_all(&mut self) {
        for s in &mut self.running {
            s.finished.get_or_insert(Finish::Cancelled);
        }
        self.retire();
        let n = self.waiting.len();
        for job in self.waiting.drain(..) {
            let _ = job.tx.send(Event::Done {
                finish: Finish::Cancelled,
                timings: Timings { prompt_tokens: job.req.prompt.len(), ..Default::default() },
            });
        }
        self.shared.outstanding.fetch_sub(n, Ordering::SeqCst);
        self.publish();
    }

    /// A model error ends every request in flight with it (the engine goes on serving).
    fn fail_all(&mut self, msg: &str) {
        for s in self.running.drain(..) {
            let _ = s.job.tx.send(Event::Error(msg.to_string()));
            count_finish(&self.shared.stats, "error");
            self.model.free(s.slot);
            self.free.push(s.slot);
            self.shared.outstanding.fetch_sub(1, Ordering::SeqCst);
        }
        self.publish();
    }
}

fn count_finish(st: &Stats, reason: &'static str) {
    if let Ok(mut m) = st.finished.lock() {
        *m.entry(reason).or_insert(0) += 1;
    }
}

fn host_logits(t: &Tensor) -> Result<Vec<f32>> {
    Ok(Vec::<f32>::try_from(t.to_kind(tch::Kind::Float).to_device(tch::Device::Cpu).reshape([-1]))?)
}

/// Samples `s`'s next token from `logits`, sends its text, and marks `s` finished where it ends.
fn take_token(s: &mut Seq<'_>, logits: &mut [f32], stop_ids: &[i64], st: &Stats) -> Result<()> {
    let p = &s.job.req.params;
    let raw = p.logprobs.map(|_| logits.to_vec());
    apply_penalties(logits, &s.counts, p.presence_penalty, p.frequency_penalty);
    let id = sample_from(logits, &p.sampling, &mut s.rng);
    let now = Instant::now();
    match s.last_token {
        Some(prev) => {
            if let Ok(mut h) = st.itl.lock() {
                h.observe((now - prev).as_secs_f64());
            }
        }
        None => {
            s.first_token = Some(now);
            if let Ok(mut h) = st.ttft.lock() {
                h.observe((now - s.job.submitted).as_secs_f64());
            }
        }
    }
    s.last_token = Some(now);
    if p.stop_at_eos && stop_ids.contains(&id) {
        s.finished = Some(Finish::Stop);
        return Ok(());
    }
    st.generation_tokens.fetch_add(1, Ordering::Relaxed);
    s.tokens.push(id);
    *s.counts.entry(id).or_insert(0) += 1;
    let logprob = match (p.logprobs, raw) {
        (Some(n), Some(raw)) => {
            let (lp, top) = logprobs(&raw, id, n);
            Some(TokenLogprob { id, logprob: lp, top })
        }
        _ => None,
    };
    let (text, stopped) = s.stream.push(id)?;
    if s.job.tx.send(Event::Text { text, token: id, logprob }).is_err() {
        s.finished = Some(Finish::Cancelled);
        return Ok(());
    }
    if stopped {
        s.finished = Some(Finish::Stop);
        s.cut = true;
    } else if s.tokens.len() >= p.max_tokens {
        s.finished = Some(Finish::Length);
    } else {
        s.next = Some(id);
    }
    Ok(())
}

/// Runs `req` to its end on `engine` and collects the answer: the text, the tokens, why it ended
/// and its timings (blocking: for tests, benchmarks and the lesson, not for async handlers).
pub fn complete(engine: &Engine, req: Request) -> Result<Completion> {
    let mut rx = engine.submit(req).map_err(|e| anyhow::anyhow!("{e}"))?;
    let mut c = Completion::default();
    loop {
        match rx.blocking_recv() {
            Some(Event::Text { text, token, logprob }) => {
                c.text.push_str(&text);
                if token >= 0 {
                    c.tokens.push(token);
                }
                c.logprobs.extend(logprob);
            }
            Some(Event::Done { finish, timings }) => {
                c.finish = Some(finish);
                c.timings = timings;
                return Ok(c);
            }
            Some(Event::Error(e)) => bail!("engine: {e}"),
            None => bail!("engine: the stream ended without an answer"),
        }
    }
}

/// A whole answer (see [`complete`]).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Completion {
    pub text: String,
    pub tokens: Vec<i64>,
    pub finish: Option<Finish>,
    pub timings: Timings,
    pub logprobs: Vec<TokenLogprob>,
}

/// How long to wait before retrying after a 429 (the queue's drain time at one answer per slot
/// and second, at least a second).
pub fn retry_after(engine: &Engine) -> Duration {
    let q = engine.stats().waiting.load(Ordering::Relaxed) as u64;
    Duration::from_secs((q / engine.slots().max(1) as u64).max(1))
}
