//! `y = x Wᵀ` with `W` stored quantized (量化), beside its reference (decode `W` in plain tch
//! ops, then a matmul in fp32). Kernels: `kernels/ops/qmatmul{,_cpu}.cpp`.
//!
//! Four storage formats, all `(N, K)` = (out, in):
//! - **int8**: `q` int8 `(N, K)` and one fp32 scale per row, `w = q · s`.
//! - **NF4** (QLoRA, bitsandbytes): 64-number blocks of the flattened weight, 4-bit indices into
//!   16 code values (two a byte, the first in the high nibble), each block scaled by its absmax;
//!   the absmaxes themselves stored as bytes into a 256-value code, times an fp32 scale per 256
//!   blocks, plus their mean (`offset`): `w = code16[i] · (code8[a_b] · s_{b/256} + offset)`.
//! - **Q4_1** (ggml): blocks of 32 along a row, 20 bytes each: fp16 `d`, fp16 `m`, 16 bytes of
//!   nibbles (numbers 0-15 in the low nibbles, 16-31 in the high ones), `w = q · d + m`.
//! - **Q8_0** (ggml): blocks of 32, 34 bytes: fp16 `d` and 32 int8, `w = q · d`.
//!
//! [`qlinear`] runs on the CPU with fp32 or bf16 inputs (the output has the input's dtype, the
//! sums are fp32). A few rows (decoding) go through a GEMV that decodes `W` in registers; more
//! rows through tiles of `W` decoded once for all rows and ATen's GEMM, or, for bf16 `x` on a CPU
//! with AMX and when asked for, our own AMX tile GEMM ([`amx`]). It is differentiable with
//! respect to `x` only (the base of LoRA / QLoRA is frozen): the backward decodes `W` for one
//! matmul and frees it, and the graph holds only the quantized bytes.

use crate::sys::ffi;
use anyhow::{bail, Result};
use tch::{Device, Kind, Tensor};

/// A quantized weight's storage format.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum QFormat {
    Int8,
    Nf4,
    Q4_1,
    Q8_0,
}

impl QFormat {
    pub fn name(self) -> &'static str {
        match self {
            QFormat::Int8 => "int8",
            QFormat::Nf4 => "nf4",
            QFormat::Q4_1 => "q4_1",
            QFormat::Q8_0 => "q8_0",
        }
    }
    fn id(self) -> i32 {
        match self {
            QFormat::Int8 => 0,
            QFormat::Nf4 => 1,
            QFormat::Q4_1 => 2,
            QFormat::Q8_0 => 3,
        }
    }
}

/// The tensors of one quantized weight `(n, k)`, as the kernels read them (see the module doc).
#[derive(Debug)]
pub struct QTensors {
    pub format: QFormat,
    pub n: i64,
    pub k: i64,
    /// int8: `q` int8 `(n, k)`; NF4: `n k / 2` bytes; ggml: `n` rows of blocks as bytes.
    pub data: Tensor,
    /// int8: fp32 per row; NF4: the fp32 nested absmaxes.
    pub scale: Option<Tensor>,
    /// NF4: one byte per block of 64.
    pub absmax_q: Option<Tensor>,
    /// NF4: the 256 fp32 values the absmax bytes index.
    pub code8: Option<Tensor>,
    /// NF4: the 16 fp32 NF4 values.
    pub code16: Option<Tensor>,
    /// NF4: the mean of the absmaxes, added back.
    pub offset: f64,
    /// Q4_1 / Q8_0: the same blocks repacked 16 rows at a time for the int8-activation GEMV
    /// (see [`QTensors::add_tiles`]); a second copy of the weight's bytes.
    pub tiles: Option<Tensor>,
}

impl QTensors {
    /// Bytes held by the weight (data and every side tensor).
    pub fn bytes(&self) -> i64 {
        let b = |t: &Option<Tensor>| t.as_ref().map_or(0, |t| t.numel() as i64 * t.kind().elt_size_in_bytes() as i64);
        self.data.numel() as i64 * self.data.kind().elt_size_in_bytes() as i64
            + b(&self.scale)
            + b(&self.absmax_q)
            + b(&self.code8)
            + b(&self.code16)
            + b(&self.tiles)
    }

    /// Adds the row-interleaved tiles that make [`qlinear_int8_activations`] read 4 numbers of
    /// 16 weight rows per register (one conversion and two FMAs per block of 32 and row of x,
    /// instead of per 2 blocks of one row), where they apply: Q4_1 or Q8_0 on the CPU, `n` a
    /// multiple of 16, and a CPU with the int8-activation path. Returns whether it added them.
    pub fn add_tiles(&mut self) -> Result<bool> {
        let fits = matches!(self.format, QFormat::Q4_1 | QFormat::Q8_0)
            && self.n % 16 == 0
            && self.k % 32 == 0
            && self.data.device() == Device::Cpu
            && int8_activations_supported(self.format, self.k);
        if !fits || self.tiles.is_some() {
            return Ok(self.tiles.is_some());
        }
        let ptrs = self.ptrs();
        let mut out = std::ptr::null_mut();
        // SAFETY: live tch tensors (or nulls) for the duration of the call; the array outlives it.
        ffi::check(unsafe { ffi::course_qtiles(self.format.id(), ptrs.as_ptr(), self.n, self.k, &mut out) })?;
        self.tiles = Some(ffi::take(out));
        Ok(true)
    }

    pub fn device(&self) -> Device {
        self.data.device()
    }

    /// A shallow copy (the same storage).
    pub fn shallow_clone(&self) -> QTensors {
        let s = |t: &Option<Tensor>| t.as_ref().map(|t| t.shallow_clone());
        QTensors {
            format: self.format,
            n: self.n,
            k: self.k,
            data: self.data.shallow_clone(),
            scale: s(&self.scale),
            absmax_q: s(&self.absmax_q),
            code8: s(&self.code8),
            code16: s(&self.code16),
            offset: self.offset,
            tiles: s(&self.tiles),
        }
    }

    fn ptrs(&self) -> [ffi::CTensor; 6] {
        let p = |t: &Option<Tensor>| t.as_ref().map_or(std::ptr::null_mut(), ffi::ptr);
        [ffi::ptr(&self.data), p(&self.scale), p(&self.absmax_q), p(&self.code8), p(&self.code16), p(&self.tiles)]
    }
}

/// `x Wᵀ` over a quantized `W`.
///
/// # Shapes
/// `x`: `(..., k)` -> `(..., n)`
pub fn qlinear(x: &Tensor, w: &QTensors) -> Result<Tensor> {
    qlinear_id(x, w, w.format.id())
}

fn qlinear_id(x: &Tensor, w: &QTensors, id: i32) -> Result<Tensor> {
    let ptrs = w.ptrs();
    let mut out = std::ptr::null_mut();
    // SAFETY: live tch tensors (or nulls) for the duration of the call; the array outlives it.
    ffi::check(unsafe { ffi::course_qlinear(id, ffi::ptr(x), ptrs.as_ptr(), w.offset, w.n, w.k, &mut out) })?;
    Ok(ffi::take(out))
}

/// Whether [`qlinear`]'s bf16 GEMM (more than 8 rows of bf16 `x`) runs on our AMX tiles in this
/// process, and why. It is opt-in (`COURSE_AMX=1` or [`set_amx`]): on the Intel Xeon the default
/// path, `W` decoded in panels for ATen's bf16 GEMM (oneDNN, on AMX itself), measured faster.
/// It takes where the CPU has AMX-TILE and AMX-BF16 and Linux granted the tile state
/// (`arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)`, asked once, by this call or the
/// first use); `COURSE_AMX=0` refuses it outright.
pub fn amx() -> (bool, String) {
    amx_call(-1)
}

/// Switches the AMX GEMM on or off for this process (on takes only where [`amx`] allows it);
/// returns the state after the switch. The benchmark's A/B.
pub fn set_amx(on: bool) -> (bool, String) {
    amx_call(on as i32)
}

fn amx_call(enable: i32) -> (bool, String) {
    let mut buf = [0u8; 256];
    // SAFETY: the buffer outlives the call and its length is passed; the callee NUL-terminates.
    let on = unsafe { ffi::course_qmatmul_amx(enable, buf.as_mut_ptr().cast(), buf.len() as i64) };
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    (on != 0, String::from_utf8_lossy(&buf[..end]).into_owned())
}

/// [`qlinear`] with int8 activations in the GEMV (at most 8 rows of `x`: decoding), llama.cpp's
/// route: each row of `x` is quantized to int8 in blocks (32 numbers for Q4_1 and Q8_0, 64 for
/// NF4; scale absmax / 127, round half to even) and meets `W` in AVX-512 VNNI byte dot products;
/// NF4's code values enter as `round(127 c) / 127`. [`qlinear_int8_activations_reference`] is
/// its reference. Where [`int8_activations_supported`] says no (another format, another CPU,
/// more than 8 rows on a weight without tiles), this is [`qlinear`] exactly. A weight with tiles
/// ([`QTensors::add_tiles`]) takes any number of rows, 8 at a time: prefill too.
pub fn qlinear_int8_activations(x: &Tensor, w: &QTensors) -> Result<Tensor> {
    qlinear_id(x, w, w.format.id() | 0x100)
}

/// Whether [`qlinear_int8_activations`] quantizes `x` for a weight of this format and `k`:
/// Q4_1 and Q8_0 with `k % 32 == 0`, NF4 with `k % 64 == 0`, on a CPU with AVX-512 VNNI (and
/// ATen's capability at AVX-512).
pub fn int8_activations_supported(format: QFormat, k: i64) -> bool {
    // SAFETY: plain values in and out.
    unsafe { ffi::course_qgemv_int8_activations(format.id(), k) != 0 }
}

/// How the quantized GEMVs prefetch `W` in software (the hardware's streamer stops at every
/// 4 KB page): not at all, non-temporally (`prefetchnta` of whole rows, 8 rows ahead: the
/// default on AMD, where it lifted the DRAM stream), or streamed (`prefetcht0` in the row loops,
/// one line for each 64 bytes read, 6 KB ahead: the default elsewhere; on the Intel Xeon it
/// lifted the 4096 x 4096 GEMVs from DRAM by 1.4-1.6x where the other two did nothing).
/// `COURSE_PREFETCH=0`, `1` or `2` sets the default; [`set_prefetch`] switches it for the
/// process (the benchmark's A/B). The results are the same in every mode, only the speed differs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Prefetch {
    Off = 0,
    NonTemporal = 1,
    Stream = 2,
}

/// The quantized GEMVs' prefetch in force.
pub fn prefetch() -> Prefetch {
    // SAFETY: plain values in and out.
    match unsafe { ffi::course_qgemv_prefetch(-1) } {
        1 => Prefetch::NonTemporal,
        2 => Prefetch::Stream,
        _ => Prefetch::Off,
    }
}

/// Sets the quantized GEMVs' prefetch for this process; returns the one before.
pub fn set_prefetch(p: Prefetch) -> Prefetch {
    let before = prefetch();
    // SAFETY: plain values in and out.
    unsafe { ffi::course_qgemv_prefetch(p as i32) };
    before
}

/// Reference for [`qlinear_int8_activations`] where it applies: `x` quantized in tch as the
/// kernel does it, `W` decoded by [`qdequantize_reference`] (NF4 with its code rounded to
/// 127ths), then a matmul in fp32.
pub fn qlinear_int8_activations_reference(x: &Tensor, w: &QTensors) -> Result<Tensor> {
    let block = if w.format == QFormat::Nf4 { 64 } else { 32 };
    if w.k % block != 0 || w.format == QFormat::Int8 {
        bail!("int8 activations: {} with in_features {} has no int8-activation path", w.format.name(), w.k);
    }
    let xf = x.to_kind(Kind::Float);
    let mut shape = xf.size();
    let k = w.k;
    let blocks = xf.reshape([-1, k / block, block]);
    let d = blocks.abs().amax([2], true) / 127.0;
    let q = (&blocks / d.clamp_min(f32::MIN_POSITIVE as f64)).round().clamp(-127, 127);
    let xq = (q * &d).reshape([-1, k]);
    let mut wr = w.shallow_clone();
    if w.format == QFormat::Nf4 {
        let code = w.code16.as_ref().map(|c| (c * 127.0).round() / 127.0);
        wr.code16 = code;
    }
    shape.pop();
    shape.push(w.n);
    Ok(xq.matmul(&qdequantize_reference(&wr)?.tr()).reshape(shape.as_slice()).to_kind(x.kind()))
}

/// `W` decoded by the kernels, `(n, k)` in fp32 or bf16.
pub fn qdequantize(w: &QTensors, kind: Kind) -> Result<Tensor> {
    let k = match kind {
        Kind::Float => 0,
        Kind::BFloat16 => 1,
        other => bail!("qdequantize: kind must be Float or BFloat16, got {other:?}"),
    };
    let ptrs = w.ptrs();
    let mut out = std::ptr::null_mut();
    // SAFETY: as in qlinear.
    ffi::check(unsafe { ffi::course_qdequantize(w.format.id(), ptrs.as_ptr(), w.offset, w.n, w.k, k, &mut out) })?;
    Ok(ffi::take(out))
}

/// Reference for [`qdequantize`]: `W` in fp32, decoded by plain tch ops from the definitions.
pub fn qdequantize_reference(w: &QTensors) -> Result<Tensor> {
    let need = |t: &Option<Tensor>, what: &str| match t {
        Some(t) => Ok(t.shallow_clone()),
        None => bail!("{}: the weight has no {what}", w.format.name()),
    };
    let (n, k) = (w.n, w.k);
    Ok(match w.format {
        QFormat::Int8 => w.data.to_kind(Kind::Float) * need(&w.scale, "scale")?.unsqueeze(1),
        QFormat::Nf4 => {
            let nb = n * k / 64;
            let a = need(&w.absmax_q, "absmax_q")?.to_kind(Kind::Int64);
            let group = Tensor::arange(nb, (Kind::Int64, w.device())).floor_divide_scalar(256);
            let absmax = need(&w.code8, "code8")?.index_select(0, &a)
                * need(&w.scale, "scale")?.index_select(0, &group)
                + w.offset;
            let p = w.data.to_kind(Kind::Int64);
            let idx = Tensor::stack(&[p.floor_divide_scalar(16), p.remainder(16)], 1).reshape([-1]);
            let vals = need(&w.code16, "code16")?.index_select(0, &idx).view([nb, 64]);
            (vals * absmax.unsqueeze(1)).reshape([n, k])
        }
        QFormat::Q4_1 | QFormat::Q8_0 => {
            let bb = if w.format == QFormat::Q4_1 { 20 } else { 34 };
            let blocks = w.data.view([-1, bb]);
            let f16 = |o: i64| blocks.narrow(1, o, 2).contiguous().view_dtype(Kind::Half).to_kind(Kind::Float);
            let d = f16(0);
            if w.format == QFormat::Q4_1 {
                let qs = blocks.narrow(1, 4, 16).to_kind(Kind::Int64);
                let q = Tensor::cat(&[qs.remainder(16), qs.floor_divide_scalar(16)], 1).to_kind(Kind::Float);
                (q * d + f16(2)).reshape([n, k])
            } else {
                let q = blocks.narrow(1, 2, 32).contiguous().view_dtype(Kind::Int8).to_kind(Kind::Float);
                (q * d).reshape([n, k])
            }
        }
    })
}

/// Reference for [`qlinear`]: `W` decoded by [`qdequantize_reference`], then `x Wᵀ` in fp32,
/// rounded to `x`'s dtype.
pub fn qlinear_reference(x: &Tensor, w: &QTensors) -> Result<Tensor> {
    Ok(x.to_kind(Kind::Float).matmul(&qdequantize_reference(w)?.tr()).to_kind(x.kind()))
}
