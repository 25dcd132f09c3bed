//! `Dataset` and `DataLoader`: batching, a seeded shuffle re-drawn every epoch, `drop_last`, a
//! collate step, and N worker threads with bounded prefetch queues.
//!
//! Two promises, whatever the number of workers (0 = load in the caller's thread):
//! - the same batches in the same order: batch `i` of an epoch is built by worker `i % N` and
//!   read back from that worker's queue in turn, so order never depends on thread timing;
//! - the same random augmentation: each example gets its own RNG seeded from
//!   `(loader seed, epoch, example index)`, not a generator shared by a worker.
//!
//! A sampler decides the order of examples in an epoch; m05 adds a distributed one through the
//! same [`Sampler`] trait.

use crate::sys::rng::Rng;
use anyhow::{anyhow, bail, Result};
use std::sync::mpsc::{sync_channel, Receiver};
use std::sync::Arc;
use std::thread::JoinHandle;
use tch::Tensor;

/// A map-style data set: a length and random access to one example.
pub trait Dataset: Send + Sync + 'static {
    type Item: Send + 'static;
    fn len(&self) -> usize;
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Example `index`; `rng` is this example's own generator for random transforms.
    fn get(&self, index: usize, rng: &mut Rng) -> Result<Self::Item>;
}

/// The order of example indices in one epoch.
pub trait Sampler: Send + Sync + 'static {
    fn indices(&self, epoch: u64, len: usize) -> Vec<usize>;
}

/// 0, 1, 2, ... every epoch.
pub struct SequentialSampler;

impl Sampler for SequentialSampler {
    fn indices(&self, _epoch: u64, len: usize) -> Vec<usize> {
        (0..len).collect()
    }
}

/// A fresh permutation each epoch, determined by `(seed, epoch)` alone, so a resumed run
/// redraws exactly the order the interrupted run had.
pub struct RandomSampler {
    pub seed: u64,
}

impl Sampler for RandomSampler {
    fn indices(&self, epoch: u64, len: usize) -> Vec<usize> {
        Rng::new(mix(self.seed, epoch, u64::MAX)).permutation(len)
    }
}

/// One u64 from three, well mixed (SplitMix64 finaliser over a combination).
pub fn mix(a: u64, b: u64, c: u64) -> u64 {
    let mut z = a ^ b.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ c.wrapping_mul(0xC2B2_AE3D_27D4_EB4F);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

type Collate<I, B> = dyn Fn(Vec<I>) -> Result<B> + Send + Sync;

pub struct DataLoader<D: Dataset, B> {
    dataset: Arc<D>,
    sampler: Arc<dyn Sampler>,
    collate: Arc<Collate<D::Item, B>>,
    pub batch_size: usize,
    pub drop_last: bool,
    pub workers: usize,
    /// Batches each worker may hold ready ahead of the consumer.
    pub prefetch: usize,
    /// Seeds the per-example RNGs of random transforms.
    pub seed: u64,
}

impl<D: Dataset, B: Send + 'static> DataLoader<D, B> {
    /// A loader over `dataset` with `collate` turning a list of examples into a batch.
    /// Defaults: sequential order, keep the last partial batch, no workers, prefetch 2, seed 0.
    pub fn new(
        dataset: Arc<D>,
        batch_size: usize,
        collate: impl Fn(Vec<D::Item>) -> Result<B> + Send + Sync + 'static,
    ) -> Result<Self> {
        if batch_size == 0 {
            bail!("batch size must be at least 1");
        }
        Ok(Self {
            dataset,
            sampler: Arc::new(SequentialSampler),
            collate: Arc::new(collate),
            batch_size,
            drop_last: false,
            workers: 0,
            prefetch: 2,
            seed: 0,
        })
    }

    pub fn sampler(mut self, s: impl Sampler) -> Self {
        self.sampler = Arc::new(s);
        self
    }
    /// Shuffle with a permutation redrawn every epoch from `seed`.
    pub fn shuffle(self, seed: u64) -> Self {
        self.sampler(RandomSampler { seed })
    }
    pub fn drop_last(mut self, on: bool) -> Self {
        self.drop_last = on;
        self
    }
    pub fn workers(mut self, n: usize) -> Self {
        self.workers = n;
        self
    }
    pub fn prefetch(mut self, n: usize) -> Self {
        self.prefetch = n.max(1);
        self
    }
    pub fn seed(mut self, seed: u64) -> Self {
        self.seed = seed;
        self
    }

    pub fn dataset(&self) -> &Arc<D> {
        &self.dataset
    }

    /// The batches of `epoch` as lists of example indices: the data order a checkpoint records.
    pub fn batch_indices(&self, epoch: u64) -> Vec<Vec<usize>> {
        let idx = self.sampler.indices(epoch, self.dataset.len());
        let mut out: Vec<Vec<usize>> = idx.chunks(self.batch_size).map(|c| c.to_vec()).collect();
        if self.drop_last && out.last().is_some_and(|b| b.len() < self.batch_size) {
            out.pop();
        }
        out
    }

    pub fn num_batches(&self, epoch: u64) -> usize {
        self.batch_indices(epoch).len()
    }

    /// Iterates over the batches of `epoch`.
    pub fn epoch(&self, epoch: u64) -> Epoch<B> {
        self.epoch_from(epoch, 0)
    }

    /// Iterates over the batches of `epoch` starting at batch `start` (resuming mid-epoch).
    pub fn epoch_from(&self, epoch: u64, start: usize) -> Epoch<B> {
        let batches: Vec<Vec<usize>> = self.batch_indices(epoch).into_iter().skip(start).collect();
        let total = batches.len();
        let make = {
            let (ds, collate, seed) = (self.dataset.clone(), self.collate.clone(), self.seed);
            move |b: &[usize]| -> Result<B> {
                let items = b
                    .iter()
                    .map(|&i| ds.get(i, &mut Rng::new(mix(seed, epoch, i as u64))))
                    .collect::<Result<Vec<_>>>()?;
                collate(items)
            }
        };
        if self.workers == 0 {
            let batches = Arc::new(batches);
            return Epoch { next: 0, total, source: Source::Inline(Box::new(move |i| make(&batches[i]))) };
        }
        let n = self.workers.min(total.max(1));
        let batches = Arc::new(batches);
        let make = Arc::new(make);
        let mut rxs = Vec::with_capacity(n);
        let mut handles = Vec::with_capacity(n);
        for w in 0..n {
            let (tx, rx) = sync_channel::<Result<B>>(self.prefetch);
            let (batches, make) = (batches.clone(), make.clone());
            handles.push(std::thread::spawn(move || {
                for i in (w..batches.len()).step_by(n) {
                    // A closed receiver means the consumer stopped early: stop too.
                    if tx.send(make(&batches[i])).is_err() {
                        return;
                    }
                }
            }));
            rxs.push(rx);
        }
        Epoch { next: 0, total, source: Source::Workers { rxs, handles } }
    }
}

enum Source<B> {
    Inline(Box<dyn FnMut(usize) -> Result<B> + Send>),
    Workers { rxs: Vec<Receiver<Result<B>>>, handles: Vec<JoinHandle<()>> },
}

/// One epoch's batches, in order. Dropping it early stops the workers.
pub struct Epoch<B> {
    next: usize,
    total: usize,
    source: Source<B>,
}

impl<B> Epoch<B> {
    pub fn len(&self) -> usize {
        self.total
    }
    pub fn is_empty(&self) -> bool {
        self.total == 0
    }
}

impl<B> Iterator for Epoch<B> {
    type Item = Result<B>;
    fn next(&mut self) -> Option<Result<B>> {
        if self.next >= self.total {
            return None;
        }
        let i = self.next;
        self.next += 1;
        let r = match &mut self.source {
            Source::Inline(make) => make(i),
            Source::Workers { rxs, .. } => {
                let n = rxs.len();
                rxs[i % n].recv().unwrap_or_else(|_| Err(anyhow!("data loader worker {} stopped (it panicked)", i % n)))
            }
        };
        if r.is_err() {
            self.next = self.total; // an error ends the epoch
        }
        Some(r)
    }
}

impl<B> Drop for Epoch<B> {
    fn drop(&mut self) {
        if let Source::Workers { rxs, handles } = &mut self.source {
            rxs.clear(); // unblocks workers waiting to send
            for h in handles.drain(..) {
                let _ = h.join();
            }
        }
    }
}

/// A batch the classification trainer can use: it knows its labels `(B)`.
pub trait Batch: Send + 'static {
    fn labels(&self) -> &Tensor;
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Example i is (i, a random draw from its own RNG).
    struct Numbers(usize);
    impl Dataset for Numbers {
        type Item = (usize, u64);
        fn len(&self) -> usize {
            self.0
        }
        fn get(&self, i: usize, rng: &mut Rng) -> Result<(usize, u64)> {
            if i == 999_999 {
                bail!("example {i} is broken");
            }
            Ok((i, rng.next_u64()))
        }
    }

    fn loader(n: usize, bs: usize, workers: usize) -> DataLoader<Numbers, Vec<(usize, u64)>> {
        DataLoader::new(Arc::new(Numbers(n)), bs, Ok).unwrap().shuffle(7).workers(workers).seed(3)
    }

    fn collect(l: &DataLoader<Numbers, Vec<(usize, u64)>>, epoch: u64) -> Vec<Vec<(usize, u64)>> {
        l.epoch(epoch).map(|b| b.unwrap()).collect()
    }

    #[test]
    fn every_example_once_per_epoch_and_same_order_for_any_worker_count() {
        let base = collect(&loader(103, 10, 0), 0);
        assert_eq!(base.len(), 11);
        assert_eq!(base.last().unwrap().len(), 3);
        let mut seen: Vec<usize> = base.iter().flatten().map(|x| x.0).collect();
        seen.sort();
        assert_eq!(seen, (0..103).collect::<Vec<_>>());
        for w in [1, 4] {
            assert_eq!(collect(&loader(103, 10, w), 0), base, "{w} workers");
        }
    }

    #[test]
    fn shuffle_changes_with_epoch_and_seed_but_not_with_reruns() {
        let l = loader(50, 50, 2);
        let e0: Vec<usize> = collect(&l, 0)[0].iter().map(|x| x.0).collect();
        let e1: Vec<usize> = collect(&l, 1)[0].iter().map(|x| x.0).collect();
        assert_ne!(e0, e1);
        assert_eq!(e0, collect(&l, 0)[0].iter().map(|x| x.0).collect::<Vec<_>>());
        let other = DataLoader::new(Arc::new(Numbers(50)), 50, Ok).unwrap().shuffle(8);
        assert_ne!(e0, collect(&other, 0)[0].iter().map(|x| x.0).collect::<Vec<_>>());
        let seq = DataLoader::new(Arc::new(Numbers(5)), 2, Ok).unwrap();
        assert_eq!(seq.batch_indices(0), vec![vec![0, 1], vec![2, 3], vec![4]]);
    }

    #[test]
    fn drop_last_and_resume_mid_epoch() {
        let l = loader(103, 10, 2).drop_last(true);
        let all = collect(&l, 2);
        assert_eq!(all.len(), 10);
        assert!(all.iter().all(|b| b.len() == 10));
        let rest: Vec<_> = l.epoch_from(2, 4).map(|b| b.unwrap()).collect();
        assert_eq!(rest, all[4..]);
    }

    #[test]
    fn errors_surface_and_early_drop_stops_workers() {
        let l = DataLoader::new(Arc::new(Numbers(1_000_000)), 1000, Ok).unwrap().workers(3);
        let mut it = l.epoch(0);
        assert!(it.next().unwrap().is_ok());
        drop(it); // must not hang: workers are blocked on full queues
        let last = l.epoch_from(0, 999).next().unwrap();
        assert!(last.unwrap_err().to_string().contains("example 999999 is broken"));
        assert!(DataLoader::new(Arc::new(Numbers(1)), 0, Ok).is_err());
    }
}
