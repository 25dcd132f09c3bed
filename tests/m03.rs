//! m03's data and binary: the corpora (counts from the data manifest, lossy UTF-8, email
//! headers), the stratified split (written once, reused, checked), and the `predict` command on
//! a model directory written by a quick run.

use course::data::text::{strip_email_headers, Corpus, Split, TextTask};
use std::path::{Path, PathBuf};
use std::process::Command;

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("course-m03-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

#[test]
fn corpora_have_the_manifest_counts_and_report_bad_utf8() {
    let bbc = Corpus::load(TextTask::Bbc).unwrap();
    assert_eq!(bbc.counts(), [510, 386, 417, 511, 401]);
    // DATA.md: exactly one BBC file is not valid UTF-8.
    assert_eq!(bbc.lossy, ["sports/199.txt"]);
    let d = bbc.docs.iter().find(|d| d.id == "sports/199.txt").unwrap();
    assert!(d.text.contains('\u{FFFD}'));
    let spam = Corpus::load(TextTask::Spam).unwrap();
    assert_eq!(spam.counts(), [2500 + 1400 + 250, 500 + 1396]);
    // Headers are gone: no document starts with a header line, except one spam whose body
    // quotes a whole second message, headers and all.
    let headed: Vec<&str> = spam
        .docs
        .iter()
        .filter(|d| {
            d.text.starts_with("Return-Path:") || d.text.starts_with("From ") || d.text.starts_with("Received:")
        })
        .map(|d| d.id.as_str())
        .collect();
    assert_eq!(headed, ["spam-2/00403.90a79abcb32065d5381a74a84da2e6bd.txt"]);
}

#[test]
fn email_headers_end_at_the_first_blank_line() {
    assert_eq!(strip_email_headers("From: a@b\nSubject: hi\n\nbody\n\nmore"), "body\n\nmore");
    assert_eq!(strip_email_headers("From: a@b\r\nSubject: hi\r\n\r\nbody"), "body");
    assert_eq!(strip_email_headers("only headers\n"), "");
    // The first blank line counts, whichever line ending it uses.
    assert_eq!(strip_email_headers("A: 1\n\nbody\r\n\r\nmore"), "body\r\n\r\nmore");
}

#[test]
fn a_corpus_folder_with_bad_bytes_and_a_missing_folder() {
    let root = tmp("corpus");
    for (g, files) in [("easy-ham-1", 3), ("easy-ham-2", 1), ("hard-ham-1", 1), ("spam-1", 2), ("spam-2", 1)] {
        std::fs::create_dir_all(root.join(g)).unwrap();
        for i in 0..files {
            let mut body = format!("Subject: {g} {i}\n\nhello {g} {i} ").into_bytes();
            if g == "spam-1" && i == 0 {
                body.extend_from_slice(&[0xff, 0xfe, b'!']);
            }
            std::fs::write(root.join(g).join(format!("{i:05}.txt")), body).unwrap();
        }
    }
    let c = Corpus::load_from(TextTask::Spam, &root).unwrap();
    assert_eq!(c.counts(), [5, 3]);
    assert_eq!(c.lossy, ["spam-1/00000.txt"]);
    let d = c.docs.iter().find(|d| d.id == "spam-1/00000.txt").unwrap();
    assert_eq!(d.text, "hello spam-1 0 \u{FFFD}\u{FFFD}!");
    std::fs::remove_dir_all(root.join("hard-ham-1")).unwrap();
    let e = format!("{:#}", Corpus::load_from(TextTask::Spam, &root).unwrap_err());
    assert!(e.contains("hard-ham-1"), "{e}");
    std::fs::remove_dir_all(&root).unwrap();
}

#[test]
fn the_split_is_stratified_written_once_and_checked() {
    let bbc = Corpus::load(TextTask::Bbc).unwrap();
    let s = Split::stratified(&bbc, 0, 0.1, 0.1).unwrap();
    s.check(&bbc).unwrap();
    // Each class contributes round(n / 10) documents to test and to validation.
    for (c, n) in bbc.counts().iter().enumerate() {
        let count = |part: &[String]| s.part(&bbc, part).iter().filter(|d| d.label == c).count();
        let tenth = (*n as f64 * 0.1).round() as usize;
        assert_eq!((count(&s.test), count(&s.val), count(&s.train)), (tenth, tenth, n - 2 * tenth), "class {c}");
    }
    assert_eq!(Split::stratified(&bbc, 0, 0.1, 0.1).unwrap(), s, "same seed, same split");
    assert_ne!(Split::stratified(&bbc, 1, 0.1, 0.1).unwrap().test, s.test, "another seed, another split");

    let dir = tmp("split");
    let path = dir.join("splits").join("bbc.json");
    let first = Split::load_or_create(&path, &bbc, 5).unwrap();
    assert!(path.is_file());
    // Reused, whatever seed the next run asks for.
    assert_eq!(Split::load_or_create(&path, &bbc, 99).unwrap(), first);
    // A damaged file is an error that names it and says how to recover.
    let mut bad = first.clone();
    let moved = bad.test.pop().unwrap();
    bad.train.push(moved.clone());
    bad.val.push(moved.clone());
    std::fs::write(&path, serde_json::to_string(&bad).unwrap()).unwrap();
    let e = format!("{:#}", Split::load_or_create(&path, &bbc, 5).unwrap_err());
    assert!(e.contains("bbc.json") && e.contains(&moved) && e.contains("delete it"), "{e}");
    std::fs::write(&path, "[1, 2").unwrap();
    let e = format!("{:#}", Split::load_or_create(&path, &bbc, 5).unwrap_err());
    assert!(e.contains("bbc.json") && e.contains("not a split file"), "{e}");
    std::fs::remove_dir_all(&dir).unwrap();
}

fn m03(args: &[&str], out: &Path) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_m03_transformer"))
        .args(args)
        .args(["--quiet", "--device", "cpu", "--outputs"])
        .arg(out)
        .output()
        .unwrap()
}

#[test]
fn predict_reads_a_saved_model_directory() {
    let out = tmp("predict");
    let o = m03(&["--quick", "--task", "bbc", "--model", "scratch"], &out);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let best = out.join("m03_transformer/bbc_scratch/best");
    for f in ["tokenizer.json", "model.safetensors", "config.json"] {
        assert!(best.join(f).is_file(), "{f} missing from {}", best.display());
    }
    let o = Command::new(env!("CARGO_BIN_EXE_m03_transformer"))
        .args(["predict", "--model"])
        .arg(&best)
        .args(["Shares in the bank fell after profits slumped", "The striker scored twice"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let text = String::from_utf8_lossy(&o.stdout);
    // Two texts, each with five class probabilities that sum to 1.
    let probs: Vec<f64> =
        text.lines().filter_map(|l| l.split_whitespace().nth(1).and_then(|v| v.parse().ok())).collect();
    assert_eq!(probs.len(), 10, "{text}");
    for chunk in probs.chunks(5) {
        assert!((chunk.iter().sum::<f64>() - 1.0).abs() < 1e-3, "{text}");
    }
    assert!(["business", "entertainment", "politics", "sports", "tech"].iter().all(|c| text.contains(c)));
    // The Hugging Face shape: the bare config with its model_type, what made it best beside it.
    let cfg: serde_json::Value = serde_json::from_slice(&std::fs::read(best.join("config.json")).unwrap()).unwrap();
    assert_eq!(cfg["model_type"], "course_encoder", "{cfg}");
    let state: serde_json::Value =
        serde_json::from_slice(&std::fs::read(best.join("trainer_state.json")).unwrap()).unwrap();
    assert!(state["val_acc"].as_f64().is_some_and(|a| (0.0..=1.0).contains(&a)), "{state}");
    // A directory in the earlier shape (config under "model") is refused with the way out.
    let old = out.join("old_shape");
    std::fs::create_dir_all(&old).unwrap();
    std::fs::copy(best.join("model.safetensors"), old.join("model.safetensors")).unwrap();
    std::fs::write(old.join("config.json"), serde_json::json!({"model": cfg, "epoch": 1}).to_string()).unwrap();
    let o = Command::new(env!("CARGO_BIN_EXE_m03_transformer"))
        .args(["predict", "--model"])
        .arg(&old)
        .arg("x")
        .output()
        .unwrap();
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && e.contains("re-run the module"), "{e}");

    // Not a model directory: the error names config.json.
    let o = Command::new(env!("CARGO_BIN_EXE_m03_transformer"))
        .args(["predict", "--model"])
        .arg(&out)
        .arg("text")
        .output()
        .unwrap();
    assert!(!o.status.success());
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(e.contains("config.json") && e.contains("model directory"), "{e}");
    std::fs::remove_dir_all(&out).unwrap();
}
