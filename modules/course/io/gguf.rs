//! GGUF, the single-file model format of llama.cpp and ggml (version 2 and 3): a reader over a
//! memory map, dequantization of the common types to tch tensors, raw access to the quantized
//! blocks, and a writer.
//!
//! Layout (little-endian): `"GGUF"`, version `u32`, tensor count `u64`, metadata count `u64`;
//! the metadata as (string key, `u32` value type, value); one info per tensor (name, `u32` dims,
//! `u64` extents innermost first, `u32` ggml type, `u64` offset into the data section); padding
//! to `general.alignment` (32 by default); the tensor data, each tensor at an aligned offset.
//! Strings are a `u64` byte length and UTF-8 bytes. A tensor's extents list the fastest-varying
//! dimension first, so the torch shape is the reverse: `attn_k` stored as `[576, 192]` is a
//! `(192, 576)` weight.
//!
//! Block types follow ggml's `ggml-common.h`: `Q8_0` is an fp16 scale `d` and 32 `i8` (x = d q);
//! `Q4_0` is `d` and 16 bytes of nibbles (x = d (q - 8)); `Q4_1` is `d`, an fp16 minimum `m` and
//! 16 bytes of nibbles (x = d q + m). In both 4-bit types byte `j` holds element `j` in its low
//! nibble and element `j + 16` in its high nibble.

use crate::sys::fsutil;
use anyhow::{bail, Context, Result};
use half::{bf16, f16};
use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use tch::{Kind, Tensor};

const MAGIC: &[u8; 4] = b"GGUF";
/// The alignment when the file has no `general.alignment` key.
pub const DEFAULT_ALIGNMENT: u64 = 32;
/// ggml's GGML_MAX_DIMS.
const MAX_DIMS: u32 = 4;
/// Nesting limit for arrays of arrays (the format allows it; real files nest at most once).
const MAX_DEPTH: usize = 4;

/// A metadata value. Arrays keep their element type even when empty.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    F32(f32),
    Bool(bool),
    Str(String),
    Array(ValueType, Vec<Value>),
    U64(u64),
    I64(i64),
    F64(f64),
}

/// GGUF's value type codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ValueType {
    U8 = 0,
    I8 = 1,
    U16 = 2,
    I16 = 3,
    U32 = 4,
    I32 = 5,
    F32 = 6,
    Bool = 7,
    Str = 8,
    Array = 9,
    U64 = 10,
    I64 = 11,
    F64 = 12,
}

impl ValueType {
    /// Every type, at the index of its code.
    const ALL: [ValueType; 13] = {
        use ValueType::*;
        [U8, I8, U16, I16, U32, I32, F32, Bool, Str, Array, U64, I64, F64]
    };

    fn from_u32(v: u32) -> Option<Self> {
        Self::ALL.get(v as usize).copied()
    }
}

impl Value {
    pub fn value_type(&self) -> ValueType {
        match self {
            Value::U8(_) => ValueType::U8,
            Value::I8(_) => ValueType::I8,
            Value::U16(_) => ValueType::U16,
            Value::I16(_) => ValueType::I16,
            Value::U32(_) => ValueType::U32,
            Value::I32(_) => ValueType::I32,
            Value::F32(_) => ValueType::F32,
            Value::Bool(_) => ValueType::Bool,
            Value::Str(_) => ValueType::Str,
            Value::Array(..) => ValueType::Array,
            Value::U64(_) => ValueType::U64,
            Value::I64(_) => ValueType::I64,
            Value::F64(_) => ValueType::F64,
        }
    }

    /// Any integer type that fits, as u64 (negative integers are None).
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            Value::U8(v) => Some(v.into()),
            Value::U16(v) => Some(v.into()),
            Value::U32(v) => Some(v.into()),
            Value::U64(v) => Some(v),
            Value::I8(v) => u64::try_from(v).ok(),
            Value::I16(v) => u64::try_from(v).ok(),
            Value::I32(v) => u64::try_from(v).ok(),
            Value::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }

    /// Any number, as f64.
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            Value::F32(v) => Some(v.into()),
            Value::F64(v) => Some(v),
            Value::I8(v) => Some(v.into()),
            Value::I16(v) => Some(v.into()),
            Value::I32(v) => Some(v.into()),
            Value::I64(v) => Some(v as f64),
            _ => self.as_u64().map(|v| v as f64),
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::Str(s) => Some(s),
            _ => None,
        }
    }

    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            Value::Bool(b) => Some(b),
            _ => None,
        }
    }

    pub fn as_array(&self) -> Option<&[Value]> {
        match self {
            Value::Array(_, v) => Some(v),
            _ => None,
        }
    }

    /// The value as JSON (numbers, strings, booleans, arrays), e.g. for a fixture or a report.
    pub fn to_json(&self) -> serde_json::Value {
        use serde_json::json;
        match self {
            Value::Str(s) => json!(s),
            Value::Bool(b) => json!(b),
            Value::F32(v) => json!(v),
            Value::F64(v) => json!(v),
            Value::Array(_, v) => serde_json::Value::Array(v.iter().map(Value::to_json).collect()),
            Value::I8(_) | Value::I16(_) | Value::I32(_) | Value::I64(_) => json!(self.as_f64().unwrap() as i64),
            _ => json!(self.as_u64().unwrap()),
        }
    }
}

impl fmt::Display for Value {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Value::Str(s) if s.len() > 60 => write!(f, "{:?}... ({} bytes)", &s[..s.floor_char_boundary(60)], s.len()),
            Value::Array(t, v) => write!(f, "[{t:?}; {}]", v.len()),
            _ => write!(f, "{}", self.to_json()),
        }
    }
}

/// The ggml tensor types this module knows the size of. Only F32, F16, BF16, Q8_0, Q4_0 and Q4_1
/// dequantize; the others can be read as raw blocks and written back unchanged.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum GgmlType {
    F32,
    F16,
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q8_0,
    Q8_1,
    Q2K,
    Q3K,
    Q4K,
    Q5K,
    Q6K,
    Q8K,
    I8,
    I16,
    I32,
    I64,
    F64,
    BF16,
}

impl GgmlType {
    /// (ggml id, name, elements per block, bytes per block).
    const TABLE: &'static [(GgmlType, u32, &'static str, u64, u64)] = &[
        (GgmlType::F32, 0, "F32", 1, 4),
        (GgmlType::F16, 1, "F16", 1, 2),
        (GgmlType::Q4_0, 2, "Q4_0", 32, 18),
        (GgmlType::Q4_1, 3, "Q4_1", 32, 20),
        (GgmlType::Q5_0, 6, "Q5_0", 32, 22),
        (GgmlType::Q5_1, 7, "Q5_1", 32, 24),
        (GgmlType::Q8_0, 8, "Q8_0", 32, 34),
        (GgmlType::Q8_1, 9, "Q8_1", 32, 36),
        (GgmlType::Q2K, 10, "Q2_K", 256, 84),
        (GgmlType::Q3K, 11, "Q3_K", 256, 110),
        (GgmlType::Q4K, 12, "Q4_K", 256, 144),
        (GgmlType::Q5K, 13, "Q5_K", 256, 176),
        (GgmlType::Q6K, 14, "Q6_K", 256, 210),
        (GgmlType::Q8K, 15, "Q8_K", 256, 292),
        (GgmlType::I8, 24, "I8", 1, 1),
        (GgmlType::I16, 25, "I16", 1, 2),
        (GgmlType::I32, 26, "I32", 1, 4),
        (GgmlType::I64, 27, "I64", 1, 8),
        (GgmlType::F64, 28, "F64", 1, 8),
        (GgmlType::BF16, 30, "BF16", 1, 2),
    ];

    fn row(self) -> &'static (GgmlType, u32, &'static str, u64, u64) {
        Self::TABLE.iter().find(|r| r.0 == self).expect("every GgmlType is in TABLE")
    }

    pub fn from_id(id: u32) -> Option<Self> {
        Self::TABLE.iter().find(|r| r.1 == id).map(|r| r.0)
    }

    /// The type named as ggml and gguf-py name it (`"Q4_1"`, `"F32"`, ...).
    pub fn from_name(name: &str) -> Option<Self> {
        Self::TABLE.iter().find(|r| r.2.eq_ignore_ascii_case(name)).map(|r| r.0)
    }

    pub fn id(self) -> u32 {
        self.row().1
    }

    pub fn name(self) -> &'static str {
        self.row().2
    }

    /// Elements per block (1 for the plain types).
    pub fn block_elems(self) -> u64 {
        self.row().3
    }

    /// Bytes per block.
    pub fn block_bytes(self) -> u64 {
        self.row().4
    }

    /// Whether [`dequantize`] and [`quantize`] handle this type.
    pub fn is_supported(self) -> bool {
        matches!(
            self,
            GgmlType::F32 | GgmlType::F16 | GgmlType::BF16 | GgmlType::Q8_0 | GgmlType::Q4_0 | GgmlType::Q4_1
        )
    }
}

impl fmt::Display for GgmlType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// One tensor's entry in the file.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorInfo {
    pub name: String,
    /// Extents as stored: innermost (contiguous) first.
    pub dims: Vec<u64>,
    pub ty: GgmlType,
    /// Offset from the start of the data section.
    pub offset: u64,
}

impl TensorInfo {
    /// The torch shape: the stored extents reversed.
    pub fn shape(&self) -> Vec<i64> {
        self.dims.iter().rev().map(|&d| d as i64).collect()
    }

    pub fn numel(&self) -> u64 {
        self.dims.iter().product()
    }

    /// Bytes of data: whole blocks along the innermost extent.
    pub fn n_bytes(&self) -> u64 {
        self.numel() / self.ty.block_elems() * self.ty.block_bytes()
    }
}

/// An open GGUF file: metadata and tensor infos parsed, the data memory-mapped.
pub struct GgufFile {
    path: PathBuf,
    map: memmap2::Mmap,
    pub version: u32,
    /// Metadata in file order.
    pub metadata: Vec<(String, Value)>,
    index: BTreeMap<String, usize>,
    pub tensors: Vec<TensorInfo>,
    by_name: BTreeMap<String, usize>,
    pub alignment: u64,
    /// File offset of the data section.
    pub data_offset: u64,
}

impl fmt::Debug for GgufFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "GgufFile({}, v{}, {} metadata keys, {} tensors)",
            self.path.display(),
            self.version,
            self.metadata.len(),
            self.tensors.len()
        )
    }
}

/// A bounds-checked little-endian reader over the file's bytes whose errors name the byte offset.
struct Cursor<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: u64, what: &dyn Fn() -> String) -> Result<&'a [u8]> {
        let left = (self.buf.len() - self.pos) as u64;
        if n > left {
            bail!(
                "truncated at byte {}: {} needs {n} bytes but the file has {left} left ({} bytes in all)",
                self.pos,
                what(),
                self.buf.len()
            );
        }
        let s = &self.buf[self.pos..self.pos + n as usize];
        self.pos += n as usize;
        Ok(s)
    }
    fn u32(&mut self, what: &dyn Fn() -> String) -> Result<u32> {
        Ok(u32::from_le_bytes(self.take(4, what)?.try_into().unwrap()))
    }
    fn u64(&mut self, what: &dyn Fn() -> String) -> Result<u64> {
        Ok(u64::from_le_bytes(self.take(8, what)?.try_into().unwrap()))
    }
    fn string(&mut self, what: &dyn Fn() -> String) -> Result<String> {
        let at = self.pos;
        let n = self.u64(&|| format!("the length of {}", what()))?;
        let bytes = self.take(n, &|| format!("{} ({n}-byte string starting at byte {at})", what()))?;
        String::from_utf8(bytes.to_vec()).map_err(|e| anyhow::anyhow!("{} at byte {at} is not UTF-8: {e}", what()))
    }
    fn value(&mut self, t: ValueType, what: &dyn Fn() -> String, depth: usize) -> Result<Value> {
        Ok(match t {
            ValueType::U8 => Value::U8(self.take(1, what)?[0]),
            ValueType::I8 => Value::I8(self.take(1, what)?[0] as i8),
            ValueType::U16 => Value::U16(u16::from_le_bytes(self.take(2, what)?.try_into().unwrap())),
            ValueType::I16 => Value::I16(i16::from_le_bytes(self.take(2, what)?.try_into().unwrap())),
            ValueType::U32 => Value::U32(self.u32(what)?),
            ValueType::I32 => Value::I32(self.u32(what)? as i32),
            ValueType::F32 => Value::F32(f32::from_bits(self.u32(what)?)),
            ValueType::Bool => {
                let at = self.pos;
                match self.take(1, what)?[0] {
                    0 => Value::Bool(false),
                    1 => Value::Bool(true),
                    b => bail!("{} at byte {at}: a bool must be 0 or 1, got {b}", what()),
                }
            }
            ValueType::Str => Value::Str(self.string(what)?),
            ValueType::U64 => Value::U64(self.u64(what)?),
            ValueType::I64 => Value::I64(self.u64(what)? as i64),
            ValueType::F64 => Value::F64(f64::from_bits(self.u64(what)?)),
            ValueType::Array => {
                let at = self.pos;
                if depth >= MAX_DEPTH {
                    bail!("{} at byte {at}: arrays nested deeper than {MAX_DEPTH}", what());
                }
                let code = self.u32(&|| format!("the element type of {}", what()))?;
                let et = ValueType::from_u32(code)
                    .with_context(|| format!("{} at byte {at}: unknown array element type {code}", what()))?;
                let n = self.u64(&|| format!("the length of {}", what()))?;
                // Every element takes at least one byte: a count beyond the bytes left is corrupt,
                // and refusing it here keeps a bad count from allocating.
                let left = (self.buf.len() - self.pos) as u64;
                if n > left {
                    bail!("{} at byte {at}: array of {n} elements but only {left} bytes left in the file", what());
                }
                let mut v = Vec::with_capacity(n as usize);
                for i in 0..n {
                    v.push(self.value(et, &|| format!("element {i} of {}", what()), depth + 1)?);
                }
                Value::Array(et, v)
            }
        })
    }
}

impl GgufFile {
    /// Opens, memory-maps and parses `path`. Every error names the file, the field and the byte
    /// offset where it went wrong.
    pub fn open(path: &Path) -> Result<Self> {
        let file = std::fs::File::open(path).with_context(|| format!("opening GGUF file {}", path.display()))?;
        // SAFETY: the map is read-only; the course never writes a GGUF in place (the writer goes
        // through a temp file and a rename), so the mapped bytes do not change under us.
        let map = unsafe { memmap2::Mmap::map(&file) }.with_context(|| format!("memory-mapping {}", path.display()))?;
        Self::parse(path, map).with_context(|| format!("reading GGUF file {}", path.display()))
    }

    fn parse(path: &Path, map: memmap2::Mmap) -> Result<Self> {
        let mut c = Cursor { buf: &map, pos: 0 };
        let magic = c.take(4, &|| "the magic".into())?;
        if magic != MAGIC {
            bail!("not a GGUF file: the magic at byte 0 is {:?}, expected \"GGUF\"", String::from_utf8_lossy(magic));
        }
        let version = c.u32(&|| "the version".into())?;
        if !(2..=3).contains(&version) {
            bail!("unsupported GGUF version {version} at byte 4 (this reader takes versions 2 and 3)");
        }
        let n_tensors = c.u64(&|| "the tensor count".into())?;
        let n_kv = c.u64(&|| "the metadata count".into())?;
        // Each metadata entry and tensor info takes at least 8 bytes.
        let size = map.len() as u64;
        if n_tensors > size / 8 || n_kv > size / 8 {
            bail!("tensor count {n_tensors} (byte 8) or metadata count {n_kv} (byte 16) is larger than a {size}-byte file can hold");
        }
        let mut metadata = Vec::with_capacity(n_kv as usize);
        let mut index = BTreeMap::new();
        for i in 0..n_kv {
            let at = c.pos;
            let key = c.string(&|| format!("the key of metadata entry {i}"))?;
            let tat = c.pos;
            let code = c.u32(&|| format!("the value type of metadata key {key:?}"))?;
            let t = ValueType::from_u32(code).with_context(|| {
                format!("metadata key {key:?} (entry {i}, byte {at}): unknown value type {code} at byte {tat}")
            })?;
            let v = c.value(t, &|| format!("the value of metadata key {key:?}"), 0)?;
            if index.insert(key.clone(), metadata.len()).is_some() {
                bail!("metadata key {key:?} appears twice (the second at byte {at})");
            }
            metadata.push((key, v));
        }
        let alignment = match index.get("general.alignment").map(|&i| &metadata[i].1) {
            None => DEFAULT_ALIGNMENT,
            Some(Value::U32(a)) if *a > 0 && a.is_power_of_two() => u64::from(*a),
            Some(v) => bail!("metadata general.alignment must be a u32 power of two, got {v}"),
        };
        let mut tensors = Vec::with_capacity(n_tensors as usize);
        let mut by_name = BTreeMap::new();
        for i in 0..n_tensors {
            let at = c.pos;
            let name = c.string(&|| format!("the name of tensor {i}"))?;
            let what = |field: &str| format!("the {field} of tensor {name:?} (info at byte {at})");
            let n_dims = c.u32(&|| what("dimension count"))?;
            if n_dims == 0 || n_dims > MAX_DIMS {
                bail!("{}: {n_dims} dimensions, expected 1 to {MAX_DIMS}", what("dimension count"));
            }
            let mut dims = Vec::with_capacity(n_dims as usize);
            for d in 0..n_dims {
                dims.push(c.u64(&|| what(&format!("extent {d}")))?);
            }
            let numel = dims.iter().try_fold(1u64, |a, &d| a.checked_mul(d));
            if dims.contains(&0) || numel.is_none() {
                bail!("{}: extents {dims:?} are zero or overflow", what("shape"));
            }
            let tat = c.pos;
            let code = c.u32(&|| what("type"))?;
            let ty = GgmlType::from_id(code)
                .with_context(|| format!("tensor {name:?}: unknown ggml type {code} at byte {tat}"))?;
            if dims[0] % ty.block_elems() != 0 {
                bail!(
                    "tensor {name:?}: its rows of {} elements are not whole {ty} blocks of {}",
                    dims[0],
                    ty.block_elems()
                );
            }
            let oat = c.pos;
            let offset = c.u64(&|| what("data offset"))?;
            if offset % alignment != 0 {
                bail!("tensor {name:?}: data offset {offset} (field at byte {oat}) is not a multiple of the alignment {alignment}");
            }
            if by_name.insert(name.clone(), tensors.len()).is_some() {
                bail!("tensor name {name:?} appears twice (the second at byte {at})");
            }
            tensors.push(TensorInfo { name, dims, ty, offset });
        }
        let data_offset = (c.pos as u64).div_ceil(alignment) * alignment;
        for t in &tensors {
            let end = data_offset.checked_add(t.offset).and_then(|s| s.checked_add(t.n_bytes()));
            match end {
                Some(end) if end <= size => {}
                _ => bail!(
                    "tensor {:?} ({} {:?}) runs past the end of the file: its {} bytes start at byte {} but the file is {size} bytes",
                    t.name,
                    t.ty,
                    t.shape(),
                    t.n_bytes(),
                    data_offset + t.offset
                ),
            }
        }
        Ok(Self { path: path.to_path_buf(), map, version, metadata, index, tensors, by_name, alignment, data_offset })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn get(&self, key: &str) -> Option<&Value> {
        self.index.get(key).map(|&i| &self.metadata[i].1)
    }

    /// A metadata value that must be there.
    pub fn require(&self, key: &str) -> Result<&Value> {
        self.get(key).with_context(|| format!("{}: no metadata key {key:?}", self.path.display()))
    }

    pub fn require_u64(&self, key: &str) -> Result<u64> {
        let v = self.require(key)?;
        v.as_u64()
            .with_context(|| format!("{}: metadata {key:?} is {v}, expected an unsigned integer", self.path.display()))
    }

    pub fn require_f64(&self, key: &str) -> Result<f64> {
        let v = self.require(key)?;
        v.as_f64().with_context(|| format!("{}: metadata {key:?} is {v}, expected a number", self.path.display()))
    }

    pub fn require_str(&self, key: &str) -> Result<&str> {
        let v = self.require(key)?;
        v.as_str().with_context(|| format!("{}: metadata {key:?} is {v}, expected a string", self.path.display()))
    }

    /// A metadata array of strings (e.g. `tokenizer.ggml.tokens`).
    pub fn require_strings(&self, key: &str) -> Result<Vec<&str>> {
        let v = self.require(key)?;
        let bad = || format!("{}: metadata {key:?} is {v}, expected an array of strings", self.path.display());
        v.as_array().with_context(bad)?.iter().map(|s| s.as_str().with_context(bad)).collect()
    }

    pub fn tensor(&self, name: &str) -> Option<&TensorInfo> {
        self.by_name.get(name).map(|&i| &self.tensors[i])
    }

    pub fn require_tensor(&self, name: &str) -> Result<&TensorInfo> {
        self.tensor(name).with_context(|| format!("{}: no tensor {name:?}", self.path.display()))
    }

    /// The tensor's bytes as stored (quantized blocks for the block types), borrowed from the map.
    pub fn raw(&self, t: &TensorInfo) -> &[u8] {
        let start = (self.data_offset + t.offset) as usize;
        &self.map[start..start + t.n_bytes() as usize]
    }

    /// The tensor dequantized into a tch tensor of the torch shape, in `kind` (Float, BFloat16,
    /// Half or Double), on the CPU. Types without a dequantizer are refused by name.
    pub fn dequantize(&self, name: &str, kind: Kind) -> Result<Tensor> {
        let t = self.require_tensor(name)?;
        let values = dequantize(t.ty, self.raw(t), t.numel() as usize)
            .with_context(|| format!("{}: tensor {name:?}", self.path.display()))?;
        let out = Tensor::from_slice(&values).view(t.shape().as_slice());
        Ok(if kind == Kind::Float { out } else { out.to_kind(kind) })
    }
}

fn f16_at(b: &[u8], i: usize) -> f32 {
    f16::from_le_bytes([b[i], b[i + 1]]).to_f32()
}

/// `n` values from `bytes` of type `ty` (whole blocks). Refuses the types it does not know.
pub fn dequantize(ty: GgmlType, bytes: &[u8], n: usize) -> Result<Vec<f32>> {
    let (be, bb) = (ty.block_elems() as usize, ty.block_bytes() as usize);
    if n % be != 0 || bytes.len() != n / be * bb {
        bail!("{ty}: {} bytes do not hold {n} values in whole blocks of {be} ({bb} bytes each)", bytes.len());
    }
    let mut out = vec![0f32; n];
    match ty {
        GgmlType::F32 => {
            for (o, c) in out.iter_mut().zip(bytes.chunks_exact(4)) {
                *o = f32::from_le_bytes(c.try_into().unwrap());
            }
        }
        GgmlType::F16 => {
            for (o, c) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                *o = f16::from_le_bytes([c[0], c[1]]).to_f32();
            }
        }
        GgmlType::BF16 => {
            for (o, c) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                *o = bf16::from_le_bytes([c[0], c[1]]).to_f32();
            }
        }
        GgmlType::Q8_0 => {
            for (o, b) in out.chunks_exact_mut(32).zip(bytes.chunks_exact(34)) {
                let d = f16_at(b, 0);
                for (x, &q) in o.iter_mut().zip(&b[2..]) {
                    *x = d * f32::from(q as i8);
                }
            }
        }
        GgmlType::Q4_0 => {
            for (o, b) in out.chunks_exact_mut(32).zip(bytes.chunks_exact(18)) {
                let d = f16_at(b, 0);
                for (j, &q) in b[2..].iter().enumerate() {
                    o[j] = d * (f32::from(q & 0x0f) - 8.0);
                    o[j + 16] = d * (f32::from(q >> 4) - 8.0);
                }
            }
        }
        GgmlType::Q4_1 => {
            for (o, b) in out.chunks_exact_mut(32).zip(bytes.chunks_exact(20)) {
                let (d, m) = (f16_at(b, 0), f16_at(b, 2));
                for (j, &q) in b[4..].iter().enumerate() {
                    o[j] = d * f32::from(q & 0x0f) + m;
                    o[j + 16] = d * f32::from(q >> 4) + m;
                }
            }
        }
        other => bail!(
            "ggml type {other} (id {}) has no dequantizer here; supported: F32, F16, BF16, Q8_0, Q4_0, Q4_1",
            other.id()
        ),
    }
    Ok(out)
}

/// `values` encoded as `ty`, as ggml's reference quantizers (`quantize_row_*_ref`) encode them.
pub fn quantize(ty: GgmlType, values: &[f32]) -> Result<Vec<u8>> {
    let be = ty.block_elems() as usize;
    if values.len() % be != 0 {
        bail!("{ty}: {} values are not whole blocks of {be}", values.len());
    }
    let mut out = Vec::with_capacity(values.len() / be * ty.block_bytes() as usize);
    match ty {
        GgmlType::F32 => values.iter().for_each(|v| out.extend_from_slice(&v.to_le_bytes())),
        GgmlType::F16 => values.iter().for_each(|v| out.extend_from_slice(&f16::from_f32(*v).to_le_bytes())),
        GgmlType::BF16 => values.iter().for_each(|v| out.extend_from_slice(&bf16::from_f32(*v).to_le_bytes())),
        GgmlType::Q8_0 => {
            for b in values.chunks_exact(32) {
                let amax = b.iter().fold(0f32, |a, x| a.max(x.abs()));
                let d = amax / 127.0;
                let id = if d != 0.0 { 1.0 / d } else { 0.0 };
                out.extend_from_slice(&f16::from_f32(d).to_le_bytes());
                out.extend(b.iter().map(|x| (x * id).round() as i8 as u8));
            }
        }
        GgmlType::Q4_0 => {
            for b in values.chunks_exact(32) {
                // The value of largest magnitude, with its sign, maps to -8.
                let max = b.iter().fold(0f32, |a, &x| if x.abs() > a.abs() { x } else { a });
                let d = max / -8.0;
                let id = if d != 0.0 { 1.0 / d } else { 0.0 };
                out.extend_from_slice(&f16::from_f32(d).to_le_bytes());
                let q = |x: f32| ((x * id + 8.5) as i32).clamp(0, 15) as u8;
                out.extend((0..16).map(|j| q(b[j]) | (q(b[j + 16]) << 4)));
            }
        }
        GgmlType::Q4_1 => {
            for b in values.chunks_exact(32) {
                let (min, max) =
                    b.iter().fold((f32::INFINITY, f32::NEG_INFINITY), |(lo, hi), &x| (lo.min(x), hi.max(x)));
                let d = (max - min) / 15.0;
                let id = if d != 0.0 { 1.0 / d } else { 0.0 };
                out.extend_from_slice(&f16::from_f32(d).to_le_bytes());
                out.extend_from_slice(&f16::from_f32(min).to_le_bytes());
                let q = |x: f32| (((x - min) * id + 0.5) as i32).min(15) as u8;
                out.extend((0..16).map(|j| q(b[j]) | (q(b[j + 16]) << 4)));
            }
        }
        other => bail!("ggml type {other} has no quantizer here; supported: F32, F16, BF16, Q8_0, Q4_0, Q4_1"),
    }
    Ok(out)
}

/// A GGUF file being assembled in memory, written in one go (temp file, fsync, rename).
#[derive(Debug, Default)]
pub struct GgufWriter {
    metadata: Vec<(String, Value)>,
    tensors: Vec<(TensorInfo, Vec<u8>)>,
    alignment: u64,
}

impl GgufWriter {
    pub fn new() -> Self {
        Self { alignment: DEFAULT_ALIGNMENT, ..Default::default() }
    }

    /// Sets (or replaces) a metadata key, keeping the first position it was set at.
    /// `general.alignment` also sets the alignment the writer uses.
    pub fn set(&mut self, key: &str, value: Value) -> Result<()> {
        if key == "general.alignment" {
            match value {
                Value::U32(a) if a > 0 && a.is_power_of_two() => self.alignment = u64::from(a),
                ref v => bail!("general.alignment must be a u32 power of two, got {v}"),
            }
        }
        match self.metadata.iter_mut().find(|(k, _)| k == key) {
            Some(slot) => slot.1 = value,
            None => self.metadata.push((key.to_string(), value)),
        }
        Ok(())
    }

    /// Copies every metadata key of `src` (e.g. the tokenizer and the architecture).
    pub fn copy_metadata(&mut self, src: &GgufFile) -> Result<()> {
        for (k, v) in &src.metadata {
            self.set(k, v.clone())?;
        }
        Ok(())
    }

    /// Adds `t` (any float dtype, any shape of at most 4 dimensions) encoded as `ty`.
    pub fn add_tensor(&mut self, name: &str, t: &Tensor, ty: GgmlType) -> Result<()> {
        let shape = t.size();
        if shape.is_empty() || shape.len() > MAX_DIMS as usize {
            bail!("tensor {name:?}: GGUF holds 1 to {MAX_DIMS} dimensions, got shape {shape:?}");
        }
        let dims: Vec<u64> = shape.iter().rev().map(|&d| d as u64).collect();
        if dims[0] % ty.block_elems() != 0 {
            bail!(
                "tensor {name:?} of shape {shape:?}: rows of {} are not whole {ty} blocks of {}",
                dims[0],
                ty.block_elems()
            );
        }
        let flat = t.detach().to_device(tch::Device::Cpu).to_kind(Kind::Float).contiguous().view([-1]);
        let values = Vec::<f32>::try_from(&flat).with_context(|| format!("tensor {name:?}: reading its values"))?;
        let bytes = quantize(ty, &values).with_context(|| format!("tensor {name:?}"))?;
        self.add_raw(name, &dims, ty, bytes)
    }

    /// Adds already-encoded bytes (e.g. a tensor copied unchanged from another GGUF's
    /// [`GgufFile::raw`]); `dims` innermost first, as stored.
    pub fn add_raw(&mut self, name: &str, dims: &[u64], ty: GgmlType, bytes: Vec<u8>) -> Result<()> {
        let info = TensorInfo { name: name.to_string(), dims: dims.to_vec(), ty, offset: 0 };
        if dims.is_empty() || dims.len() > MAX_DIMS as usize || dims.contains(&0) || dims[0] % ty.block_elems() != 0 {
            bail!("tensor {name:?}: extents {dims:?} are not 1-{MAX_DIMS} non-zero extents of whole {ty} blocks");
        }
        if info.n_bytes() != bytes.len() as u64 {
            bail!("tensor {name:?}: {} bytes given, {ty} {dims:?} takes {}", bytes.len(), info.n_bytes());
        }
        if self.tensors.iter().any(|(t, _)| t.name == name) {
            bail!("tensor {name:?} added twice");
        }
        self.tensors.push((info, bytes));
        Ok(())
    }

    /// The whole file as bytes (version 3).
    pub fn to_bytes(&self) -> Vec<u8> {
        fn string(out: &mut Vec<u8>, s: &str) {
            out.extend_from_slice(&(s.len() as u64).to_le_bytes());
            out.extend_from_slice(s.as_bytes());
        }
        fn value(out: &mut Vec<u8>, v: &Value) {
            match v {
                Value::U8(x) => out.push(*x),
                Value::I8(x) => out.push(*x as u8),
                Value::U16(x) => out.extend_from_slice(&x.to_le_bytes()),
                Value::I16(x) => out.extend_from_slice(&x.to_le_bytes()),
                Value::U32(x) => out.extend_from_slice(&x.to_le_bytes()),
                Value::I32(x) => out.extend_from_slice(&x.to_le_bytes()),
                Value::F32(x) => out.extend_from_slice(&x.to_le_bytes()),
                Value::Bool(x) => out.push(u8::from(*x)),
                Value::Str(s) => string(out, s),
                Value::Array(t, items) => {
                    out.extend_from_slice(&(*t as u32).to_le_bytes());
                    out.extend_from_slice(&(items.len() as u64).to_le_bytes());
                    items.iter().for_each(|i| value(out, i));
                }
                Value::U64(x) => out.extend_from_slice(&x.to_le_bytes()),
                Value::I64(x) => out.extend_from_slice(&x.to_le_bytes()),
                Value::F64(x) => out.extend_from_slice(&x.to_le_bytes()),
            }
        }
        let a = self.alignment;
        let mut out = Vec::new();
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&3u32.to_le_bytes());
        out.extend_from_slice(&(self.tensors.len() as u64).to_le_bytes());
        out.extend_from_slice(&(self.metadata.len() as u64).to_le_bytes());
        for (k, v) in &self.metadata {
            string(&mut out, k);
            out.extend_from_slice(&(v.value_type() as u32).to_le_bytes());
            value(&mut out, v);
        }
        let mut offset = 0u64;
        for (t, bytes) in &self.tensors {
            string(&mut out, &t.name);
            out.extend_from_slice(&(t.dims.len() as u32).to_le_bytes());
            t.dims.iter().for_each(|d| out.extend_from_slice(&d.to_le_bytes()));
            out.extend_from_slice(&t.ty.id().to_le_bytes());
            out.extend_from_slice(&offset.to_le_bytes());
            offset = (offset + bytes.len() as u64).div_ceil(a) * a;
        }
        out.resize((out.len() as u64).div_ceil(a) as usize * a as usize, 0);
        for (_, bytes) in &self.tensors {
            out.extend_from_slice(bytes);
            out.resize((out.len() as u64).div_ceil(a) as usize * a as usize, 0);
        }
        out
    }

    /// Writes the file atomically: a reader never sees half of it, and a file already at `path`
    /// is replaced only once the new one is complete on disk.
    pub fn write(&self, path: &Path) -> Result<()> {
        fsutil::write_atomic(path, &self.to_bytes()).with_context(|| format!("writing GGUF file {}", path.display()))
    }
}
