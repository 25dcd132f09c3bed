//! Losses: the one cross-entropy every model's training uses (ignore index -100, label
//! smoothing), mean squared error, and a scalar for logging.

pub use crate::ops::IGNORE_INDEX;
use tch::{Kind, Reduction, Tensor};

/// Mean cross-entropy of logits `(N, C)` against class indices `(N)`, over the rows whose target
/// is not [`IGNORE_INDEX`] (-100, as the fused `ops::cross_entropy`), in the logits' dtype, with
/// label smoothing (Szegedy et al. 2016): the target puts `1 - s + s/C` on the true class and
/// `s/C` elsewhere. The classifiers (m02, m03) and the unfused LM loss (m04-m06) both use it.
pub fn cross_entropy(logits: &Tensor, labels: &Tensor, label_smoothing: f64) -> Tensor {
    logits.cross_entropy_loss::<Tensor>(labels, None, Reduction::Mean, IGNORE_INDEX, label_smoothing)
}

/// Mean next-token cross-entropy of language-model logits `(..., V)` against targets `(...)`:
/// through the fused kernel (`ops::cross_entropy`) when `fused`, else [`cross_entropy`] in fp32
/// for bf16/fp16 logits (f64 stays f64). Targets of -100 leave the mean. Shapes and dtypes are
/// the model's own, so a kernel error (a target out of range) panics with its message, as tch's
/// own ops do in a forward pass.
pub fn next_token_loss(logits: &Tensor, targets: &Tensor, fused: bool) -> Tensor {
    let v = logits.size().last().copied().unwrap_or(1);
    let (flat, y) = (logits.view([-1, v]), targets.reshape([-1]));
    if fused {
        return crate::ops::cross_entropy(&flat, &y).unwrap_or_else(|e| panic!("fused cross-entropy: {e:#}"));
    }
    match flat.kind() {
        Kind::BFloat16 | Kind::Half => cross_entropy(&flat.to_kind(Kind::Float), &y, 0.0),
        _ => cross_entropy(&flat, &y, 0.0),
    }
}

/// Mean squared error.
pub fn mse(pred: &Tensor, target: &Tensor) -> Tensor {
    pred.mse_loss(target, Reduction::Mean)
}

/// Mean of a loss over a batch in f64 (for logging).
pub fn scalar(t: &Tensor) -> f64 {
    t.to_kind(Kind::Double).double_value(&[])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn label_smoothing_matches_the_analytic_loss() {
        let logits = Tensor::from_slice(&[2.0f64, 0.0, -1.0]).view([1, 3]);
        let labels = Tensor::from_slice(&[0i64]);
        let lp: Vec<f64> = Vec::try_from(logits.log_softmax(-1, Kind::Double).view([3])).unwrap();
        let s = 0.1;
        let want = -((1.0 - s + s / 3.0) * lp[0] + s / 3.0 * (lp[1] + lp[2]));
        assert!((scalar(&cross_entropy(&logits, &labels, s)) - want).abs() < 1e-12);
        assert!((scalar(&cross_entropy(&logits, &labels, 0.0)) + lp[0]).abs() < 1e-12);
        let a = Tensor::from_slice(&[1.0f64, 2.0]);
        assert_eq!(scalar(&mse(&a, &Tensor::from_slice(&[0.0f64, 0.0]))), 2.5);
    }

    #[test]
    fn ignored_targets_leave_the_mean() {
        let logits = Tensor::from_slice(&[2.0f64, 0.0, -1.0, 0.5, 0.5, 3.0]).view([2, 3]);
        let lp0: f64 = logits.get(0).log_softmax(-1, Kind::Double).double_value(&[1]);
        let t = Tensor::from_slice(&[1i64, IGNORE_INDEX]);
        assert!((scalar(&cross_entropy(&logits, &t, 0.0)) + lp0).abs() < 1e-12);
    }
}
