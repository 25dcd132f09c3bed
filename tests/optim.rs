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
