//! Brendan Gregg's folded stacks, and the SVG flame graph that `inferno`
//! draws from them.

use std::{collections::BTreeMap, fmt::Write as _};

use anyhow::Context as _;
use inferno::flamegraph::{self, Palette, color::BasicPalette};

use super::human;
use crate::memory::profile::{Frame, Profile};

/// The root frame put above a truncated stack in folded output, so that a
/// flame graph groups stacks that lost their outer frames instead of
/// showing each as a root of its own.
const TRUNCATED_ROOT: &str = "[truncated]";

/// A frame name fit for folded output: no `;` (the frame separator; as
/// stackcollapse-perf does, `;` becomes `:`) and no line breaks.
fn folded_name(frame: &Frame) -> String {
    let name: String = frame
        .name()
        .chars()
        .map(|c| match c {
            ';' => ':',
            '\n' | '\r' => ' ',
            c => c,
        })
        .collect();
    if name.trim().is_empty() {
        "[unnamed]".to_string()
    } else {
        name
    }
}

/// Brendan Gregg's folded stacks of column `column`: one line per distinct
/// stack, outermost frame first, frames joined by `;`, a space, the value.
/// Stacks that print the same are merged, zero values left out, lines in
/// byte order. Inlined functions are frames of their own; a truncated
/// stack hangs under a `[truncated]` root.
///
/// Panics when `column` is not a column of `profile`.
pub fn folded(profile: &Profile, column: usize) -> String {
    assert!(
        column < profile.value_types.len(),
        "column {column} of a profile with {} value types",
        profile.value_types.len()
    );
    let mut merged: BTreeMap<String, i64> = BTreeMap::new();
    for stack in &profile.stacks {
        let value = stack.values[column];
        if value == 0 {
            continue;
        }
        let mut names: Vec<String> = Vec::with_capacity(stack.frames.len() + 1);
        if stack.truncated {
            names.push(TRUNCATED_ROOT.to_string());
        }
        names.extend(
            stack
                .frames
                .iter()
                .rev()
                .map(|&i| folded_name(&profile.frames[i])),
        );
        if names.is_empty() {
            names.push("[no stack]".to_string());
        }
        *merged.entry(names.join(";")).or_default() += value;
    }
    let mut out = String::new();
    for (stack, value) in merged {
        if value != 0 {
            let _ = writeln!(out, "{stack} {value}");
        }
    }
    out
}

/// A flame graph of column `column` as SVG (inferno's, memory palette).
pub fn svg(profile: &Profile, column: usize) -> anyhow::Result<Vec<u8>> {
    let vt = profile.value_types.get(column).with_context(|| {
        format!(
            "column {column} of a profile with {} value types",
            profile.value_types.len()
        )
    })?;
    let lines = folded(profile, column);
    if lines.is_empty() {
        anyhow::bail!("no {} recorded: no flame graph to draw", vt.name);
    }
    let mut opts = flamegraph::Options::default();
    opts.title = format!(
        "{} (pid {}): {} profile, {}",
        profile.process, profile.pid, profile.mode, vt.name
    );
    opts.subtitle = Some(format!(
        "{} {} in {:.1} s",
        human(profile.total(column), vt.unit),
        vt.name,
        profile.duration.as_secs_f64()
    ));
    opts.count_name = vt.unit.to_string();
    opts.colors = Palette::Basic(BasicPalette::Mem);
    opts.hash = true;
    opts.deterministic = true;
    opts.notes = profile.notes.join("; ");
    let mut out = Vec::new();
    flamegraph::from_lines(&mut opts, lines.lines(), &mut out)
        .context("drawing the flame graph")?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::super::fixture::{MAIN, synthetic};
    use super::*;

    #[test]
    fn folded_stacks() {
        let p = synthetic();
        assert_eq!(
            folded(&p, 0),
            "[truncated];app::worker<[u8: 4]>;app::cache::insert;alloc::raw_vec::RawVecInner<A>::grow_one;__rust_alloc;malloc 1048576\n\
             __libc_start_call_main;__rust_alloc_zeroed;calloc 524288\n\
             __libc_start_call_main;app::main;app::parse::load;app::parse::read_header;__rust_alloc;malloc 8388608\n\
             __libc_start_call_main;app::main;libplugin.so+0x4567;malloc 3145728\n"
        );
        // Zero values are left out: only two stacks hold in-use bytes.
        assert_eq!(folded(&p, 2).lines().count(), 2);
        let total: i64 = folded(&p, 1)
            .lines()
            .map(|l| l.rsplit_once(' ').unwrap().1.parse::<i64>().unwrap())
            .sum();
        assert_eq!(total, p.total(1));
        // The same stack twice: one line, the values added.
        let mut twice = synthetic();
        twice.stacks.push(twice.stacks[1].clone());
        assert!(
            folded(&twice, 0)
                .contains("__libc_start_call_main;app::main;libplugin.so+0x4567;malloc 6291456\n")
        );
        // Names never break the format.
        let mut odd = synthetic();
        odd.frames[MAIN].function = Some("a;b\nc".into());
        assert!(folded(&odd, 0).contains(";a:b c;"));
    }

    #[test]
    fn svg_flame_graph() {
        let p = synthetic();
        let drawn = String::from_utf8(svg(&p, 0).unwrap()).unwrap();
        assert!(drawn.starts_with("<?xml") || drawn.starts_with("<svg"));
        for name in [
            "app::parse::read_header",
            "libplugin.so+0x4567",
            "app::cache::insert",
            "app (pid 4242): allocs profile, alloc_space",
            "bytes",
        ] {
            assert!(drawn.contains(name), "{name} missing from the SVG");
        }
        assert!(svg(&p, 9).is_err());
        let mut empty = synthetic();
        empty.stacks.clear();
        assert!(svg(&empty, 0).is_err());
    }
}
