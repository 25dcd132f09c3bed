//! Custom ops from `kernels/`, one file per op, each beside a `*_reference` written in plain tch
//! ops that the tests and the benchmark compare against.

pub mod adamw;
pub mod bias_gelu;
pub mod cross_entropy;
pub mod dropout;
pub mod linear;
pub mod llama;
pub mod qmatmul;

pub use bias_gelu::{bias_gelu, bias_gelu_backward, bias_gelu_forward, bias_gelu_reference};
pub use cross_entropy::{
    cross_entropy, cross_entropy_backward, cross_entropy_forward, cross_entropy_reference, IGNORE_INDEX,
};
pub use linear::{linear, linear_reference, linear_uses_onednn, skinny_matmul};
pub use llama::{
    add_rms_norm_, decode_attention, decode_attention_reference, decode_attention_rows, rms_norm, rms_norm_reference,
    swiglu, swiglu_reference,
};
pub use qmatmul::{
    qdequantize, qdequantize_reference, qlinear, qlinear_int8_activations, qlinear_reference, QFormat, QTensors,
};
