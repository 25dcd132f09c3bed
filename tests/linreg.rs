//! m01's three regressions against the true weights: exact recovery without noise, and the
//! statistical bound with noise.

use course::basics::linreg::{closed_form, gradient_descent, nan_max, nn_linear_sgd, synthetic};
use course::sys::rng::Rng;
use tch::{Device, Kind, Tensor};

#[test]
fn noiseless_problem_is_recovered_exactly_by_all_three() {
    let p = synthetic(400, 4, 0.0, &mut Rng::new(5), Kind::Double, Device::Cpu).unwrap();
    let cf = closed_form(&p.x, &p.y).unwrap();
    assert!(cf.max_error(&p) < 1e-10, "closed form {}", cf.max_error(&p));
    let gd = gradient_descent(&p.x, &p.y, 0.1, 400);
    assert!(gd.max_error(&p) < 1e-8, "gradient descent {}", gd.max_error(&p));
    let nn = nn_linear_sgd(&p.x, &p.y, 0.1, 400).unwrap();
    assert!(nn.max_error(&p) < 1e-8, "nn::Linear {}", nn.max_error(&p));
    assert!(nn.losses.last().unwrap() < &1e-15);
}

#[test]
fn noisy_problem_is_within_six_standard_errors() {
    let (n, sigma) = (5000, 0.3);
    let p = synthetic(n, 3, sigma, &mut Rng::new(9), Kind::Float, Device::Cpu).unwrap();
    let se = sigma / (n as f64).sqrt(); // X ~ N(0, I): standard error of each weight
    let cf = closed_form(&p.x, &p.y).unwrap();
    assert!(cf.max_error(&p) < 6.0 * se, "error {} vs 6 se {}", cf.max_error(&p), 6.0 * se);
    // The residual variance estimates sigma^2.
    let resid = &p.y - (p.x.matmul(&cf.w) + cf.b);
    let var = resid.square().mean(Kind::Double).double_value(&[]);
    assert!((var / (sigma * sigma) - 1.0).abs() < 0.1, "residual variance {var}");
}

#[test]
fn closed_form_rejects_bad_shapes() {
    let x = Tensor::randn([10, 2], (Kind::Double, Device::Cpu));
    let err = closed_form(&x, &Tensor::zeros([9, 1], (Kind::Double, Device::Cpu))).unwrap_err().to_string();
    assert!(err.contains("y must be (10, 1)"), "{err}");
}

#[test]
fn a_diverged_fit_never_looks_good() {
    let p = synthetic(200, 2, 0.1, &mut Rng::new(1), Kind::Float, Device::Cpu).unwrap();
    // lr 1.5 > 2 / lambda_max (about 1): gradient descent blows up to inf, then NaN.
    let gd = gradient_descent(&p.x, &p.y, 1.5, 2000);
    assert!(gd.max_error(&p).is_nan() || gd.max_error(&p) > 1e6, "{}", gd.max_error(&p));
    assert!(nan_max(f64::NAN, 1.0).is_nan() && nan_max(1.0, f64::NAN).is_nan() && nan_max(1.0, 2.0) == 2.0);
}
