//! Picking the next token from logits: greedy, temperature, top-k and top-p (nucleus), drawn with
//! the course's seeded RNG so a seed gives the same text on every device.

use crate::sys::rng::Rng;
use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor};

/// How [`super::generate::generate`] picks each token.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Sampling {
    /// Divides the logits: < 1 sharpens, > 1 flattens; 0 means greedy (always the top token).
    pub temperature: f64,
    /// Keep only the k most likely tokens (None: all).
    pub top_k: Option<usize>,
    /// Keep the smallest set of most likely tokens whose probability reaches p (nucleus
    /// sampling, Holtzman et al. 2019); 1.0 keeps all.
    pub top_p: f64,
}

impl Default for Sampling {
    fn default() -> Self {
        Self { temperature: 0.8, top_k: Some(200), top_p: 1.0 }
    }
}

impl Sampling {
    /// As Hugging Face's `generation_config.json` (greedy is `do_sample: false`; no top-k is 0).
    pub fn generation_config(&self, max_new_tokens: usize) -> serde_json::Value {
        serde_json::json!({
            "do_sample": self.temperature > 0.0,
            "temperature": self.temperature,
            "top_k": self.top_k.unwrap_or(0),
            "top_p": self.top_p,
            "max_new_tokens": max_new_tokens,
        })
    }

    /// The sampler a `generation_config.json` describes; missing fields take Hugging Face's
    /// defaults (temperature 1, top-k 50, top-p 1; greedy unless `do_sample`).
    pub fn from_generation_config(v: &serde_json::Value) -> Result<Sampling> {
        let num = |k: &str, d: f64| -> Result<f64> {
            match v.get(k) {
                None | Some(serde_json::Value::Null) => Ok(d),
                Some(x) => {
                    x.as_f64().ok_or_else(|| anyhow::anyhow!("generation config: \"{k}\" must be a number, got {x}"))
                }
            }
        };
        let greedy = !v.get("do_sample").and_then(|d| d.as_bool()).unwrap_or(false);
        let top_k = num("top_k", 50.0)?;
        let s = Sampling {
            temperature: if greedy { 0.0 } else { num("temperature", 1.0)? },
            top_k: (top_k >= 1.0).then_some(top_k as usize),
            top_p: num("top_p", 1.0)?,
        };
        s.check()?;
        Ok(s)
    }

    pub fn check(&self) -> Result<()> {
        if !(self.temperature.is_finite() && self.temperature >= 0.0) {
            bail!("sampling: temperature must be >= 0, got {}", self.temperature);
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            bail!("sampling: top_p must be in (0, 1], got {}", self.top_p);
        }
        if self.top_k == Some(0) {
            bail!("sampling: top_k must be at least 1");
        }
        Ok(())
    }
}

/// Draws one token id from `logits` `(V)`: temperature, then top-k, then top-p, then a draw by
/// inverse CDF with the course's own RNG (so a seed gives the same text on every device).
pub fn sample(logits: &Tensor, s: &Sampling, rng: &mut Rng) -> i64 {
    let logits: Vec<f32> =
        Vec::<f32>::try_from(logits.to_kind(Kind::Float).to_device(Device::Cpu).reshape([-1])).unwrap_or_default();
    sample_from(&logits, s, rng)
}

/// [`sample`] over logits already on the host. Only what a draw needs is sorted: with top-k the
/// k best (a selection, then a sort of k), with top-p < 1 everything, and with neither nothing
/// (the draw walks the ids in order), so a plain temperature costs one pass over the vocabulary.
pub fn sample_from(logits: &[f32], s: &Sampling, rng: &mut Rng) -> i64 {
    if logits.is_empty() {
        return 0;
    }
    if s.temperature == 0.0 {
        return argmax(logits);
    }
    let by_logit =
        |a: &usize, b: &usize| logits[*b].partial_cmp(&logits[*a]).unwrap_or(std::cmp::Ordering::Equal).then(a.cmp(b));
    let top = logits[argmax(logits) as usize];
    let inv_t = (1.0 / s.temperature) as f32;
    let weight = |i: usize| crate::sys::simd::exp_nonpositive((logits[i] - top) * inv_t) as f64;
    let k = s.top_k.map_or(logits.len(), |k| k.min(logits.len()));
    let order: Vec<usize> = if k < logits.len() {
        let mut ids: Vec<usize> = (0..logits.len()).collect();
        ids.select_nth_unstable_by(k - 1, by_logit);
        ids.truncate(k);
        ids.sort_unstable_by(by_logit);
        ids
    } else if s.top_p < 1.0 {
        let mut ids: Vec<usize> = (0..logits.len()).collect();
        ids.sort_unstable_by(by_logit);
        ids
    } else {
        // Neither: every token, in id order; each weight computed once (an exp per token is
        // most of a step's sampling time at 49,152 tokens).
        let mut w = vec![0f32; logits.len()];
        let z = crate::sys::simd::exp_weights(logits, top, inv_t, &mut w);
        let u = rng.next_f64() * z;
        let mut acc = 0.0;
        for (i, &x) in w.iter().enumerate() {
            acc += x as f64;
            if u < acc {
                return i as i64;
            }
        }
        return argmax(logits);
    };
    let mut probs: Vec<f64> = order.iter().map(|&i| weight(i)).collect();
    let z: f64 = probs.iter().sum();
    probs.iter_mut().for_each(|p| *p /= z);
    if s.top_p < 1.0 {
        // Smallest prefix whose mass reaches top_p (the top token is always kept).
        let mut acc = 0.0;
        let mut n = probs.len();
        for (i, p) in probs.iter().enumerate() {
            acc += p;
            if acc >= s.top_p {
                n = i + 1;
                break;
            }
        }
        probs.truncate(n);
        let z: f64 = probs.iter().sum();
        probs.iter_mut().for_each(|p| *p /= z);
    }
    let u = rng.next_f64();
    let mut acc = 0.0;
    for (i, p) in probs.iter().enumerate() {
        acc += p;
        if u < acc {
            return order[i] as i64;
        }
    }
    order[probs.len() - 1] as i64
}

/// The first index of the largest value (NaN never wins).
pub fn argmax(v: &[f32]) -> i64 {
    // The largest value in one branch-free pass (NaNs never win), then its first index: two
    // passes the compiler vectorises, where one pass with a branch per logit was ~4x slower.
    let top = v.iter().fold(f32::NEG_INFINITY, |m, &x| if x > m { x } else { m });
    v.iter().position(|&x| x == top).unwrap_or(0) as i64
}

/// OpenAI's presence and frequency penalties on `logits`, in place: each token that occurs `c`
/// times in `counts` loses `c · frequency + presence` (for `c > 0`).
pub fn apply_penalties(
    logits: &mut [f32],
    counts: &std::collections::HashMap<i64, u32>,
    presence: f64,
    frequency: f64,
) {
    if presence == 0.0 && frequency == 0.0 {
        return;
    }
    for (&id, &c) in counts {
        if let Some(l) = logits.get_mut(id as usize) {
            if c > 0 {
                *l -= (c as f64 * frequency + presence) as f32;
            }
        }
    }
}

/// `log softmax(logits)` at `id` and the `n` most likely tokens with theirs, best first.
pub fn logprobs(logits: &[f32], id: i64, n: usize) -> (f32, Vec<(i64, f32)>) {
    let top = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let lse = top + logits.iter().map(|&l| (l as f64 - top).exp()).sum::<f64>().ln();
    let lp = |i: usize| (logits[i] as f64 - lse) as f32;
    let mut best: Vec<usize> = (0..logits.len()).collect();
    let n = n.min(logits.len());
    let by =
        |a: &usize, b: &usize| logits[*b].partial_cmp(&logits[*a]).unwrap_or(std::cmp::Ordering::Equal).then(a.cmp(b));
    if n > 0 && n < best.len() {
        best.select_nth_unstable_by(n - 1, by);
    }
    best.truncate(n);
    best.sort_unstable_by(by);
    (lp(id as usize), best.into_iter().map(|i| (i as i64, lp(i))).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generation_configs_round_trip() {
        let s = Sampling { temperature: 0.7, top_k: Some(40), top_p: 0.9 };
        let g = s.generation_config(100);
        assert_eq!((g["do_sample"].as_bool(), g["max_new_tokens"].as_u64()), (Some(true), Some(100)));
        assert_eq!(Sampling::from_generation_config(&g).unwrap(), s);
        let greedy = Sampling::from_generation_config(&serde_json::json!({"temperature": 0.5})).unwrap();
        assert_eq!(greedy, Sampling { temperature: 0.0, top_k: Some(50), top_p: 1.0 });
        let e = Sampling::from_generation_config(&serde_json::json!({"do_sample": true, "top_p": "x"})).unwrap_err();
        assert!(e.to_string().contains("\"top_p\" must be a number"), "{e}");
    }
}
