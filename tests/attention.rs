//! Attention from scratch against libtorch's own `scaled_dot_product_attention` (values and
//! gradients), and the positional encodings against their closed forms.

use course::models::encoder::{EncoderClassifier, EncoderConfig};
use course::nn::attention::{attention, causal_mask, causal_padding_mask, merge_heads, padding_mask, split_heads};
use course::nn::pool::Pooling;
use course::nn::positions::{sinusoidal, Positions, Rope, RopeStyle};
use course::sys::rng::Rng;
use tch::{nn, Device, Kind, Tensor};

fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
    (a - b).abs().max().double_value(&[])
}

/// Runs ours and SDPA on the same leaves; returns (output diff, max grad diff over q, k, v).
fn compare(mask: Option<&Tensor>, causal: bool, seed: u64) -> (f64, f64) {
    let mut rng = Rng::new(seed);
    let shape = [2, 3, 6, 8];
    let leaves: Vec<Tensor> = (0..3).map(|_| rng.normal_tensor(&shape)).collect();
    let g = rng.normal_tensor(&shape);
    let run = |ours: bool| -> (Tensor, Vec<Tensor>) {
        let [q, k, v] = [0, 1, 2].map(|i| leaves[i].copy().set_requires_grad(true));
        let out = if ours {
            let keep = if causal { Some(causal_mask(6, Device::Cpu)) } else { mask.map(|m| m.shallow_clone()) };
            attention(&q, &k, &v, keep.as_ref(), 0.0, false).0
        } else {
            Tensor::scaled_dot_product_attention(&q, &k, &v, mask, 0.0, causal, None, false)
        };
        (&out * &g).sum(Kind::Float).backward();
        (out.detach(), vec![q.grad(), k.grad(), v.grad()])
    };
    let (a, ga) = run(true);
    let (b, gb) = run(false);
    let gd = ga.iter().zip(&gb).map(|(x, y)| max_diff(x, y)).fold(0.0, f64::max);
    (max_diff(&a, &b), gd)
}

#[test]
fn attention_equals_sdpa_without_a_mask() {
    let (o, g) = compare(None, false, 1);
    assert!(o < 1e-5 && g < 1e-5, "output diff {o}, grad diff {g}");
}

#[test]
fn causal_attention_equals_sdpa_is_causal() {
    let (o, g) = compare(None, true, 2);
    assert!(o < 1e-5 && g < 1e-5, "output diff {o}, grad diff {g}");
}

#[test]
fn padding_mask_equals_sdpa_with_the_same_boolean_mask() {
    // Batch 0 has 6 real tokens, batch 1 has 4: its last two keys are masked.
    let am = Tensor::from_slice(&[1i64, 1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0]).view([2, 6]);
    let keep = padding_mask(&am);
    assert_eq!(keep.size(), [2, 1, 1, 6]);
    let (o, g) = compare(Some(&keep), false, 3);
    assert!(o < 1e-5 && g < 1e-5, "output diff {o}, grad diff {g}");
    let both = causal_padding_mask(&am);
    let (o, g) = compare(Some(&both), false, 4);
    assert!(o < 1e-5 && g < 1e-5, "output diff {o}, grad diff {g}");
}

#[test]
fn fused_attention_equals_attention_with_a_padding_mask() {
    let mut rng = Rng::new(9);
    let [q, k, v] = [0, 1, 2].map(|_| rng.normal_tensor(&[2, 4, 7, 16]));
    let am = Tensor::from_slice(&[1i64, 1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0]).view([2, 7]);
    let keep = padding_mask(&am);
    let a = attention(&q, &k, &v, Some(&keep), 0.0, false).0;
    let b = course::nn::attention::fused_attention(&q, &k, &v, Some(&keep), 0.0, false);
    assert!(max_diff(&a, &b) < 1e-5);
}

#[test]
fn masked_keys_get_zero_weight_and_rows_sum_to_one() {
    let mut rng = Rng::new(5);
    let q = rng.normal_tensor(&[1, 1, 4, 8]);
    let am = Tensor::from_slice(&[1i64, 1, 1, 0]).view([1, 4]);
    let (_, w) = attention(&q, &q, &q, Some(&padding_mask(&am)), 0.0, false);
    assert!(w.select(-1, 3).abs().max().double_value(&[]) < 1e-30);
    let sums = w.sum_dim_intlist(-1, false, Kind::Float);
    assert!(max_diff(&sums, &Tensor::ones_like(&sums)) < 1e-6);
    let (_, w) = attention(&q, &q, &q, Some(&causal_mask(4, Device::Cpu)), 0.0, false);
    assert!(w.triu(1).abs().max().double_value(&[]) == 0.0, "a query attended to a later key");
}

#[test]
fn split_then_merge_heads_is_the_identity_and_heads_are_contiguous_slices() {
    let x = Tensor::arange(2 * 3 * 12, (Kind::Float, Device::Cpu)).view([2, 3, 12]);
    let h = split_heads(&x, 4);
    assert_eq!(h.size(), [2, 4, 3, 3]);
    // Head 1 of token 2 in batch 0 is features 3..6 of that token.
    assert_eq!(
        Vec::<f32>::try_from(h.get(0).get(1).get(2)).unwrap(),
        Vec::<f32>::try_from(x.get(0).get(2).narrow(0, 3, 3)).unwrap()
    );
    assert_eq!(max_diff(&merge_heads(&h), &x), 0.0);
}

#[test]
fn sinusoidal_encoding_matches_its_formula() {
    let pe = sinusoidal(50, 16);
    assert_eq!(pe.size(), [50, 16]);
    for (p, i) in [(0i64, 0i64), (7, 2), (13, 5), (49, 7)] {
        let angle = p as f64 / 10000f64.powf(2.0 * i as f64 / 16.0);
        assert!((pe.double_value(&[p, 2 * i]) - angle.sin()).abs() < 1e-6);
        assert!((pe.double_value(&[p, 2 * i + 1]) - angle.cos()).abs() < 1e-6);
    }
}

#[test]
fn rope_scores_depend_only_on_the_relative_position() {
    // q at position m and k at position n: q_m . k_n must equal q_{m+s} . k_{n+s}.
    let mut rng = Rng::new(6);
    let (q, k) = (rng.normal_tensor(&[1, 1, 1, 16]), rng.normal_tensor(&[1, 1, 1, 16]));
    for style in [RopeStyle::Half, RopeStyle::Interleaved] {
        let rope = Rope::new(16, 64, 10000.0, style, Device::Cpu).unwrap();
        let score = |m: i64, n: i64| (rope.apply(&q, m) * rope.apply(&k, n)).sum(Kind::Double).double_value(&[]);
        let base = score(5, 2);
        for s in [1, 9, 30] {
            assert!((score(5 + s, 2 + s) - base).abs() < 1e-4, "{style:?} shift {s}");
        }
        // Position 0 is no rotation, and rotations keep norms.
        assert!(max_diff(&rope.apply(&q, 0), &q) < 1e-7);
        let n0 = q.norm().double_value(&[]);
        assert!((rope.apply(&q, 17).norm().double_value(&[]) - n0).abs() < 1e-5);
    }
}

#[test]
fn rope_styles_agree_once_the_head_dimensions_are_permuted() {
    // Interleaved pairs (2i, 2i+1) are half pairs (i, i + Dh/2) after the permutation
    // [0, 8, 1, 9, ...]: the relation between llama.cpp's GGUF layout and Hugging Face's.
    let mut rng = Rng::new(7);
    let x = rng.normal_tensor(&[1, 2, 5, 16]);
    let perm: Vec<i64> = (0..8).flat_map(|i| [i, i + 8]).collect();
    let perm = Tensor::from_slice(&perm);
    let half = Rope::new(16, 32, 10000.0, RopeStyle::Half, Device::Cpu).unwrap();
    let inter = Rope::new(16, 32, 10000.0, RopeStyle::Interleaved, Device::Cpu).unwrap();
    let a = half.apply(&x, 3).index_select(-1, &perm);
    let b = inter.apply(&x.index_select(-1, &perm), 3);
    assert!(max_diff(&a, &b) < 1e-6);
}

#[test]
fn encoder_classifier_ignores_padding_and_learns_a_token_rule() {
    // Padding must not change a sequence's logits; and a 2-layer encoder must learn "is token 3
    // present" on random sequences, for each kind of positions.
    for positions in [Positions::Sinusoidal, Positions::Learned, Positions::Rope] {
        tch::manual_seed(0);
        let vs = nn::VarStore::new(Device::Cpu);
        let cfg = EncoderConfig {
            vocab: 12,
            d_model: 32,
            heads: 4,
            layers: 2,
            d_ff: 64,
            max_len: 16,
            dropout: 0.0,
            positions,
            pooling: Pooling::Mean,
            classes: 2,
        };
        let model = EncoderClassifier::new(&vs.root(), &cfg).unwrap();
        let ids = Tensor::from_slice(&[5i64, 3, 7, 0, 0]).view([1, 5]);
        let mask = Tensor::from_slice(&[1i64, 1, 1, 0, 0]).view([1, 5]);
        let short = model.logits(&ids.narrow(1, 0, 3), &mask.narrow(1, 0, 3), false);
        let padded = model.logits(&ids, &mask, false);
        assert!(max_diff(&short, &padded) < 1e-5, "{positions:?}: padding changed the logits");

        let mut rng = Rng::new(8);
        let data: Vec<i64> = (0..256 * 8).map(|_| 4 + rng.below(8) as i64).collect();
        let x = Tensor::from_slice(&data).view([256, 8]);
        let put = Tensor::from_slice(&(0..256).map(|i| (i % 2) as i64).collect::<Vec<_>>());
        let x = x.where_self(
            &put.unsqueeze(1)
                .logical_not()
                .logical_or(&Tensor::arange(8, (Kind::Int64, Device::Cpu)).ne(2).unsqueeze(0)),
            &Tensor::from(3i64),
        );
        let m = Tensor::ones([256, 8], (Kind::Int64, Device::Cpu));
        let mut opt = nn::OptimizerConfig::build(nn::Adam::default(), &vs, 3e-3).unwrap();
        for _ in 0..60 {
            let loss = model.logits(&x, &m, true).cross_entropy_for_logits(&put);
            opt.backward_step(&loss);
        }
        let acc = model.logits(&x, &m, false).argmax(-1, false).eq_tensor(&put).to_kind(Kind::Float).mean(Kind::Float);
        assert!(acc.double_value(&[]) > 0.95, "{positions:?}: accuracy {}", acc.double_value(&[]));
    }
}
