//! c10d through the shim, with the ranks as threads of this process (each its own TCPStore
//! client and ProcessGroupGloo, as separate processes would have): collectives against analytic
//! values, timeouts, bucketed DDP against hand-averaged gradients, SyncBatchNorm against batch
//! norm over the whole batch, and the DistributedSampler's shards.

use anyhow::Result;
use course::data::loader::Sampler;
use course::dist::c10d::{Backend, ProcessGroup, ReduceOp, Store};
use course::dist::ddp::{Ddp, DdpConfig, DistributedSampler, SyncBatchNorm};
use course::dist::launch::free_port;
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};
use tch::nn::{self, ModuleT};
use tch::{Device, Kind, Tensor};

const T: Duration = Duration::from_secs(30);

/// Runs `f(pg)` on `n` ranks (threads) joined through a fresh TCPStore; returns each rank's result.
/// Rank 0's store listens on a port the OS picks, so parallel tests never race for one.
fn on_ranks<R: Send + 'static>(n: usize, f: impl Fn(ProcessGroup) -> Result<R> + Send + Sync + 'static) -> Vec<R> {
    let server = Store::tcp("127.0.0.1", 0, n, true, T).unwrap();
    let port = server.port().unwrap();
    let mut server = Some(server);
    let f = Arc::new(f);
    let handles: Vec<_> = (0..n)
        .map(|rank| {
            let f = f.clone();
            let mine = server.take();
            thread::spawn(move || -> Result<R> {
                let store = match mine {
                    Some(s) => s,
                    None => Store::tcp("127.0.0.1", port, n, false, T)?,
                };
                let pg = ProcessGroup::new(store, rank, n, Backend::Gloo, T)?;
                f(pg)
            })
        })
        .collect();
    handles.into_iter().map(|h| h.join().expect("rank thread panicked").unwrap()).collect()
}

#[test]
fn collectives_match_analytic_values() {
    let out = on_ranks(3, |pg| {
        let r = pg.rank() as f64;
        let s = Tensor::from_slice(&[r, 10.0 * r]);
        pg.allreduce(&s, ReduceOp::Sum)?;
        let a = Tensor::from_slice(&[r as f32 + 1.0]);
        pg.allreduce(&a, ReduceOp::Avg)?;
        let b = Tensor::full([4], r, (Kind::Float, Device::Cpu));
        pg.broadcast(&b, 2)?;
        let g = pg.allgather(&Tensor::from_slice(&[r as i64, 7]))?;
        pg.barrier()?;
        let m = pg.allreduce_f64(&[r, 1.0], ReduceOp::Sum)?;
        Ok((
            Vec::<f64>::try_from(&s)?,
            f32::try_from(&a)?,
            Vec::<f32>::try_from(&b)?,
            g.iter().map(|t| Vec::<i64>::try_from(t).unwrap()).collect::<Vec<_>>(),
            m,
        ))
    });
    for (s, a, b, g, m) in out {
        assert_eq!(s, vec![3.0, 30.0]); // 0 + 1 + 2
        assert!((a - 2.0).abs() < 1e-6, "average of 1, 2, 3 = {a}");
        assert_eq!(b, vec![2.0; 4]);
        assert_eq!(g, vec![vec![0, 7], vec![1, 7], vec![2, 7]]);
        assert_eq!(m, vec![3.0, 3.0]);
    }
}

#[test]
fn store_set_get_add_and_prefixes() {
    let out = on_ranks(2, |pg| {
        let st = pg.store();
        let mine = st.prefixed("test")?;
        mine.set(&format!("k{}", pg.rank()), format!("hello from {}", pg.rank()).as_bytes())?;
        let other = mine.get(&format!("k{}", 1 - pg.rank()), T)?;
        let n = st.add("counter", 5)?;
        pg.barrier()?;
        let total = st.add("counter", 0)?;
        Ok((String::from_utf8(other)?, n, total))
    });
    assert_eq!(out[0].0, "hello from 1");
    assert_eq!(out[1].0, "hello from 0");
    assert!(out.iter().all(|o| o.2 == 10), "{out:?}");
    let mut firsts: Vec<i64> = out.iter().map(|o| o.1).collect();
    firsts.sort();
    assert_eq!(firsts, vec![5, 10]);
}

#[test]
fn a_missing_rank_times_out_with_c10d_message() {
    // Rank 1 joins the group but never enters the allreduce: rank 0 must give up at its timeout.
    let store = Store::tcp("127.0.0.1", 0, 2, true, T).unwrap();
    let port = store.port().unwrap();
    let peer = thread::spawn(move || {
        let store = Store::tcp("127.0.0.1", port, 2, false, T).unwrap();
        let pg = ProcessGroup::new(store, 1, 2, Backend::Gloo, T).unwrap();
        thread::sleep(Duration::from_secs(6));
        drop(pg);
    });
    let pg = ProcessGroup::new(store, 0, 2, Backend::Gloo, T).unwrap();
    let t0 = Instant::now();
    let err =
        pg.allreduce_timeout(&Tensor::ones([8], (Kind::Float, Device::Cpu)), ReduceOp::Sum, Duration::from_secs(2));
    let took = t0.elapsed();
    let msg = format!("{:#}", err.expect_err("allreduce without the peer must fail"));
    assert!(msg.contains("allreduce on rank 0 of 2"), "{msg}");
    assert!(took < Duration::from_secs(6), "gave up after {took:?}");
    peer.join().unwrap();
}

#[test]
fn unreachable_store_is_a_clear_error() {
    let port = free_port().unwrap(); // nobody listens there
    let t0 = Instant::now();
    let err = Store::tcp("127.0.0.1", port, 2, false, Duration::from_secs(2)).err().expect("no server");
    let msg = format!("{err:#}");
    assert!(msg.contains(&format!("connecting to the TCPStore at 127.0.0.1:{port}")), "{msg}");
    assert!(t0.elapsed() < Duration::from_secs(20));
}

fn model(vs: &nn::VarStore) -> nn::Sequential {
    let p = vs.root();
    nn::seq().add(nn::linear(&p / "a", 5, 7, Default::default())).add_fn(|x| x.tanh()).add(nn::linear(
        &p / "b",
        7,
        3,
        Default::default(),
    ))
}

/// Gradients of the model with weights `init` on the whole batch.
fn grads_on(init: &[(String, Tensor)], x: &Tensor, y: &Tensor) -> Vec<(String, Tensor)> {
    let vs = nn::VarStore::new(Device::Cpu);
    let m = model(&vs);
    let vars = vs.variables();
    tch::no_grad(|| {
        for (n, t) in init {
            vars[n].detach().copy_(t);
        }
    });
    let loss = m.forward_t(x, true).cross_entropy_for_logits(y);
    loss.backward();
    course::dist::ddp::sorted_variables(&vs).into_iter().map(|(n, t)| (n, t.grad().copy())).collect()
}

#[test]
fn ddp_broadcasts_weights_and_averages_gradients_in_buckets() {
    // A tiny bucket cap forces several buckets; the result must not depend on it.
    for cap in [25.0, 0.0001] {
        let out = on_ranks(2, move |pg| {
            let rank = pg.rank();
            tch::manual_seed(100 + rank as i64); // different initial weights per rank
            let vs = nn::VarStore::new(Device::Cpu);
            let m = model(&vs);
            let mut ddp = Ddp::new(Arc::new(pg), &vs, DdpConfig { bucket_cap_mb: cap })?;
            let x = Tensor::arange(40, (Kind::Float, Device::Cpu)).reshape([8, 5]).sin();
            let y = Tensor::from_slice(&[0i64, 1, 2, 0, 1, 2, 2, 1]);
            let (xr, yr) = (x.narrow(0, 4 * rank as i64, 4), y.narrow(0, 4 * rank as i64, 4));
            let loss = m.forward_t(&xr, true).cross_entropy_for_logits(&yr);
            loss.backward();
            ddp.sync_gradients()?;
            let weights: Vec<(String, Tensor)> =
                course::dist::ddp::sorted_variables(&vs).into_iter().map(|(n, t)| (n, t.detach().copy())).collect();
            let grads: Vec<Tensor> =
                course::dist::ddp::sorted_variables(&vs).iter().map(|(_, t)| t.grad().copy()).collect();
            Ok((weights, grads, ddp.bucket_names().len(), x, y))
        });
        let (w0, _, nb, x, y) = &out[0];
        // 104 bytes: b.bias (12 B) + b.weight (84 B) share one bucket; a.weight (140 B) and
        // a.bias (28 B) get their own.
        assert_eq!(*nb, if cap > 1.0 { 1 } else { 3 }, "bucket count at cap {cap}");
        // Both ranks hold rank 0's weights and the same averaged gradients.
        for ((_, a), (_, b)) in w0.iter().zip(&out[1].0) {
            assert_eq!(f64::try_from((a - b).abs().max()).unwrap(), 0.0);
        }
        // Reference: the gradient of the mean loss over all 8 rows = mean of the two halves'.
        let full = grads_on(w0, x, y);
        for (i, (name, g)) in full.iter().enumerate() {
            for (rank, o) in out.iter().enumerate() {
                let d = f64::try_from((&o.1[i] - g).abs().max()).unwrap();
                assert!(d < 1e-6, "{name} on rank {rank}: |Δ| = {d}");
            }
        }
    }
}

#[test]
fn no_sync_accumulates_locally_then_averages_the_sum() {
    let out = on_ranks(2, |pg| {
        let vs = nn::VarStore::new(Device::Cpu);
        let w = vs.root().var("w", &[3], nn::Init::Const(1.0));
        let mut ddp = Ddp::new(Arc::new(pg), &vs, DdpConfig::default())?;
        let r = ddp.group().rank() as f64 + 1.0;
        let c = Tensor::from_slice(&[r, 2.0 * r, 3.0 * r]).to_kind(Kind::Float);
        ddp.no_sync(|_| (&w * &c).sum(Kind::Float).backward());
        let local = Vec::<f32>::try_from(w.grad())?;
        (&w * &c).sum(Kind::Float).backward();
        ddp.sync_gradients()?;
        Ok((local, Vec::<f32>::try_from(w.grad())?))
    });
    // Rank r's local gradient after the no_sync pass is c_r; after the second pass 2 c_r, and
    // the average over ranks is (2 c_1 + 2 c_2) / 2 = c_1 + c_2 = (3, 6, 9).
    assert_eq!(out[0].0, vec![1.0, 2.0, 3.0]);
    assert_eq!(out[1].0, vec![2.0, 4.0, 6.0]);
    for o in &out {
        assert_eq!(o.1, vec![3.0, 6.0, 9.0]);
    }
}

#[test]
fn sync_batch_norm_equals_batch_norm_over_the_whole_batch() {
    let x = Tensor::randn([6, 3, 4, 4], (Kind::Float, Device::Cpu)) * 3.0 + 1.0;
    let dy = Tensor::randn([6, 3, 4, 4], (Kind::Float, Device::Cpu));
    // Reference: one process, plain batch norm over all 6 samples; loss = sum(y * dy) / 6 as the
    // mean of per-sample losses, so each rank's half has loss sum(y_r * dy_r) / 3.
    let vs = nn::VarStore::new(Device::Cpu);
    let bn = nn::batch_norm2d(vs.root() / "bn", 3, Default::default());
    tch::no_grad(|| {
        bn.ws.as_ref().unwrap().detach().copy_(&Tensor::from_slice(&[0.5f32, 1.5, -2.0]));
        bn.bs.as_ref().unwrap().detach().copy_(&Tensor::from_slice(&[0.1f32, 0.0, 0.3]));
    });
    let xr = x.copy().set_requires_grad(true);
    let y = bn.forward_t(&xr, true);
    ((&y * &dy).sum(Kind::Float) / 6.0).backward();
    let reference = (
        y.detach(),
        xr.grad(),
        bn.ws.as_ref().unwrap().grad(),
        bn.bs.as_ref().unwrap().grad(),
        bn.running_mean.copy(),
        bn.running_var.copy(),
    );

    let (xv, dyv) = (Vec::<f32>::try_from(x.reshape([-1])).unwrap(), Vec::<f32>::try_from(dy.reshape([-1])).unwrap());
    let out = on_ranks(2, move |pg| {
        let rank = pg.rank() as i64;
        let (xs, dys) = (Tensor::from_slice(&xv).reshape([6, 3, 4, 4]), Tensor::from_slice(&dyv).reshape([6, 3, 4, 4]));
        let vs = nn::VarStore::new(Device::Cpu);
        let sbn = SyncBatchNorm::new(&(vs.root() / "bn"), 3, Some(Arc::new(pg)));
        tch::no_grad(|| {
            sbn.ws.detach().copy_(&Tensor::from_slice(&[0.5f32, 1.5, -2.0]));
            sbn.bs.detach().copy_(&Tensor::from_slice(&[0.1f32, 0.0, 0.3]));
        });
        let xr = xs.narrow(0, 3 * rank, 3).copy().set_requires_grad(true);
        let y = sbn.forward_t(&xr, true);
        ((&y * dys.narrow(0, 3 * rank, 3)).sum(Kind::Float) / 3.0).backward();
        Ok((y.detach(), xr.grad(), sbn.ws.grad(), sbn.bs.grad(), sbn.running_mean.copy(), sbn.running_var.copy()))
    });
    let cat = |f: &dyn Fn(&(Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)) -> Tensor| {
        Tensor::cat(&[f(&out[0]), f(&out[1])], 0)
    };
    let close = |a: &Tensor, b: &Tensor, what: &str| {
        let d = f64::try_from((a - b).abs().max()).unwrap();
        assert!(d < 2e-5, "{what}: |Δ| = {d}");
    };
    close(&cat(&|o| o.0.shallow_clone()), &reference.0, "output");
    // Each rank's input gradient is the gradient of its own loss (mean over 3) through the
    // global statistics: twice the share of the global mean loss, as DDP expects before averaging.
    close(&(cat(&|o| o.1.shallow_clone()) / 2.0), &reference.1, "input gradient");
    // Weight and bias gradients are per-rank; their DDP average is the global one.
    close(&((&out[0].2 + &out[1].2) / 2.0), &reference.2, "weight gradient");
    close(&((&out[0].3 + &out[1].3) / 2.0), &reference.3, "bias gradient");
    for o in &out {
        close(&o.4, &reference.4, "running mean");
        close(&o.5, &reference.5, "running var");
    }
}

#[test]
fn distributed_sampler_shards_cover_the_epoch_once() {
    let len = 10;
    for world in [1, 2, 3, 4] {
        let shards: Vec<Vec<usize>> =
            (0..world).map(|r| DistributedSampler::new(r, world, Some(7), false).unwrap().indices(3, len)).collect();
        let per = len.div_ceil(world);
        assert!(shards.iter().all(|s| s.len() == per), "world {world}: {shards:?}");
        // Interleaving the shards gives back the epoch's permutation, padded from its start.
        let perm = course::data::loader::RandomSampler { seed: 7 }.indices(3, len);
        let woven: Vec<usize> = (0..per).flat_map(|i| shards.iter().map(move |s| s[i])).collect();
        let mut padded = perm.clone();
        padded.extend_from_within(0..per * world - len);
        assert_eq!(woven, padded, "world {world}");
        // drop_last trims instead.
        let d: Vec<Vec<usize>> =
            (0..world).map(|r| DistributedSampler::new(r, world, Some(7), true).unwrap().indices(3, len)).collect();
        assert!(d.iter().all(|s| s.len() == len / world));
        let mut all: Vec<usize> = d.concat();
        all.sort();
        all.dedup();
        assert_eq!(all.len(), len / world * world, "no repeats with drop_last");
    }
    assert!(DistributedSampler::new(2, 2, None, false).is_err());
}
