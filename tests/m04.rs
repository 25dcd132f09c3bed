//! m04_amp end to end on quick sizes: a plain run's files, the non-finite check from the
//! command line, `--compare` with fp16 bounded by its time budget, and the profiler's outputs.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("course-m04-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn m04(out: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_m04_amp"))
        .args(["--quick", "--quiet", "--device", "cpu", "--outputs"])
        .arg(out)
        .args(args)
        .output()
        .unwrap()
}

fn ok(o: &Output) -> String {
    let text = format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
    assert!(o.status.success(), "m04_amp failed:\n{text}");
    text
}

fn metrics(p: &Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(p).unwrap()).unwrap()
}

#[test]
fn a_quick_run_writes_its_model_samples_and_charts() {
    let out = tmp("plain");
    let text = ok(&m04(&out, &["--samples", "2", "--sample-tokens", "50"]));
    let dir = out.join("m04_amp");
    let m = metrics(&dir.join("metrics.json"));
    assert!(m["metrics"]["val_loss"].as_f64().unwrap() < 84f64.ln(), "{m}");
    assert_eq!(m["metrics"]["steps"], 40.0);
    let samples = std::fs::read_to_string(dir.join("samples.txt")).unwrap();
    assert_eq!(samples.matches("--- sample").count(), 2);
    assert!(samples.contains("ROMEO."));
    for f in
        ["loss.png", "run/best/config.json", "run/best/vocab.json", "run/best/model.safetensors", "run/last/state.json"]
    {
        assert!(dir.join(f).is_file(), "{f} missing");
    }
    let md = course::io::hf::ModelDir::open(&dir.join("run/best")).unwrap();
    assert_eq!(md.model_type(), "nanogpt");
    let cfg: course::models::gpt::GptConfig = md.config_as().unwrap();
    assert_eq!(cfg.vocab_size, 84, "the Shakespeare texts have 84 distinct characters");
    // The sampling the run used, as Hugging Face's generation_config.json.
    let g = course::infer::Sampling::from_generation_config(&md.generation_config().unwrap().unwrap()).unwrap();
    assert_eq!(g, course::infer::Sampling { temperature: 0.8, top_k: Some(200), top_p: 1.0 });
    assert!(text.contains("tokens/s"));
    // `sample` rebuilds the model from the directory alone; a seed gives the same text.
    let sample = |seed: &str| {
        let o = Command::new(env!("CARGO_BIN_EXE_m04_amp"))
            .args(["sample", "--device", "cpu", "--prompt", "ROMEO.", "--tokens", "30", "--seed", seed, "--model"])
            .arg(dir.join("run/best"))
            .output()
            .unwrap();
        ok(&o);
        String::from_utf8_lossy(&o.stdout).into_owned()
    };
    let (a, b, c) = (sample("1"), sample("1"), sample("2"));
    assert!(a.starts_with("ROMEO.") && a.trim_end().chars().count() >= 30, "{a:?}");
    assert_eq!(a, b);
    assert_ne!(a, c);
    let o = Command::new(env!("CARGO_BIN_EXE_m04_amp")).args(["sample", "--model"]).arg(&out).output().unwrap();
    assert!(!o.status.success() && String::from_utf8_lossy(&o.stderr).contains("config.json"));
    std::fs::remove_dir_all(&out).unwrap();
}

#[test]
fn an_injected_nan_names_the_parameter_or_is_skipped() {
    let out = tmp("nan");
    let o = m04(&out, &["--inject-nan", "3", "--samples", "0"]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("step 3") && err.contains("'transformer.h.0.attn.c_attn.weight'"), "{err}");
    assert!(!out.join("m04_amp/metrics.json").exists(), "a failed run leaves no metrics");
    ok(&m04(&out, &["--inject-nan", "3", "--on-nonfinite", "skip", "--samples", "0"]));
    assert_eq!(metrics(&out.join("m04_amp/metrics.json"))["metrics"]["skipped_steps"], 1.0);
    std::fs::remove_dir_all(&out).unwrap();
}

#[test]
fn compare_trains_each_precision_and_bounds_slow_fp16() {
    let out = tmp("compare");
    let text = ok(&m04(&out, &["--compare", "fp32,bf16,fp16", "--slow-fp16-budget", "2"]));
    let dir = out.join("m04_amp/compare");
    for f in ["compare.md", "tokens_per_s.png", "peak_memory.png", "val_loss.png", "loss_curves.png", "metrics.json"] {
        assert!(dir.join(f).is_file(), "{f} missing");
    }
    let m = metrics(&dir.join("metrics.json"));
    assert_eq!(m["metrics"]["fp32_steps"], 40.0);
    assert_eq!(m["metrics"]["bf16_steps"], 40.0);
    let fp32 = m["metrics"]["fp32_val_loss"].as_f64().unwrap();
    let bf16 = m["metrics"]["bf16_val_loss"].as_f64().unwrap();
    assert!((bf16 / fp32 - 1.0).abs() < 0.03, "bf16 {bf16} vs fp32 {fp32}");
    // fp16 on this CPU is emulated; whether it finishes 40 tiny steps or hits the 2 s budget,
    // the run ends and says why fp16 is slow here.
    assert!(m["metrics"]["fp16_steps"].as_f64().unwrap() >= 1.0);
    if !std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default().contains("avx512_fp16") {
        assert!(text.contains("no native fp16"), "{text}");
    }
    let table = std::fs::read_to_string(dir.join("compare.md")).unwrap();
    assert_eq!(table.lines().filter(|l| l.starts_with("| fp") || l.starts_with("| bf")).count(), 3, "{table}");
    let o = m04(&out, &["--compare", "fp32,fp33"]);
    assert!(!o.status.success() && String::from_utf8_lossy(&o.stderr).contains("unknown precision 'fp33'"));
    std::fs::remove_dir_all(&out).unwrap();
}

#[test]
fn profile_writes_a_chrome_trace_and_a_top_ops_table() {
    let out = tmp("profile");
    ok(&m04(&out, &["--profile", "3", "--samples", "0", "--fused-gelu"]));
    let dir = out.join("m04_amp");
    let trace: serde_json::Value = serde_json::from_slice(&std::fs::read(dir.join("trace.json")).unwrap()).unwrap();
    assert!(trace["traceEvents"].as_array().is_some_and(|e| !e.is_empty()));
    let table = std::fs::read_to_string(dir.join("top_ops.txt")).unwrap();
    assert!(table.contains("aten::"), "{table}");
    std::fs::remove_dir_all(&out).unwrap();
}
