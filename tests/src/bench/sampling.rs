//! Small statistics and progress helpers shared by the scenarios.

use serde::Serialize;
use std::time::{Duration, Instant};

/// The `q`-quantile (0..=1) of `sorted` by the nearest-rank method.
pub fn quantile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

/// p50/p95/p99/max/mean of some milliseconds (None: no samples).
#[derive(Clone, Copy, Debug, Serialize)]
pub struct Summary {
    pub count: usize,
    pub p50: Option<f64>,
    pub p95: Option<f64>,
    pub p99: Option<f64>,
    pub max: Option<f64>,
    pub mean: Option<f64>,
}

pub fn summary(values: &[f64]) -> Summary {
    let mut v = values.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    let mean = if v.is_empty() {
        f64::NAN
    } else {
        v.iter().sum::<f64>() / v.len() as f64
    };
    Summary {
        count: v.len(),
        p50: round2(quantile(&v, 0.50)),
        p95: round2(quantile(&v, 0.95)),
        p99: round2(quantile(&v, 0.99)),
        max: round2(v.last().copied().unwrap_or(f64::NAN)),
        mean: round2(mean),
    }
}

/// Two decimals; None for NaN or infinity (null in the JSON, "n/a" shown).
pub fn round2(x: f64) -> Option<f64> {
    x.is_finite().then(|| (x * 100.0).round() / 100.0)
}

/// A figure for a report's table.
pub fn show(x: Option<f64>) -> String {
    x.map_or_else(|| "n/a".into(), |v| v.to_string())
}

/// Prints `[label] elapsed/total s  detail` about once a second.
pub struct Progress {
    label: String,
    start: Instant,
    total: Duration,
    last: Instant,
}

impl Progress {
    pub fn new(label: impl Into<String>, total: Duration) -> Progress {
        let now = Instant::now();
        Progress {
            label: label.into(),
            start: now,
            total,
            last: now,
        }
    }

    pub fn elapsed(&self) -> Duration {
        self.start.elapsed()
    }

    pub fn tick(&mut self, detail: impl FnOnce() -> String) {
        if self.last.elapsed() >= Duration::from_secs(1) {
            self.last = Instant::now();
            println!(
                "   [{}] {:>4.0}/{:.0} s  {}",
                self.label,
                self.start.elapsed().as_secs_f64(),
                self.total.as_secs_f64(),
                detail()
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_quantiles() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(quantile(&v, 0.5), 50.0);
        assert_eq!(quantile(&v, 0.99), 99.0);
        assert_eq!(quantile(&v, 1.0), 100.0);
        assert_eq!(quantile(&[7.0], 0.01), 7.0);
        assert!(quantile(&[], 0.5).is_nan());
    }
}
