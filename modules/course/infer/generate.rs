//! Autoregressive generation: over any [`CausalLm`] without a cache (m04's GPT), and with the
//! Llama's KV cache, streaming, stop tokens and strings and a repetition penalty (`generate_cached`).

use super::sampling::{sample, Sampling};
use crate::models::llama::Llama;
use crate::models::CausalLm;
use crate::sys::rng::Rng;
use anyhow::{bail, Result};
use serde::Serialize;
use std::time::Instant;
use tch::{Kind, Tensor};
use tokenizers::Tokenizer;

/// Samples `max_new` tokens after `prompt`, nanoGPT's `generate` with a seeded sampler: each step
/// runs the model over the last `context_len` tokens (no KV cache). Returns the prompt followed by
/// the new tokens.
pub fn generate<M: CausalLm + ?Sized>(
    model: &M,
    prompt: &[i64],
    max_new: usize,
    s: &Sampling,
    rng: &mut Rng,
) -> Result<Vec<i64>> {
    if prompt.is_empty() {
        bail!("generate: the prompt is empty (give at least one token)");
    }
    if let Some(&bad) = prompt.iter().find(|&&t| t < 0 || t >= model.vocab_size()) {
        bail!("generate: token {bad} is outside the vocabulary of {}", model.vocab_size());
    }
    s.check()?;
    let _g = tch::no_grad_guard();
    let device = model.device();
    let mut out = prompt.to_vec();
    for _ in 0..max_new {
        let start = out.len().saturating_sub(model.context_len() as usize);
        let idx = Tensor::from_slice(&out[start..]).to_device(device).unsqueeze(0); // (1, T)
        let logits = model.logits(&idx).select(1, -1).squeeze_dim(0); // (V)
        out.push(sample(&logits, s, rng));
    }
    Ok(out)
}

/// What [`generate_cached`] generates and when it stops.
#[derive(Debug, Clone, PartialEq)]
pub struct GenerateConfig {
    pub sampling: Sampling,
    pub max_new_tokens: usize,
    /// CTRL's repetition penalty (Keskar et al. 2019), as Hugging Face applies it: the logit of
    /// every token already in the prompt or the answer is divided by it when positive and
    /// multiplied by it when negative. 1.0 is off.
    pub repetition_penalty: f64,
    /// Token ids that end the answer (not included in it).
    pub stop_ids: Vec<i64>,
    /// Strings that end the answer (cut there, never streamed).
    pub stop_strings: Vec<String>,
    pub seed: u64,
}

impl Default for GenerateConfig {
    fn default() -> Self {
        Self {
            sampling: Sampling { temperature: 0.0, top_k: None, top_p: 1.0 },
            max_new_tokens: 256,
            repetition_penalty: 1.0,
            stop_ids: vec![],
            stop_strings: vec![],
            seed: 0,
        }
    }
}

impl GenerateConfig {
    pub fn check(&self) -> Result<()> {
        self.sampling.check()?;
        if !(self.repetition_penalty.is_finite() && self.repetition_penalty > 0.0) {
            bail!("repetition_penalty must be > 0, got {}", self.repetition_penalty);
        }
        if self.stop_strings.iter().any(|s| s.is_empty()) {
            bail!("a stop string must not be empty");
        }
        Ok(())
    }
}

/// Why generation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    /// A stop token or stop string.
    Stop,
    /// `max_new_tokens`, or the KV cache (the context) is full.
    Length,
}

/// The answer and how long it took.
#[derive(Debug, Clone, Serialize)]
pub struct Generated {
    /// The new tokens (a stop token excluded).
    pub tokens: Vec<i64>,
    /// Their text, cut at a stop string.
    pub text: String,
    pub finish: FinishReason,
    pub prompt_tokens: usize,
    pub prefill_secs: f64,
    pub decode_secs: f64,
}

impl Generated {
    pub fn prefill_tokens_per_sec(&self) -> f64 {
        self.prompt_tokens as f64 / self.prefill_secs.max(1e-9)
    }
    /// Tokens after the first, per second of decoding (the first comes out of the prefill).
    pub fn decode_tokens_per_sec(&self) -> f64 {
        self.tokens.len().saturating_sub(1) as f64 / self.decode_secs.max(1e-9)
    }
}

/// Turns tokens into text as they come: never half a UTF-8 character (a character split over
/// two byte-level tokens decodes to U+FFFD until its last byte arrives), and never the start of
/// a stop string that may still complete.
pub struct TextStream<'a> {
    tok: &'a Tokenizer,
    ids: Vec<u32>,
    emitted: usize,
    stops: Vec<String>,
    text: String,
}

impl<'a> TextStream<'a> {
    pub fn new(tok: &'a Tokenizer, stop_strings: &[String]) -> Self {
        Self { tok, ids: vec![], emitted: 0, stops: stop_strings.to_vec(), text: String::new() }
    }

    /// Adds a token; returns the text now safe to show and whether a stop string was reached
    /// (the text is then cut before it).
    pub fn push(&mut self, id: i64) -> Result<(String, bool)> {
        self.ids.push(id as u32);
        let full = self.tok.decode(&self.ids, true).map_err(|e| anyhow::anyhow!("decoding: {e}"))?;
        // A stop string anywhere in the text not yet shown (or straddling its start).
        let from = self.stops.iter().map(|s| s.len()).max().map_or(self.emitted, |m| self.emitted.saturating_sub(m));
        let from = (0..=from).rev().find(|&i| full.is_char_boundary(i)).unwrap_or(0);
        if let Some(p) = self.stops.iter().filter_map(|s| full[from..].find(s.as_str()).map(|p| from + p)).min() {
            let out = full[self.emitted.min(p)..p].to_string();
            self.emitted = self.emitted.max(p);
            self.text = full[..p].to_string();
            return Ok((out, true));
        }
        let mut safe = full.len();
        while full[..safe].ends_with('\u{FFFD}') {
            safe -= '\u{FFFD}'.len_utf8();
        }
        // Hold back a tail that is the beginning of a stop string.
        let hold = self
            .stops
            .iter()
            .flat_map(|s| (1..s.len()).filter(|&k| s.is_char_boundary(k)).map(move |k| &s[..k]))
            .filter(|p| full[..safe].ends_with(p))
            .map(str::len)
            .max()
            .unwrap_or(0);
        let end = (safe - hold).max(self.emitted);
        let out = full[self.emitted..end].to_string();
        self.emitted = end;
        self.text = full;
        Ok((out, false))
    }

    /// The rest, at the end of generation (a trailing incomplete character included as U+FFFD).
    pub fn finish(&mut self) -> String {
        let out = self.text.get(self.emitted..).unwrap_or("").to_string();
        self.emitted = self.text.len();
        out
    }

    /// All the text so far (cut at a stop string once one is reached).
    pub fn text(&self) -> &str {
        &self.text
    }
}

/// CTRL's repetition penalty on `logits` `(V)` for the tokens in `seen`.
pub fn apply_repetition_penalty(logits: &Tensor, seen: &[i64], penalty: f64) -> Tensor {
    if penalty == 1.0 || seen.is_empty() {
        return logits.shallow_clone();
    }
    let mut ids = seen.to_vec();
    ids.sort_unstable();
    ids.dedup();
    let idx = Tensor::from_slice(&ids).to_device(logits.device());
    let sel = logits.index_select(0, &idx);
    let penalised = (&sel / penalty).where_self(&sel.gt(0.0), &(&sel * penalty));
    logits.index_copy(0, &idx, &penalised)
}

/// Generates an answer to `prompt` (token ids) with the model's KV cache: one forward over the
/// prompt (prefill), then one token at a time (decode), each sampled with a seeded RNG. `on_text`
/// receives the text as it becomes safe to show; returning an error from it stops generation.
pub fn generate_cached(
    model: &Llama,
    tok: &Tokenizer,
    prompt: &[i64],
    cfg: &GenerateConfig,
    on_text: &mut dyn FnMut(&str) -> Result<()>,
) -> Result<Generated> {
    cfg.check()?;
    if prompt.is_empty() {
        bail!("generate: the prompt is empty (give at least one token)");
    }
    let vocab = model.cfg.vocab_size;
    if let Some(&bad) = prompt.iter().find(|&&t| t < 0 || t >= vocab) {
        bail!("generate: token {bad} is outside the vocabulary of {vocab}");
    }
    let ctx = model.cfg.max_position_embeddings as usize;
    if prompt.len() >= ctx {
        bail!("generate: the prompt has {} tokens; the model's context holds {ctx}", prompt.len());
    }
    // Inference mode: no autograd records and no version counters, a little less per op.
    let _g = crate::sys::runtime::inference_mode();
    let capacity = (prompt.len() + cfg.max_new_tokens).min(ctx) as i64;
    let mut cache = model.new_cache(1, capacity);
    let mut rng = Rng::new(cfg.seed);
    let mut stream = TextStream::new(tok, &cfg.stop_strings);
    let mut seen = prompt.to_vec();
    let mut tokens = vec![];
    let t0 = Instant::now();
    let ids = Tensor::from_slice(prompt).to_device(model.device()).unsqueeze(0);
    let mut logits = model.step(&ids, &mut cache)?.squeeze_dim(0);
    let prefill_secs = t0.elapsed().as_secs_f64();
    let t1 = Instant::now();
    let mut finish = FinishReason::Length;
    let mut cut_at_string = false;
    while tokens.len() < cfg.max_new_tokens {
        let l = apply_repetition_penalty(&logits.to_kind(Kind::Float), &seen, cfg.repetition_penalty);
        let next = sample(&l, &cfg.sampling, &mut rng);
        if cfg.stop_ids.contains(&next) {
            finish = FinishReason::Stop;
            break;
        }
        tokens.push(next);
        seen.push(next);
        let (text, stopped) = stream.push(next)?;
        if !text.is_empty() {
            on_text(&text)?;
        }
        if stopped {
            finish = FinishReason::Stop;
            cut_at_string = true;
            break;
        }
        if tokens.len() == cfg.max_new_tokens || cache.len() >= cache.capacity() {
            break;
        }
        let ids = Tensor::from_slice(&[next]).to_device(model.device()).unsqueeze(0);
        logits = model.step(&ids, &mut cache)?.squeeze_dim(0);
    }
    // Text held back as the possible start of a stop string is the answer's after all, unless
    // the stop string completed.
    if !cut_at_string {
        let rest = stream.finish();
        if !rest.is_empty() {
            on_text(&rest)?;
        }
    }
    Ok(Generated {
        tokens,
        text: stream.text().to_string(),
        finish,
        prompt_tokens: prompt.len(),
        prefill_secs,
        decode_secs: t1.elapsed().as_secs_f64(),
    })
}
