//! The result of a run: human lines and the same figures as one JSON object,
//! plus the small statistics and formatting helpers they need.

use serde_json::{Map, Value};

/// What a run prints at the end.
#[derive(Debug, Default)]
pub struct Summary {
    lines: Vec<String>,
    notes: Vec<String>,
    figures: Map<String, Value>,
}

impl Summary {
    /// A line of the human summary: a short label, then the figures.
    pub fn line(&mut self, label: &str, text: impl AsRef<str>) {
        self.lines.push(format!("{label:<9} {}", text.as_ref()));
    }

    /// Something the reader should know to trust (or not) the figures.
    pub fn note(&mut self, text: impl Into<String>) {
        self.notes.push(text.into());
    }

    /// A machine-readable figure.
    pub fn set(&mut self, key: &str, value: impl Into<Value>) {
        self.figures.insert(key.to_owned(), value.into());
    }

    pub fn print(mut self, json: bool) {
        println!();
        for line in &self.lines {
            println!("{line}");
        }
        for note in &self.notes {
            println!("note: {note}");
        }
        if json {
            self.figures.insert("notes".to_owned(), self.notes.into());
            println!("{}", Value::Object(self.figures));
        }
    }
}

/// Percentiles of a set of durations, in nanoseconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Spread {
    pub count: usize,
    pub p50: u64,
    pub p99: u64,
    pub max: u64,
}

impl Spread {
    pub fn of(mut samples: Vec<u64>) -> Option<Spread> {
        samples.sort_unstable();
        Some(Spread {
            count: samples.len(),
            p50: percentile(&samples, 0.50),
            p99: percentile(&samples, 0.99),
            max: *samples.last()?,
        })
    }

    /// `p50 1.2 ms, p99 3.4 ms, max 5.6 ms`
    pub fn describe(&self) -> String {
        format!(
            "p50 {}, p99 {}, max {}",
            duration(self.p50),
            duration(self.p99),
            duration(self.max)
        )
    }

    /// Sets `<prefix>_p50_ms` and friends.
    pub fn set(&self, summary: &mut Summary, prefix: &str) {
        summary.set(&format!("{prefix}_p50_ms"), ms(self.p50));
        summary.set(&format!("{prefix}_p99_ms"), ms(self.p99));
        summary.set(&format!("{prefix}_max_ms"), ms(self.max));
    }
}

/// Nearest-rank percentile of sorted samples (0 for none).
fn percentile(sorted: &[u64], q: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = (q * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// Milliseconds with microsecond precision, for JSON.
pub fn ms(ns: u64) -> f64 {
    round3(ns as f64 / 1e6)
}

pub fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

/// `850 µs`, `12.3 ms`, `4.56 s`
pub fn duration(ns: u64) -> String {
    match ns {
        0..=999_999 => format!("{} µs", ns / 1000),
        1_000_000..=999_999_999 => format!("{:.1} ms", ns as f64 / 1e6),
        _ => format!("{:.2} s", ns as f64 / 1e9),
    }
}

/// `512 B`, `4.2 KiB`, `95.3 MiB`
pub fn bytes(n: f64) -> String {
    if n.abs() < 1024.0 {
        format!("{n:.0} B")
    } else if n.abs() < 1024.0 * 1024.0 {
        format!("{:.1} KiB", n / 1024.0)
    } else {
        format!("{:.1} MiB", n / (1024.0 * 1024.0))
    }
}

/// `1,234,567`
pub fn count(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// Events per second over `ns` (0 when no time passed).
pub fn per_second(events: u64, ns: u64) -> f64 {
    if ns == 0 {
        0.0
    } else {
        events as f64 * 1e9 / ns as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_use_the_nearest_rank() {
        let spread = Spread::of((1..=100).rev().collect()).unwrap();
        assert_eq!(
            (spread.count, spread.p50, spread.p99, spread.max),
            (100, 50, 99, 100)
        );
        assert_eq!(Spread::of(vec![7]).unwrap().p99, 7);
        assert!(Spread::of(Vec::new()).is_none());
    }

    #[test]
    fn figures_read_well() {
        assert_eq!(count(1_234_567), "1,234,567");
        assert_eq!(count(999), "999");
        assert_eq!(duration(850_000), "850 µs");
        assert_eq!(duration(12_340_000), "12.3 ms");
        assert_eq!(duration(4_560_000_000), "4.56 s");
        assert_eq!(bytes(4300.0), "4.2 KiB");
    }
}
