//! Gradient checkpointing against the plain block: identical outputs and gradients of the input
//! and every parameter with dropout active (so the saved RNG state is exercised), under CPU bf16
//! autocast, with the block used twice in one graph, and through `recompute_local`; errors from
//! the closure, unlisted parameters and in-place changes surface as `Err`; the closure lives as
//! long as the graph.
//!
//! Dropout draws from torch's global generator, which `tch::manual_seed` resets for the whole
//! process, so every test here takes the `TORCH_RNG` lock (tests run in parallel threads).

use anyhow::anyhow;
use course::sys::recompute::{recompute, recompute_local, try_recompute};
use course::sys::rng::Rng;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use tch::{nn, nn::Module, Device, Kind, Tensor};

static TORCH_RNG: Mutex<()> = Mutex::new(());

fn lock() -> MutexGuard<'static, ()> {
    TORCH_RNG.lock().unwrap_or_else(|e| e.into_inner())
}

const C: i64 = 16;
const P_DROP: f64 = 0.1;

/// Linear(C, 4C) - GELU - dropout - Linear(4C, C), the MLP of a transformer block.
#[derive(Debug)]
struct Mlp {
    fc: nn::Linear,
    proj: nn::Linear,
}

impl Mlp {
    fn new(vs: &nn::Path) -> Self {
        Self {
            fc: nn::linear(vs / "c_fc", C, 4 * C, Default::default()),
            proj: nn::linear(vs / "c_proj", 4 * C, C, Default::default()),
        }
    }

    /// # Shapes
    /// `x`: `(B, T, C)` -> `(B, T, C)`
    fn forward(&self, x: &Tensor) -> Tensor {
        self.proj.forward(&self.fc.forward(x).gelu("tanh").dropout(P_DROP, true))
    }

    /// The same block over the same tensors (shared storage and autograd identity): `Send`,
    /// so it can move into a `checkpoint` closure.
    fn shallow(&self) -> Mlp {
        let lin =
            |l: &nn::Linear| nn::Linear { ws: l.ws.shallow_clone(), bs: l.bs.as_ref().map(|b| b.shallow_clone()) };
        Mlp { fc: lin(&self.fc), proj: lin(&self.proj) }
    }
}

struct Setup {
    vs: nn::VarStore,
    mlp: Mlp,
    x: Tensor,
    /// Fixed upstream weights, so the loss is not a plain sum (every output gets its own gradient).
    w: Tensor,
}

fn setup(seed: u64) -> Setup {
    let vs = nn::VarStore::new(Device::Cpu);
    let mlp = Mlp::new(&vs.root());
    // Parameters from the course RNG, not torch's global generator.
    let mut rng = Rng::new(seed);
    tch::no_grad(|| {
        for (_, mut p) in vs.variables() {
            p.copy_(&(rng.normal_tensor(&p.size()) * 0.2));
        }
    });
    let x = rng.normal_tensor(&[3, 5, C]).set_requires_grad(true);
    let w = rng.normal_tensor(&[3, 5, C]);
    Setup { vs, mlp, x, w }
}

fn params(vs: &nn::VarStore) -> Vec<Tensor> {
    let mut v = vs.variables().into_iter().collect::<Vec<_>>();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v.into_iter().map(|(_, t)| t).collect()
}

/// Clears and returns (name, grad) of the input and every parameter.
fn take_grads(s: &Setup) -> Vec<(String, Tensor)> {
    let mut out = vec![("input".to_string(), s.x.grad().copy())];
    let mut vars = s.vs.variables().into_iter().collect::<Vec<_>>();
    vars.sort_by(|a, b| a.0.cmp(&b.0));
    for (name, t) in vars {
        out.push((name, t.grad().copy()));
    }
    for (_, t) in s.vs.variables() {
        course::sys::runtime::clear_grad(&t);
    }
    course::sys::runtime::clear_grad(&s.x);
    out
}

fn assert_same(what: &str, a: &[(String, Tensor)], b: &[(String, Tensor)]) {
    assert_eq!(a.len(), b.len());
    for ((na, ta), (nb, tb)) in a.iter().zip(b) {
        assert_eq!(na, nb);
        assert!(ta.defined() && tb.defined(), "{what}: {na} has no gradient");
        let diff = (ta - tb).abs().max().double_value(&[]);
        // The recompute runs the same kernels on the same values: bit-identical.
        assert!(diff == 0.0, "{what}: gradient of {na} differs by {diff:e}");
    }
}

#[test]
fn gradients_equal_the_plain_block_with_dropout() {
    let _g = lock();
    let s = setup(1);
    tch::manual_seed(7);
    let y_plain = s.mlp.forward(&s.x);
    (&y_plain * &s.w).sum(Kind::Float).backward();
    let after_plain = Tensor::randn([4], (Kind::Float, Device::Cpu));
    let plain = take_grads(&s);

    tch::manual_seed(7);
    let m = s.mlp.shallow();
    let y_ck = recompute(move |x| m.forward(x), &s.x, &params(&s.vs)).unwrap();
    assert!(y_ck.requires_grad());
    assert!(y_ck.equal(&y_plain), "checkpointed forward differs");
    (&y_ck * &s.w).sum(Kind::Float).backward();
    // The recompute consumed no randomness from the program's point of view.
    let after_ck = Tensor::randn([4], (Kind::Float, Device::Cpu));
    assert!(after_ck.equal(&after_plain), "the RNG stream after backward differs");
    let ck = take_grads(&s);
    assert_same("dropout", &plain, &ck);

    // Dropout really was active: a different seed gives a different output.
    tch::manual_seed(8);
    assert!(!s.mlp.forward(&s.x).equal(&y_plain));
}

#[test]
fn gradients_equal_the_plain_block_under_cpu_bf16_autocast() {
    let _g = lock();
    let s = setup(2);
    let run = |ckpt: bool| {
        tch::manual_seed(11);
        let y = {
            let _ac = course::sys::runtime::autocast(Device::Cpu, Kind::BFloat16, true).unwrap();
            if ckpt {
                let m = s.mlp.shallow();
                recompute(move |x| m.forward(x), &s.x, &params(&s.vs)).unwrap()
            } else {
                s.mlp.forward(&s.x)
            }
        };
        assert_eq!(y.kind(), Kind::BFloat16, "autocast ran the last linear in bf16");
        // Backward outside autocast, as a trainer does: the recompute must re-enter it.
        (y.to_kind(Kind::Float) * &s.w).sum(Kind::Float).backward();
        assert!(!course::sys::runtime::autocast_state(Device::Cpu).unwrap().0, "autocast left on");
        take_grads(&s)
    };
    let plain = run(false);
    let ck = run(true);
    assert_same("bf16 autocast", &plain, &ck);

    // The comparison means something: fp32 gradients differ from the bf16 ones.
    tch::manual_seed(11);
    (s.mlp.forward(&s.x) * &s.w).sum(Kind::Float).backward();
    let fp32 = take_grads(&s);
    let diff = (&fp32[1].1 - &plain[1].1).abs().max().double_value(&[]);
    assert!(diff > 1e-4, "bf16 and fp32 gradients agree to {diff:e}; autocast had no effect");
}

#[test]
fn block_used_twice_in_one_graph() {
    let _g = lock();
    let s = setup(3);
    tch::manual_seed(5);
    let y = s.mlp.forward(&(s.mlp.forward(&s.x) + &s.x));
    (&y * &s.w).sum(Kind::Float).backward();
    let plain = take_grads(&s);

    tch::manual_seed(5);
    let (m1, m2) = (s.mlp.shallow(), s.mlp.shallow());
    let h = recompute(move |x| m1.forward(x), &s.x, &params(&s.vs)).unwrap() + &s.x;
    let y2 = recompute(move |x| m2.forward(x), &h, &params(&s.vs)).unwrap();
    assert!(y2.equal(&y));
    (&y2 * &s.w).sum(Kind::Float).backward();
    let ck = take_grads(&s);
    assert_same("twice", &plain, &ck);
}

#[test]
fn checkpoint_local_takes_a_shared_block() {
    let _g = lock();
    let s = setup(4);
    tch::manual_seed(9);
    (s.mlp.forward(&s.x) * &s.w).sum(Kind::Float).backward();
    let plain = take_grads(&s);

    tch::manual_seed(9);
    let shared = Rc::new(s.mlp.shallow()); // not Send
    let y = recompute_local(move |x| Ok(shared.forward(x)), &s.x, &params(&s.vs)).unwrap();
    (y * &s.w).sum(Kind::Float).backward();
    assert_same("local", &plain, &take_grads(&s));
}

#[test]
fn parameters_get_gradients_when_the_input_needs_none() {
    let _g = lock();
    let s = setup(5);
    let x = s.x.detach();
    tch::manual_seed(3);
    (s.mlp.forward(&x) * &s.w).sum(Kind::Float).backward();
    let plain: Vec<Tensor> = params(&s.vs).iter().map(|p| p.grad().copy()).collect();
    params(&s.vs).iter().for_each(course::sys::runtime::clear_grad);

    tch::manual_seed(3);
    let m = s.mlp.shallow();
    let y = recompute(move |x| m.forward(x), &x, &params(&s.vs)).unwrap();
    assert!(y.requires_grad(), "parameters require grad, so the output must");
    (y * &s.w).sum(Kind::Float).backward();
    for (p, g) in params(&s.vs).iter().zip(&plain) {
        assert!(p.grad().equal(g));
    }
}

#[test]
fn errors_and_panics_in_the_recompute_surface_at_backward() {
    let _g = lock();
    let s = setup(6);
    // Fine in the forward, fails when backward recomputes.
    let calls = Arc::new(AtomicUsize::new(0));
    let (m, c) = (s.mlp.shallow(), calls.clone());
    let y = try_recompute(
        move |x| {
            if c.fetch_add(1, Ordering::SeqCst) == 0 {
                Ok(m.forward(x))
            } else {
                Err(anyhow!("boom in the recompute"))
            }
        },
        &s.x,
        &params(&s.vs),
    )
    .unwrap();
    let err = (y * &s.w).sum(Kind::Float).f_backward().unwrap_err().to_string();
    assert!(err.contains("recompute: the block failed: boom in the recompute"), "{err}");
    assert_eq!(calls.load(Ordering::SeqCst), 2);

    // A panic (a shape error in a tch op) becomes an error too, with its message.
    let (m, c) = (s.mlp.shallow(), Arc::new(AtomicUsize::new(0)));
    let y = recompute(
        move |x| {
            if c.fetch_add(1, Ordering::SeqCst) == 0 {
                m.forward(x)
            } else {
                x.matmul(&Tensor::zeros([7, 3], (Kind::Float, Device::Cpu)))
            }
        },
        &s.x,
        &params(&s.vs),
    )
    .unwrap();
    let err = (y * &s.w).sum(Kind::Float).f_backward().unwrap_err().to_string();
    assert!(err.contains("panicked") && err.contains("mat1 and mat2"), "{err}");

    // In the forward, the error is checkpoint's own.
    let err = try_recompute(|_| Err(anyhow!("bad block")), &s.x, &params(&s.vs)).unwrap_err();
    assert!(format!("{err:#}").contains("bad block"), "{err:#}");
}

#[test]
fn a_parameter_missing_from_params_is_refused() {
    let _g = lock();
    let s = setup(7);
    let m = s.mlp.shallow();
    let mut ps = params(&s.vs);
    let dropped = ps.remove(0); // c_fc.bias, shape (4C)
    let y = recompute(move |x| m.forward(x), &s.x, &ps).unwrap();
    let err = (y * &s.w).sum(Kind::Float).f_backward().unwrap_err().to_string();
    assert!(
        err.contains("neither its input nor in `params`") && err.contains(&format!("{:?}", dropped.size())),
        "{err}"
    );

    let twice = [ps[0].shallow_clone(), ps[0].shallow_clone()];
    let m = s.mlp.shallow();
    let err = recompute(move |x| m.forward(x), &s.x, &twice).unwrap_err();
    assert!(format!("{err:#}").contains("listed twice"), "{err:#}");
}

#[test]
fn changing_a_parameter_before_backward_is_an_error() {
    let _g = lock();
    let s = setup(8);
    let m = s.mlp.shallow();
    let y = recompute(move |x| m.forward(x), &s.x, &params(&s.vs)).unwrap();
    let mut p = params(&s.vs).remove(1);
    tch::no_grad(|| {
        let _ = p.g_add_scalar_(1.0); // an "optimizer step" before backward
    });
    let err = (y * &s.w).sum(Kind::Float).f_backward().unwrap_err().to_string();
    assert!(err.contains("modified by an inplace operation"), "{err}");
}

/// Sets a flag when dropped.
struct DropFlag(Arc<AtomicBool>);
impl Drop for DropFlag {
    fn drop(&mut self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

#[test]
fn the_closure_lives_as_long_as_the_graph() {
    let _g = lock();
    let s = setup(9);
    let dropped = Arc::new(AtomicBool::new(false));
    let (m, flag) = (s.mlp.shallow(), DropFlag(dropped.clone()));
    let y = recompute(
        move |x| {
            let _keep = &flag;
            m.forward(x)
        },
        &s.x,
        &params(&s.vs),
    )
    .unwrap();
    assert!(!dropped.load(Ordering::SeqCst), "freed while the graph still needs it");
    let loss = (&y * &s.w).sum(Kind::Float);
    loss.backward();
    assert!(!dropped.load(Ordering::SeqCst), "freed while the output still holds the node");
    drop(loss);
    drop(y);
    assert!(dropped.load(Ordering::SeqCst), "not freed with the graph");

    // Under no_grad nothing is saved: the closure runs once and is freed at once.
    let dropped = Arc::new(AtomicBool::new(false));
    let (m, flag) = (s.mlp.shallow(), DropFlag(dropped.clone()));
    let y = tch::no_grad(|| {
        recompute(
            move |x| {
                let _keep = &flag;
                m.forward(x)
            },
            &s.x,
            &params(&s.vs),
        )
        .unwrap()
    });
    assert!(!y.requires_grad());
    assert!(dropped.load(Ordering::SeqCst));
}
