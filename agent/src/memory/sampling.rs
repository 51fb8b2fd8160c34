//! Sampling by bytes (a Poisson process over the bytes a process
//! allocates or grows by): the table of exponential draws the kernel picks
//! its next distance from, and the weight that makes totals unbiased.

/// Mean bytes between allocation samples unless told otherwise.
pub const DEFAULT_ALLOC_MEAN: u64 = 512 * 1024;
/// Mean bytes between growth samples (faults, mappings) unless told otherwise.
pub const DEFAULT_GROWTH_MEAN: u64 = 64 * 1024;

/// `n` exponential draws of mean `one`, at evenly spaced quantiles so that
/// the table's mean is the distribution's (to a tenth of a percent).
pub fn exponential_draws(n: usize, one: u64) -> Vec<u64> {
    (0..n)
        .map(|i| {
            let u = (i as f64 + 0.5) / n as f64;
            (-(1.0 - u).ln() * one as f64).round() as u64
        })
        .collect()
}

/// The chance that an event of `size` bytes holds a sample point when
/// points fall `mean` bytes apart on average (1 when every event is sampled).
pub fn probability(size: u64, mean: u64) -> f64 {
    if mean == 0 {
        return 1.0;
    }
    -(-(size as f64) / mean as f64).exp_m1()
}

/// What one sampled event of `size` bytes stands for: `(bytes, events)`.
pub fn weight(size: u64, mean: u64) -> (f64, f64) {
    let p = probability(size, mean).max(f64::MIN_POSITIVE);
    (size as f64 / p, 1.0 / p)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn draws_have_the_mean_they_claim() {
        let d = exponential_draws(1024, 1 << 16);
        let mean = d.iter().sum::<u64>() as f64 / d.len() as f64;
        assert!((mean / 65536.0 - 1.0).abs() < 0.01, "{mean}");
        assert!(d.windows(2).all(|w| w[0] <= w[1]));
    }

    #[test]
    fn small_events_weigh_about_the_mean_large_ones_themselves() {
        let (bytes, count) = weight(16, 512 * 1024);
        assert!((bytes - 512.0 * 1024.0).abs() / (512.0 * 1024.0) < 0.001);
        assert!((count - 32768.0).abs() < 20.0);
        let (bytes, count) = weight(64 << 20, 512 * 1024);
        assert!((bytes - (64 << 20) as f64).abs() < 1.0);
        assert!((count - 1.0).abs() < 1e-9);
        assert_eq!(weight(100, 0), (100.0, 1.0));
    }

    /// Simulates the kernel's sampler on a known stream of sizes and checks
    /// that weighted totals come back within a few percent.
    #[test]
    fn weighted_samples_estimate_the_true_total() {
        let draws = exponential_draws(1024, 1 << 16);
        let mean = 64 * 1024;
        let mut state = 0x2545_f491_4f6c_dd1du64;
        let mut rand = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let mut left = 0u64;
        let (mut truth, mut estimate) = (0u64, 0f64);
        for i in 0..400_000u64 {
            let size = [24, 1024, 4096, 100_000][(i % 4) as usize];
            truth += size;
            if left > size {
                left -= size;
                continue;
            }
            left = (draws[(rand() % 1024) as usize] * mean) >> 16;
            estimate += weight(size, mean).0;
        }
        let err = (estimate / truth as f64 - 1.0).abs();
        assert!(err < 0.03, "estimate off by {:.1} %", err * 100.0);
    }
}
