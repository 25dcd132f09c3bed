//! `ops::linear` (oneDNN forward and input gradient, mm weight gradient) against tch's `linear`
//! and against the same layer in f64: values and all three gradients, the paths where it must be
//! exactly tch's op (f64, bf16 autocast), frozen inputs, no-grad calls and its error messages.

use course::ops::{linear, linear_reference, linear_uses_onednn};
use course::sys::runtime::autocast;
use tch::{Device, Kind, Tensor};

fn randn(shape: &[i64], seed: i64) -> Tensor {
    tch::manual_seed(seed);
    Tensor::randn(shape, (Kind::Float, Device::Cpu))
}

fn max_abs(a: &Tensor, b: &Tensor) -> f64 {
    (a.to_kind(Kind::Double) - b.to_kind(Kind::Double)).abs().max().double_value(&[])
}

/// (y, dx, dw, db) of `f(x, w, b)` with upstream gradient `up`, each input a fresh leaf.
fn run(
    f: impl Fn(&Tensor, &Tensor, Option<&Tensor>) -> Tensor,
    x: &Tensor,
    w: &Tensor,
    b: Option<&Tensor>,
    up: &Tensor,
) -> (Tensor, Tensor, Tensor, Option<Tensor>) {
    let (x, w) = (x.detach().set_requires_grad(true), w.detach().set_requires_grad(true));
    let b = b.map(|b| b.detach().set_requires_grad(true));
    let y = f(&x, &w, b.as_ref());
    (&y * up.to_kind(y.kind())).sum(Kind::Double).backward();
    (y.detach(), x.grad(), w.grad(), b.map(|b| b.grad()))
}

#[test]
fn values_and_gradients_are_as_accurate_as_tch_against_f64() {
    assert!(linear_uses_onednn(&randn(&[2, 3], 0)), "this libtorch has MKLDNN: fp32 CPU input takes oneDNN");
    // (input shape, out_features, bias): m04's shapes, odd sizes, a 3-D input, a single row.
    let cases: &[(&[i64], i64, bool)] =
        &[(&[1024, 256], 768, true), (&[4, 16, 256], 1024, true), (&[7, 33], 17, false), (&[1, 5], 3, true)];
    for (i, &(shape, n, bias)) in cases.iter().enumerate() {
        let k = *shape.last().unwrap();
        let x = randn(shape, 10 + i as i64);
        let w = randn(&[n, k], 20 + i as i64) * (k as f64).powf(-0.5);
        let b = bias.then(|| randn(&[n], 30 + i as i64));
        let mut out_shape = shape.to_vec();
        *out_shape.last_mut().unwrap() = n;
        let up = randn(&out_shape, 40 + i as i64);
        let ours = run(|x, w, b| linear(x, w, b).unwrap(), &x, &w, b.as_ref(), &up);
        let tch = run(linear_reference, &x, &w, b.as_ref(), &up);
        let d = |t: &Tensor| t.to_kind(Kind::Double);
        let exact = run(linear_reference, &d(&x), &d(&w), b.as_ref().map(d).as_ref(), &d(&up));
        let parts =
            [("y", &ours.0, &tch.0, &exact.0), ("dx", &ours.1, &tch.1, &exact.1), ("dw", &ours.2, &tch.2, &exact.2)];
        for (what, o, t, e) in parts {
            assert_eq!(o.size(), e.size(), "case {i} {what}: shape");
            let (eo, et) = (max_abs(o, e), max_abs(t, e));
            let scale = e.abs().max().double_value(&[]);
            // fp32 accumulation over K (or M) terms: both within a few ulps of the largest value,
            // and ours no worse than 4x tch's own error.
            assert!(eo <= 1e-5 * scale.max(1.0), "case {i} {what}: |ours - f64| = {eo:e} (scale {scale})");
            assert!(eo <= 4.0 * et + 1e-6 * scale.max(1.0), "case {i} {what}: ours {eo:e} vs tch {et:e} from f64");
        }
        match (&ours.3, &exact.3) {
            (Some(o), Some(e)) => {
                assert!(max_abs(o, e) <= 1e-5 * e.abs().max().double_value(&[]).max(1.0), "case {i} db")
            }
            (None, None) => {}
            _ => panic!("case {i}: bias gradient present on one side only"),
        }
    }
}

#[test]
fn f64_and_bf16_autocast_are_exactly_tchs_linear() {
    let (x, w, b) = (randn(&[6, 32], 1), randn(&[8, 32], 2), randn(&[8], 3));
    let d = |t: &Tensor| t.to_kind(Kind::Double);
    assert!(!linear_uses_onednn(&d(&x)));
    let up = randn(&[6, 8], 4).to_kind(Kind::Double);
    let ours = run(|x, w, b| linear(x, w, b).unwrap(), &d(&x), &d(&w), Some(&d(&b)), &up);
    let tch = run(linear_reference, &d(&x), &d(&w), Some(&d(&b)), &up);
    for (what, o, t) in [("y", &ours.0, &tch.0), ("dx", &ours.1, &tch.1), ("dw", &ours.2, &tch.2)] {
        assert!(o.equal(t), "f64 {what} differs from tch's linear");
    }
    // Under CPU autocast the op is at::linear, so autocast casts it to bf16 as it does tch's.
    let _bf16 = autocast(Device::Cpu, Kind::BFloat16, true).unwrap();
    assert!(!linear_uses_onednn(&x));
    let (yo, yt) = (linear(&x, &w, Some(&b)).unwrap(), linear_reference(&x, &w, Some(&b)));
    assert_eq!(yo.kind(), Kind::BFloat16);
    assert!(yo.equal(&yt), "bf16 autocast output differs from tch's linear");
}

#[test]
fn frozen_inputs_get_no_gradient_and_no_grad_calls_build_no_graph() {
    let (x, w) = (randn(&[5, 16], 5), randn(&[4, 16], 6));
    // Frozen weight (as a LoRA base): the input still gets its gradient, the weight none.
    let xg = x.detach().set_requires_grad(true);
    let y = linear(&xg, &w, None).unwrap();
    y.sum(Kind::Float).backward();
    assert!(!w.grad().defined(), "a weight that does not require grad got one");
    let want = Tensor::ones([5, 4], (Kind::Float, Device::Cpu)).mm(&w);
    assert!(max_abs(&xg.grad(), &want) < 1e-5);
    // Frozen input, trained weight: dw = upstreamᵀ x.
    let wg = w.detach().set_requires_grad(true);
    linear(&x, &wg, None).unwrap().sum(Kind::Float).backward();
    let want = Tensor::ones([5, 4], (Kind::Float, Device::Cpu)).tr().mm(&x);
    assert!(max_abs(&wg.grad(), &want) < 1e-5);
    // Under no_grad nothing is recorded even with inputs that require grad.
    let y = tch::no_grad(|| linear(&xg, &wg, None).unwrap());
    assert!(!y.requires_grad());
    // A non-contiguous input (a transposed view) gives the same values.
    let xt = x.tr().contiguous().tr();
    assert!(max_abs(&linear(&xt, &w, None).unwrap(), &linear_reference(&x, &w, None)) < 1e-5);
    // An empty batch is at::linear's empty result.
    assert_eq!(linear(&randn(&[0, 16], 7), &w, None).unwrap().size(), [0, 4]);
}

#[test]
fn double_backward_is_refused() {
    let x = randn(&[3, 8], 8).set_requires_grad(true);
    let w = randn(&[2, 8], 9).set_requires_grad(true);
    let y = linear(&x, &w, None).unwrap().pow_tensor_scalar(2).sum(Kind::Float);
    let r = Tensor::f_run_backward(&[&y], &[&x], true, true);
    let msg = r.err().map(|e| e.to_string()).unwrap_or_default();
    assert!(msg.contains("double backward"), "create_graph through ops::linear: {msg:?}");
}

#[test]
fn bad_arguments_name_what_is_wrong() {
    let x = randn(&[3, 8], 1);
    let cases: Vec<(Tensor, Option<Tensor>, &str)> = vec![
        (randn(&[8], 2), None, "weight must be 2-D"),
        (randn(&[4, 7], 3), None, "in_features 7"),
        (randn(&[4, 8], 4), Some(randn(&[5], 5)), "bias must have shape (4)"),
        (randn(&[4, 8], 6).to_kind(Kind::Double), None, "differs from weight dtype"),
    ];
    for (w, b, want) in cases {
        let err = linear(&x, &w, b.as_ref()).expect_err(want).to_string();
        assert!(err.contains(want), "expected {want:?} in {err:?}");
    }
}

#[test]
fn the_few_row_kernel_matches_tch_in_fp32_and_bf16() {
    use course::ops::skinny_matmul;
    // Widths with and without a tail past whole 32-column steps; 1 to 4 rows, and 5 (two passes).
    for (i, &(m, k, n)) in [(1, 576, 960), (1, 33, 7), (3, 100, 65), (4, 1536, 576), (5, 64, 13)].iter().enumerate() {
        let x = randn(&[m, k], 60 + i as i64);
        let w = randn(&[n, k], 70 + i as i64);
        let got = skinny_matmul(&x, &w).unwrap();
        let want = x.to_kind(Kind::Double).matmul(&w.to_kind(Kind::Double).tr());
        let scale = want.abs().max().double_value(&[]).max(1.0);
        assert!(max_abs(&got, &want) <= 1e-5 * scale * (k as f64).sqrt(), "fp32 {m}x{k} -> {n}");
        // bf16 in, fp32 accumulation, one rounding on store: within bf16's half-ulp of the exact
        // product of the bf16 inputs.
        let (xb, wb) = (x.to_kind(Kind::BFloat16), w.to_kind(Kind::BFloat16));
        let got = skinny_matmul(&xb, &wb).unwrap();
        assert_eq!(got.kind(), Kind::BFloat16);
        let exact = xb.to_kind(Kind::Double).matmul(&wb.to_kind(Kind::Double).tr());
        let excess = ((got.to_kind(Kind::Double) - &exact).abs() - exact.abs() * (1.0 / 256.0) - 1e-3 * scale).max();
        assert!(excess.double_value(&[]) <= 0.0, "bf16 {m}x{k} -> {n}");
    }
    // ops::linear takes the kernel for no-grad calls of up to 4 rows: same values, bias added.
    let (x, w, b) = (randn(&[1, 1, 48], 80), randn(&[20, 48], 81), randn(&[20], 82));
    let y = tch::no_grad(|| linear(&x, &w, Some(&b)).unwrap());
    assert!(max_abs(&y, &linear_reference(&x, &w, Some(&b))) < 1e-5);
    let e = skinny_matmul(&x, &w.to_kind(Kind::Double)).unwrap_err().to_string();
    assert!(e.contains("must both be float32 or both bfloat16"), "{e}");
}
