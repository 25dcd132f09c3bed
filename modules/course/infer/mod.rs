//! Inference: sampling the next token and generating text from a causal language model
//! (m07 adds the KV-cache engine and the server here).

pub mod generate;
pub mod sampling;

pub use generate::generate;
pub use sampling::{sample, Sampling};
