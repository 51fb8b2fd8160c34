//! The formats of a memory profile: a text report of the top allocation
//! sites (`text`), Brendan Gregg's folded stacks and an SVG flame graph
//! (`flame`), and gzipped pprof protobuf for `go tool pprof`, Pyroscope
//! and Grafana (`pprof`). Each ranks or cuts stacks at the allocation
//! sites that `attribution` picks out of the allocator plumbing.

mod attribution;
#[cfg(test)]
mod fixture;
mod flame;
mod pprof;
mod text;

pub use attribution::site;
pub use flame::{folded, svg};
pub use pprof::pprof;
pub use text::text;

/// `bytes` with a binary unit: "512 B", "1.5 KiB", "10.0 MiB".
pub fn human_bytes(bytes: f64) -> String {
    const UNITS: [&str; 5] = ["KiB", "MiB", "GiB", "TiB", "PiB"];
    if bytes.abs() < 1023.5 {
        return format!("{bytes:.0} B");
    }
    let mut value = bytes / 1024.0;
    let mut unit = 0;
    // 1023.96 KiB prints as "1.0 MiB", not "1024.0 KiB".
    while value.abs() >= 1023.95 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    format!("{value:.1} {}", UNITS[unit])
}

/// A value of a column with unit `unit`: humanised bytes, plain counts.
fn human(value: i64, unit: &str) -> String {
    if unit == "bytes" {
        human_bytes(value as f64)
    } else {
        value.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::fixture::MIB;
    use super::*;

    #[test]
    fn human_units() {
        assert_eq!(human_bytes(0.0), "0 B");
        assert_eq!(human_bytes(512.0), "512 B");
        assert_eq!(human_bytes(1536.0), "1.5 KiB");
        assert_eq!(human_bytes(10.0 * MIB as f64), "10.0 MiB");
        assert_eq!(human_bytes(MIB as f64 - 10.0), "1.0 MiB");
        assert_eq!(human_bytes(3.0 * (1u64 << 40) as f64), "3.0 TiB");
    }
}
