//! Our event files, read back by the real TensorBoard's event reader (installed in .venv by
//! scripts/setup.py).

use course::train::tensorboard::SummaryWriter;
use std::process::Command;

#[test]
fn tensorboard_reads_back_every_scalar() {
    let py = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(".venv/bin/python");
    assert!(py.exists(), "{} missing: run python3 scripts/setup.py", py.display());
    let dir = std::env::temp_dir().join(format!("course-tb-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let mut w = SummaryWriter::new(&dir).unwrap();
    let mut want = vec![];
    for step in 0..25i64 {
        for (tag, v) in [
            ("train/loss", 2.5 / (step + 1) as f64),
            ("lr", 0.1 * 0.9f64.powi(step as i32)),
            ("val/accuracy", 0.5 + step as f64 / 100.0),
        ] {
            w.add_scalar(tag, v, step * 100).unwrap();
            want.push((tag.to_string(), step * 100, v as f32));
        }
    }
    let script = r#"
import sys, json
from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
out = []
for e in EventFileLoader(sys.argv[1]).Load():
    for v in e.summary.value:
        # the loader converts simple_value summaries into tensor-based ones
        val = v.simple_value if v.HasField("simple_value") else float(v.tensor.float_val[0])
        out.append([v.tag, e.step, val])
print(json.dumps(out))
"#;
    let out = Command::new(&py).args(["-c", script]).arg(&w.path).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let got: Vec<(String, i64, f32)> = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(got, want);
    let lines = std::fs::read_to_string(dir.join("scalars.jsonl")).unwrap();
    assert_eq!(lines.lines().count(), 75);
    std::fs::remove_dir_all(&dir).unwrap();
}
