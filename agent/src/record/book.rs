//! The book `pipelens record` keeps: a `metrics` recorder that sits beside
//! the Prometheus one (a fan-out: every series the agent exports reaches
//! both) and keeps, per interval, what each series did — counter
//! increments, gauge values (last and peak), and every histogram
//! observation in a DDSketch rather than in the exporter's fixed buckets,
//! so that a review's quantiles are within 1 % whatever the buckets.
//!
//! Only `pipelens record` installs it: `pipelens run` pays nothing for it.

use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
};

use metrics::{Counter, Gauge, Histogram, Key, KeyName, Metadata, Recorder, SharedString, Unit};
use pipelens_review::snapshot::{CounterDelta, GaugeReading, HistogramDelta, Series, Sketch};

/// What the book holds of each series.
#[derive(Default)]
struct Entries {
    counters: HashMap<Key, Arc<BookCounter>>,
    gauges: HashMap<Key, Arc<BookGauge>>,
    histograms: HashMap<Key, Arc<BookHistogram>>,
}

/// The per-interval book; cloned handles share it.
#[derive(Clone, Default)]
pub struct Book {
    entries: Arc<Mutex<Entries>>,
}

/// A counter's running total, and the total at the last interval's end.
#[derive(Default)]
struct BookCounter {
    total: AtomicU64,
    closed: AtomicU64,
}

impl metrics::CounterFn for BookCounter {
    fn increment(&self, value: u64) {
        self.total.fetch_add(value, Ordering::Relaxed);
    }

    fn absolute(&self, value: u64) {
        self.total.fetch_max(value, Ordering::Relaxed);
    }
}

/// A gauge's value, and the highest it reached since the interval began
/// (both as `f64` bits).
struct BookGauge {
    value: AtomicU64,
    peak: AtomicU64,
}

impl Default for BookGauge {
    fn default() -> Self {
        Self {
            value: AtomicU64::new(0f64.to_bits()),
            peak: AtomicU64::new(0f64.to_bits()),
        }
    }
}

impl BookGauge {
    fn update(&self, f: impl Fn(f64) -> f64) {
        let mut now = self.value.load(Ordering::Relaxed);
        let new = loop {
            let new = f(f64::from_bits(now));
            match self.value.compare_exchange_weak(
                now,
                new.to_bits(),
                Ordering::Relaxed,
                Ordering::Relaxed,
            ) {
                Ok(_) => break new,
                Err(actual) => now = actual,
            }
        };
        let mut peak = self.peak.load(Ordering::Relaxed);
        while new > f64::from_bits(peak) {
            match self.peak.compare_exchange_weak(
                peak,
                new.to_bits(),
                Ordering::Relaxed,
                Ordering::Relaxed,
            ) {
                Ok(_) => break,
                Err(actual) => peak = actual,
            }
        }
    }
}

impl metrics::GaugeFn for BookGauge {
    fn increment(&self, value: f64) {
        self.update(|v| v + value);
    }

    fn decrement(&self, value: f64) {
        self.update(|v| v - value);
    }

    fn set(&self, value: f64) {
        self.update(|_| value);
    }
}

/// The observations of the interval under way.
#[derive(Default)]
struct BookHistogram {
    sketch: Mutex<Sketch>,
}

impl metrics::HistogramFn for BookHistogram {
    fn record(&self, value: f64) {
        self.sketch
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .add(value);
    }
}

/// What every series did in one interval.
#[derive(Debug, Default)]
pub struct Page {
    pub counters: Vec<CounterDelta>,
    pub gauges: Vec<GaugeReading>,
    pub histograms: Vec<HistogramDelta>,
}

fn series(key: &Key) -> Series {
    Series {
        name: key.name().to_owned(),
        labels: key
            .labels()
            .map(|l| (l.key().to_owned(), l.value().to_owned()))
            .collect(),
    }
}

impl Book {
    /// Ends the interval under way: what each series did since the last
    /// call. Counters that did not move and histograms without
    /// observations are left out; every gauge is read.
    pub fn close_interval(&self) -> Page {
        let entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        let mut page = Page::default();
        for (key, c) in &entries.counters {
            let total = c.total.load(Ordering::Relaxed);
            let before = c.closed.swap(total, Ordering::Relaxed);
            if total > before {
                page.counters.push(CounterDelta {
                    series: series(key),
                    value: total - before,
                });
            }
        }
        for (key, g) in &entries.gauges {
            let last = f64::from_bits(g.value.load(Ordering::Relaxed));
            // The next interval's peak starts from where this one ends.
            let peak = f64::from_bits(g.peak.swap(last.to_bits(), Ordering::Relaxed));
            page.gauges.push(GaugeReading {
                series: series(key),
                last,
                max: peak.max(last),
            });
        }
        for (key, h) in &entries.histograms {
            let sketch = std::mem::take(&mut *h.sketch.lock().unwrap_or_else(|e| e.into_inner()));
            if sketch.count() > 0 {
                page.histograms.push(HistogramDelta {
                    series: series(key),
                    sketch,
                });
            }
        }
        page.counters.sort_by(|a, b| a.series.cmp(&b.series));
        page.gauges.sort_by(|a, b| a.series.cmp(&b.series));
        page.histograms.sort_by(|a, b| a.series.cmp(&b.series));
        page
    }
}

impl Recorder for Book {
    fn describe_counter(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_gauge(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_histogram(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}

    fn register_counter(&self, key: &Key, _: &Metadata<'_>) -> Counter {
        let mut e = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        Counter::from_arc(e.counters.entry(key.clone()).or_default().clone())
    }

    fn register_gauge(&self, key: &Key, _: &Metadata<'_>) -> Gauge {
        let mut e = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        Gauge::from_arc(e.gauges.entry(key.clone()).or_default().clone())
    }

    fn register_histogram(&self, key: &Key, _: &Metadata<'_>) -> Histogram {
        let mut e = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        Histogram::from_arc(e.histograms.entry(key.clone()).or_default().clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_interval_holds_what_happened_in_it() {
        let book = Book::default();
        metrics::with_local_recorder(&book, || {
            let c = metrics::counter!("c_total", "process" => "p");
            let g = metrics::gauge!("g", "process" => "p");
            let h = metrics::histogram!("h_seconds", "process" => "p");
            c.increment(3);
            g.increment(5.0);
            g.decrement(4.0);
            for v in [0.010, 0.020, 0.030] {
                h.record(v);
            }
            // A series registered again is the same series.
            metrics::counter!("c_total", "process" => "p").increment(1);
        });
        let first = book.close_interval();
        assert_eq!(first.counters.len(), 1);
        assert_eq!(first.counters[0].value, 4);
        assert_eq!(first.counters[0].series.label("process"), Some("p"));
        assert_eq!((first.gauges[0].last, first.gauges[0].max), (1.0, 5.0));
        let sketch = &first.histograms[0].sketch;
        assert_eq!(sketch.count(), 3);
        let p50 = sketch.quantile(0.5).unwrap();
        assert!((p50 - 0.020).abs() <= 0.020 * 0.01, "{p50}");

        metrics::with_local_recorder(&book, || {
            metrics::counter!("c_total", "process" => "p").absolute(10);
        });
        let second = book.close_interval();
        assert_eq!(
            second.counters[0].value, 6,
            "absolute(10) after a total of 4"
        );
        assert!(
            second.histograms.is_empty(),
            "no observation in this interval"
        );
        assert_eq!((second.gauges[0].last, second.gauges[0].max), (1.0, 1.0));
        assert!(book.close_interval().counters.is_empty());
    }
}
