//! course::train::optim against PyTorch's own optimizers (fixture by tests/fixtures/make_optim_fixture.py)
//! and save/restore exactness.

use course::train::optim::{AdamW, Group, Optimizer, OptimizerState, Param, Sgd};
use tch::{Kind, Tensor};

fn problem() -> (Tensor, Tensor, Tensor, Tensor) {
    let f = (Kind::Double, tch::Device::Cpu);
    let w = ((Tensor::arange(12, f).view([3, 4]) + 1.0).sin() * 0.5).set_requires_grad(true);
    let b = ((Tensor::arange(3, f) + 1.0).cos() * 0.1).set_requires_grad(true);
    let x = (Tensor::arange(20, f).view([4, 5]) * 0.3).sin();
    let y = (Tensor::arange(15, f).view([3, 5]) * 0.7).cos();
    (w, b, x, y)
}

fn params(w: &Tensor, b: &Tensor) -> (Vec<Param>, Vec<Group>) {
    (
        vec![
            Param { name: "W".into(), tensor: w.shallow_clone(), group: 0 },
            Param { name: "b".into(), tensor: b.shallow_clone(), group: 1 },
        ],
        vec![
            Group { name: "decay".into(), weight_decay: 0.1, lr_scale: 1.0 },
            Group { name: "no_decay".into(), weight_decay: 0.0, lr_scale: 1.0 },
        ],
    )
}

fn make(case: &str, w: &Tensor, b: &Tensor) -> Box<dyn Optimizer> {
    let (p, g) = params(w, b);
    match case {
        "sgd_momentum" => Box::new(Sgd::new(p, g, 0.01, 0.9, false).unwrap()),
        "sgd_nesterov" => Box::new(Sgd::new(p, g, 0.01, 0.9, true).unwrap()),
        "sgd_plain" => Box::new(Sgd::new(p, g, 0.01, 0.0, false).unwrap()),
        "adamw" => Box::new(AdamW::new(p, g, 0.05, (0.9, 0.99), 1e-8).unwrap()),
        _ => unreachable!(),
    }
}

fn step(opt: &mut dyn Optimizer, w: &Tensor, b: &Tensor, x: &Tensor, y: &Tensor) {
    opt.zero_grad();
    let loss = (w.matmul(x) + b.unsqueeze(1) - y).square().sum(Kind::Double);
    loss.backward();
    opt.step().unwrap();
}

fn values(t: &Tensor) -> Vec<f64> {
    Vec::<f64>::try_from(t.detach().flatten(0, -1)).unwrap()
}

#[test]
fn every_optimizer_matches_pytorch_step_by_step() {
    let fixture: serde_json::Value = serde_json::from_str(include_str!("fixtures/optim.json")).unwrap();
    for (case, steps) in fixture["cases"].as_object().unwrap() {
        let (w, b, x, y) = problem();
        let mut opt = make(case, &w, &b);
        for (k, want) in steps.as_array().unwrap().iter().enumerate() {
            step(opt.as_mut(), &w, &b, &x, &y);
            for (name, got) in [("W", values(&w)), ("b", values(&b))] {
                let want: Vec<f64> = want[name].as_array().unwrap().iter().map(|v| v.as_f64().unwrap()).collect();
                let err = got.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0.0, f64::max);
                assert!(err < 1e-12, "{case} step {} {name}: max |diff| {err:e}", k + 1);
            }
        }
    }
}

#[test]
fn saved_state_resumes_bit_for_bit() {
    for case in ["sgd_momentum", "sgd_nesterov", "adamw"] {
        let (w, b, x, y) = problem();
        let mut straight = make(case, &w, &b);
        for _ in 0..5 {
            step(straight.as_mut(), &w, &b, &x, &y);
        }
        // 2 steps, save, a fresh optimizer on copies of the parameters, load, 3 steps.
        let (w2, b2, _, _) = problem();
        let mut first = make(case, &w2, &b2);
        step(first.as_mut(), &w2, &b2, &x, &y);
        step(first.as_mut(), &w2, &b2, &x, &y);
        let saved = first.state();
        let json: serde_json::Value = serde_json::from_str(&saved.json.to_string()).unwrap(); // through text, as on disk
        let state =
            OptimizerState { tensors: saved.tensors.iter().map(|(k, v)| (k.clone(), v.copy())).collect(), json };
        let w3 = w2.detach().copy().set_requires_grad(true);
        let b3 = b2.detach().copy().set_requires_grad(true);
        let mut resumed = make(case, &w3, &b3);
        resumed.load_state(&state).unwrap();
        for _ in 0..3 {
            step(resumed.as_mut(), &w3, &b3, &x, &y);
        }
        assert!(w3.equal(&w) && b3.equal(&b), "{case}: resumed parameters differ from the uninterrupted run");
    }
}

#[test]
fn wrong_state_is_refused_with_a_reason() {
    let (w, b, _, _) = problem();
    let mut sgd = make("sgd_momentum", &w, &b);
    let adam_state = make("adamw", &w, &b).state();
    assert!(sgd.load_state(&adam_state).err().unwrap().to_string().contains("not sgd"));
    let mut bad = make("sgd_momentum", &w, &b).state();
    bad.tensors.insert("W.momentum_buffer".into(), Tensor::zeros([2, 2], (Kind::Double, tch::Device::Cpu)));
    let err = sgd.load_state(&bad).err().unwrap().to_string();
    assert!(err.contains("momentum_buffer") && err.contains("[2, 2]") && err.contains("W"), "{err}");
    assert!(Sgd::new(vec![], vec![], 0.1, 0.0, true).is_err(), "nesterov without momentum");
}

#[test]
fn fused_adamw_equals_the_per_parameter_reference() {
    use course::ops::adamw::{adamw_reference, fused_adamw, AdamWHyper};
    let h = AdamWHyper { lr: 3e-3, beta1: 0.9, beta2: 0.99, weight_decay: 0.1, eps: 1e-8 };
    for (kind, tol) in [(Kind::Double, 1e-14), (Kind::Float, 2e-6)] {
        tch::manual_seed(11);
        let f = (kind, tch::Device::Cpu);
        let shapes: [&[i64]; 3] = [&[257, 33], &[1000], &[3]];
        let p: Vec<Tensor> = shapes.iter().map(|s| Tensor::randn(*s, f)).collect();
        let (m, v): (Vec<Tensor>, Vec<Tensor>) = p.iter().map(|t| (t.zeros_like(), t.zeros_like())).unzip();
        let (pr, mr, vr): (Vec<Tensor>, Vec<Tensor>, Vec<Tensor>) = (
            p.iter().map(|t| t.copy()).collect(),
            m.iter().map(|t| t.copy()).collect(),
            v.iter().map(|t| t.copy()).collect(),
        );
        for step in 1..=5 {
            let g: Vec<Tensor> = p.iter().map(|t| t.randn_like()).collect();
            let steps = vec![step as f64; p.len()];
            fused_adamw(&p, &g, &m, &v, &steps, h).unwrap();
            for k in 0..p.len() {
                adamw_reference(&pr[k], &g[k], &mr[k], &vr[k], step as f64, h).unwrap();
            }
        }
        for k in 0..p.len() {
            for (a, b, what) in [(&p[k], &pr[k], "param"), (&m[k], &mr[k], "exp_avg"), (&v[k], &vr[k], "exp_avg_sq")] {
                let d = (a - b).abs().max().double_value(&[]);
                assert!(d <= tol * (1.0 + b.abs().max().double_value(&[])), "{kind:?} {what} {k}: max |Δ| {d}");
            }
        }
    }
    // Bad input is named, not a crash.
    let a = Tensor::zeros([2, 3], (Kind::Float, tch::Device::Cpu));
    let b = Tensor::zeros([3], (Kind::Float, tch::Device::Cpu));
    let e = fused_adamw(&[a.copy()], &[b], &[a.copy()], &[a.copy()], &[1.0], h).unwrap_err().to_string();
    assert!(e.contains("parameter 0 has shape [2, 3]"), "{e}");
    let e = fused_adamw(&[a.copy()], &[], &[], &[], &[], h).unwrap_err().to_string();
    assert!(e.contains("1 parameters but 0 gradients"), "{e}");
}

#[test]
fn adamw_fused_and_unfused_train_alike() {
    // The optimizer's two paths over the fixture's problem: equal to f64 rounding.
    let run = |fused: bool| {
        let (w, b, x, y) = problem();
        let (p, g) = params(&w, &b);
        let mut opt = AdamW::new(p, g, 0.05, (0.9, 0.99), 1e-8).unwrap();
        opt.fused = fused;
        for _ in 0..10 {
            step(&mut opt, &w, &b, &x, &y);
        }
        (values(&w), values(&b))
    };
    let (a, b) = (run(true), run(false));
    for (x, y) in a.0.iter().chain(&a.1).zip(b.0.iter().chain(&b.1)) {
        assert!((x - y).abs() < 1e-12, "{x} vs {y}");
    }
}
