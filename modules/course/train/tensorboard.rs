//! TensorBoard event files, written by hand: the TFRecord framing (length, masked CRC-32C of the
//! length, payload, masked CRC-32C of the payload) around `Event` protocol buffers holding
//! scalar summaries. The real TensorBoard reads them (tests/tensorboard.rs checks with its own
//! reader). The same scalars also go to `scalars.jsonl`, one JSON object per line.

use anyhow::{Context, Result};
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

/// CRC-32C (Castagnoli, reflected polynomial 0x82F63B78), table-driven.
pub fn crc32c(data: &[u8]) -> u32 {
    static TABLE: std::sync::OnceLock<[u32; 256]> = std::sync::OnceLock::new();
    let t = TABLE.get_or_init(|| {
        let mut t = [0u32; 256];
        for (i, e) in t.iter_mut().enumerate() {
            let mut c = i as u32;
            for _ in 0..8 {
                c = if c & 1 != 0 { 0x82F6_3B78 ^ (c >> 1) } else { c >> 1 };
            }
            *e = c;
        }
        t
    });
    !data.iter().fold(!0u32, |c, &b| t[((c ^ b as u32) & 0xff) as usize] ^ (c >> 8))
}

/// TFRecord's masking, so a CRC of data that itself contains CRCs stays well distributed.
pub fn masked_crc(data: &[u8]) -> u32 {
    let c = crc32c(data);
    (c.rotate_right(15)).wrapping_add(0xa282_ead8)
}

fn varint(mut v: u64, out: &mut Vec<u8>) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn bytes_field(field: u32, data: &[u8], out: &mut Vec<u8>) {
    varint(((field << 3) | 2) as u64, out);
    varint(data.len() as u64, out);
    out.extend_from_slice(data);
}

/// An `Event` (tensorflow/core/util/event.proto): wall_time = 1 (double), step = 2 (int64),
/// file_version = 3 (string), summary = 5 (Summary { repeated Value value = 1 }, Value { tag = 1,
/// simple_value = 2 (float) }).
fn event(wall_time: f64, step: i64, file_version: Option<&str>, scalar: Option<(&str, f32)>) -> Vec<u8> {
    let mut e = vec![0x09];
    e.extend_from_slice(&wall_time.to_le_bytes());
    e.push(0x10);
    varint(step as u64, &mut e);
    if let Some(v) = file_version {
        bytes_field(3, v.as_bytes(), &mut e);
    }
    if let Some((tag, value)) = scalar {
        let mut val = vec![];
        bytes_field(1, tag.as_bytes(), &mut val);
        val.push(0x15);
        val.extend_from_slice(&value.to_le_bytes());
        let mut summary = vec![];
        bytes_field(1, &val, &mut summary);
        bytes_field(5, &summary, &mut e);
    }
    e
}

fn record(payload: &[u8]) -> Vec<u8> {
    let len = (payload.len() as u64).to_le_bytes();
    let mut r = Vec::with_capacity(payload.len() + 16);
    r.extend_from_slice(&len);
    r.extend_from_slice(&masked_crc(&len).to_le_bytes());
    r.extend_from_slice(payload);
    r.extend_from_slice(&masked_crc(payload).to_le_bytes());
    r
}

fn now() -> f64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0)
}

/// Writes scalars to `<dir>/events.out.tfevents.<time>.<host>` and `<dir>/scalars.jsonl`.
/// Each call appends and flushes, so a crash loses at most the scalar being written.
pub struct SummaryWriter {
    events: File,
    jsonl: File,
    pub path: PathBuf,
}

impl SummaryWriter {
    pub fn new(dir: &Path) -> Result<Self> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_string())
            .unwrap_or_else(|_| "localhost".into());
        let t = now();
        let path = dir.join(format!("events.out.tfevents.{}.{host}", t as u64));
        let mut events = File::create(&path).with_context(|| format!("creating {}", path.display()))?;
        events.write_all(&record(&event(t, 0, Some("brain.Event:2"), None)))?;
        let jsonl = OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join("scalars.jsonl"))
            .with_context(|| format!("opening {}", dir.join("scalars.jsonl").display()))?;
        Ok(Self { events, jsonl, path })
    }

    pub fn add_scalar(&mut self, tag: &str, value: f64, step: i64) -> Result<()> {
        let t = now();
        self.events.write_all(&record(&event(t, step, None, Some((tag, value as f32)))))?;
        self.events.flush()?;
        let line = serde_json::json!({"tag": tag, "step": step, "value": if value.is_finite() { Some(value) } else { None }, "wall_time": t});
        writeln!(self.jsonl, "{line}")?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32c_matches_the_standard_check_value() {
        // The CRC catalogue's check value for CRC-32C over "123456789".
        assert_eq!(crc32c(b"123456789"), 0xE306_9283);
        assert_eq!(crc32c(b""), 0);
    }

    #[test]
    fn varint_and_record_framing() {
        let mut v = vec![];
        varint(300, &mut v);
        assert_eq!(v, [0xac, 0x02]); // the protobuf docs' example
        let r = record(b"abc");
        assert_eq!(&r[..8], &3u64.to_le_bytes());
        assert_eq!(&r[12..15], b"abc");
        assert_eq!(u32::from_le_bytes(r[15..19].try_into().unwrap()), masked_crc(b"abc"));
    }
}
