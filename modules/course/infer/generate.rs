//! Autoregressive generation over any [`CausalLm`]: the prompt checked, then one token at a time.

use super::sampling::{sample, Sampling};
use crate::models::CausalLm;
use crate::sys::rng::Rng;
use anyhow::{bail, Result};
use tch::Tensor;

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
