//! The Llama decoder's fused CPU ops (`ops::llama`: RMSNorm with the residual add, SwiGLU, and
//! a new token's RoPE + cache write + attention) against their references in plain tch ops
//! (Hugging Face's arithmetic, SDPA), in fp32 and bf16, at shapes with and without a vector
//! tail, under every CPU kernel variant; an analytic case; and their error messages.

use course::ops::{
    add_rms_norm_, decode_attention, decode_attention_reference, decode_attention_rows, rms_norm, rms_norm_reference,
    swiglu, swiglu_reference,
};
use tch::{Device, Kind, Tensor};

mod common;
use common::run_under_every_cpu_variant;

fn randn(shape: &[i64], seed: i64) -> Tensor {
    tch::manual_seed(seed);
    Tensor::randn(shape, (Kind::Float, Device::Cpu))
}

fn max_abs(a: &Tensor, b: &Tensor) -> f64 {
    (a.to_kind(Kind::Double) - b.to_kind(Kind::Double)).abs().max().double_value(&[])
}

/// In bf16 both sides round the same fp32 intermediates; a sum taken in another order can move
/// a value across a rounding boundary, so allow one bf16 step (2⁻⁷ relative) on a few elements
/// and require the rest to be bit-equal.
fn assert_bf16_close(what: &str, got: &Tensor, want: &Tensor) {
    assert_eq!(got.kind(), Kind::BFloat16, "{what}: dtype");
    assert_eq!(got.size(), want.size(), "{what}: shape");
    let (g, w) = (got.to_kind(Kind::Double), want.to_kind(Kind::Double));
    let excess = ((&g - &w).abs() - w.abs() * (1.0 / 128.0) - 1e-6).max().double_value(&[]);
    assert!(excess <= 0.0, "{what}: beyond one bf16 step by {excess}");
    let differ = g.ne_tensor(&w).to_kind(Kind::Double).mean(Kind::Double).double_value(&[]);
    assert!(differ <= 0.02, "{what}: {:.2} % of the values differ", differ * 100.0);
}

#[test]
fn rms_norm_and_the_residual_add_match_the_reference() {
    for (i, &(rows, c)) in [(1, 576), (3, 33), (100, 64), (2, 7)].iter().enumerate() {
        let s = 10 * i as i64;
        let (x, r, w) = (randn(&[rows, c], s) * 3.0, randn(&[rows, c], s + 1), randn(&[c], s + 2) + 1.0);
        let eps = 1e-5;
        let got = rms_norm(&x, &w, eps).unwrap();
        assert!(max_abs(&got, &rms_norm_reference(&x, &w, eps)) < 1e-5, "fp32 {rows}x{c}");
        // ATen's own fused fp32 rms_norm is a second implementation.
        assert!(max_abs(&got, &x.rms_norm([c], Some(&w), eps)) < 1e-5, "fp32 vs aten {rows}x{c}");
        // In place: x becomes x + r, and the norm is the norm of the sum.
        let mut xs = x.copy();
        let got = add_rms_norm_(&mut xs, &r, &w, eps).unwrap();
        assert!(xs.equal(&(&x + &r)), "fp32 sum {rows}x{c}");
        assert!(max_abs(&got, &rms_norm_reference(&(&x + &r), &w, eps)) < 1e-5);
        let (xb, rb, wb) = (x.to_kind(Kind::BFloat16), r.to_kind(Kind::BFloat16), w.to_kind(Kind::BFloat16));
        assert_bf16_close("bf16 rms_norm", &rms_norm(&xb, &wb, eps).unwrap(), &rms_norm_reference(&xb, &wb, eps));
        let mut xs = xb.copy();
        let got = add_rms_norm_(&mut xs, &rb, &wb, eps).unwrap();
        assert!(xs.equal(&(&xb + &rb)), "bf16 sum {rows}x{c}: rounded as tch's add rounds");
        assert_bf16_close("bf16 add_rms_norm_", &got, &rms_norm_reference(&(&xb + &rb), &wb, eps));
    }
    // A 3-D, non-contiguous input without a residual is fine (read through a copy).
    let x = randn(&[4, 3, 16], 50).transpose(0, 1);
    let w = randn(&[16], 51);
    assert!(max_abs(&rms_norm(&x, &w, 1e-6).unwrap(), &rms_norm_reference(&x, &w, 1e-6)) < 1e-5);
}

#[test]
fn swiglu_matches_the_reference() {
    for (i, &(rows, f)) in [(1, 1536), (5, 37), (64, 48)].iter().enumerate() {
        let gu = randn(&[rows, 2 * f], 60 + i as i64) * 4.0;
        let got = swiglu(&gu).unwrap();
        assert_eq!(got.size(), [rows, f]);
        assert!(max_abs(&got, &swiglu_reference(&gu)) < 1e-5, "fp32 {rows}x{f}");
        let b = gu.to_kind(Kind::BFloat16);
        assert_bf16_close("bf16 swiglu", &swiglu(&b).unwrap(), &swiglu_reference(&b));
    }
}

/// Rotary tables as `models::llama` builds them: (P, hd), frequency i at columns i and i + hd/2.
fn rope_tables(p: i64, hd: i64, theta: f64) -> (Tensor, Tensor) {
    let inv = Tensor::arange_start_step(0, hd, 2, (Kind::Int64, Device::Cpu)).to_kind(Kind::Float) / hd as f64;
    let inv = Tensor::from(theta).to_kind(Kind::Float).pow(&inv).reciprocal();
    let f = Tensor::arange(p, (Kind::Float, Device::Cpu)).outer(&inv);
    let e = Tensor::cat(&[&f, &f], -1);
    (e.cos(), e.sin())
}

struct Case {
    b: i64,
    h: i64,
    kv: i64,
    hd: i64,
    cap: i64,
    positions: Vec<i64>,
}

/// Ours and the reference from the same start: output, and both caches after the write.
fn attention_pair(c: &Case, kind: Kind, cache_kind: Kind, seed: i64) -> [(Tensor, Tensor); 3] {
    let qkv = randn(&[c.b, 1, (c.h + 2 * c.kv) * c.hd], seed).to_kind(kind);
    let (cos, sin) = rope_tables(c.cap, c.hd, 10000.0);
    let (cos, sin) = (cos.to_kind(kind), sin.to_kind(kind));
    // Earlier positions hold keys and values already (numbers of the model's dtype, as the
    // model writes them); the rest of the cache is garbage that must not be read.
    let ck0 = (randn(&[c.b, c.kv, c.cap, c.hd], seed + 1) * 2.0).to_kind(kind).to_kind(cache_kind);
    let cv0 = randn(&[c.b, c.kv, c.cap, c.hd], seed + 2).to_kind(kind).to_kind(cache_kind);
    let (mut ck, mut cv) = (ck0.copy(), cv0.copy());
    let (mut rk, mut rv) = (ck0.copy(), cv0.copy());
    let pos = Tensor::from_slice(&c.positions);
    let got = decode_attention(&qkv, &cos, &sin, &mut ck, &mut cv, &pos, c.h, c.kv).unwrap();
    let want = tch::no_grad(|| decode_attention_reference(&qkv, &cos, &sin, &mut rk, &mut rv, &c.positions, c.h, c.kv));
    [(got, want), (ck, rk), (cv, rv)]
}

#[test]
fn decode_attention_over_rows_of_a_larger_cache_matches_the_reference_on_those_rows() {
    // Continuous batching: 3 sequences in rows 4, 0 and 2 of a 5-row cache, at their own positions.
    let (h, kv, hd, cap) = (9, 3, 64, 40);
    let (rows, positions) = ([4i64, 0, 2], vec![31i64, 0, 17]);
    let qkv = randn(&[3, 1, (h + 2 * kv) * hd], 70);
    let (cos, sin) = rope_tables(cap, hd, 10000.0);
    let ck0 = randn(&[5, kv, cap, hd], 71);
    let cv0 = randn(&[5, kv, cap, hd], 72);
    let (mut ck, mut cv) = (ck0.copy(), cv0.copy());
    let (pos, r) = (Tensor::from_slice(&positions), Tensor::from_slice(&rows));
    let got = decode_attention_rows(&qkv, &cos, &sin, &mut ck, &mut cv, &pos, Some(&r), h, kv).unwrap();
    // The reference on the three rows gathered into a cache of their own.
    let (mut rk, mut rv) = (ck0.index_select(0, &r), cv0.index_select(0, &r));
    let want = tch::no_grad(|| decode_attention_reference(&qkv, &cos, &sin, &mut rk, &mut rv, &positions, h, kv));
    assert!(max_abs(&got, &want) < 1e-5, "output differs by {}", max_abs(&got, &want));
    assert!(max_abs(&ck.index_select(0, &r), &rk) < 1e-6 && cv.index_select(0, &r).equal(&rv), "written rows");
    // The rows not named are untouched.
    let others = Tensor::from_slice(&[1i64, 3]);
    assert!(ck.index_select(0, &others).equal(&ck0.index_select(0, &others)));
    assert!(cv.index_select(0, &others).equal(&cv0.index_select(0, &others)));
    // A row twice, or past the cache, is refused by name.
    for (bad, want) in
        [([4i64, 0, 4], "rows[2] = 4 is given twice"), ([4, 0, 5], "rows[2] = 5 is outside the cache's 0..5 rows")]
    {
        let r = Tensor::from_slice(&bad);
        let e =
            decode_attention_rows(&qkv, &cos, &sin, &mut ck, &mut cv, &pos, Some(&r), h, kv).unwrap_err().to_string();
        assert!(e.contains(want), "{e}");
    }
}

#[test]
fn decode_attention_matches_rope_cache_write_and_sdpa() {
    let cases = [
        // SmolLM2's heads (9 query, 3 kv, 64 wide), one sequence well into its cache.
        Case { b: 1, h: 9, kv: 3, hd: 64, cap: 300, positions: vec![237] },
        // Two sequences at different positions, one at the very first; a width with a tail.
        Case { b: 2, h: 4, kv: 2, hd: 20, cap: 16, positions: vec![5, 0] },
        // Plain multi-head (kv = heads), the last slot of the cache.
        Case { b: 3, h: 2, kv: 2, hd: 8, cap: 9, positions: vec![8, 3, 1] },
    ];
    for (i, c) in cases.iter().enumerate() {
        let seed = 100 + 10 * i as i64;
        let [(y, yr), (k, kr), (v, vr)] = attention_pair(c, Kind::Float, Kind::Float, seed);
        assert_eq!(y.size(), [c.b, 1, c.h * c.hd]);
        assert!(max_abs(&y, &yr) < 1e-5, "fp32 case {i}: output differs by {}", max_abs(&y, &yr));
        assert!(max_abs(&k, &kr) < 1e-6 && v.equal(&vr), "fp32 case {i}: cache");
        // bf16 model with the fp32 cache (a CPU without AMX) and with a bf16 cache. Both caches
        // hold the same numbers (bf16-rounded rotated keys, bf16 values), and ours attends in
        // fp32 either way, so both outputs are held to the reference's fp32 SDPA over them
        // (its bf16 SDPA rounds scores and probabilities to bf16: less accurate than ours).
        let [(_, yr32), ..] = attention_pair(c, Kind::BFloat16, Kind::Float, seed);
        for ck in [Kind::Float, Kind::BFloat16] {
            let [(y, _), (k, kr), (v, vr)] = attention_pair(c, Kind::BFloat16, ck, seed);
            assert_bf16_close(&format!("bf16 case {i} cache {ck:?}: output"), &y, &yr32);
            assert!(k.equal(&kr) && v.equal(&vr), "bf16 case {i} cache {ck:?}: the rotated keys are rounded alike");
        }
    }
}

#[test]
fn attention_over_one_position_returns_its_value() {
    // Analytic: softmax over a single key is 1, so the output is that position's value, whatever
    // q and k are, and the value written to the cache is the token's own v.
    let (h, kv, hd) = (6, 2, 16);
    let qkv = randn(&[1, 1, (h + 2 * kv) * hd], 7);
    let (cos, sin) = rope_tables(4, hd, 10000.0);
    let (mut ck, mut cv) = (
        Tensor::zeros([1, kv, 4, hd], (Kind::Float, Device::Cpu)),
        Tensor::zeros([1, kv, 4, hd], (Kind::Float, Device::Cpu)),
    );
    let y = decode_attention(&qkv, &cos, &sin, &mut ck, &mut cv, &Tensor::from_slice(&[0i64]), h, kv).unwrap();
    let v = qkv.narrow(2, (h + kv) * hd, kv * hd).view([kv, hd]);
    for head in 0..h {
        let want = v.get(head / (h / kv));
        assert!(y.view([h, hd]).get(head).equal(&want), "head {head}");
    }
    // Position 0 rotates by angle 0: the cached key is the raw key.
    assert!(ck.narrow(2, 0, 1).view([kv, hd]).equal(&qkv.narrow(2, h * hd, kv * hd).view([kv, hd])));
}

#[test]
fn every_cpu_kernel_variant_agrees() {
    run_under_every_cpu_variant(&[
        "rms_norm_and_the_residual_add_match_the_reference",
        "swiglu_matches_the_reference",
        "decode_attention_matches_rope_cache_write_and_sdpa",
        "attention_over_one_position_returns_its_value",
    ]);
}

#[test]
fn bad_arguments_give_clear_errors() {
    let err = |r: anyhow::Result<Tensor>| r.expect_err("must fail").to_string();
    let (x, w) = (randn(&[2, 8], 1), randn(&[8], 2));
    let e = err(rms_norm(&x.to_kind(Kind::Double), &w, 1e-5));
    assert!(e.contains("rms_norm: input must be float32 or bfloat16, got Double"), "{e}");
    let e = err(rms_norm(&x, &randn(&[7], 3), 1e-5));
    assert!(e.contains("weight [7] does not match the last dimension of input [2, 8]"), "{e}");
    let e = err(rms_norm(&x.detach().copy().set_requires_grad(true), &w, 1e-5));
    assert!(e.contains("requires grad, and this op has no backward"), "{e}");
    let mut t = randn(&[8, 2], 4).tr();
    let e = err(add_rms_norm_(&mut t, &x, &w, 1e-5));
    assert!(e.contains("updated in place and must be contiguous"), "{e}");
    let e = err(swiglu(&randn(&[2, 7], 5)));
    assert!(e.contains("swiglu: the last dimension of input [2, 7] must be even"), "{e}");

    let (h, kv, hd, cap) = (4, 2, 8, 6);
    let qkv = randn(&[1, 1, (h + 2 * kv) * hd], 6);
    let (cos, sin) = rope_tables(cap, hd, 10000.0);
    let z = || Tensor::zeros([1, kv, cap, hd], (Kind::Float, Device::Cpu));
    let (mut ck, mut cv) = (z(), z());
    let pos = |p: i64| Tensor::from_slice(&[p]);
    let e = err(decode_attention(&qkv, &cos, &sin, &mut ck, &mut cv, &pos(6), h, kv));
    assert!(e.contains("positions[0] = 6 is outside 0..6"), "{e}");
    let e = err(decode_attention(&qkv, &cos, &sin, &mut ck, &mut cv, &pos(0), 3, kv));
    assert!(e.contains("heads (3) must be a positive multiple of kv_heads (2)"), "{e}");
    let e = err(decode_attention(&qkv.narrow(2, 0, 40), &cos, &sin, &mut ck, &mut cv, &pos(0), h, kv));
    assert!(e.contains("qkv must be (1, 1, 64)"), "{e}");
    let e = err(decode_attention(&qkv, &cos.to_kind(Kind::BFloat16), &sin, &mut ck, &mut cv, &pos(0), h, kv));
    assert!(e.contains("cos must be Float like the input, got BFloat16"), "{e}");
    let mut cd = z().to_kind(Kind::Double);
    let e = err(decode_attention(&qkv, &cos, &sin, &mut cd, &mut z().to_kind(Kind::Double), &pos(0), h, kv));
    assert!(e.contains("the caches must both be float32 or both Float, got Double"), "{e}");
    let e = err(decode_attention(&qkv, &cos, &sin, &mut ck, &mut cv, &Tensor::from_slice(&[0i32]), h, kv));
    assert!(e.contains("positions must be a CPU int64 tensor of 1 entries"), "{e}");
}
