use course::nn::quant::{ggml_weight, Int8Weight, Nf4Weight};
use course::ops::qmatmul::{
    qlinear, qlinear_int8_activations as qa, qlinear_int8_activations_reference as qar, QFormat,
};
use std::time::Instant;
use tch::{Device, Kind, Tensor};
fn t(f: &dyn Fn()) -> f64 {
    f();
    let n = 50;
    let s = Instant::now();
    for _ in 0..n {
        f()
    }
    s.elapsed().as_secs_f64() * 1e3 / n as f64
}
fn main() {
    tch::manual_seed(0);
    let _g = tch::no_grad_guard();
    for (k, n) in [(4096i64, 4096i64), (1536, 576), (576, 49152)] {
        let x = Tensor::randn([1, k], (Kind::Float, Device::Cpu));
        let w = Tensor::randn([n, k], (Kind::Float, Device::Cpu)) * 0.02;
        let v: Vec<f32> = Vec::try_from(w.reshape([-1])).unwrap();
        let q41 = ggml_weight(
            QFormat::Q4_1,
            Tensor::from_slice(&course::io::gguf::quantize(course::io::gguf::GgmlType::Q4_1, &v).unwrap()),
            n,
            k,
        )
        .unwrap();
        let i8w = Int8Weight::quantize(&w).unwrap().tensors();
        let nf4 = Nf4Weight::quantize(&w).unwrap().tensors();
        let f = t(&|| drop(x.linear::<Tensor>(&w, None)));
        let a = t(&|| drop(qlinear(&x, &i8w).unwrap()));
        let b = t(&|| drop(qlinear(&x, &q41).unwrap()));
        let c = t(&|| drop(qlinear(&x, &nf4).unwrap()));
        let v = Vec::try_from(w.reshape([-1])).unwrap();
        let q80 = ggml_weight(
            QFormat::Q8_0,
            Tensor::from_slice(&course::io::gguf::quantize(course::io::gguf::GgmlType::Q8_0, &v).unwrap()),
            n,
            k,
        )
        .unwrap();
        for (nm, q) in [("q4_1", &q41), ("nf4", &nf4), ("q8_0", &q80)] {
            let e = (qa(&x, q).unwrap() - qar(&x, q).unwrap()).abs().max().double_value(&[])
                / qar(&x, q).unwrap().abs().max().double_value(&[]);
            let e2 = (qa(&x, q).unwrap() - qlinear(&x, q).unwrap()).abs().max().double_value(&[])
                / qar(&x, q).unwrap().abs().max().double_value(&[]);
            let tq = t(&|| drop(qa(&x, q).unwrap()));
            println!("  {nm} act8 {tq:.3} ms ({:.2}x f32), vs ref {e:.2e}, vs float path {e2:.2e}", f / tq);
        }
        println!(
            "{k}x{n}: f32 {f:.3} int8 {a:.3} ({:.2}x) q4_1 {b:.3} ({:.2}x) nf4 {c:.3} ({:.2}x)",
            f / a,
            f / b,
            f / c
        );
    }
}
