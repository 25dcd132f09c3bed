//! The profiler wrapper: a trace of known ops holds exactly the calls made, with self time
//! within total time and self percentages summing to 100; a memory profile sees the peak of
//! known tensors; the per-op summary and memory peaks of a hand-made trace with nested
//! intervals give exact numbers; bad trace files are errors naming the file.

use course::sys::profile::{
    format_table, memory_peaks, record_function, top_ops, MemoryPeak, OpDevice, OpStat, Profiler, ProfilerOptions,
};
use course::sys::rng::Rng;
use std::path::PathBuf;
use std::sync::Mutex;
use tch::{Device, Kind, Tensor};

/// Kineto records one trace per process: tests that start a profiler take turns.
static PROFILER: Mutex<()> = Mutex::new(());

fn temp_dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("course-profile-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn row<'a>(rows: &'a [OpStat], name: &str) -> &'a OpStat {
    rows.iter().find(|r| r.name == name).unwrap_or_else(|| panic!("no {name} in {rows:#?}"))
}

#[test]
fn trace_of_known_ops_counts_every_call() {
    let _turn = PROFILER.lock().unwrap_or_else(|e| e.into_inner());
    let dir = temp_dir("known");
    let path = dir.join("trace.json");
    let mut rng = Rng::new(1);
    let a = rng.normal_tensor(&[128, 96]);
    let b = rng.normal_tensor(&[96, 64]);
    const K: u64 = 5;

    let prof = Profiler::start(false).unwrap();
    {
        let _r = record_function("forward");
        for _ in 0..K {
            let _ = a.matmul(&b);
        }
        let _ = a.relu();
    }
    prof.stop_and_save(&path).unwrap();

    let text = std::fs::read_to_string(&path).unwrap();
    let json: serde_json::Value = serde_json::from_str(&text).expect("the trace is valid JSON");
    assert!(json["traceEvents"].as_array().is_some_and(|e| !e.is_empty()), "no traceEvents");
    let leftovers: Vec<_> = std::fs::read_dir(&dir).unwrap().filter_map(|e| e.ok()).map(|e| e.file_name()).collect();
    assert_eq!(leftovers.len(), 1, "temporary files left next to the trace: {leftovers:?}");

    let rows = top_ops(&path, usize::MAX).unwrap();
    assert_eq!(row(&rows, "aten::matmul").calls, K);
    assert_eq!(row(&rows, "aten::mm").calls, K);
    assert_eq!(row(&rows, "aten::relu").calls, 1);
    let fwd = row(&rows, "forward");
    assert_eq!(fwd.calls, 1);
    // The range contains every op, so its total covers theirs; matmul's covers mm's.
    assert!(fwd.total_us >= row(&rows, "aten::matmul").total_us + row(&rows, "aten::relu").total_us);
    assert!(row(&rows, "aten::matmul").total_us >= row(&rows, "aten::mm").total_us);
    for r in &rows {
        assert!(r.self_us >= 0.0 && r.self_us <= r.total_us + 1e-9, "{r:?}");
        assert_eq!(r.device, OpDevice::Cpu);
    }
    let pct: f64 = rows.iter().map(|r| r.self_pct).sum();
    assert!((pct - 100.0).abs() < 1e-6, "self percentages sum to {pct}");
    // Sorted by self time, and the matmuls dominate a relu of the same input.
    assert!(rows.windows(2).all(|w| w[0].self_us >= w[1].self_us));
    assert!(row(&rows, "aten::mm").self_us > row(&rows, "aten::relu").self_us);

    let top2 = top_ops(&path, 2).unwrap();
    assert_eq!(top2, rows[..2].to_vec());
    let table = format_table(&rows);
    assert!(
        table.contains("aten::mm") && table.contains("Self %") && table.contains("(100.00% of the trace's)"),
        "{table}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn memory_profile_sees_the_peak_of_live_tensors() {
    let _turn = PROFILER.lock().unwrap_or_else(|e| e.into_inner());
    let dir = temp_dir("memory");
    let path = dir.join("trace.json");
    const MIB: i64 = 1 << 20;
    let prof = Profiler::start_with(ProfilerOptions { profile_memory: true, ..Default::default() }).unwrap();
    let a = Tensor::zeros([MIB], (Kind::Float, Device::Cpu)); // 4 MiB, kept
    let b = &a + 1.0; // 4 MiB more: the peak, 8 MiB
    drop(b);
    let c = Tensor::zeros([MIB / 2], (Kind::Float, Device::Cpu)); // back to 6 MiB
    prof.stop_and_save(&path).unwrap();
    drop((a, c));
    let peaks = memory_peaks(&path).unwrap();
    assert_eq!(peaks.len(), 1, "{peaks:?}");
    assert_eq!(peaks[0].device, OpDevice::Cpu);
    // Room for a few bytes of scalars beside the two 4 MiB buffers.
    assert!((8 * MIB..8 * MIB + 4096).contains(&peaks[0].peak_bytes), "{peaks:?}");
    assert!(peaks[0].events >= 4, "{peaks:?}");
    // Without profile_memory there are no memory events.
    let path2 = dir.join("plain.json");
    let prof = Profiler::start(false).unwrap();
    let _ = Tensor::zeros([1024], (Kind::Float, Device::Cpu));
    prof.stop_and_save(&path2).unwrap();
    assert!(memory_peaks(&path2).unwrap().is_empty());
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn one_profiler_at_a_time_and_drop_stops_it() {
    let _turn = PROFILER.lock().unwrap_or_else(|e| e.into_inner());
    let p = Profiler::start(false).unwrap();
    let err = Profiler::start(false).err().expect("a second profiler must be refused");
    assert!(format!("{err:#}").contains("already running"), "{err:#}");
    drop(p);
    // Dropped means stopped: a new one starts, and stop() discards without error.
    Profiler::start(false).unwrap().stop().unwrap();
}

#[test]
fn cuda_profiling_without_a_gpu_is_an_error() {
    if tch::Cuda::is_available() {
        return;
    }
    let _turn = PROFILER.lock().unwrap_or_else(|e| e.into_inner());
    let err = Profiler::start(true).err().expect("no CUDA device");
    assert!(format!("{err:#}").contains("no CUDA device"), "{err:#}");
}

#[test]
fn unwritable_path_is_an_error_naming_it_and_stops_the_profiler() {
    let _turn = PROFILER.lock().unwrap_or_else(|e| e.into_inner());
    let dir = temp_dir("unwritable");
    // A regular file where a directory is needed.
    let blocker = dir.join("file");
    std::fs::write(&blocker, b"x").unwrap();
    let path = blocker.join("trace.json");
    let err = Profiler::start(false).unwrap().stop_and_save(&path).unwrap_err();
    assert!(format!("{err:#}").contains(&path.display().to_string()), "{err:#}");
    Profiler::start(false).unwrap().stop().unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Kineto's layout: microsecond timestamps with three decimals, events of several threads, a
/// GPU kernel on a stream, metadata and span events that are not ops.
#[test]
fn self_time_of_a_hand_made_trace_is_exact() {
    let dir = temp_dir("handmade");
    let path = dir.join("trace.json");
    let base = 4653810397542.095_f64;
    let mem = |total: i64, device_type: i64, device_id: i64| {
        format!(
            r#"{{"ph": "i", "cat": "cpu_instant_event", "s": "t", "name": "[memory]", "pid": 7, "tid": 7, "ts": {:.3}, "args": {{"Total Reserved": 0, "Total Allocated": {total}, "Bytes": 1, "Device Id": {device_id}, "Device Type": {device_type}, "Addr": 1}}}}"#,
            base + 1.0
        )
    };
    let x = |name: &str, cat: &str, pid: &str, tid: &str, start: f64, dur: f64| {
        format!(
            r#"{{"ph": "X", "cat": "{cat}", "name": "{name}", "pid": {pid}, "tid": {tid}, "ts": {:.3}, "dur": {dur:.3}, "args": {{"External id": 1}}}}"#,
            base + start
        )
    };
    let events = [
        // Thread 1: step [0,100) holds linear [10,50) (which holds mm [15,45)), relu [60,70)
        // and mm [72,92).
        x("step", "user_annotation", "7", "7", 0.0, 100.0),
        x("aten::linear", "cpu_op", "7", "7", 10.0, 40.0),
        x("aten::mm", "cpu_op", "7", "7", 15.0, 30.0),
        x("aten::relu", "cpu_op", "7", "7", 60.0, 10.0),
        x("aten::mm", "cpu_op", "7", "7", 72.0, 20.0),
        // Thread 2 (the autograd engine's, say): overlaps step in time but is not inside it;
        // relu starts exactly where mm ends, so it is not mm's child.
        x("aten::mm", "cpu_op", "7", "9", 0.0, 100.0),
        x("aten::relu", "cpu_op", "7", "9", 100.0, 1.0),
        // A kernel on GPU 0, stream 7: its own device's 100%.
        x("gemm_kernel", "kernel", "0", "7", 20.0, 5.0),
        // Not ops: the profiler's span, and a metadata event.
        x("PyTorch Profiler (0)", "Trace", "\"Spans\"", "\"PyTorch Profiler\"", -1.0, 1000.0),
        r#"{"name": "thread_name", "ph": "M", "ts": 1.0, "pid": 7, "tid": 7, "args": {"name": "main"}}"#.to_string(),
        // Allocations (profile_memory): instant events, not ops.
        mem(100, 0, -1),
        mem(300, 0, -1),
        mem(200, 0, -1),
        mem(5000, 1, 0),
    ];
    std::fs::write(&path, format!("{{\"schemaVersion\": 1, \"traceEvents\": [{}]}}", events.join(",\n"))).unwrap();

    let rows = top_ops(&path, 10).unwrap();
    let got: Vec<(&str, OpDevice, u64, f64, f64)> =
        rows.iter().map(|r| (r.name.as_str(), r.device, r.calls, r.total_us, r.self_us)).collect();
    use OpDevice::{Cpu, Cuda};
    // step: 100 - (40 + 10 + 20); linear: 40 - 30; mm: 30 + 20 + 100, no children.
    assert_eq!(
        got,
        vec![
            ("aten::mm", Cpu, 3, 150.0, 150.0),
            ("step", Cpu, 1, 100.0, 30.0),
            ("aten::relu", Cpu, 2, 11.0, 11.0),
            ("aten::linear", Cpu, 1, 40.0, 10.0),
            ("gemm_kernel", Cuda, 1, 5.0, 5.0),
        ]
    );
    // CPU self time totals 201 us (= the top-level spans' 100 + 100 + 1).
    let pct: Vec<f64> = rows.iter().map(|r| r.self_pct).collect();
    let want = [150.0 / 201.0 * 100.0, 30.0 / 201.0 * 100.0, 11.0 / 201.0 * 100.0, 10.0 / 201.0 * 100.0, 100.0];
    for (g, w) in pct.iter().zip(want) {
        assert!((g - w).abs() < 1e-9, "self % {g} vs {w}");
    }
    assert_eq!(top_ops(&path, 1).unwrap().len(), 1);
    assert_eq!(
        memory_peaks(&path).unwrap(),
        vec![
            MemoryPeak { device: Cpu, index: -1, peak_bytes: 300, events: 3 },
            MemoryPeak { device: Cuda, index: 0, peak_bytes: 5000, events: 1 },
        ]
    );

    // A bare event array (the other Chrome trace layout) gives the same rows.
    let bare = dir.join("bare.json");
    std::fs::write(&bare, format!("  [{}]", events.join(","))).unwrap();
    assert_eq!(top_ops(&bare, 10).unwrap(), rows);

    let table = format_table(&rows);
    assert!(table.contains("150.000us") && table.contains("74.63%"), "{table}");
    assert!(table.contains("Self CUDA time of these rows: 5.000us (100.00% of the trace's)"), "{table}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn missing_or_malformed_trace_is_an_error_naming_the_file() {
    let dir = temp_dir("bad");
    let missing = dir.join("nope.json");
    let err = top_ops(&missing, 5).unwrap_err();
    assert!(format!("{err:#}").contains("nope.json"), "{err:#}");

    for (name, text) in
        [("truncated.json", "{\"traceEvents\": [{\"ph\": \"X\""), ("empty.json", ""), ("wrong.json", "{\"a\": 1}")]
    {
        let p = dir.join(name);
        std::fs::write(&p, text).unwrap();
        let err = top_ops(&p, 5).unwrap_err();
        assert!(format!("{err:#}").contains(name), "{name}: {err:#}");
    }
    std::fs::remove_dir_all(&dir).unwrap();
}
