//! Runs the module binaries and the course runner as a user would, in temporary output folders.

use course::run::catalog::MODULES;
use course::Metrics;
use std::path::{Path, PathBuf};
use std::process::Command;

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("course-it-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn bin_dir() -> PathBuf {
    Path::new(env!("CARGO_BIN_EXE_course")).parent().unwrap().to_path_buf()
}

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().expect("spawn");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{cmd:?} failed:\n{text}");
    text
}

fn is_png(p: &Path) -> bool {
    std::fs::read(p).map(|b| b.starts_with(b"\x89PNG\r\n\x1a\n")).unwrap_or(false)
}

#[test]
fn every_built_module_runs_quick_and_writes_valid_metrics() {
    let mut ran = 0;
    for m in MODULES {
        let bin = bin_dir().join(m.name);
        // A module still "planned" has no quick run with targets yet; m06's quick run (a child
        // process per weight format) has a test of its own below, which checks all of this too.
        if !bin.exists() || m.target == "planned" || m.name == "m06_lora_quant" {
            continue;
        }
        let out = tmp(m.name);
        run(Command::new(&bin).args(["--quick", "--quiet", "--device", "cpu", "--outputs"]).arg(&out));
        let metrics = Metrics::load(&out.join(m.name).join("metrics.json")).unwrap();
        assert_eq!(metrics.module, m.name);
        assert!(metrics.quick);
        assert_eq!(metrics.device, "cpu");
        assert!(!metrics.targets.is_empty(), "{} records no targets", m.name);
        for a in &metrics.artifacts {
            let p = out.join(m.name).join(a);
            assert!(p.exists(), "{} lists missing artifact {a}", m.name);
            if a.ends_with(".png") {
                assert!(is_png(&p), "{a} is not a PNG");
            }
        }
        assert!(out.join(m.name).join("manifest.json").exists());
        ran += 1;
        std::fs::remove_dir_all(&out).unwrap();
    }
    // m01 is always built with the tests (it is a [[bin]] of this package).
    assert!(ran >= 1, "no module binary found in {}", bin_dir().display());
}

#[test]
fn m01_meets_every_target_and_charts_its_fit() {
    let out = tmp("m01");
    run(Command::new(env!("CARGO_BIN_EXE_m01_basics"))
        .args(["--quiet", "--device", "cpu", "--seed", "3", "--outputs"])
        .arg(&out));
    let m = Metrics::load(&out.join("m01_basics/metrics.json")).unwrap();
    assert!(!m.quick && m.seed == 3);
    // A failing rerun removes the old metrics instead of leaving them looking current.
    let out2 = Command::new(env!("CARGO_BIN_EXE_m01_basics"))
        .args(["--samples", "5", "--features", "5", "--quiet", "--outputs"])
        .arg(&out)
        .output()
        .unwrap();
    assert!(!out2.status.success());
    assert!(!out.join("m01_basics/metrics.json").exists(), "stale metrics.json survived a failed run");
    run(Command::new(env!("CARGO_BIN_EXE_m01_basics"))
        .args(["--quiet", "--device", "cpu", "--seed", "3", "--outputs"])
        .arg(&out));
    assert!(m.all_targets_met(), "{:#?}", m.targets);
    for name in [
        "closed_form_param_error",
        "gradient_descent_param_error",
        "nn_linear_sgd_param_error",
        "repro_cross_process",
        "methods_max_disagreement",
    ] {
        assert!(m.targets.iter().any(|t| t.name == name), "missing target {name}");
    }
    assert_eq!(m.artifacts, ["loss.png", "fit.png"]);
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("m01_basics/manifest.json")).unwrap()).unwrap();
    assert_eq!(manifest["seed"], 3);
    assert_eq!(manifest["config"]["common"]["seed"], 3);
    assert!(manifest["versions"]["torch"].as_str().unwrap().starts_with("2.11.0"));
    assert!(manifest["wall_time_s"].as_f64().unwrap() > 0.0);
    assert_eq!(manifest["retains_freed_memory"], cfg!(all(target_os = "linux", target_env = "gnu")));
    std::fs::remove_dir_all(&out).unwrap();
}

#[test]
fn bad_flags_are_clear_errors() {
    let out = Command::new(env!("CARGO_BIN_EXE_m01_basics")).args(["--device", "tpu"]).output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--device") && err.contains("'tpu'"), "{err}");
    let out = Command::new(env!("CARGO_BIN_EXE_m01_basics")).args(["--device", "cuda:7", "--quick"]).output().unwrap();
    if tch::Cuda::device_count() < 8 {
        assert!(!out.status.success());
        assert!(String::from_utf8_lossy(&out.stderr).contains("cuda:7"), "{}", String::from_utf8_lossy(&out.stderr));
    }
    let out = Command::new(env!("CARGO_BIN_EXE_m01_basics"))
        .args(["--samples", "3", "--quick", "--outputs"])
        .arg(tmp("bad"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--samples"));
}

#[test]
fn two_processes_give_the_same_bits_as_this_one() {
    let probe = |seed: u64| {
        let s = run(Command::new(env!("CARGO_BIN_EXE_m01_basics")).args([
            "--probe-fingerprint",
            &seed.to_string(),
            "--device",
            "cpu",
        ]));
        u64::from_str_radix(s.trim(), 16).unwrap()
    };
    let here = course::basics::repro::fingerprint(11, tch::Device::Cpu);
    assert_eq!(probe(11), here);
    assert_eq!(probe(11), probe(11));
    assert_ne!(probe(12), here);
}

#[test]
fn course_list_reads_metrics_files() {
    let out = tmp("list");
    let list = || run(Command::new(env!("CARGO_BIN_EXE_course")).args(["list", "--outputs"]).arg(&out));
    assert!(list().lines().any(|l| l.starts_with("m01_basics") && l.contains("not run")));
    std::fs::create_dir_all(out.join("m01_basics")).unwrap();
    let m = serde_json::json!({"module": "m01_basics", "quick": false, "seed": 0, "device": "cpu",
        "metrics": {"x": 1.0},
        "targets": [{"name": "a", "value": 1.0, "goal": 0.5, "op": ">=", "met": true},
                    {"name": "b", "value": 1.0, "goal": 0.5, "op": "<=", "met": false}],
        "artifacts": []});
    std::fs::write(out.join("m01_basics/metrics.json"), m.to_string()).unwrap();
    assert!(list().lines().any(|l| l.starts_with("m01_basics") && l.contains("ran (1/2 targets met)")), "{}", list());
    let mut m2 = m.clone();
    m2["targets"][1]["value"] = serde_json::json!(0.1);
    m2["targets"][1]["met"] = serde_json::json!(true);
    std::fs::write(out.join("m01_basics/metrics.json"), m2.to_string()).unwrap();
    assert!(list().lines().any(|l| l.starts_with("m01_basics") && l.contains("all targets met")));
    std::fs::write(out.join("m01_basics/metrics.json"), "{not json").unwrap();
    assert!(list().lines().any(|l| l.starts_with("m01_basics") && l.contains("invalid metrics")));
    std::fs::remove_dir_all(&out).unwrap();
}

#[test]
fn tour_writes_a_gallery_with_the_charts() {
    let out = tmp("tour");
    run(Command::new(env!("CARGO_BIN_EXE_course"))
        .args(["tour", "--quick", "--only", "m01_basics", "--device", "cpu", "--outputs"])
        .arg(&out));
    let html = std::fs::read_to_string(out.join("index.html")).unwrap();
    assert!(
        html.contains("<img src=\"m01_basics/loss.png\"") && html.contains("<img src=\"m01_basics/fit.png\""),
        "{html}"
    );
    assert!(html.contains("targets met"));
    assert!(is_png(&out.join("m01_basics/loss.png")));
    let bad = Command::new(env!("CARGO_BIN_EXE_course")).args(["tour", "--only", "m99_nope"]).output().unwrap();
    assert!(!bad.status.success() && String::from_utf8_lossy(&bad.stderr).contains("unknown module 'm99_nope'"));
    std::fs::remove_dir_all(&out).unwrap();
}

#[test]
fn tour_without_module_binaries_says_how_to_build_them() {
    // A copy of the runner alone in a folder, as after `cargo run --bin course` in a fresh clone.
    let dir = tmp("lonely");
    let lonely = dir.join("course");
    std::fs::copy(env!("CARGO_BIN_EXE_course"), &lonely).unwrap();
    let out = Command::new(&lonely).args(["tour", "--quick", "--outputs"]).arg(dir.join("out")).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("cargo build --release"), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn every_module_binary_in_cargo_toml_is_in_the_catalog() {
    let toml = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("Cargo.toml")).unwrap();
    let mut section = "";
    let mut bins = 0;
    for line in toml.lines() {
        if line.starts_with('[') {
            section = line.trim();
        } else if let (true, Some(name)) = (section == "[[bin]]", line.strip_prefix("name = \"")) {
            let name = name.trim_end_matches('"');
            if name.starts_with('m') && name.as_bytes().get(1).is_some_and(u8::is_ascii_digit) {
                assert!(course::run::catalog::find(name).is_some(), "{name} is a binary but not in catalog::MODULES");
                bins += 1;
            }
        }
    }
    assert!(bins >= 2, "found {bins} module binaries in Cargo.toml");
}

#[test]
fn m06_chat_answers_through_the_template_and_reports_its_speed() {
    let bin = bin_dir().join("m06_lora_quant");
    let text = run(Command::new(&bin).args(["chat", "What is the capital of France?", "--max-new-tokens", "16"]));
    assert!(text.contains("Paris"), "{text}");
    assert!(text.contains("prefill") && text.contains("decode") && text.contains("peak RSS"), "{text}");
    let help = run(Command::new(&bin).arg("--help"));
    assert!(help.contains("chat") && help.contains("export") && help.contains("LoRA"), "{help}");
    // Bad input: clear errors, no panic.
    let out = Command::new(&bin).args(["chat", "hi", "--model", "/nonexistent.gguf"]).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("--model /nonexistent.gguf") && !err.contains("panicked"), "{err}");
    // No question and stdin not a terminal: stdin is the question.
    let mut child = Command::new(&bin)
        .args(["chat", "--max-new-tokens", "16"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    child.stdin.take().unwrap().write_all(b"What is the capital of France?\n").unwrap();
    let o = child.wait_with_output().unwrap();
    assert!(o.status.success() && String::from_utf8_lossy(&o.stdout).contains("Paris"));
    let out = Command::new(&bin).args(["chat", "hi", "--top-p", "0"]).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("top_p") && !err.contains("panicked"), "{err}");
}

#[test]
fn m06_quick_tunes_then_compares_every_format_in_its_own_process() {
    let bin = bin_dir().join("m06_lora_quant");
    let out = tmp("m06-full");
    let text = run(Command::new(&bin).args(["--quick", "--quiet", "--device", "cpu", "--outputs"]).arg(&out));
    for f in ["f32", "bf16", "int8", "nf4", "nf4_gptq", "q4_1"] {
        assert!(text.contains(&format!("=== {f} (a process of its own) ===")), "{text}");
    }
    let dir = out.join("m06_lora_quant");
    let metrics = Metrics::load(&dir.join("metrics.json")).unwrap();
    assert!(metrics.quick && metrics.targets.iter().any(|t| t.name == "identity_lora"));
    assert_eq!((metrics.module.as_str(), metrics.device.as_str()), ("m06_lora_quant", "cpu"));
    assert!(dir.join("manifest.json").exists());
    let m = &metrics.metrics;
    // q4_1 computes exactly what the dequantized f32 model computes (the file's own numbers).
    assert!((m["q4_1_ppl_hamlet"] / m["f32_ppl_hamlet"] - 1.0).abs() < 1e-3, "{m:?}");
    assert_eq!(m["q4_1_greedy_agreement"], 1.0);
    assert!(m["q4_1_weight_mb"] * 5.0 < m["f32_weight_mb"] && m["nf4_weight_mb"] < m["int8_weight_mb"]);
    // GPTQ changes NF4's codes, not its size.
    assert_eq!(m["nf4_gptq_weight_mb"], m["nf4_weight_mb"]);
    for a in &metrics.artifacts {
        let p = dir.join(a);
        assert!(p.exists(), "missing artifact {a}");
        if a.ends_with(".png") {
            assert!(is_png(&p), "{a} is not a PNG");
        }
    }
    for png in ["weights.png", "decode.png", "quality_vs_size.png"] {
        assert!(metrics.artifacts.iter().any(|a| a == png), "{png} not listed");
    }
    // Bad input: an unknown format is refused by name, before any child starts.
    let o = Command::new(&bin)
        .args(["--quick", "--outputs"])
        .arg(&out)
        .args(["compare", "--formats", "f32,fp8"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("\"fp8\" is not one of") && !err.contains("panicked"), "{err}");
    std::fs::remove_dir_all(&out).unwrap();
}

#[test]
fn m06_train_quick_tunes_and_saves_a_peft_adapter() {
    let bin = bin_dir().join("m06_lora_quant");
    let out = tmp("m06-train");
    let adapter = out.join("adapter");
    let text = run(Command::new(&bin)
        .args(["--quick", "--quiet", "--device", "cpu", "--outputs"])
        .arg(&out)
        .args(["train", "--max-len", "96", "--name", "Quill", "--out"])
        .arg(&adapter));
    assert!(text.contains("trainable%: 1.78"), "{text}");
    let metrics = Metrics::load(&out.join("m06_lora_quant/train").join("metrics.json")).unwrap();
    assert!(metrics.quick && metrics.targets.iter().any(|t| t.name == "identity_lora"));
    assert!(metrics.metrics["heldout_loss_base"].is_finite());
    // peft's folder: its config and its keys, 7 projections x 30 layers x (A, B).
    let a = course::io::peft::read_adapter(&adapter).unwrap();
    assert_eq!((a.config.peft_type.as_str(), a.config.r), ("LORA", 8));
    assert_eq!(a.tensors.len(), 7 * 30 * 2);
    let tc: serde_json::Value =
        serde_json::from_slice(&std::fs::read(adapter.join("training_config.json")).unwrap()).unwrap();
    assert_eq!(tc["name"], "Quill");
    // The adapter on the base, and the merged export of both, answer alike (greedy, f32).
    let ask = |extra: &[&str]| {
        let o =
            Command::new(&bin).args(["chat", "Who are you?", "--max-new-tokens", "8"]).args(extra).output().unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        String::from_utf8_lossy(&o.stdout).into_owned()
    };
    let merged = out.join("merged");
    let a_str = adapter.to_str().unwrap();
    let with_adapter = ask(&["--adapter", a_str]);
    run(Command::new(&bin).args(["export", "--adapter", a_str, "--out"]).arg(&merged));
    assert_eq!(ask(&["--merged", merged.to_str().unwrap()]), with_adapter);
    // Bad input: a target that names no layer is refused by name, without a panic.
    let o = Command::new(&bin)
        .args(["--quick", "--outputs"])
        .arg(&out)
        .args(["train", "--targets", "c_attn"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("matched no linear layer") && !err.contains("panicked"), "{err}");
    std::fs::remove_dir_all(&out).unwrap();
}
