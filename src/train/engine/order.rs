//! The data order every objective trains in: a seeded permutation of the examples per epoch
//! (ChaCha8 seeded by the run's seed and the epoch number), and the position in it, which lives
//! in the checkpointed [`TrainState`] so a resumed run continues with the very next example.

use crate::train::checkpoint::TrainState;

/// A deterministic permutation of `0..n` for `epoch` (ChaCha seeded by `seed` and `epoch`), so
/// a resumed run visits the data in the same order.
pub fn epoch_order(n: usize, seed: u64, epoch: u64) -> Vec<usize> {
    use rand::SeedableRng;
    use rand::seq::SliceRandom;
    let mut rng =
        rand_chacha::ChaCha8Rng::seed_from_u64(seed ^ epoch.wrapping_mul(0x9E37_79B9_7F4A_7C15));
    let mut v: Vec<usize> = (0..n).collect();
    v.shuffle(&mut rng);
    v
}

/// How a step's examples are drawn from the epoch-wise permutations.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DataOrder {
    /// A step never crosses an epoch: the last step of an epoch takes what is left (DPO, KTO:
    /// every example counts once per epoch).
    Epochs,
    /// Every step takes the same number of examples, running on into the next epoch's order
    /// (PPO: a fixed number of prompts rolled out per step).
    Stream,
}

/// Where the data stands: `n` examples in `order`, seeded by `seed`.
#[derive(Debug, Clone, Copy)]
pub struct DataCursor {
    pub n: usize,
    pub seed: u64,
    pub order: DataOrder,
}

impl DataCursor {
    /// The example indices of the next step of `per_step` examples, from the position in `state`.
    pub fn next_batch(&self, state: &mut TrainState, per_step: usize) -> Vec<usize> {
        let n = self.n;
        if n == 0 {
            return Vec::new();
        }
        if state.data_position as usize >= n {
            state.epoch += 1;
            state.data_position = 0;
        }
        match self.order {
            DataOrder::Epochs => {
                let order = epoch_order(n, self.seed, state.epoch);
                let start = state.data_position as usize;
                order[start..(start + per_step).min(n)].to_vec()
            }
            DataOrder::Stream => {
                let first = state.epoch as usize * n + state.data_position as usize;
                let mut cached: Option<(usize, Vec<usize>)> = None;
                (first..first + per_step)
                    .map(|g| {
                        let epoch = g / n;
                        if cached.as_ref().is_none_or(|(e, _)| *e != epoch) {
                            cached = Some((epoch, epoch_order(n, self.seed, epoch as u64)));
                        }
                        cached.as_ref().map_or(0, |(_, order)| order[g % n])
                    })
                    .collect()
            }
        }
    }

    /// Moves the position past `taken` examples (a finished epoch points at the next one).
    pub fn advance(&self, state: &mut TrainState, taken: usize) {
        let n = self.n.max(1) as u64;
        let global = state.epoch * n + state.data_position + taken as u64;
        state.epoch = global / n;
        state.data_position = global % n;
    }

    /// Epochs done, as a fraction (what the log's `epoch` says).
    pub fn epochs(&self, state: &TrainState) -> f64 {
        state.epoch as f64 + state.data_position as f64 / self.n.max(1) as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn epochs_order_never_crosses_an_epoch_and_stream_order_does() {
        let epochs = DataCursor {
            n: 5,
            seed: 3,
            order: DataOrder::Epochs,
        };
        let mut state = TrainState::new(3);
        let a = epochs.next_batch(&mut state, 4);
        epochs.advance(&mut state, a.len());
        let b = epochs.next_batch(&mut state, 4);
        assert_eq!((a.len(), b.len()), (4, 1));
        epochs.advance(&mut state, b.len());
        assert_eq!((state.epoch, state.data_position), (1, 0));
        let mut seen: Vec<usize> = a.iter().chain(&b).copied().collect();
        seen.sort_unstable();
        assert_eq!(seen, vec![0, 1, 2, 3, 4]);

        let stream = DataCursor {
            order: DataOrder::Stream,
            ..epochs
        };
        let mut state = TrainState::new(3);
        let a = stream.next_batch(&mut state, 4);
        stream.advance(&mut state, 4);
        let b = stream.next_batch(&mut state, 4);
        stream.advance(&mut state, 4);
        assert_eq!((a.len(), b.len()), (4, 4));
        assert_eq!(b[0], epoch_order(5, 3, 0)[4]);
        assert_eq!(b[1..], epoch_order(5, 3, 1)[..3]);
        assert_eq!((state.epoch, state.data_position), (1, 3));
    }
}
