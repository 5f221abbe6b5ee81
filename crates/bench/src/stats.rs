//! Percentiles of a sample, as every scenario reports its times.

/// Percentiles of a sample, by nearest rank on the sorted values.
#[derive(Clone, Copy, Debug, serde::Serialize, serde::Deserialize)]
pub struct Stats {
    pub n: usize,
    pub min: f64,
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub max: f64,
    pub mean: f64,
}

impl Stats {
    pub fn of(values: &[f64]) -> Stats {
        let mut v: Vec<f64> = values.iter().copied().filter(|x| x.is_finite()).collect();
        v.sort_by(f64::total_cmp);
        let n = v.len();
        if n == 0 {
            return Stats {
                n,
                min: f64::NAN,
                p50: f64::NAN,
                p90: f64::NAN,
                p99: f64::NAN,
                max: f64::NAN,
                mean: f64::NAN,
            };
        }
        let at = |q: f64| v[((q * n as f64).ceil() as usize).clamp(1, n) - 1];
        Stats {
            n,
            min: v[0],
            p50: at(0.50),
            p90: at(0.90),
            p99: at(0.99),
            max: v[n - 1],
            mean: v.iter().sum::<f64>() / n as f64,
        }
    }

    /// Read back from a report's JSON, where `json!` put it. Only an empty sample fails
    /// to read (its NaNs are written as null, which an f64 does not take), and that one
    /// reads back as the empty sample it was.
    pub fn from_json(v: &serde_json::Value) -> Stats {
        serde_json::from_value(v.clone()).unwrap_or(Stats::of(&[]))
    }

    /// `p50 1.2 / p99 3.4 / max 5.6 ms (n=100)`.
    pub fn line(&self, unit: &str) -> String {
        format!(
            "p50 {:.3} / p90 {:.3} / p99 {:.3} / max {:.3} {unit} (n={})",
            self.p50, self.p90, self.p99, self.max, self.n
        )
    }
}
