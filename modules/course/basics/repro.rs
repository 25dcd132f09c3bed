//! Reproducibility probes (module m01): a fixed recipe of random ops whose result is hashed
//! bit for bit, so two runs — in one process or two — can be compared exactly.

use crate::sys::rng::seed_everything;
use tch::nn::{self, Module, ModuleT};
use tch::{Device, Kind, Tensor};

/// FNV-1a over the raw bytes of `t` (made contiguous, on the CPU).
pub fn tensor_hash(t: &Tensor) -> u64 {
    let t = t.to_device(Device::Cpu).contiguous();
    let n = t.numel() * t.kind().elt_size_in_bytes();
    let mut bytes = vec![0u8; n];
    t.copy_data_u8(&mut bytes, t.numel());
    bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ *b as u64).wrapping_mul(0x0100_0000_01b3))
}

/// Seeds everything with `seed`, then draws from every source of randomness a training run
/// touches: tensor RNG, parameter initialisation, dropout, a shuffle by the course RNG, and a
/// matmul and reduction (whose results depend on thread scheduling only if kernels are
/// non-deterministic). Returns one hash of all of it.
pub fn fingerprint(seed: u64, device: Device) -> u64 {
    let mut rng = seed_everything(seed);
    let vs = nn::VarStore::new(device);
    let lin = nn::linear(vs.root() / "probe", 64, 32, Default::default());
    let x = Tensor::randn([128, 64], (Kind::Float, device));
    let h = lin.forward(&x).relu();
    let h = h.dropout(0.5, true);
    let y = h.matmul(&h.tr()).sum_dim_intlist([1i64].as_slice(), false, Kind::Float);
    let perm: Vec<i64> = rng.permutation(128).into_iter().map(|i| i as i64).collect();
    let y = y.index_select(0, &Tensor::from_slice(&perm).to_device(device));
    let drop2 = nn::func(|t| t.dropout(0.1, true)).forward_t(&y, true);
    tensor_hash(&drop2) ^ tensor_hash(&lin.ws).rotate_left(1)
}
