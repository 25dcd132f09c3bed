//! Normalisation layers that tch's `nn` lacks: LayerNorm with an optional bias (GPT-2 with
//! `bias: false`) and Llama's RMSNorm. SyncBatchNorm needs a process group and lives in
//! `dist::ddp`; models take their batch norm from a factory so they need not know.

use tch::nn;
use tch::Tensor;

/// LayerNorm with an optional bias (tch's has both affine tensors or neither).
#[derive(Debug)]
pub struct LayerNorm {
    pub ws: Tensor,
    pub bs: Option<Tensor>,
    dim: i64,
}

impl LayerNorm {
    /// # Shapes
    /// `x`: `(..., C)` -> `(..., C)`
    pub fn forward(&self, x: &Tensor) -> Tensor {
        x.layer_norm([self.dim], Some(&self.ws), self.bs.as_ref(), 1e-5, true)
    }
}

/// A LayerNorm over `c` features at `vs` (`weight`, and `bias` when asked), eps 1e-5.
pub fn layer_norm(vs: nn::Path, c: i64, bias: bool) -> LayerNorm {
    LayerNorm {
        ws: vs.var("weight", &[c], nn::Init::Const(1.0)),
        bs: bias.then(|| vs.var("bias", &[c], nn::Init::Const(0.0))),
        dim: c,
    }
}

/// RMSNorm (Zhang & Sennrich 2019), Llama's norm: `x / sqrt(mean(x²) + eps) · weight`, no mean
/// subtracted and no bias. As Hugging Face's `LlamaRMSNorm`, the statistics run in fp32 and the
/// normalised value is cast back to the input's dtype before the weight multiplies it.
#[derive(Debug)]
pub struct RmsNorm {
    pub ws: Tensor,
    pub eps: f64,
}

impl RmsNorm {
    /// # Shapes
    /// `x`: `(..., C)` -> `(..., C)`
    pub fn forward(&self, x: &Tensor) -> Tensor {
        let kind = x.kind();
        if kind == tch::Kind::Float && self.ws.kind() == kind {
            // ATen's rms_norm: one op, and in fp32 the same arithmetic as the steps below.
            return x.rms_norm([self.ws.size()[0]], Some(&self.ws), self.eps);
        }
        crate::ops::rms_norm_reference(x, &self.ws, self.eps)
    }
}

/// An RMSNorm over `c` features at `vs` (`weight`, initialised to ones).
pub fn rms_norm(vs: nn::Path, c: i64, eps: f64) -> RmsNorm {
    RmsNorm { ws: vs.var("weight", &[c], nn::Init::Const(1.0)), eps }
}
