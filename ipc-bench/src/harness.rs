//! Timing and statistics.
//!
//! A measurement is a warm-up, then [`REPETITIONS`] repetitions of many calls, each
//! call (or small batch of calls) timed on its own. Every repetition gives a median
//! and a p99; the result is the median of those. Iteration counts come from the
//! warm-up, so each repetition lasts about [`Plan::rep_time`]. [`Measurement`] lets the
//! caller run the repetitions of several systems in turn, so that a host whose speed drifts
//! over minutes moves every system alike and ratios between them stay honest.

use std::io;
use std::time::{Duration, Instant};

/// Repetitions per measurement.
pub const REPETITIONS: usize = 3;

/// Shortest timed sample: calls faster than this are timed in batches, so the
/// ~25 ns of `Instant::now` stays a small share of each sample.
const MIN_SAMPLE: Duration = Duration::from_micros(2);

/// How long to measure.
#[derive(Clone, Copy, Debug)]
pub struct Plan {
    /// Warm-up duration.
    pub warm_time: Duration,
    /// Fewest warm-up calls, whatever the time.
    pub min_warm: usize,
    /// Target duration of one repetition.
    pub rep_time: Duration,
    /// Fewest samples per repetition, whatever the time.
    pub min_samples: usize,
    /// Most samples per repetition.
    pub max_samples: usize,
}

impl Plan {
    /// A full run: about 1 s per repetition, at least 100 samples for the p99.
    pub const FULL: Plan = Plan {
        warm_time: Duration::from_millis(300),
        min_warm: 10,
        rep_time: Duration::from_millis(1000),
        min_samples: 100,
        max_samples: 1_000_000,
    };

    /// A smoke test: checks that everything runs, figures are rough.
    pub const QUICK: Plan = Plan {
        warm_time: Duration::from_millis(10),
        min_warm: 3,
        rep_time: Duration::from_millis(25),
        min_samples: 10,
        max_samples: 1_000_000,
    };
}

/// Result of one measurement, in nanoseconds per call.
#[derive(Clone, Copy, Debug)]
pub struct Stats {
    /// Median of the repetitions' medians.
    pub median: f64,
    /// Median of the repetitions' 99th percentiles.
    pub p99: f64,
    /// Median of the repetitions' means (what throughput would suggest).
    pub mean: f64,
    /// Samples per repetition.
    pub samples: usize,
    /// Calls per sample.
    pub batch: usize,
    /// Each repetition's median, in the order the repetitions ran; the first [`Stats::reps`]
    /// are filled.
    pub rep_medians: [f64; REPETITIONS],
    /// Repetitions done (at least one).
    pub reps: usize,
}

impl Stats {
    /// The medians of the repetitions done, in the order they ran: the `i`th of two systems
    /// of a cell were taken seconds apart (see [`Measurement`]).
    pub fn rep_medians(&self) -> &[f64] {
        &self.rep_medians[..self.reps]
    }

    /// (largest − smallest repetition median) / median: how much the repetitions agree.
    pub fn spread(&self) -> f64 {
        let (lo, hi) = self
            .rep_medians()
            .iter()
            .fold((f64::MAX, 0f64), |(lo, hi), &m| (lo.min(m), hi.max(m)));
        if self.median > 0.0 {
            (hi - lo) / self.median
        } else {
            0.0
        }
    }
}

/// A measurement in progress: warmed up, with some of its repetitions done.
pub struct Measurement {
    batch: usize,
    /// One slot per sample, allocated once, outside the timed loops.
    times: Vec<f64>,
    /// (median, p99, mean) of each repetition so far.
    reps: Vec<(f64, f64, f64)>,
}

impl Measurement {
    /// Warms up (caches, allocator, lazily faulted buffers) and sizes the repetitions from
    /// the time a call took.
    pub fn warm_up(plan: &Plan, mut call: impl FnMut() -> io::Result<()>) -> io::Result<Self> {
        let start = Instant::now();
        let mut warm_calls = 0u32;
        while warm_calls < plan.min_warm as u32 || start.elapsed() < plan.warm_time {
            call()?;
            warm_calls += 1;
        }
        let per_call = start.elapsed() / warm_calls;
        let batch = if per_call.is_zero() {
            1000
        } else {
            MIN_SAMPLE.div_duration_f64(per_call).ceil().max(1.0) as usize
        };
        let per_sample = per_call * batch as u32;
        let samples = if per_sample.is_zero() {
            plan.max_samples
        } else {
            (plan.rep_time.div_duration_f64(per_sample) as usize)
                .clamp(plan.min_samples, plan.max_samples)
        };
        Ok(Measurement {
            batch,
            times: vec![0f64; samples],
            reps: Vec::with_capacity(REPETITIONS),
        })
    }

    /// Runs one repetition; returns the calls it made.
    pub fn repetition(&mut self, mut call: impl FnMut() -> io::Result<()>) -> io::Result<usize> {
        for slot in self.times.iter_mut() {
            let t = Instant::now();
            for _ in 0..self.batch {
                call()?;
            }
            *slot = t.elapsed().as_nanos() as f64 / self.batch as f64;
        }
        self.reps.push(summarize(&mut self.times));
        Ok(self.times.len() * self.batch)
    }

    /// The figures of the repetitions done so far (at least one).
    pub fn stats(&self) -> Stats {
        let reps = &self.reps;
        let median = median_of(reps.iter().map(|r| r.0));
        let mut rep_medians = [0.0; REPETITIONS];
        for (slot, rep) in rep_medians.iter_mut().zip(reps) {
            *slot = rep.0;
        }
        Stats {
            median,
            p99: median_of(reps.iter().map(|r| r.1)),
            mean: median_of(reps.iter().map(|r| r.2)),
            samples: self.times.len(),
            batch: self.batch,
            rep_medians,
            reps: reps.len().min(REPETITIONS),
        }
    }
}

/// (median, p99, mean) of one repetition; sorts `times`.
fn summarize(times: &mut [f64]) -> (f64, f64, f64) {
    times.sort_by(f64::total_cmp);
    let mean = times.iter().sum::<f64>() / times.len() as f64;
    (percentile(times, 0.5), percentile(times, 0.99), mean)
}

/// Nearest-rank percentile of sorted, non-empty data.
fn percentile(sorted: &[f64], q: f64) -> f64 {
    let rank = (q * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn median_of(values: impl Iterator<Item = f64>) -> f64 {
    let mut v: Vec<f64> = values.collect();
    v.sort_by(f64::total_cmp);
    percentile(&v, 0.5)
}
