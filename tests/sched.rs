//! course::train::sched against PyTorch's schedulers (fixture by tests/fixtures/make_sched_fixture.py).

use course::train::sched::{Mode, ReduceLrOnPlateau, Schedule};

fn fixture() -> serde_json::Value {
    serde_json::from_str(include_str!("fixtures/sched.json")).unwrap()
}

fn floats(v: &serde_json::Value) -> Vec<f64> {
    v.as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect()
}

fn assert_close(case: &str, got: &[f64], want: &[f64]) {
    assert_eq!(got.len(), want.len(), "{case}");
    for (t, (g, w)) in got.iter().zip(want).enumerate() {
        assert!((g - w).abs() < 1e-12, "{case} step {t}: {g} vs PyTorch {w}");
    }
}

#[test]
fn step_cosine_and_warmup_cosine_match_pytorch() {
    let f = fixture();
    for (case, s) in [
        ("step", Schedule::Step { step_size: 3, gamma: 0.5 }),
        ("cosine", Schedule::Cosine { t_max: 10, eta_min: 0.001 }),
        ("warmup_cosine", Schedule::WarmupCosine { warmup: 3, total: 10, min_lr: 0.01 }),
    ] {
        let want = floats(&f["cases"][case]);
        let got: Vec<f64> = (0..want.len()).map(|t| s.lr(0.1, t)).collect();
        assert_close(case, &got, &want);
    }
}

#[test]
fn reduce_on_plateau_matches_pytorch_and_round_trips() {
    let f = fixture();
    let metrics = floats(&f["plateau_metrics"]);
    let want = floats(&f["cases"]["plateau"]);
    let mut s = ReduceLrOnPlateau::new(0.1, Mode::Min, 0.5, 2, 1e-2, 1, 0.02);
    let mut got = vec![];
    for (t, m) in metrics.iter().enumerate() {
        got.push(s.lr);
        s.step(*m);
        if t == 8 {
            // Save and restore mid-way through JSON: the rest must not change.
            s = serde_json::from_str(&serde_json::to_string(&s).unwrap()).unwrap();
        }
    }
    assert_close("plateau", &got, &want);
}
