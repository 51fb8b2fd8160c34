//! Latency and duration distributions for the summary (and for comparing
//! runs): one DDSketch per row (`sketches-ddsketch`), fed by every
//! observation of the run. Its quantiles are within 1 % of the true value
//! (relative error), whatever the run's length; it holds at most 2,048
//! bins (16 KiB) — 50 µs … 30 s latencies take about 660 — and sketches of
//! the same configuration merge exactly.

use serde::Serialize;
use sketches_ddsketch::{Config, DDSketch};

/// The sketch's relative error on any quantile.
pub const RELATIVE_ERROR: f64 = 0.01;
const MAX_BINS: u32 = 2048;
/// Smaller values (under a nanosecond) count as zero.
const MIN_VALUE: f64 = 1e-9;

/// A bounded, mergeable distribution of non-negative values (seconds).
#[derive(Clone)]
pub struct Distribution(DDSketch);

impl std::fmt::Debug for Distribution {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Distribution")
            .field("count", &self.0.count())
            .finish_non_exhaustive()
    }
}

impl Default for Distribution {
    fn default() -> Self {
        Self(DDSketch::new(Config::new(
            RELATIVE_ERROR,
            MAX_BINS,
            MIN_VALUE,
        )))
    }
}

/// What the summary reports of a distribution.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct Quantiles {
    pub count: usize,
    pub p50: f64,
    pub p95: f64,
    pub p99: f64,
    pub max: f64,
}

impl Distribution {
    pub fn add(&mut self, v: f64) {
        self.0.add(v);
    }

    pub fn quantiles(&self) -> Option<Quantiles> {
        let q = |q: f64| self.0.quantile(q).ok().flatten();
        Some(Quantiles {
            count: self.0.count(),
            p50: q(0.5)?,
            p95: q(0.95)?,
            p99: q(0.99)?,
            max: self.0.max()?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn exact(sorted: &[f64], q: f64) -> f64 {
        sorted[((sorted.len() as f64 - 1.0) * q).floor() as usize]
    }

    /// A long run whose latency changes after its first 100,000
    /// observations (fast, then ten times slower): every quantile is the
    /// whole run's, within the stated error, not the first part's.
    #[test]
    fn quantiles_are_the_whole_runs_within_the_stated_error() {
        let mut d = Distribution::default();
        let mut all = Vec::new();
        // A deterministic spread: 40–60 µs, then 400–600 µs.
        for i in 0..150_000u64 {
            let spread = (i * 7919 % 1000) as f64 / 1000.0;
            let v = if i < 100_000 {
                40e-6 + 20e-6 * spread
            } else {
                400e-6 + 200e-6 * spread
            };
            d.add(v);
            all.push(v);
        }
        all.sort_by(f64::total_cmp);
        let got = d.quantiles().expect("observations");
        assert_eq!(got.count, 150_000);
        for (q, v) in [(0.5, got.p50), (0.95, got.p95), (0.99, got.p99)] {
            let want = exact(&all, q);
            assert!(
                (v - want).abs() <= want * RELATIVE_ERROR,
                "p{q}: {v} vs {want}"
            );
        }
        assert!(got.p99 > 400e-6 && got.p50 < 60e-6);
        assert_eq!(got.max, all[all.len() - 1]);
    }

    #[test]
    fn merged_halves_equal_the_whole() {
        let (mut a, mut b, mut whole) = (
            Distribution::default(),
            Distribution::default(),
            Distribution::default(),
        );
        for i in 1..=10_000u32 {
            let v = f64::from(i) * 1e-5;
            whole.add(v);
            if i % 2 == 0 { a.add(v) } else { b.add(v) }
        }
        // What comparing runs (or nodes) will rest on.
        a.0.merge(&b.0).expect("one configuration");
        assert_eq!(a.quantiles(), whole.quantiles());
    }

    #[test]
    fn memory_is_bounded_whatever_the_spread() {
        let mut d = Distribution::default();
        // From a nanosecond to a day, densely: the bins cap at MAX_BINS.
        let mut v = 1e-9;
        while v < 86_400.0 {
            d.add(v);
            v *= 1.001;
        }
        assert!(d.0.length() <= MAX_BINS as usize, "{}", d.0.length());
        assert!(d.quantiles().is_some());
    }

    #[test]
    fn empty_has_no_quantiles() {
        assert_eq!(Distribution::default().quantiles(), None);
    }
}
