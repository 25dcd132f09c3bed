//! Profiling with torch's own profiler (Kineto, what `torch.profiler.profile` runs).
//!
//! - [`Profiler`] records every ATen op this thread runs (and, with `cuda`, every CUDA kernel)
//!   and saves the Chrome trace JSON that `prof.export_chrome_trace(path)` writes; open it in
//!   <https://ui.perfetto.dev> or `chrome://tracing`.
//! - [`record_function`] marks a named range ("forward", "backward", "optimizer") in the trace,
//!   like `torch.profiler.record_function`.
//! - [`top_ops`] and [`format_table`] read a trace back and summarise it per op, like
//!   `prof.key_averages().table(sort_by="self_cpu_time_total")`: calls, total time, and self
//!   time (the op's duration minus that of the ops it called), which is where time really goes.
//! - [`memory_peaks`] reads the peak allocated bytes per device from a trace recorded with
//!   `profile_memory` (torch's `profile_memory=True`).
//!
//! Like torch's, the profiler is thread-local: it records the thread that started it (plus the
//! threads that inherit its state, such as the autograd engine's) and must stop on that thread,
//! so [`Profiler`] is not `Send`. Kineto is one per process, so only one [`Profiler`] may run
//! at a time.

use crate::{sys::ffi, sys::fsutil};
use anyhow::{bail, Context, Result};
use serde::Deserialize;
use std::collections::HashMap;
use std::ffi::{c_int, c_void, CString};
use std::fs::File;
use std::io::{BufReader, Read};
use std::marker::PhantomData;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};

/// Whether a [`Profiler`] is running anywhere in the process.
static RUNNING: AtomicBool = AtomicBool::new(false);

/// What to record besides the CPU ops.
#[derive(Debug, Clone, Copy, Default)]
pub struct ProfilerOptions {
    /// Also record CUDA kernels and copies (needs a CUDA device).
    pub cuda: bool,
    /// Record each op's input shapes in the trace (`record_shapes=True`); costs some overhead.
    pub record_shapes: bool,
    /// Record every allocation and free (`profile_memory=True`), for [`memory_peaks`].
    pub profile_memory: bool,
}

/// A running torch profiler. Stop it with [`Profiler::stop_and_save`] (or [`Profiler::stop`]
/// to discard the trace); dropping it stops it too and discards the trace.
#[must_use = "the profiler records until it is stopped or dropped"]
pub struct Profiler {
    running: bool,
    /// torch's profiler state is thread-local: stop on the thread that started it.
    _not_send: PhantomData<*const ()>,
}

impl Profiler {
    /// Starts recording this thread's ops; `cuda` adds CUDA kernels (an error without a CUDA
    /// device).
    pub fn start(cuda: bool) -> Result<Profiler> {
        Self::start_with(ProfilerOptions { cuda, ..Default::default() })
    }

    pub fn start_with(opts: ProfilerOptions) -> Result<Profiler> {
        if opts.cuda && !tch::Cuda::is_available() {
            bail!("profiler: CUDA profiling was requested but no CUDA device is visible");
        }
        if RUNNING.compare_exchange(false, true, Ordering::SeqCst, Ordering::SeqCst).is_err() {
            bail!("profiler: another Profiler is already running in this process (torch's Kineto records one trace at a time)");
        }
        // SAFETY: plain integers in; the shim catches every C++ exception.
        let started = ffi::check(unsafe {
            ffi::course_profiler_start(opts.cuda as c_int, opts.record_shapes as c_int, opts.profile_memory as c_int)
        });
        if let Err(e) = started {
            RUNNING.store(false, Ordering::SeqCst);
            return Err(e.context("starting torch's profiler"));
        }
        Ok(Profiler { running: true, _not_send: PhantomData })
    }

    /// Stops recording and writes the Chrome trace JSON to `path` (directories created). The
    /// file appears whole or not at all: torch writes a temporary next to it, which is renamed.
    pub fn stop_and_save(mut self, path: &Path) -> Result<()> {
        self.running = false;
        let mut stopped = false;
        let saved = fsutil::write_via_temp(path, |tmp| {
            stopped = true;
            let c = CString::new(tmp.to_str().with_context(|| format!("{} is not valid UTF-8", tmp.display()))?)
                .with_context(|| format!("{} contains a NUL byte", tmp.display()))?;
            // SAFETY: a live NUL-terminated path; the shim catches every C++ exception.
            ffi::check(unsafe { ffi::course_profiler_stop(c.as_ptr()) })?;
            // Kineto logs instead of failing when it cannot write, so check the file is there.
            match std::fs::metadata(tmp) {
                Ok(m) if m.len() > 0 => Ok(()),
                _ => bail!("torch's profiler wrote no trace to {}", tmp.display()),
            }
        });
        if !stopped {
            // The directory could not be created: stop anyway, dropping the trace.
            let _ = ffi::check(unsafe { ffi::course_profiler_stop(std::ptr::null()) });
        }
        RUNNING.store(false, Ordering::SeqCst);
        saved.with_context(|| format!("saving the profiler trace to {}", path.display()))
    }

    /// Stops recording and discards the trace.
    pub fn stop(mut self) -> Result<()> {
        self.running = false;
        let r = ffi::check(unsafe { ffi::course_profiler_stop(std::ptr::null()) });
        RUNNING.store(false, Ordering::SeqCst);
        r.context("stopping torch's profiler")
    }
}

impl Drop for Profiler {
    fn drop(&mut self) {
        if self.running {
            // Can only fail if torch's profiler was already stopped behind our back.
            let _ = ffi::check(unsafe { ffi::course_profiler_stop(std::ptr::null()) });
            RUNNING.store(false, Ordering::SeqCst);
        }
    }
}

/// A named range in the trace, from creation to drop (`with torch.profiler.record_function(name)`).
/// Ranges appear as `user_annotation` events that contain the ops run inside them; without a
/// running profiler (or on a thread it does not record) they cost one small allocation and
/// record nothing. Drop on the same thread, innermost first.
#[must_use = "the range ends when the guard is dropped"]
pub struct RecordFunction {
    guard: *mut c_void,
}

/// Marks a named range until the returned guard is dropped:
/// `let _r = record_function("forward");`.
pub fn record_function(name: &str) -> RecordFunction {
    let c = CString::new(name.replace('\0', " ")).expect("NULs replaced");
    // SAFETY: a live NUL-terminated string, copied by RecordFunction.
    RecordFunction { guard: unsafe { ffi::course_record_function_enter(c.as_ptr()) } }
}

impl Drop for RecordFunction {
    fn drop(&mut self) {
        if !self.guard.is_null() {
            // SAFETY: a guard from course_record_function_enter, freed once.
            unsafe { ffi::course_record_function_exit(self.guard) }
        }
    }
}

/// Where an op's time was spent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum OpDevice {
    /// ATen ops, named ranges and CUDA runtime calls, timed on the host.
    Cpu,
    /// Kernels, copies and memsets, timed on the GPU.
    Cuda,
}

impl OpDevice {
    pub fn as_str(self) -> &'static str {
        match self {
            OpDevice::Cpu => "cpu",
            OpDevice::Cuda => "cuda",
        }
    }
}

/// One row of [`top_ops`]: every event with this name on this device, aggregated.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct OpStat {
    pub name: String,
    pub device: OpDevice,
    pub calls: u64,
    /// Sum of the events' durations, in microseconds (includes the ops they called).
    pub total_us: f64,
    /// `total_us` minus the time of the events directly nested in them on the same thread.
    pub self_us: f64,
    /// `self_us` as a percentage of the self time of all events on this device; over all rows
    /// of a device these sum to 100.
    pub self_pct: f64,
}

impl OpStat {
    /// Mean total time per call, in microseconds.
    pub fn avg_us(&self) -> f64 {
        if self.calls == 0 {
            0.0
        } else {
            self.total_us / self.calls as f64
        }
    }
}

/// The fields of a Chrome trace event that the summary needs; the rest (`args`, ...) are skipped.
#[derive(Deserialize)]
struct RawEvent {
    #[serde(default)]
    ph: Option<String>,
    #[serde(default)]
    cat: Option<String>,
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    pid: Option<serde_json::Value>,
    #[serde(default)]
    tid: Option<serde_json::Value>,
    #[serde(default)]
    ts: Option<f64>,
    #[serde(default)]
    dur: Option<f64>,
    #[serde(default)]
    args: Option<MemoryArgs>,
}

/// The `args` of a `[memory]` event (profile_memory); other events' args are skipped.
#[derive(Deserialize)]
struct MemoryArgs {
    #[serde(rename = "Total Allocated", default)]
    total_allocated: Option<i64>,
    #[serde(rename = "Device Type", default)]
    device_type: Option<i64>,
    #[serde(rename = "Device Id", default)]
    device_id: Option<i64>,
}

#[derive(Deserialize)]
struct TraceObject {
    #[serde(rename = "traceEvents")]
    trace_events: Vec<RawEvent>,
}

/// The categories Kineto writes for timed work, by device. Others (`Trace` spans, flow
/// arrows, `gpu_user_annotation` mirrors of named ranges, Python frames) are left out.
fn device_of(cat: &str) -> Option<OpDevice> {
    match cat {
        "cpu_op" | "user_annotation" | "cuda_runtime" | "cuda_driver" => Some(OpDevice::Cpu),
        "kernel" | "gpu_memcpy" | "gpu_memset" => Some(OpDevice::Cuda),
        _ => None,
    }
}

/// A complete ("ph": "X") event, times in integer nanoseconds: Kineto writes microseconds with
/// three decimals, and integers keep the nesting test and the sums exact.
struct Span {
    name: String,
    device: OpDevice,
    start: i64,
    dur: i64,
}

fn read_events(trace: &Path) -> Result<Vec<RawEvent>> {
    let f = File::open(trace).with_context(|| format!("opening trace {}", trace.display()))?;
    let mut r = BufReader::new(f);
    // Chrome traces are either {"traceEvents": [...], ...} (what Kineto writes) or a bare array.
    let mut first = [0u8; 1];
    let mut lead = Vec::new();
    loop {
        let n = r.read(&mut first).with_context(|| format!("reading trace {}", trace.display()))?;
        if n == 0 || !first[0].is_ascii_whitespace() {
            break;
        }
        lead.push(first[0]);
    }
    let is_array = first[0] == b'[';
    let rest = std::io::Cursor::new([lead, first.to_vec()].concat()).chain(r);
    let parsed = if is_array {
        serde_json::from_reader::<_, Vec<RawEvent>>(rest)
    } else {
        serde_json::from_reader::<_, TraceObject>(rest).map(|t| t.trace_events)
    };
    parsed.with_context(|| format!("trace {} is not a Chrome trace JSON (traceEvents)", trace.display()))
}

fn spans(events: Vec<RawEvent>) -> HashMap<(OpDevice, String, String), Vec<Span>> {
    let mut by_thread: HashMap<(OpDevice, String, String), Vec<Span>> = HashMap::new();
    for e in events {
        if e.ph.as_deref() != Some("X") {
            continue;
        }
        let Some(device) = e.cat.as_deref().and_then(device_of) else { continue };
        let (Some(ts), Some(name)) = (e.ts, e.name) else { continue };
        let key = |v: &Option<serde_json::Value>| v.as_ref().map(|v| v.to_string()).unwrap_or_default();
        let span = Span {
            name,
            device,
            start: (ts * 1e3).round() as i64,
            dur: (e.dur.unwrap_or(0.0).max(0.0) * 1e3).round() as i64,
        };
        by_thread.entry((device, key(&e.pid), key(&e.tid))).or_default().push(span);
    }
    by_thread
}

/// Self time of each span of one thread, in the same order: its duration minus the part of its
/// direct children that lies inside it. Spans on one thread nest (a call stack), so a stack of
/// open spans finds each one's parent.
fn self_times(spans: &mut [Span]) -> Vec<i64> {
    // Parents first: earlier start, and at equal starts the longer span.
    spans.sort_by(|a, b| a.start.cmp(&b.start).then(b.dur.cmp(&a.dur)));
    let mut child = vec![0i64; spans.len()];
    let mut open: Vec<usize> = Vec::new();
    for i in 0..spans.len() {
        let (start, end) = (spans[i].start, spans[i].start + spans[i].dur);
        while let Some(&p) = open.last() {
            if start >= spans[p].start + spans[p].dur {
                open.pop();
            } else {
                break;
            }
        }
        if let Some(&p) = open.last() {
            child[p] += end.min(spans[p].start + spans[p].dur) - start;
        }
        open.push(i);
    }
    spans.iter().zip(child).map(|(s, c)| (s.dur - c).max(0)).collect()
}

/// Summarises a Chrome trace (from [`Profiler::stop_and_save`] or Python's
/// `export_chrome_trace`) per op name and device, sorted by self time, largest first; at most
/// `n` rows. Percentages are of the whole trace, not of the rows returned.
pub fn top_ops(trace: &Path, n: usize) -> Result<Vec<OpStat>> {
    let events = read_events(trace)?;
    let mut agg: HashMap<(String, OpDevice), (u64, i64, i64)> = HashMap::new();
    let mut device_self: HashMap<OpDevice, i64> = HashMap::new();
    for (_, mut thread) in spans(events) {
        let selfs = self_times(&mut thread);
        for (s, self_ns) in thread.into_iter().zip(selfs) {
            *device_self.entry(s.device).or_default() += self_ns;
            let e = agg.entry((s.name, s.device)).or_default();
            e.0 += 1;
            e.1 += s.dur;
            e.2 += self_ns;
        }
    }
    let mut rows: Vec<OpStat> = agg
        .into_iter()
        .map(|((name, device), (calls, total, self_ns))| {
            let all = device_self.get(&device).copied().unwrap_or(0);
            OpStat {
                name,
                device,
                calls,
                total_us: total as f64 / 1e3,
                self_us: self_ns as f64 / 1e3,
                self_pct: if all > 0 { 100.0 * self_ns as f64 / all as f64 } else { 0.0 },
            }
        })
        .collect();
    rows.sort_by(|a, b| {
        b.self_us.total_cmp(&a.self_us).then_with(|| a.name.cmp(&b.name)).then(a.device.cmp(&b.device))
    });
    rows.truncate(n);
    Ok(rows)
}

/// The most memory allocated at once on one device during a trace recorded with
/// [`ProfilerOptions::profile_memory`].
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct MemoryPeak {
    pub device: OpDevice,
    /// The CUDA device index; -1 for the CPU.
    pub index: i64,
    /// The largest "Total Allocated" of the trace's `[memory]` events. On the CPU this counts
    /// only allocations made while profiling (net of their frees): the step's own memory. On
    /// CUDA it is the caching allocator's total, including what was allocated before.
    pub peak_bytes: i64,
    /// Allocations and frees recorded.
    pub events: u64,
}

/// Peak allocated memory per device from the `[memory]` events of a trace; empty if the trace
/// was recorded without `profile_memory`. Devices other than CPU and CUDA are left out.
pub fn memory_peaks(trace: &Path) -> Result<Vec<MemoryPeak>> {
    let mut peaks: Vec<MemoryPeak> = vec![];
    for e in read_events(trace)? {
        if e.name.as_deref() != Some("[memory]") {
            continue;
        }
        let Some(args) = e.args else { continue };
        let Some(total) = args.total_allocated else { continue };
        // c10::DeviceType codes: 0 = CPU, 1 = CUDA.
        let device = match args.device_type {
            Some(0) => OpDevice::Cpu,
            Some(1) => OpDevice::Cuda,
            _ => continue,
        };
        let index = args.device_id.unwrap_or(-1);
        match peaks.iter_mut().find(|p| p.device == device && p.index == index) {
            Some(p) => {
                p.peak_bytes = p.peak_bytes.max(total);
                p.events += 1;
            }
            None => peaks.push(MemoryPeak { device, index, peak_bytes: total, events: 1 }),
        }
    }
    peaks.sort_by_key(|p| (p.device, p.index));
    Ok(peaks)
}

/// torch's time format in its profiler tables: 3 decimals in us, ms or s.
fn fmt_us(us: f64) -> String {
    if us >= 1e6 {
        format!("{:.3}s", us / 1e6)
    } else if us >= 1e3 {
        format!("{:.3}ms", us / 1e3)
    } else {
        format!("{us:.3}us")
    }
}

/// A text table of [`top_ops`] rows in the layout of torch's `key_averages().table()`, with a
/// footer per device giving the rows' self time and their share of the trace's.
pub fn format_table(rows: &[OpStat]) -> String {
    const MAX_NAME: usize = 55; // torch's default name column width
    let shorten = |s: &str| {
        if s.chars().count() > MAX_NAME {
            format!("{}...", s.chars().take(MAX_NAME - 3).collect::<String>())
        } else {
            s.to_string()
        }
    };
    let name_w = rows.iter().map(|r| shorten(&r.name).chars().count()).max().unwrap_or(0).max(4);
    let header = format!(
        "{:>name_w$}  {:>6}  {:>8}  {:>12}  {:>12}  {:>12}  {:>8}",
        "Name", "Device", "Self %", "Self", "Total", "Avg", "Calls"
    );
    let rule = "-".repeat(header.len());
    let mut out = format!("{rule}\n{header}\n{rule}\n");
    for r in rows {
        out += &format!(
            "{:>name_w$}  {:>6}  {:>7.2}%  {:>12}  {:>12}  {:>12}  {:>8}\n",
            shorten(&r.name),
            r.device.as_str(),
            r.self_pct,
            fmt_us(r.self_us),
            fmt_us(r.total_us),
            fmt_us(r.avg_us()),
            r.calls
        );
    }
    out += &format!("{rule}\n");
    for device in [OpDevice::Cpu, OpDevice::Cuda] {
        let of: Vec<&OpStat> = rows.iter().filter(|r| r.device == device).collect();
        if of.is_empty() {
            continue;
        }
        let us: f64 = of.iter().map(|r| r.self_us).sum();
        let pct: f64 = of.iter().map(|r| r.self_pct).sum();
        out += &format!(
            "Self {} time of these rows: {} ({:.2}% of the trace's)\n",
            device.as_str().to_uppercase(),
            fmt_us(us),
            pct
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn span(name: &str, start: i64, dur: i64) -> Span {
        Span { name: name.into(), device: OpDevice::Cpu, start, dur }
    }

    #[test]
    fn self_time_subtracts_direct_children_only() {
        // a [0,100) holds b [10,50) which holds c [20,30); d [50,60) starts where b ends, so it
        // is a's child, not b's. Given out of order on purpose.
        let mut s = vec![span("c", 20, 10), span("d", 50, 10), span("a", 0, 100), span("b", 10, 40)];
        let selfs = self_times(&mut s);
        let got: Vec<(&str, i64)> = s.iter().map(|x| x.name.as_str()).zip(selfs).collect();
        assert_eq!(got, vec![("a", 50), ("b", 30), ("c", 10), ("d", 10)]);
    }

    #[test]
    fn time_format_matches_torch() {
        assert_eq!(fmt_us(18.4781), "18.478us");
        assert_eq!(fmt_us(28339.0), "28.339ms");
        assert_eq!(fmt_us(2.5e6), "2.500s");
    }
}
