//! Weight quantization (量化) of a frozen linear layer's `W` (out × in), in plain tch ops: the
//! formats' definitions, which the kernels in `kernels/` are checked against.
//!
//! - **int8**, one scale per output row (absmax): `w ≈ q · s`, `s = max|w_row| / 127`.
//! - **NF4** as QLoRA and bitsandbytes define it: blocks of 64 consecutive numbers of the
//!   flattened weight, each scaled by its absmax into [-1, 1] and rounded to the nearest of 16
//!   "normal float" codes (quantiles of a normal distribution, with an exact 0), two codes a byte
//!   (the first in the high nibble). Double quantization (QLoRA's second idea) stores the block
//!   absmaxes themselves in 8 bits: minus their mean, in blocks of 256, each scaled by its own
//!   absmax and rounded to bitsandbytes' 8-bit dynamic code. 4.127 bits a number in all.
//!
//! Rounding ties go to the lower code, as in bitsandbytes (0.49).
//!
//! Each weight gives the kernels of [`crate::ops::qmatmul`] its tensors ([`QTensors`]); GGUF's
//! Q4_1 and Q8_0 blocks come as the file stores them ([`ggml_weight`]).

use crate::ops::qmatmul::qdequantize_reference;
pub use crate::ops::qmatmul::{QFormat, QTensors};
use anyhow::{bail, Result};
use tch::{Device, Kind, Tensor};

/// The 16 NF4 code values (bitsandbytes' `get_4bit_type("nf4")`, QLoRA appendix).
pub const NF4_CODE: [f32; 16] = [
    -1.0,
    -0.696_192_8,
    -0.525_073_05,
    -0.394_917_5,
    -0.284_441_38,
    -0.184_773_43,
    -0.091_050_036,
    0.0,
    0.079_580_3,
    0.160_930_2,
    0.246_112_3,
    0.337_915_24,
    0.440_709_83,
    0.562_617,
    0.722_956_84,
    1.0,
];

/// Numbers per NF4 block, and absmaxes per block of the double quantization.
pub const NF4_BLOCK: i64 = 64;
pub const NESTED_BLOCK: i64 = 256;

/// bitsandbytes' signed 8-bit dynamic code (`create_dynamic_map(signed=True, max_exponent_bits=7,
/// total_bits=8)`): for each decade 10⁻⁶ … 10⁰, the midpoints of `2^i + 1` points spaced evenly in
/// [0.1, 1], both signs, plus 0 and 1, sorted; 256 values from -0.99296875 to 1. The numbers are
/// bitsandbytes 0.49.2's own (printed from it, shortest round-trip form): torch's fp32 `linspace`
/// rounds some points one ulp apart from a straight `start + step * k`, so recomputing them would
/// not give the same code. `tests/quant.rs` compares them with bitsandbytes at test time.
#[rustfmt::skip]
const DYNAMIC_CODE: [f32; 256] = [
    -0.99296874, -0.9789063, -0.96484375, -0.9507812, -0.93671876, -0.92265624,
    -0.9085938, -0.89453125, -0.8804687, -0.86640626, -0.85234374, -0.8382813,
    -0.82421875, -0.8101562, -0.79609376, -0.78203124, -0.7679688, -0.75390625,
    -0.7398437, -0.72578126, -0.7117188, -0.6976563, -0.68359375, -0.6695312,
    -0.65546876, -0.6414063, -0.6273438, -0.61328125, -0.5992187, -0.58515626,
    -0.5710938, -0.5570313, -0.54296875, -0.5289062, -0.5148437, -0.50078124,
    -0.4867187, -0.47265625, -0.45859373, -0.44453126, -0.43046874, -0.41640624,
    -0.40234375, -0.38828123, -0.37421876, -0.36015624, -0.34609374, -0.33203125,
    -0.31796873, -0.30390626, -0.28984374, -0.27578127, -0.26171875, -0.24765624,
    -0.23359375, -0.21953125, -0.20546874, -0.19140625, -0.17734376, -0.16328125,
    -0.14921875, -0.13515624, -0.12109375, -0.107031256, -0.09859375, -0.09578126,
    -0.092968754, -0.09015625, -0.08734375, -0.08453125, -0.08171876, -0.07890625,
    -0.07609375, -0.07328125, -0.070468746, -0.067656256, -0.06484375, -0.06203125,
    -0.059218753, -0.05640625, -0.05359375, -0.05078125, -0.04796875, -0.04515625,
    -0.042343747, -0.03953125, -0.036718752, -0.03390625, -0.03109375, -0.028281251,
    -0.02546875, -0.02265625, -0.019843752, -0.01703125, -0.01421875, -0.01140625,
    -0.00971875, -0.009156249, -0.00859375, -0.00803125, -0.00746875, -0.00690625,
    -0.00634375, -0.00578125, -0.0052187503, -0.0046562497, -0.00409375, -0.0035312497,
    -0.00296875, -0.00240625, -0.00184375, -0.0012812499, -0.0009437501, -0.00083125,
    -0.00071875006, -0.0006062501, -0.00049375003, -0.00038125002, -0.00026875004, -0.00015625001,
    -8.875e-05, -6.625e-05, -4.375e-05, -2.1249998e-05, -7.75e-06, -3.2500002e-06,
    -5.5000004e-07, 0.0, 5.5000004e-07, 3.2500002e-06, 7.75e-06, 2.1249998e-05,
    4.375e-05, 6.625e-05, 8.875e-05, 0.00015625001, 0.00026875004, 0.00038125002,
    0.00049375003, 0.0006062501, 0.00071875006, 0.00083125, 0.0009437501, 0.0012812499,
    0.00184375, 0.00240625, 0.00296875, 0.0035312497, 0.00409375, 0.0046562497,
    0.0052187503, 0.00578125, 0.00634375, 0.00690625, 0.00746875, 0.00803125,
    0.00859375, 0.009156249, 0.00971875, 0.01140625, 0.01421875, 0.01703125,
    0.019843752, 0.02265625, 0.02546875, 0.028281251, 0.03109375, 0.03390625,
    0.036718752, 0.03953125, 0.042343747, 0.04515625, 0.04796875, 0.05078125,
    0.05359375, 0.05640625, 0.059218753, 0.06203125, 0.06484375, 0.067656256,
    0.070468746, 0.07328125, 0.07609375, 0.07890625, 0.08171876, 0.08453125,
    0.08734375, 0.09015625, 0.092968754, 0.09578126, 0.09859375, 0.107031256,
    0.12109375, 0.13515624, 0.14921875, 0.16328125, 0.17734376, 0.19140625,
    0.20546874, 0.21953125, 0.23359375, 0.24765624, 0.26171875, 0.27578127,
    0.28984374, 0.30390626, 0.31796873, 0.33203125, 0.34609374, 0.36015624,
    0.37421876, 0.38828123, 0.40234375, 0.41640624, 0.43046874, 0.44453126,
    0.45859373, 0.47265625, 0.4867187, 0.50078124, 0.5148437, 0.5289062,
    0.54296875, 0.5570313, 0.5710938, 0.58515626, 0.5992187, 0.61328125,
    0.6273438, 0.6414063, 0.65546876, 0.6695312, 0.68359375, 0.6976563,
    0.7117188, 0.72578126, 0.7398437, 0.75390625, 0.7679688, 0.78203124,
    0.79609376, 0.8101562, 0.82421875, 0.8382813, 0.85234374, 0.86640626,
    0.8804687, 0.89453125, 0.9085938, 0.92265624, 0.93671876, 0.9507812,
    0.96484375, 0.9789063, 0.99296874, 1.0,
];

/// [`DYNAMIC_CODE`] as a vector.
pub fn dynamic_map() -> Vec<f32> {
    DYNAMIC_CODE.to_vec()
}

/// Index of the nearest value of the sorted `code` for each number of `x` (ties to the lower
/// index), as int64.
fn nearest(x: &Tensor, code: &[f32]) -> Tensor {
    let mids: Vec<f32> = code.windows(2).map(|w| (w[0] + w[1]) / 2.0).collect();
    // bucketize(right = false): index i with mids[i-1] < x <= mids[i]; x on a midpoint goes low.
    x.bucketize(&Tensor::from_slice(&mids).to_device(x.device()), false, false)
}

/// An int8 weight: `q` (out, in) int8 and one fp32 scale per output row.
#[derive(Debug)]
pub struct Int8Weight {
    pub q: Tensor,
    pub scale: Tensor,
}

impl Int8Weight {
    pub fn quantize(w: &Tensor) -> Result<Int8Weight> {
        check_weight("int8", w)?;
        let wf = w.to_kind(Kind::Float);
        let scale = wf.abs().amax([1], true) / 127.0;
        let safe = scale.where_self(&scale.gt(0.0), &Tensor::ones_like(&scale));
        let q = (&wf / &safe).round().clamp(-127, 127).to_kind(Kind::Int8);
        Ok(Int8Weight { q, scale: scale.squeeze_dim(1) })
    }

    /// `W` back, in `kind` (plain tch ops: [`qdequantize_reference`]).
    pub fn dequantize(&self, kind: Kind) -> Tensor {
        qdequantize_reference(&self.tensors()).expect("an int8 weight has its scale").to_kind(kind)
    }

    /// The kernels' view of this weight (shallow: the same storage).
    pub fn tensors(&self) -> QTensors {
        let s = self.q.size();
        QTensors {
            format: QFormat::Int8,
            n: s[0],
            k: s[1],
            data: self.q.shallow_clone(),
            scale: Some(self.scale.shallow_clone()),
            absmax_q: None,
            code8: None,
            code16: None,
            offset: 0.0,
            tiles: None,
        }
    }

    pub fn bytes(&self) -> i64 {
        self.q.numel() as i64 + 4 * self.scale.numel() as i64
    }
}

/// An NF4 weight with double-quantized block scales (bitsandbytes' `quantize_4bit(quant_type="nf4",
/// blocksize=64, compress_statistics=True)`), laid out as its state dict holds it.
#[derive(Debug)]
pub struct Nf4Weight {
    /// `numel / 2` bytes: number `2i` in the high nibble of byte `i`, `2i + 1` in the low one.
    pub packed: Tensor,
    /// One byte per block of 64: the index of the block's absmax (minus `offset`) in `nested_code`.
    pub absmax_q: Tensor,
    /// fp32, one per 256 blocks: the scale of those blocks' quantized absmaxes.
    pub nested_absmax: Tensor,
    /// The mean of the block absmaxes, subtracted before their quantization.
    pub offset: f32,
    /// The 8-bit code of the absmaxes (256 fp32, [`dynamic_map`]).
    pub nested_code: Tensor,
    /// `(out, in)`.
    pub shape: [i64; 2],
}

impl Nf4Weight {
    /// Quantizes `w` `(out, in)`; its size must be a multiple of 64.
    pub fn quantize(w: &Tensor) -> Result<Nf4Weight> {
        check_weight("nf4", w)?;
        let (out, inp) = (w.size()[0], w.size()[1]);
        let n = out * inp;
        if n % NF4_BLOCK != 0 {
            bail!("nf4: the weight's {out} x {inp} = {n} numbers are not a whole number of {NF4_BLOCK}-number blocks");
        }
        let blocks = w.to_kind(Kind::Float).reshape([-1, NF4_BLOCK]);
        let absmax = blocks.abs().amax([1], false);
        let inv = absmax.reciprocal().where_self(&absmax.gt(0.0), &Tensor::zeros_like(&absmax));
        let scaled = (&blocks * inv.unsqueeze(1)).clamp(-1.0, 1.0);
        let codes = nearest(&scaled.reshape([-1]), &NF4_CODE);
        Ok(Self::assemble(&codes, &absmax, [out, inp]))
    }

    /// The weight from its codes (indices 0..16, flattened `(out, in)` order) and the block
    /// absmaxes, which are double-quantized here.
    fn assemble(codes: &Tensor, absmax: &Tensor, shape: [i64; 2]) -> Nf4Weight {
        let packed = pack_codes(codes);
        let (absmax_q, nested_absmax, offset, nested_code) = double_quantize(absmax);
        Nf4Weight { packed, absmax_q, nested_absmax, offset, nested_code, shape }
    }

    /// GPTQ (Frantar et al., 2022) onto NF4's grid: the same format and layout as
    /// [`Self::quantize`], with the codes chosen to keep the layer's *output* on calibration
    /// inputs close, not each number alone. `h` `(in, in)` is `Σ xᵀx` over the calibration
    /// inputs `x` of this layer (GPTQ's Hessian of the squared output error, up to a factor).
    ///
    /// The block scales are fixed first (each block's absmax, double-quantized: the numbers the
    /// kernels will multiply by, "static groups"); then the columns are rounded left to right,
    /// and each column's rounding error is pushed onto the columns not yet rounded through the
    /// Cholesky factor of `H⁻¹` (with 1 % of H's mean diagonal added, GPTQ's damping), in lazy
    /// batches of 128 columns. With `h` a multiple of the identity the errors stay where they
    /// are, and the codes are exactly [`Self::quantize`]'s. Blocks must not straddle rows:
    /// `in % 64 == 0`.
    pub fn quantize_gptq(w: &Tensor, h: &Tensor) -> Result<Nf4Weight> {
        check_weight("nf4 gptq", w)?;
        let (out, inp) = (w.size()[0], w.size()[1]);
        if inp % NF4_BLOCK != 0 {
            bail!("nf4 gptq: in_features {inp} is not a multiple of the {NF4_BLOCK}-number block");
        }
        if h.size() != [inp, inp] {
            bail!("nf4 gptq: the Hessian must be ({inp}, {inp}) for this weight, got {:?}", h.size());
        }
        if h.device() != w.device() {
            bail!("nf4 gptq: the weight is on {:?}, the Hessian on {:?}", w.device(), h.device());
        }
        let _g = tch::no_grad_guard();
        let dev = w.device();
        let mut wf = w.to_kind(Kind::Float).copy();
        let importance: Vec<f32> =
            Vec::try_from(h.diagonal(0, 0, 1).to_kind(Kind::Float).clamp_min(0.0).to_device(Device::Cpu))?;
        let wv: Vec<f32> = Vec::try_from(wf.to_device(Device::Cpu).reshape([-1]))?;
        let absmax = Tensor::from_slice(&search_scales(&wv, &importance)).to_device(dev);
        let (absmax_q, nested_absmax, offset, nested_code) = double_quantize(&absmax);
        let scale = dequantize_absmax(&absmax_q, &nested_absmax, offset, &nested_code).view([out, inp / NF4_BLOCK]);
        let positive = scale.gt(0.0);
        let inv = scale.reciprocal().where_self(&positive, &Tensor::zeros_like(&scale));
        let scale = scale.where_self(&positive, &Tensor::zeros_like(&scale));

        let hd = h.to_kind(Kind::Double).copy();
        if hd.isfinite().logical_not().any().int64_value(&[]) != 0 {
            bail!("nf4 gptq: the Hessian holds a NaN or an infinity");
        }
        let dead = hd.diagonal(0, 0, 1).le(0.0);
        let _ = hd.diagonal(0, 0, 1).masked_fill_(&dead, 1.0);
        let _ = wf.masked_fill_(&dead.unsqueeze(0), 0.0);
        // Columns in decreasing order of their inputs' energy (GPTQ's act-order): the columns that
        // matter most are rounded first, while the most columns are left to absorb their errors.
        // The scales were fixed above per block, so the order changes no block's scale.
        let perm = hd.diagonal(0, 0, 1).argsort(0, true);
        let hd = hd.index_select(0, &perm).index_select(1, &perm);
        let wf = wf.index_select(1, &perm);
        let cols = Tensor::arange(inp, (Kind::Int64, dev)).floor_divide_scalar(NF4_BLOCK).index_select(0, &perm);
        let scale = scale.index_select(1, &cols);
        let inv = inv.index_select(1, &cols);
        let damp = 0.01 * hd.diagonal(0, 0, 1).mean(Kind::Double).double_value(&[]);
        let hd = hd + Tensor::eye(inp, (Kind::Double, dev)) * damp;
        let (chol, info) = hd.linalg_cholesky_ex(false, false);
        if info.int64_value(&[]) != 0 {
            bail!(
                "nf4 gptq: the damped Hessian is not positive definite (Cholesky failed at {})",
                info.int64_value(&[])
            );
        }
        let u = chol.cholesky_inverse(false).linalg_cholesky(true).to_kind(Kind::Float);

        // The column loop in plain Rust, row by row: under GPTQ a row's rounding errors move only
        // along that row, so the rows are independent and split across threads; the lazy
        // updates of the later columns are matmuls.
        let cpu = Device::Cpu;
        let flat = |t: &Tensor| -> Result<Vec<f32>> { Ok(Vec::try_from(t.to_device(cpu).contiguous().reshape([-1]))?) };
        let (scale_v, inv_v) = (flat(&scale)?, flat(&inv)?);
        let wf = wf.to_device(cpu);
        let u = u.to_device(cpu);
        let mids = nf4_mids();
        let (n, k) = (out as usize, inp as usize);
        let mut codes = vec![0u8; n * k];
        let threads = (tch::get_num_threads().max(1) as usize).min(n.max(1));
        let rows_per = n.div_ceil(threads).max(1);
        const LAZY: usize = 128;
        for i1 in (0..k).step_by(LAZY) {
            let cnt = LAZY.min(k - i1);
            let mut w1 = flat(&wf.narrow(1, i1 as i64, cnt as i64))?;
            let u1 = flat(&u.narrow(0, i1 as i64, cnt as i64).narrow(1, i1 as i64, cnt as i64))?;
            let mut err = vec![0f32; n * cnt];
            let (sv, iv, u1r, mids) = (&scale_v, &inv_v, &u1, &mids);
            std::thread::scope(|sc| {
                let parts = w1
                    .chunks_mut(rows_per * cnt)
                    .zip(err.chunks_mut(rows_per * cnt))
                    .zip(codes.chunks_mut(rows_per * k));
                for (t, ((wch, ech), cch)) in parts.enumerate() {
                    sc.spawn(move || {
                        for (lr, ((row, erow), crow)) in
                            wch.chunks_mut(cnt).zip(ech.chunks_mut(cnt)).zip(cch.chunks_mut(k)).enumerate()
                        {
                            let r = t * rows_per + lr;
                            for i in 0..cnt {
                                let j = i1 + i;
                                let x = row[i];
                                let y = (x * iv[r * k + j]).clamp(-1.0, 1.0);
                                let idx = nearest_nf4(mids, y);
                                crow[j] = idx as u8;
                                let e = (x - NF4_CODE[idx] * sv[r * k + j]) / u1r[i * cnt + i];
                                erow[i] = e;
                                for (a, &b) in row[i..].iter_mut().zip(&u1r[i * cnt + i..(i + 1) * cnt]) {
                                    *a -= e * b;
                                }
                            }
                        }
                    });
                }
            });
            if i1 + cnt < k {
                let rest = (k - i1 - cnt) as i64;
                let e = Tensor::from_slice(&err).view([out, cnt as i64]);
                let mut later = wf.narrow(1, (i1 + cnt) as i64, rest);
                later -= e.matmul(&u.narrow(0, i1 as i64, cnt as i64).narrow(1, (i1 + cnt) as i64, rest));
            }
        }
        let codes = Tensor::from_slice(&codes).view([out, inp]).to_kind(Kind::Int64).to_device(dev);
        // Back to the weight's own column order.
        let codes = codes.index_select(1, &perm.argsort(0, false));
        Ok(Nf4Weight { packed: pack_codes(&codes), absmax_q, nested_absmax, offset, nested_code, shape: [out, inp] })
    }
}

/// Each block's scale, chosen among 0.70–1.00 of its absmax (16 steps) as the one whose NF4
/// rounding leaves the least squared error in the block, each number's error weighted by its
/// column's input energy (`importance`, one per column: the Hessian's diagonal, as llama.cpp's
/// imatrix weighs its scale search): clipping the block's largest number a little buys finer
/// steps for the rest. `w` is the weight `(out, in)` flattened, `in` a multiple of 64; plain
/// Rust over the blocks, split across threads.
fn search_scales(w: &[f32], importance: &[f32]) -> Vec<f32> {
    let k = importance.len();
    let blocks = w.len() / NF4_BLOCK as usize;
    let mut out = vec![0f32; blocks];
    let threads = (tch::get_num_threads().max(1) as usize).min(blocks.max(1));
    let per = blocks.div_ceil(threads).max(1);
    let mids = nf4_mids();
    std::thread::scope(|sc| {
        for (t, chunk) in out.chunks_mut(per).enumerate() {
            let mids = &mids;
            sc.spawn(move || {
                for (lb, slot) in chunk.iter_mut().enumerate() {
                    let b = t * per + lb;
                    let x = &w[b * 64..(b + 1) * 64];
                    let c0 = (b * 64) % k;
                    let imp = &importance[c0..c0 + 64];
                    let amax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
                    let (mut best, mut best_err) = (amax, f32::INFINITY);
                    if amax > 0.0 {
                        for i in 0..16 {
                            let s = amax * (0.70 + 0.02 * i as f32);
                            let inv = 1.0 / s;
                            let mut e = 0f32;
                            for (&v, &g) in x.iter().zip(imp) {
                                let idx = nearest_nf4(mids, (v * inv).clamp(-1.0, 1.0));
                                let d = v - NF4_CODE[idx] * s;
                                e += g * d * d;
                            }
                            if e < best_err {
                                best_err = e;
                                best = s;
                            }
                        }
                    }
                    *slot = best;
                }
            });
        }
    });
    out
}

/// The midpoints between neighbouring NF4 codes.
fn nf4_mids() -> [f32; 15] {
    std::array::from_fn(|i| (NF4_CODE[i] + NF4_CODE[i + 1]) / 2.0)
}

/// The index of the NF4 code nearest `y`, ties to the lower code as in [`nearest`]: the number
/// of midpoints below `y`, by a binary search of four steps.
fn nearest_nf4(mids: &[f32; 15], y: f32) -> usize {
    let mut idx = 0usize;
    for step in [8usize, 4, 2, 1] {
        if mids[idx + step - 1] < y {
            idx += step;
        }
    }
    idx
}

/// Two NF4 codes a byte, the first in the high nibble.
fn pack_codes(codes: &Tensor) -> Tensor {
    let q = codes.reshape([-1]).to_kind(Kind::Uint8).view([-1, 2]);
    (q.select(1, 0) * 16 + q.select(1, 1)).to_kind(Kind::Uint8)
}

/// Double quantization of NF4's block absmaxes (QLoRA's second idea): minus their mean, in
/// groups of 256, each group scaled by its own absmax into the 8-bit dynamic code. Returns the
/// code bytes, the groups' fp32 scales, the mean, and the 256-value code.
fn double_quantize(absmax: &Tensor) -> (Tensor, Tensor, f32, Tensor) {
    let offset = absmax.mean(Kind::Float).double_value(&[]) as f32;
    let centred = absmax - offset as f64;
    let nb = centred.size()[0];
    let groups = (nb + NESTED_BLOCK - 1) / NESTED_BLOCK;
    let padded = centred.constant_pad_nd([0, groups * NESTED_BLOCK - nb]).view([groups, NESTED_BLOCK]);
    let nested_absmax = padded.abs().amax([1], false);
    let ninv = nested_absmax.reciprocal().where_self(&nested_absmax.gt(0.0), &Tensor::zeros_like(&nested_absmax));
    let normed = (&padded * ninv.unsqueeze(1)).clamp(-1.0, 1.0).reshape([-1]).narrow(0, 0, nb);
    let code = dynamic_map();
    let absmax_q = nearest(&normed, &code).to_kind(Kind::Uint8);
    (absmax_q, nested_absmax, offset, Tensor::from_slice(&code).to_device(absmax.device()))
}

/// The block absmaxes back from their double quantization (fp32).
fn dequantize_absmax(absmax_q: &Tensor, nested_absmax: &Tensor, offset: f32, code: &Tensor) -> Tensor {
    let nb = absmax_q.size()[0];
    let c = code.index_select(0, &absmax_q.to_kind(Kind::Int64));
    let group = Tensor::arange(nb, (Kind::Int64, absmax_q.device())).floor_divide_scalar(NESTED_BLOCK);
    c * nested_absmax.index_select(0, &group) + offset as f64
}

impl Nf4Weight {
    /// The block absmaxes as double quantization gives them back (fp32).
    pub fn absmax(&self) -> Tensor {
        dequantize_absmax(&self.absmax_q, &self.nested_absmax, self.offset, &self.nested_code)
    }

    /// `W` back, `(out, in)` in `kind` (plain tch ops: [`qdequantize_reference`]).
    pub fn dequantize(&self, kind: Kind) -> Tensor {
        qdequantize_reference(&self.tensors()).expect("an NF4 weight has all its tensors").to_kind(kind)
    }

    /// The kernels' view of this weight (shallow: the same storage, plus the 16 code values).
    pub fn tensors(&self) -> QTensors {
        QTensors {
            format: QFormat::Nf4,
            n: self.shape[0],
            k: self.shape[1],
            data: self.packed.shallow_clone(),
            scale: Some(self.nested_absmax.shallow_clone()),
            absmax_q: Some(self.absmax_q.shallow_clone()),
            code8: Some(self.nested_code.shallow_clone()),
            code16: Some(Tensor::from_slice(&NF4_CODE).to_device(self.packed.device())),
            offset: self.offset as f64,
            tiles: None,
        }
    }

    /// Bytes held: the nibbles, a byte per block, and the nested scales and code.
    pub fn bytes(&self) -> i64 {
        self.packed.numel() as i64 + self.absmax_q.numel() as i64 + 4 * (self.nested_absmax.numel() as i64 + 256 + 1)
    }

    pub fn device(&self) -> Device {
        self.packed.device()
    }
}

/// A ggml Q4_1 or Q8_0 weight `(n, k)` from its blocks as a GGUF file stores them (`bytes`: u8,
/// `n` rows of `k / 32` blocks of 20 or 34 bytes), kept as they are: no re-quantization.
pub fn ggml_weight(format: QFormat, bytes: Tensor, n: i64, k: i64) -> Result<QTensors> {
    let bb = match format {
        QFormat::Q4_1 => 20,
        QFormat::Q8_0 => 34,
        other => bail!("ggml_weight: {} is not a ggml block format (q4_1 or q8_0)", other.name()),
    };
    if k % 32 != 0 {
        bail!("{}: in_features {k} is not a multiple of ggml's block of 32", format.name());
    }
    if bytes.kind() != Kind::Uint8 || bytes.numel() as i64 != n * (k / 32) * bb {
        bail!(
            "{}: a ({n}, {k}) weight takes {} bytes of blocks, got {} numbers of {:?}",
            format.name(),
            n * (k / 32) * bb,
            bytes.numel(),
            bytes.kind()
        );
    }
    Ok(QTensors {
        format,
        n,
        k,
        data: bytes.contiguous(),
        scale: None,
        absmax_q: None,
        code8: None,
        code16: None,
        offset: 0.0,
        tiles: None,
    })
}

fn check_weight(what: &str, w: &Tensor) -> Result<()> {
    if w.dim() != 2 {
        bail!("{what}: a linear layer's weight is 2-D (out, in), got shape {:?}", w.size());
    }
    if !matches!(w.kind(), Kind::Float | Kind::BFloat16 | Kind::Half | Kind::Double) {
        bail!("{what}: the weight must be floating point, got {:?}", w.kind());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_dynamic_code_has_bitsandbytes_shape() {
        let c = dynamic_map();
        assert_eq!(c.len(), 256);
        assert_eq!((c[0], c[127], c[254], c[255]), (-0.99296875, 0.0, 0.99296875, 1.0));
        assert!(c.windows(2).all(|w| w[0] < w[1]));
    }

    #[test]
    fn nf4_and_int8_round_trip_within_their_steps() {
        tch::manual_seed(0);
        let w = Tensor::randn([96, 128], (Kind::Float, Device::Cpu)) * 0.05;
        let q = Nf4Weight::quantize(&w).unwrap();
        assert_eq!(q.packed.size(), [96 * 128 / 2]);
        let back = q.dequantize(Kind::Float);
        // Each number is within half the widest NF4 gap (0.304, between -1 and -0.696) of its
        // block's absmax, plus the absmax's own 8-bit error.
        let blocks = w.reshape([-1, 64]);
        let amax = blocks.abs().amax([1], true);
        let err = (&back.reshape([-1, 64]) - &blocks).abs() / &amax;
        assert!(err.max().double_value(&[]) <= 0.16, "{}", err.max().double_value(&[]));
        // Codes hit exactly: a block holding only code values times its absmax comes back as is.
        let exact = Tensor::from_slice(&NF4_CODE).repeat([8]).view([2, 64]) * 0.5;
        let e = Nf4Weight::quantize(&exact).unwrap();
        assert!((e.dequantize(Kind::Float) - &exact).abs().max().double_value(&[]) < 1e-6);
        // The first number of a byte is its high nibble: code 15 (1.0) then code 0 (-1.0).
        let mut v = vec![0.0f32; 64];
        v[0] = 1.0;
        v[1] = -1.0;
        let b = Nf4Weight::quantize(&Tensor::from_slice(&v).view([1, 64])).unwrap();
        assert_eq!(b.packed.int64_value(&[0]), 0xF0);
        let i8w = Int8Weight::quantize(&w).unwrap();
        let step = w.abs().amax([1], true) / 127.0;
        assert!(((i8w.dequantize(Kind::Float) - &w).abs() - &step * 0.5 - 1e-7).max().double_value(&[]) <= 0.0);
        assert!(Nf4Weight::quantize(&Tensor::zeros([3, 7], (Kind::Float, Device::Cpu))).is_err());
    }
}
