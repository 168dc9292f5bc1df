//! A rate sampled from a growing count of pages: what each tracker's
//! `DirtyTracker::sample_rate` computes.

use crate::vmm::memory::PAGE_SIZE;
use std::sync::Mutex;
use std::time::Instant;

/// The count and time of the previous sample.
pub struct RateSampler {
    last: Mutex<(Instant, u64)>,
}

impl RateSampler {
    /// Starts measuring now, from a count of `count`.
    pub fn new(count: u64) -> Self {
        RateSampler { last: Mutex::new((Instant::now(), count)) }
    }

    /// Measures from now again, from a count of `count`.
    pub fn restart(&self, count: u64) {
        *self.last.lock().expect("rate sampler lock") = (Instant::now(), count);
    }

    /// Bytes per second (`PAGE_SIZE` a counted page) since the previous sample.
    pub fn sample(&self, count: u64) -> f64 {
        let mut last = self.last.lock().expect("rate sampler lock");
        let now = Instant::now();
        let seconds = now.duration_since(last.0).as_secs_f64();
        let pages = count.saturating_sub(last.1);
        *last = (now, count);
        if seconds > 0.0 {
            pages as f64 * PAGE_SIZE as f64 / seconds
        } else {
            0.0
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_rate_is_pages_over_the_time_since_the_previous_sample() {
        let sampler = RateSampler::new(100);
        std::thread::sleep(std::time::Duration::from_millis(20));
        let rate = sampler.sample(110);
        // 10 pages in at least 20 ms: at most 2 MB/s, and more than nothing.
        assert!(rate > 0.0 && rate <= 10.0 * 4096.0 / 0.02, "{rate}");
        sampler.restart(500);
        assert!(sampler.sample(500) == 0.0);
    }
}
