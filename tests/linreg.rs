//! m01's three regressions against the true weights: exact recovery without noise, and the
//! statistical bound with noise.

use course::linreg::{closed_form, gradient_descent, nn_linear_sgd, synthetic};
use tch::{Device, Kind, Tensor};

#[test]
fn noiseless_problem_is_recovered_exactly_by_all_three() {
    tch::manual_seed(5);
    let p = synthetic(400, 4, 0.0, Kind::Double, Device::Cpu);
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
    tch::manual_seed(9);
    let (n, sigma) = (5000, 0.3);
    let p = synthetic(n, 3, sigma, Kind::Float, Device::Cpu);
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
