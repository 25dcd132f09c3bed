//! Layers shared by the models: attention (written out and fused), positional encodings, norms
//! and losses. Built from tch and our `ops`; knows no model, no data set and no training.

pub mod attention;
pub mod loss;
pub mod norm;
pub mod pool;
pub mod positions;
