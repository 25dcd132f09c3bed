//! Classification metrics: accuracy, top-k accuracy and the confusion matrix.

use tch::{Kind, Tensor};

/// Fraction of rows of `logits (B, C)` whose arg-max equals `labels (B)`.
pub fn accuracy(logits: &Tensor, labels: &Tensor) -> f64 {
    correct(logits, labels) as f64 / labels.size()[0].max(1) as f64
}

/// Number of rows whose arg-max equals the label.
pub fn correct(logits: &Tensor, labels: &Tensor) -> i64 {
    logits.argmax(-1, false).eq_tensor(labels).sum(Kind::Int64).int64_value(&[])
}

/// Fraction of rows whose label is among the `k` largest logits.
pub fn top_k_accuracy(logits: &Tensor, labels: &Tensor, k: i64) -> f64 {
    let (_, idx) = logits.topk(k.min(logits.size()[1]), -1, true, true); // (B, k)
    let hit = idx.eq_tensor(&labels.unsqueeze(1)).any_dim(1, false);
    hit.to_kind(Kind::Double).mean(Kind::Double).double_value(&[])
}

/// `m[true][pred]` counts for `classes` classes.
#[derive(Debug, Clone, PartialEq)]
pub struct Confusion {
    pub m: Vec<Vec<u64>>,
}

impl Confusion {
    pub fn new(classes: usize) -> Self {
        Self { m: vec![vec![0; classes]; classes] }
    }
    /// Adds a batch of predictions `(B)` and labels `(B)`.
    pub fn add(&mut self, preds: &Tensor, labels: &Tensor) {
        let p: Vec<i64> = Vec::try_from(preds.to_kind(Kind::Int64).to_device(tch::Device::Cpu)).unwrap_or_default();
        let l: Vec<i64> = Vec::try_from(labels.to_kind(Kind::Int64).to_device(tch::Device::Cpu)).unwrap_or_default();
        let n = self.m.len() as i64;
        for (p, l) in p.into_iter().zip(l) {
            if (0..n).contains(&p) && (0..n).contains(&l) {
                self.m[l as usize][p as usize] += 1;
            }
        }
    }
    pub fn total(&self) -> u64 {
        self.m.iter().flatten().sum()
    }
    pub fn accuracy(&self) -> f64 {
        let diag: u64 = (0..self.m.len()).map(|i| self.m[i][i]).sum();
        diag as f64 / self.total().max(1) as f64
    }
    pub fn as_f64(&self) -> Vec<Vec<f64>> {
        self.m.iter().map(|r| r.iter().map(|&v| v as f64).collect()).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hand_computed_cases() {
        // Rows' arg-max: 1, 0, 2, 2. Labels: 1, 2, 2, 0. Correct: rows 0 and 2.
        let logits = Tensor::from_slice(&[0.1f32, 0.7, 0.2, 0.5, 0.3, 0.2, 0.1, 0.2, 0.7, 0.3, 0.1, 0.6]).view([4, 3]);
        let labels = Tensor::from_slice(&[1i64, 2, 2, 0]);
        assert_eq!(correct(&logits, &labels), 2);
        assert_eq!(accuracy(&logits, &labels), 0.5);
        // Top-2 sets: {1,2}, {0,1}, {2,1}, {2,0}: labels 1, 2, 2, 0 hit in rows 0, 2, 3.
        assert_eq!(top_k_accuracy(&logits, &labels, 2), 0.75);
        assert_eq!(top_k_accuracy(&logits, &labels, 3), 1.0);
        let mut c = Confusion::new(3);
        c.add(&logits.argmax(-1, false), &labels);
        assert_eq!(c.m, vec![vec![0, 0, 1], vec![0, 1, 0], vec![1, 0, 1]]);
        assert_eq!((c.total(), c.accuracy()), (4, 0.5));
    }
}
