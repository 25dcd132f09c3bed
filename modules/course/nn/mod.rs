//! Layers shared by the models: attention (written out and fused), positional encodings, norms,
//! losses and LoRA's low-rank update. Built from tch and our `ops`; knows no model, no data set and no training.

pub mod attention;
pub mod lora;
pub mod loss;
pub mod norm;
pub mod pool;
pub mod positions;
pub mod quant;
