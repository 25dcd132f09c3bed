//! The IDX format of MNIST and Fashion-MNIST (yann.lecun.com/exdb/mnist): a big-endian header
//! `0x00 0x00 <type> <ndim>`, then `ndim` u32 sizes, then the data. Plain or gzipped (detected by
//! the gzip magic, not the file name). Every check names the file and what is wrong.

use anyhow::{bail, Context, Result};
use std::io::Read;
use std::path::Path;

/// An IDX array of unsigned bytes (the only element type MNIST-style files use).
#[derive(Debug, Clone, PartialEq)]
pub struct IdxU8 {
    pub dims: Vec<usize>,
    pub data: Vec<u8>,
}

const TYPE_U8: u8 = 0x08;

/// Reads a whole IDX file of u8 elements, plain or gzipped.
pub fn read_idx_u8(path: &Path) -> Result<IdxU8> {
    let raw = std::fs::read(path).with_context(|| format!("reading IDX file {}", path.display()))?;
    let bytes = if raw.starts_with(&[0x1f, 0x8b]) {
        let mut out = Vec::with_capacity(raw.len() * 4);
        flate2::read::GzDecoder::new(&raw[..])
            .read_to_end(&mut out)
            .with_context(|| format!("{}: corrupt or truncated gzip stream", path.display()))?;
        out
    } else {
        raw
    };
    parse_idx_u8(&bytes).with_context(|| format!("{} is not a valid IDX file", path.display()))
}

/// Parses IDX bytes (already decompressed).
pub fn parse_idx_u8(b: &[u8]) -> Result<IdxU8> {
    if b.len() < 4 {
        bail!("file is {} bytes, shorter than the 4-byte magic number", b.len());
    }
    if b[0] != 0 || b[1] != 0 {
        bail!("bad magic number {:02x}{:02x}{:02x}{:02x}: the first two bytes must be zero", b[0], b[1], b[2], b[3]);
    }
    if b[2] != TYPE_U8 {
        bail!("element type 0x{:02x} is not supported (expected 0x08, unsigned byte)", b[2]);
    }
    let ndim = b[3] as usize;
    if ndim == 0 {
        bail!("magic number says 0 dimensions");
    }
    let header = 4 + 4 * ndim;
    if b.len() < header {
        bail!("file is {} bytes, shorter than its {header}-byte header ({ndim} dimensions)", b.len());
    }
    let dims: Vec<usize> =
        (0..ndim).map(|i| u32::from_be_bytes(b[4 + 4 * i..8 + 4 * i].try_into().unwrap()) as usize).collect();
    let count = dims.iter().try_fold(1usize, |a, &d| a.checked_mul(d)).context("dimensions overflow")?;
    let have = b.len() - header;
    if have != count {
        bail!(
            "header says {dims:?} = {count} elements but the file holds {have} data bytes ({})",
            if have < count { "truncated" } else { "trailing bytes" }
        );
    }
    Ok(IdxU8 { dims, data: b[header..].to_vec() })
}

/// An image set and its labels from a pair of IDX files, checked against each other.
pub struct ImageSet {
    /// (n, rows, cols) pixels 0..=255.
    pub images: IdxU8,
    /// n labels.
    pub labels: Vec<u8>,
}

impl ImageSet {
    pub fn load(images: &Path, labels: &Path) -> Result<Self> {
        let im = read_idx_u8(images)?;
        let lb = read_idx_u8(labels)?;
        if im.dims.len() != 3 {
            bail!("{}: expected 3 dimensions (n, rows, cols), got {:?}", images.display(), im.dims);
        }
        if lb.dims.len() != 1 {
            bail!("{}: expected 1 dimension (n), got {:?}", labels.display(), lb.dims);
        }
        if im.dims[0] != lb.dims[0] {
            bail!(
                "{} holds {} images but {} holds {} labels",
                images.display(),
                im.dims[0],
                labels.display(),
                lb.dims[0]
            );
        }
        Ok(Self { images: im, labels: lb.data })
    }

    pub fn len(&self) -> usize {
        self.labels.len()
    }

    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    /// (rows, cols)
    pub fn image_size(&self) -> (usize, usize) {
        (self.images.dims[1], self.images.dims[2])
    }

    /// The pixels of image `i`.
    pub fn image(&self, i: usize) -> &[u8] {
        let (r, c) = self.image_size();
        &self.images.data[i * r * c..(i + 1) * r * c]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn idx(dims: &[u32], data: &[u8]) -> Vec<u8> {
        let mut v = vec![0, 0, 8, dims.len() as u8];
        for d in dims {
            v.extend_from_slice(&d.to_be_bytes());
        }
        v.extend_from_slice(data);
        v
    }

    fn tmpdir(name: &str) -> std::path::PathBuf {
        let d = std::env::temp_dir().join(format!("course-idx-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn reads_plain_and_gzipped_files_written_here() {
        let d = tmpdir("ok");
        let pixels: Vec<u8> = (0..2 * 3 * 4).map(|i| i as u8 * 7).collect();
        std::fs::write(d.join("im"), idx(&[2, 3, 4], &pixels)).unwrap();
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        gz.write_all(&idx(&[2], &[5, 9])).unwrap();
        std::fs::write(d.join("lb.gz"), gz.finish().unwrap()).unwrap();
        let set = ImageSet::load(&d.join("im"), &d.join("lb.gz")).unwrap();
        assert_eq!(set.len(), 2);
        assert_eq!(set.image_size(), (3, 4));
        assert_eq!(set.image(1), &pixels[12..24]);
        assert_eq!(set.labels, [5, 9]);
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn errors_name_the_file_and_the_problem() {
        let d = tmpdir("bad");
        let msg = |p: &Path| format!("{:#}", read_idx_u8(p).unwrap_err());
        std::fs::write(d.join("magic"), [1, 0, 8, 1, 0, 0, 0, 1, 0]).unwrap();
        let e = msg(&d.join("magic"));
        assert!(e.contains("magic") && e.contains("bad magic number 01000801"), "{e}");
        std::fs::write(d.join("short"), idx(&[10], &[1, 2, 3])).unwrap();
        let e = msg(&d.join("short"));
        assert!(e.contains("short") && e.contains("10 elements") && e.contains("truncated"), "{e}");
        std::fs::write(d.join("type"), [0, 0, 0x0d, 1, 0, 0, 0, 0]).unwrap();
        assert!(msg(&d.join("type")).contains("element type 0x0d"));
        std::fs::write(d.join("tiny"), [0, 0]).unwrap();
        assert!(msg(&d.join("tiny")).contains("shorter than the 4-byte magic"));
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        gz.write_all(&idx(&[4], &[1, 2, 3, 4])).unwrap();
        let bytes = gz.finish().unwrap();
        std::fs::write(d.join("cut.gz"), &bytes[..bytes.len() - 6]).unwrap();
        assert!(msg(&d.join("cut.gz")).contains("corrupt or truncated gzip"), "{}", msg(&d.join("cut.gz")));
        let e = msg(&d.join("missing"));
        assert!(e.contains("missing") && e.contains("No such file"), "{e}");
        std::fs::write(d.join("a"), idx(&[2, 1, 1], &[0, 0])).unwrap();
        std::fs::write(d.join("b"), idx(&[3], &[0, 0, 0])).unwrap();
        let e = format!("{:#}", ImageSet::load(&d.join("a"), &d.join("b")).err().unwrap());
        assert!(e.contains("2 images") && e.contains("3 labels"), "{e}");
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn real_mnist_has_the_documented_label_counts() {
        // Runs where setup.py has fetched MNIST (always in CI, which runs setup first).
        let root = crate::data::registry::data_root().join("mnist");
        if !root.join(".ok").exists() {
            eprintln!("skipped: MNIST not installed (python3 scripts/setup.py --data mnist)");
            return;
        }
        let s = ImageSet::load(&root.join("train-images-idx3-ubyte"), &root.join("train-labels-idx1-ubyte")).unwrap();
        assert_eq!((s.len(), s.image_size()), (60_000, (28, 28)));
        let mut counts = [0usize; 10];
        s.labels.iter().for_each(|&l| counts[l as usize] += 1);
        // DATA.md: train label counts.
        assert_eq!(counts, [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]);
    }
}
