//! m02 across processes: an interrupted run resumed in a new process equals an uninterrupted
//! one, bit for bit; and the number of loader workers does not change training.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use tch::Tensor;

fn mnist_installed() -> bool {
    course::data::registry::find("mnist").is_some_and(|d| d.present(&course::data::registry::data_root()))
}

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("course-m02-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

fn m02(out: &Path, extra: &[&str]) {
    let o = Command::new(env!("CARGO_BIN_EXE_m02_data"))
        .args([
            "--quick",
            "--quiet",
            "--device",
            "cpu",
            "--model",
            "mlp",
            "--epochs",
            "2",
            "--skip-resume-check",
            "--outputs",
        ])
        .arg(out)
        .args(extra)
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "m02_data {extra:?} failed:\n{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
}

fn weights(out: &Path) -> BTreeMap<String, Tensor> {
    Tensor::read_safetensors(out.join("m02_data/mlp/last/model.safetensors")).unwrap().into_iter().collect()
}

fn losses(out: &Path) -> Vec<f64> {
    let s: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("m02_data/mlp/last/state.json")).unwrap()).unwrap();
    s["trainer"]["progress"]["history"].as_array().unwrap().iter().map(|r| r["train_loss"].as_f64().unwrap()).collect()
}

fn assert_same(a: &Path, b: &Path, what: &str) {
    let (wa, wb) = (weights(a), weights(b));
    assert_eq!(wa.keys().collect::<Vec<_>>(), wb.keys().collect::<Vec<_>>());
    for (k, t) in &wa {
        assert!(t.equal(&wb[k]), "{what}: tensor {k} differs");
    }
    assert_eq!(losses(a), losses(b), "{what}: epoch losses differ");
}

#[test]
fn resume_in_a_new_process_equals_the_uninterrupted_run() {
    if !mnist_installed() {
        panic!("MNIST is not installed: run python3 scripts/setup.py --data mnist");
    }
    let straight = tmp("straight");
    m02(&straight, &[]);
    let resumed = tmp("resumed");
    m02(&resumed, &["--stop-after", "1"]);
    assert_eq!(losses(&resumed).len(), 1, "the interrupted run saved after one epoch");
    assert!(!resumed.join("m02_data/metrics.json").exists(), "an interrupted run writes no metrics");
    m02(&resumed, &["--resume"]);
    assert_eq!(losses(&resumed).len(), 2);
    assert_same(&straight, &resumed, "resumed");
    let no_workers = tmp("workers0");
    m02(&no_workers, &["--workers", "0"]);
    assert_same(&straight, &no_workers, "--workers 0 vs 2");
    for d in [straight, resumed, no_workers] {
        std::fs::remove_dir_all(d).unwrap();
    }
}

#[test]
fn resuming_with_another_model_config_is_refused() {
    if !mnist_installed() {
        return;
    }
    let out = tmp("mismatch");
    m02(&out, &["--stop-after", "1"]);
    let o = Command::new(env!("CARGO_BIN_EXE_m02_data"))
        .args([
            "--quick",
            "--quiet",
            "--model",
            "mlp",
            "--epochs",
            "2",
            "--init",
            "xavier-uniform",
            "--resume",
            "--skip-resume-check",
            "--outputs",
        ])
        .arg(&out)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("another model config"), "{err}");
    std::fs::remove_dir_all(&out).unwrap();
}
