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
    let logits: Vec<f64> =
        Vec::<f64>::try_from(logits.to_kind(Kind::Double).to_device(Device::Cpu)).unwrap_or_default();
    if s.temperature == 0.0 {
        return argmax(&logits);
    }
    // Sort token ids by logit, descending (stable: ties keep id order).
    let mut order: Vec<usize> = (0..logits.len()).collect();
    order.sort_by(|&a, &b| logits[b].partial_cmp(&logits[a]).unwrap_or(std::cmp::Ordering::Equal));
    let keep = s.top_k.map_or(order.len(), |k| k.min(order.len()));
    order.truncate(keep);
    let top = logits[order[0]];
    let mut probs: Vec<f64> = order.iter().map(|&i| ((logits[i] - top) / s.temperature).exp()).collect();
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

fn argmax(v: &[f64]) -> i64 {
    let mut best = 0;
    for (i, x) in v.iter().enumerate() {
        if *x > v[best] {
            best = i;
        }
    }
    best as i64
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
