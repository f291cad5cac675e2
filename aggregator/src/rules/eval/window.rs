//! Incremental window aggregates.
//!
//! A [`WindowAgg`] holds the readings of one window in arrival order
//! (timestamps never decrease: the engine clamps slightly late readings to
//! the series clock) and keeps, besides them, only what its aggregate needs:
//!
//! - sum and count: a running sum, re-zeroed whenever the window empties so
//!   rounding error cannot outlive the readings that caused it;
//! - min / max: a monotonic deque (ascending for min, descending for max):
//!   amortized O(1) per push and per eviction;
//! - percentile: the window's values kept sorted (binary search, O(n) shift
//!   on insert/remove), nearest-rank definition.
//!
//! Invariants: `items` timestamps are non-decreasing; `min_q`/`max_q` are a
//! subsequence of `items` whose values are strictly monotonic from the front
//! (the front is the current min/max); `sorted` is a permutation of the
//! values in `items` when the aggregate is a percentile, empty otherwise.

use std::collections::VecDeque;

use crate::rules::model::Agg;

/// The readings of one window and the running state of its aggregate.
#[derive(Debug, Clone)]
pub(crate) struct WindowAgg {
    agg: Agg,
    items: VecDeque<(i64, f64)>,
    sum: f64,
    mono: VecDeque<(i64, f64)>,
    sorted: Vec<f64>,
}

impl WindowAgg {
    /// An empty window computing `agg`.
    pub(crate) fn new(agg: Agg) -> WindowAgg {
        WindowAgg {
            agg,
            items: VecDeque::new(),
            sum: 0.0,
            mono: VecDeque::new(),
            sorted: Vec::new(),
        }
    }

    /// Adds a reading; `t` must not be below the last pushed timestamp.
    pub(crate) fn push(&mut self, t: i64, v: f64) {
        self.items.push_back((t, v));
        self.sum += v;
        match self.agg {
            Agg::Min => {
                while self.mono.back().is_some_and(|&(_, b)| b >= v) {
                    self.mono.pop_back();
                }
                self.mono.push_back((t, v));
            }
            Agg::Max => {
                while self.mono.back().is_some_and(|&(_, b)| b <= v) {
                    self.mono.pop_back();
                }
                self.mono.push_back((t, v));
            }
            Agg::Percentile(_) => {
                let i = match self.sorted.binary_search_by(|x| x.total_cmp(&v)) {
                    Ok(i) | Err(i) => i,
                };
                self.sorted.insert(i, v);
            }
            Agg::Avg | Agg::Sum | Agg::Count => {}
        }
    }

    /// Drops every reading with a timestamp `<= cutoff`.
    pub(crate) fn evict_through(&mut self, cutoff: i64) {
        while let Some(&(t, v)) = self.items.front() {
            if t > cutoff {
                break;
            }
            self.items.pop_front();
            self.sum -= v;
            if let Agg::Percentile(_) = self.agg {
                if let Ok(i) = self.sorted.binary_search_by(|x| x.total_cmp(&v)) {
                    self.sorted.remove(i);
                }
            }
        }
        while self.mono.front().is_some_and(|&(t, _)| t <= cutoff) {
            self.mono.pop_front();
        }
        if self.items.is_empty() {
            self.sum = 0.0;
        }
    }

    /// Empties the window (tumbling windows, at close).
    pub(crate) fn clear(&mut self) {
        self.items.clear();
        self.mono.clear();
        self.sorted.clear();
        self.sum = 0.0;
    }

    /// Number of readings in the window.
    pub(crate) fn len(&self) -> usize {
        self.items.len()
    }

    /// The aggregate; `None` for avg/min/max/percentile of an empty window
    /// (count and sum of an empty window are 0).
    pub(crate) fn value(&self) -> Option<f64> {
        let n = self.items.len();
        match self.agg {
            Agg::Count => Some(n as f64),
            Agg::Sum => Some(if n == 0 { 0.0 } else { self.sum }),
            Agg::Avg => (n > 0).then(|| self.sum / n as f64),
            Agg::Min | Agg::Max => self.mono.front().map(|&(_, v)| v),
            Agg::Percentile(p) => {
                if self.sorted.is_empty() {
                    return None;
                }
                let rank = ((p / 100.0) * self.sorted.len() as f64).ceil() as usize;
                let i = rank.clamp(1, self.sorted.len()) - 1;
                self.sorted.get(i).copied()
            }
        }
    }

    /// The aggregate of an empty window, for the kinds that have one.
    pub(crate) fn value_of_empty(&self) -> Option<f64> {
        matches!(self.agg, Agg::Count | Agg::Sum).then_some(0.0)
    }

    /// Timestamps of the oldest and newest readings with their values.
    pub(crate) fn ends(&self) -> Option<((i64, f64), (i64, f64))> {
        Some((*self.items.front()?, *self.items.back()?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn naive(agg: Agg, vals: &[f64]) -> Option<f64> {
        if vals.is_empty() {
            return match agg {
                Agg::Count | Agg::Sum => Some(0.0),
                _ => None,
            };
        }
        let mut sorted = vals.to_vec();
        sorted.sort_by(f64::total_cmp);
        Some(match agg {
            Agg::Count => vals.len() as f64,
            Agg::Sum => vals.iter().sum(),
            Agg::Avg => vals.iter().sum::<f64>() / vals.len() as f64,
            Agg::Min => sorted[0],
            Agg::Max => sorted[sorted.len() - 1],
            Agg::Percentile(p) => {
                let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
                sorted[rank.clamp(1, sorted.len()) - 1]
            }
        })
    }

    proptest! {
        /// The incremental aggregates of a sliding window agree with a
        /// recomputation over the window's readings after every reading.
        #[test]
        fn sliding_aggregates_match_naive(
            steps in proptest::collection::vec((0i64..40, -1000.0f64..1000.0), 1..200),
            size in 1i64..200,
            pct in 1.0f64..100.0,
        ) {
            for agg in [Agg::Avg, Agg::Min, Agg::Max, Agg::Sum, Agg::Count, Agg::Percentile(pct)] {
                let mut w = WindowAgg::new(agg);
                let mut all: Vec<(i64, f64)> = Vec::new();
                let mut t = 0i64;
                for &(dt, v) in &steps {
                    t += dt;
                    w.push(t, v);
                    w.evict_through(t - size);
                    all.push((t, v));
                    let inside: Vec<f64> =
                        all.iter().filter(|(ti, _)| *ti > t - size).map(|(_, v)| *v).collect();
                    let (got, want) = (w.value(), naive(agg, &inside));
                    match (got, want) {
                        (Some(g), Some(n)) => prop_assert!((g - n).abs() <= 1e-6 * (1.0 + n.abs()),
                            "{agg:?}: incremental {g} naive {n}"),
                        (g, n) => prop_assert_eq!(g, n),
                    }
                }
            }
        }
    }

    #[test]
    fn percentile_nearest_rank() {
        let mut w = WindowAgg::new(Agg::Percentile(50.0));
        for (i, v) in [5.0, 1.0, 4.0, 2.0, 3.0].into_iter().enumerate() {
            w.push(i as i64, v);
        }
        assert_eq!(w.value(), Some(3.0));
        w.evict_through(1); // drops 5 and 1
        assert_eq!(w.value(), Some(3.0)); // [2,3,4]
        let mut p100 = WindowAgg::new(Agg::Percentile(100.0));
        p100.push(0, 7.0);
        p100.push(0, 9.0);
        assert_eq!(p100.value(), Some(9.0));
    }

    #[test]
    fn min_max_follow_evictions() {
        let mut mn = WindowAgg::new(Agg::Min);
        let mut mx = WindowAgg::new(Agg::Max);
        for (t, v) in [(0, 3.0), (1, 1.0), (2, 2.0), (3, 5.0)] {
            mn.push(t, v);
            mx.push(t, v);
        }
        assert_eq!((mn.value(), mx.value()), (Some(1.0), Some(5.0)));
        mn.evict_through(1);
        assert_eq!(mn.value(), Some(2.0));
        mn.evict_through(3);
        assert_eq!(mn.value(), None);
    }
}
