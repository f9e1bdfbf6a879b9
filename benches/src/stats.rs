//! Summaries of timing samples.

use serde::Serialize;

/// p50/p99/min/max/mean of a set of samples, in the samples' unit.
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    /// Number of samples.
    pub n: usize,
    /// Median.
    pub p50: f64,
    /// 99th percentile (nearest rank).
    pub p99: f64,
    /// Smallest.
    pub min: f64,
    /// Largest.
    pub max: f64,
    /// Arithmetic mean.
    pub mean: f64,
}

impl Summary {
    /// Summarises `samples` (not empty).
    pub fn of(samples: &[f64]) -> Summary {
        assert!(!samples.is_empty(), "no samples to summarise");
        let mut sorted = samples.to_vec();
        sorted.sort_by(f64::total_cmp);
        let rank = |p: f64| {
            let index = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
            sorted[index.clamp(1, sorted.len()) - 1]
        };
        Summary {
            n: sorted.len(),
            p50: rank(50.0),
            p99: rank(99.0),
            min: sorted[0],
            max: sorted[sorted.len() - 1],
            mean: sorted.iter().sum::<f64>() / sorted.len() as f64,
        }
    }

    /// One table row: name, then the figures with `decimals` decimals.
    pub fn row(&self, name: &str, unit: &str, decimals: usize) -> String {
        format!(
            "{name:<34} {:>9.d$} {:>9.d$} {:>9.d$} {:>9.d$}  {unit}  (n={})",
            self.p50,
            self.p99,
            self.min,
            self.max,
            self.n,
            d = decimals
        )
    }
}

/// The table header matching [`Summary::row`].
pub fn header() -> String {
    format!(
        "{:<34} {:>9} {:>9} {:>9} {:>9}",
        "", "p50", "p99", "min", "max"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        let samples: Vec<f64> = (1..=100).map(f64::from).collect();
        let s = Summary::of(&samples);
        assert_eq!((s.p50, s.p99, s.min, s.max), (50.0, 99.0, 1.0, 100.0));
        assert_eq!(Summary::of(&[7.0]).p99, 7.0);
        let s = Summary::of(&[3.0, 1.0, 2.0]);
        assert_eq!((s.p50, s.mean), (2.0, 2.0));
    }
}
