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

    /// Per class: precision `tp / predicted`, recall `tp / true`, F1 their harmonic mean, and
    /// support (true count). A ratio with a zero denominator is 0 (scikit-learn's
    /// `zero_division=0`).
    pub fn per_class(&self) -> Vec<ClassScores> {
        let n = self.m.len();
        (0..n)
            .map(|c| {
                let tp = self.m[c][c] as f64;
                let support: u64 = self.m[c].iter().sum();
                let predicted: u64 = (0..n).map(|r| self.m[r][c]).sum();
                let ratio = |a: f64, b: u64| if b == 0 { 0.0 } else { a / b as f64 };
                let (precision, recall) = (ratio(tp, predicted), ratio(tp, support));
                let f1 = if precision + recall == 0.0 { 0.0 } else { 2.0 * precision * recall / (precision + recall) };
                ClassScores { precision, recall, f1, support }
            })
            .collect()
    }

    /// The matrix as an annotated heatmap: true classes down, predicted across.
    pub fn heatmap(&self, title: &str, classes: &[&str]) -> crate::run::charts::Heatmap {
        let ticks: Vec<String> = classes.iter().map(|s| s.to_string()).collect();
        crate::run::charts::Heatmap {
            title: title.to_string(),
            x_label: "predicted".into(),
            y_label: "true".into(),
            values: self.as_f64(),
            x_ticks: ticks.clone(),
            y_ticks: ticks,
            annotate: true,
        }
    }

    /// The unweighted mean of the per-class F1 scores.
    pub fn macro_f1(&self) -> f64 {
        let s = self.per_class();
        s.iter().map(|c| c.f1).sum::<f64>() / s.len().max(1) as f64
    }

    /// scikit-learn's `classification_report` as a text table: one row per class, then
    /// accuracy, macro average and support-weighted average.
    pub fn report(&self, names: &[&str]) -> String {
        let s = self.per_class();
        let w = names.iter().map(|n| n.len()).chain([12]).max().unwrap_or(12);
        let mut out = format!("{:>w$} {:>9} {:>9} {:>9} {:>9}\n", "", "precision", "recall", "f1-score", "support");
        for (i, c) in s.iter().enumerate() {
            let name = names.get(i).copied().map_or_else(|| i.to_string(), str::to_string);
            out += &format!("{name:>w$} {:>9.4} {:>9.4} {:>9.4} {:>9}\n", c.precision, c.recall, c.f1, c.support);
        }
        let total = self.total();
        let k = s.len().max(1) as f64;
        let wsum =
            |f: fn(&ClassScores) -> f64| s.iter().map(|c| f(c) * c.support as f64).sum::<f64>() / total.max(1) as f64;
        out += &format!("\n{:>w$} {:>9} {:>9} {:>9.4} {total:>9}\n", "accuracy", "", "", self.accuracy());
        out += &format!(
            "{:>w$} {:>9.4} {:>9.4} {:>9.4} {total:>9}\n",
            "macro avg",
            s.iter().map(|c| c.precision).sum::<f64>() / k,
            s.iter().map(|c| c.recall).sum::<f64>() / k,
            self.macro_f1()
        );
        out += &format!(
            "{:>w$} {:>9.4} {:>9.4} {:>9.4} {total:>9}\n",
            "weighted avg",
            wsum(|c| c.precision),
            wsum(|c| c.recall),
            wsum(|c| c.f1)
        );
        out
    }
}

/// One class's scores in a [`Confusion`].
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct ClassScores {
    pub precision: f64,
    pub recall: f64,
    pub f1: f64,
    pub support: u64,
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

    #[test]
    fn precision_recall_f1_by_hand() {
        // true\pred   0  1  2
        //   0          5  1  0     class 0: tp 5, predicted 5+2+0 = 7, support 6
        //   1          2  3  1     class 1: tp 3, predicted 1+3+0 = 4, support 6
        //   2          0  0  0     class 2: never true, predicted once
        let c = Confusion { m: vec![vec![5, 1, 0], vec![2, 3, 1], vec![0, 0, 0]] };
        let s = c.per_class();
        let close = |a: f64, b: f64| assert!((a - b).abs() < 1e-12, "{a} != {b}");
        close(s[0].precision, 5.0 / 7.0);
        close(s[0].recall, 5.0 / 6.0);
        close(s[0].f1, 2.0 * (5.0 / 7.0) * (5.0 / 6.0) / (5.0 / 7.0 + 5.0 / 6.0)); // = 10/13
        close(s[0].f1, 10.0 / 13.0);
        close(s[1].precision, 0.75);
        close(s[1].recall, 0.5);
        close(s[1].f1, 0.6);
        assert_eq!(s[2], ClassScores { precision: 0.0, recall: 0.0, f1: 0.0, support: 0 });
        close(c.macro_f1(), (10.0 / 13.0 + 0.6) / 3.0);
        let r = c.report(&["ham", "spam", "other"]);
        let rows: Vec<Vec<&str>> = r.lines().map(|l| l.split_whitespace().collect()).collect();
        assert!(rows.contains(&vec!["spam", "0.7500", "0.5000", "0.6000", "6"]), "{r}");
        assert!(rows.contains(&vec!["accuracy", "0.6667", "12"]), "{r}");
        // Weighted by support 6, 6, 0: precision (5/7 + 0.75) / 2.
        assert!(rows.contains(&vec!["weighted", "avg", "0.7321", "0.6667", "0.6846", "12"]), "{r}");
    }
}
