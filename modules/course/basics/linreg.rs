//! Linear regression three ways (module m01): the closed form, gradient descent with autograd by
//! hand, and `nn::Linear` trained by tch's SGD. All three must recover the same weights.

use crate::sys::rng::Rng;
use anyhow::{ensure, Result};
use tch::nn::{self, Module, OptimizerConfig};
use tch::{Device, Kind, Tensor};

/// y = X w + b + noise, with X ~ N(0, 1).
pub struct Problem {
    /// (n, d)
    pub x: Tensor,
    /// (n, 1)
    pub y: Tensor,
    /// (d, 1)
    pub w_true: Tensor,
    pub b_true: f64,
}

/// A synthetic problem drawn from the course RNG (so it does not depend on torch's global
/// generator, which tests running in parallel share).
pub fn synthetic(n: i64, d: i64, noise: f64, rng: &mut Rng, kind: Kind, device: Device) -> Result<Problem> {
    ensure!(n >= 1 && d >= 1, "need at least one sample and one feature, got {n} x {d}");
    let mut normal = |count: i64, scale: f64| -> Result<Tensor> {
        let v: Vec<f64> = (0..count).map(|_| rng.normal() * scale).collect();
        Ok(Tensor::from_slice(&v).f_to_kind(kind)?.f_to_device(device)?)
    };
    let w_true = normal(d, 2.0)?.view([d, 1]); // (d, 1)
    let b_true = 0.5;
    let x = normal(n * d, 1.0)?.view([n, d]); // (n, d)
    let y = x.matmul(&w_true) + b_true + normal(n, noise)?.view([n, 1]); // (n, 1)
    Ok(Problem { x, y, w_true, b_true })
}

/// max that propagates NaN (f64::max would drop it and let a diverged fit look good).
pub fn nan_max(a: f64, b: f64) -> f64 {
    if a.is_nan() || b.is_nan() {
        f64::NAN
    } else {
        a.max(b)
    }
}

/// A fitted model: weights (d, 1), bias, and the loss after each step (empty for closed form).
#[derive(Debug)]
pub struct Fit {
    pub w: Tensor,
    pub b: f64,
    pub losses: Vec<f64>,
}

impl Fit {
    /// max |w - w_true| and |b - b_true| together.
    pub fn max_error(&self, p: &Problem) -> f64 {
        let dw = (&self.w - &p.w_true).abs().max().double_value(&[]);
        nan_max(dw, (self.b - p.b_true).abs())
    }
}

/// Normal equations on the design matrix with a column of ones: (AᵀA) θ = Aᵀy, solved by
/// `linalg_solve` (a Cholesky-free LU solve; fine for well-conditioned A).
pub fn closed_form(x: &Tensor, y: &Tensor) -> Result<Fit> {
    let (n, d) = x.size2()?;
    ensure!(y.size() == [n, 1], "y must be ({n}, 1), got {:?}", y.size());
    let a = Tensor::cat(&[x.shallow_clone(), Tensor::ones([n, 1], (x.kind(), x.device()))], 1); // (n, d+1)
    let ata = a.tr().matmul(&a); // (d+1, d+1)
    let aty = a.tr().matmul(y); // (d+1, 1)
    let theta = Tensor::f_linalg_solve(&ata, &aty, true)?; // (d+1, 1)
    Ok(Fit { w: theta.narrow(0, 0, d), b: theta.double_value(&[d, 0]), losses: vec![] })
}

/// Full-batch gradient descent on the mean squared error, with autograd doing the derivative
/// and the update written by hand under `no_grad` (what an optimizer does inside).
pub fn gradient_descent(x: &Tensor, y: &Tensor, lr: f64, steps: usize) -> Fit {
    let d = x.size()[1];
    let opts = (x.kind(), x.device());
    let mut w = Tensor::zeros([d, 1], opts).set_requires_grad(true);
    let mut b = Tensor::zeros([1], opts).set_requires_grad(true);
    let mut losses = Vec::with_capacity(steps);
    for _ in 0..steps {
        let pred = x.matmul(&w) + &b; // (n, 1)
        let loss = (pred - y).square().mean(x.kind());
        losses.push(loss.double_value(&[]));
        w.zero_grad();
        b.zero_grad();
        loss.backward();
        tch::no_grad(|| {
            let _ = w.f_sub_(&(w.grad() * lr)).expect("shapes agree");
            let _ = b.f_sub_(&(b.grad() * lr)).expect("shapes agree");
        });
    }
    let b_val = b.double_value(&[0]);
    Fit { w: w.detach(), b: b_val, losses }
}

/// `nn::Linear` + tch's SGD: the idiomatic way.
pub fn nn_linear_sgd(x: &Tensor, y: &Tensor, lr: f64, steps: usize) -> Result<Fit> {
    let d = x.size()[1];
    let mut vs = nn::VarStore::new(x.device());
    // Zero initialisation so all three methods start from the same point.
    let cfg = nn::LinearConfig { ws_init: nn::Init::Const(0.0), bs_init: Some(nn::Init::Const(0.0)), bias: true };
    let lin = nn::linear(vs.root() / "linear", d, 1, cfg);
    if x.kind() == Kind::Double {
        vs.double(); // parameters are created as f32; converted in place (lin sees it)
    }
    let mut opt = nn::Sgd::default().build(&vs, lr)?;
    let mut losses = Vec::with_capacity(steps);
    for _ in 0..steps {
        let loss = (lin.forward(x) - y).square().mean(x.kind());
        losses.push(loss.double_value(&[]));
        opt.backward_step(&loss);
    }
    let w = lin.ws.detach().tr(); // (1, d) -> (d, 1)
    let b = lin.bs.as_ref().map(|b| b.double_value(&[0])).unwrap_or(0.0);
    Ok(Fit { w, b, losses })
}
