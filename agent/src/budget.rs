//! The agent's own memory, kept under `--memory-limit` by shedding, never
//! by growing.
//!
//! The governor reads the agent's resident set a few times a second and
//! sets a pressure level every collector reads before it takes on new
//! state:
//!
//! - **high** (from 70 % of the limit): no new state. The memory collector
//!   profiles no new process; the stream analysers follow no new socket
//!   (its capture is switched off in the kernel). What is followed already
//!   goes on being counted.
//! - **critical** (from 85 %): state is let go. The memory collector
//!   releases the half of its growth profiles with the fewest samples
//!   (their series keep their last values) and folds new call stacks into
//!   their innermost frames; freed heap is handed back to the kernel.
//!
//! The level falls back once the resident set is below 60 % (high) or 75 %
//! (critical) of the limit, so that it does not flap. Everything shed is
//! counted in `pipelens_shed_total{collector,what}`, exported at zero from
//! the start; the level is `pipelens_agent_memory_pressure` (0, 1, 2).

use std::{
    sync::atomic::{AtomicU8, Ordering},
    time::Duration,
};

use tokio_util::sync::CancellationToken;

/// How hard the agent must save memory now.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Pressure {
    Normal = 0,
    High = 1,
    Critical = 2,
}

static LEVEL: AtomicU8 = AtomicU8::new(0);

/// The level the governor set last (normal when none runs).
pub fn pressure() -> Pressure {
    match LEVEL.load(Ordering::Relaxed) {
        0 => Pressure::Normal,
        1 => Pressure::High,
        _ => Pressure::Critical,
    }
}

/// Every `(collector, what)` that can be shed: the series exist from the
/// first scrape.
const SHED: [(&str, &str); 4] = [
    ("memory", "process"),
    ("memory", "stack"),
    ("memory", "sample"),
    ("streams", "stream"),
];

/// Counts `n` of `what` shed by `collector` (one of [`SHED`]).
pub fn shed(collector: &'static str, what: &'static str, n: u64) {
    debug_assert!(SHED.contains(&(collector, what)));
    metrics::counter!("pipelens_shed_total", "collector" => collector, "what" => what).increment(n);
}

/// The agent's resident set now, in bytes.
pub fn resident_bytes() -> Option<u64> {
    status_kib("VmRSS:").map(|k| k * 1024)
}

/// The agent's peak resident set since it started, in bytes.
pub fn peak_resident_bytes() -> Option<u64> {
    status_kib("VmHWM:").map(|k| k * 1024)
}

fn status_kib(field: &str) -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()
}

/// The level for `resident` bytes under `limit`, coming from `now`.
pub fn next_level(now: Pressure, resident: u64, limit: u64) -> Pressure {
    let share = resident as f64 / limit.max(1) as f64;
    match now {
        _ if share >= 0.85 => Pressure::Critical,
        Pressure::Critical if share >= 0.75 => Pressure::Critical,
        _ if share >= 0.70 => Pressure::High,
        Pressure::Critical | Pressure::High if share >= 0.60 => Pressure::High,
        _ => Pressure::Normal,
    }
}

/// Watches the resident set against `limit` until `shutdown`.
pub async fn govern(limit: u64, shutdown: CancellationToken) {
    metrics::gauge!("pipelens_agent_memory_limit_bytes").set(limit as f64);
    metrics::gauge!("pipelens_agent_memory_pressure").set(0.0);
    for (collector, what) in SHED {
        shed(collector, what, 0);
    }
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = shutdown.cancelled() => return,
        }
        let Some(resident) = resident_bytes() else {
            continue;
        };
        metrics::gauge!("pipelens_agent_resident_bytes").set(resident as f64);
        let now = pressure();
        let next = next_level(now, resident, limit);
        if next == now {
            continue;
        }
        LEVEL.store(next as u8, Ordering::Relaxed);
        metrics::gauge!("pipelens_agent_memory_pressure").set(next as u8 as f64);
        let mib = |b: u64| b as f64 / (1024.0 * 1024.0);
        if next > now {
            log::warn!(
                "memory pressure {next:?}: resident {:.1} MiB of a {:.1} MiB limit; shedding (pipelens_shed_total)",
                mib(resident),
                mib(limit)
            );
        } else {
            log::info!(
                "memory pressure {next:?}: resident {:.1} MiB of {:.1} MiB",
                mib(resident),
                mib(limit)
            );
        }
        if next == Pressure::Critical {
            trim();
        }
    }
}

/// Hands freed heap back to the kernel (glibc keeps it otherwise).
pub fn trim() {
    // SAFETY: malloc_trim only walks the allocator's own free lists.
    unsafe {
        libc::malloc_trim(0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    #[test]
    fn levels_rise_at_their_thresholds_and_fall_with_hysteresis() {
        use Pressure::*;
        let limit = 100 * MIB;
        assert_eq!(next_level(Normal, 69 * MIB, limit), Normal);
        assert_eq!(next_level(Normal, 70 * MIB, limit), High);
        assert_eq!(next_level(Normal, 86 * MIB, limit), Critical);
        assert_eq!(next_level(High, 84 * MIB, limit), High);
        assert_eq!(next_level(High, 61 * MIB, limit), High);
        assert_eq!(next_level(High, 59 * MIB, limit), Normal);
        assert_eq!(next_level(Critical, 76 * MIB, limit), Critical);
        assert_eq!(next_level(Critical, 74 * MIB, limit), High);
        assert_eq!(next_level(Critical, 59 * MIB, limit), Normal);
    }

    #[test]
    fn the_resident_set_of_this_process_is_read() {
        let now = resident_bytes().expect("VmRSS");
        let peak = peak_resident_bytes().expect("VmHWM");
        assert!(now > MIB && peak >= now, "{now} {peak}");
    }
}
