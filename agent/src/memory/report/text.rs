//! The report for a person: the heaviest allocation sites in a table,
//! and the heaviest stacks of the first few.

use std::{collections::HashMap, fmt::Write as _};

use super::{attribution::site, human, human_bytes};
use crate::memory::profile::{Frame, Profile};

/// How the text report names a site: the function, and where it is when
/// the line tables tell.
fn site_label(frame: &Frame) -> String {
    match (&frame.file, frame.line) {
        (Some(file), Some(line)) => format!("{} ({file}:{line})", frame.name()),
        (Some(file), None) => format!("{} ({file})", frame.name()),
        _ => frame.name(),
    }
}

/// One row of the site table: the values summed over every stack whose
/// site prints the same, and the heaviest of those stacks.
struct SiteRow {
    label: String,
    values: Vec<i64>,
    heaviest: usize,
}

/// Every site with a value, heaviest first by the first column (then by
/// name, for a stable order).
fn ranked_sites(profile: &Profile) -> Vec<SiteRow> {
    let columns = profile.value_types.len();
    let mut rows: Vec<SiteRow> = Vec::new();
    let mut index: HashMap<String, usize> = HashMap::new();
    for (s, stack) in profile.stacks.iter().enumerate() {
        if stack.values.iter().all(|v| *v == 0) {
            continue;
        }
        let label = if stack.frames.is_empty() {
            "[no stack]".to_string()
        } else {
            site_label(&profile.frames[site(profile, stack)])
        };
        let r = *index.entry(label.clone()).or_insert_with(|| {
            rows.push(SiteRow {
                label,
                values: vec![0; columns],
                heaviest: s,
            });
            rows.len() - 1
        });
        let row = &mut rows[r];
        for (sum, v) in row.values.iter_mut().zip(&stack.values) {
            *sum += v;
        }
        let first = |i: usize| profile.stacks[i].values.first().copied().unwrap_or(0);
        if first(s) > first(row.heaviest) {
            row.heaviest = s;
        }
    }
    rows.sort_by(|a, b| {
        let first = |r: &SiteRow| r.values.first().copied().unwrap_or(0);
        first(b).cmp(&first(a)).then_with(|| a.label.cmp(&b.label))
    });
    rows
}

/// How many sites the text report shows the heaviest stack of.
const STACKS_SHOWN: usize = 3;

/// The report for a person: what was profiled, the totals, the notes, the
/// `top` heaviest allocation sites by the first column (0: all of them),
/// and the heaviest stack of each of the first few.
pub fn text(profile: &Profile, top: usize) -> String {
    let mut out = String::new();
    let types = &profile.value_types;
    let _ = writeln!(
        out,
        "memory profile of {} (pid {})",
        profile.process, profile.pid
    );
    let _ = writeln!(out, "  mode      {}", profile.mode);
    let _ = writeln!(out, "  duration  {:.1} s", profile.duration.as_secs_f64());
    let sampling = if profile.sample_mean_bytes == 0 {
        "every event recorded".to_string()
    } else {
        format!(
            "one sample per {} on average (values are estimates)",
            human_bytes(profile.sample_mean_bytes as f64)
        )
    };
    let _ = writeln!(out, "  sampling  {sampling}");
    let totals: Vec<String> = types
        .iter()
        .enumerate()
        .map(|(c, t)| format!("{} {}", t.name, human(profile.total(c), t.unit)))
        .collect();
    let _ = writeln!(out, "  totals    {}", totals.join(", "));

    if !profile.notes.is_empty() {
        let _ = writeln!(out, "\nnotes");
        for note in &profile.notes {
            let _ = writeln!(out, "  - {note}");
        }
    }

    let sites = ranked_sites(profile);
    let Some(first) = types.first() else {
        return out;
    };
    if sites.is_empty() {
        let _ = writeln!(out, "\nno {} recorded", first.name);
        return out;
    }
    let shown = if top == 0 {
        sites.len()
    } else {
        top.min(sites.len())
    };
    let _ = writeln!(
        out,
        "\ntop {shown} of {} sites by {}",
        sites.len(),
        first.name
    );

    // Columns: the first value, its share of the total, the other values,
    // the site. Numbers right-aligned, each as wide as its widest cell.
    let first_total = profile.total(0);
    let mut header: Vec<String> = vec!["#".into(), first.name.into(), "share".into()];
    header.extend(types[1..].iter().map(|t| t.name.to_string()));
    let rows: Vec<Vec<String>> = sites[..shown]
        .iter()
        .enumerate()
        .map(|(n, row)| {
            let share = if first_total > 0 {
                format!("{:.1}%", 100.0 * row.values[0] as f64 / first_total as f64)
            } else {
                "-".to_string()
            };
            let mut cells = vec![(n + 1).to_string(), human(row.values[0], first.unit), share];
            cells.extend(
                types[1..]
                    .iter()
                    .zip(&row.values[1..])
                    .map(|(t, v)| human(*v, t.unit)),
            );
            cells
        })
        .collect();
    let widths: Vec<usize> = (0..header.len())
        .map(|c| {
            rows.iter()
                .map(|r| r[c].len())
                .chain([header[c].len()])
                .max()
                .unwrap_or(0)
        })
        .collect();
    let line = |cells: &[String], last: &str| {
        let mut l = String::new();
        for (cell, w) in cells.iter().zip(&widths) {
            let _ = write!(l, "  {cell:>w$}");
        }
        let _ = write!(l, "  {last}");
        l
    };
    let _ = writeln!(out, "{}", line(&header, "site"));
    for (row, cells) in sites.iter().zip(&rows) {
        let _ = writeln!(out, "{}", line(cells, &row.label));
    }

    for (n, row) in sites.iter().take(shown.min(STACKS_SHOWN)).enumerate() {
        let stack = &profile.stacks[row.heaviest];
        let _ = writeln!(
            out,
            "\nheaviest stack of site {}, {}: {} of its {} {}",
            n + 1,
            row.label,
            human(stack.values[0], first.unit),
            human(row.values[0], first.unit),
            first.name,
        );
        for &i in &stack.frames {
            let f = &profile.frames[i];
            let mut l = format!("    {}", f.name());
            match (&f.file, f.line) {
                (Some(file), Some(line)) => {
                    let _ = write!(l, "  at {file}:{line}");
                }
                (Some(file), None) => {
                    let _ = write!(l, "  at {file}");
                }
                _ => {}
            }
            if f.inlined {
                l.push_str("  (inlined)");
            }
            let _ = writeln!(out, "{l}");
        }
        if stack.frames.is_empty() {
            let _ = writeln!(out, "    (no frames)");
        }
        if stack.truncated {
            let _ = writeln!(out, "    (truncated)");
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::super::fixture::synthetic;
    use super::*;

    #[test]
    fn text_report() {
        let p = synthetic();
        let t = text(&p, 10);
        println!("{t}");
        for line in [
            "memory profile of app (pid 4242)",
            "  mode      allocs",
            "  duration  10.0 s",
            "  sampling  one sample per 512.0 KiB on average",
            "  totals    alloc_space 12.5 MiB, alloc_objects 17, inuse_space 1.5 MiB, inuse_objects 6",
            "  - the process exited before the end",
        ] {
            assert!(t.contains(line), "{line:?} missing from\n{t}");
        }
        let table = "\
top 4 of 4 sites by alloc_space
  #  alloc_space  share  alloc_objects  inuse_space  inuse_objects  site
  1      8.0 MiB  64.0%              4      1.0 MiB              1  app::parse::read_header (src/parse.rs:12)
  2      3.0 MiB  24.0%              2          0 B              0  libplugin.so+0x4567
  3      1.0 MiB   8.0%             10    512.0 KiB              5  app::cache::insert (src/cache.rs:88)
  4    512.0 KiB   4.0%              1          0 B              0  __libc_start_call_main
";
        assert!(t.contains(table), "{table}missing from\n{t}");
        // The heaviest stack of the first site is the 6 MiB one (line 7 of
        // main), innermost first, the inlined frame marked.
        let first = t
            .find("heaviest stack of site 1, app::parse::read_header (src/parse.rs:12): 6.0 MiB of its 8.0 MiB alloc_space\n")
            .expect("first stack");
        let block: Vec<&str> = t[first..].lines().skip(1).take(6).collect();
        assert_eq!(
            block,
            [
                "    malloc",
                "    __rust_alloc",
                "    app::parse::read_header  at src/parse.rs:12  (inlined)",
                "    app::parse::load  at src/parse.rs:40",
                "    app::main  at src/main.rs:7",
                "    __libc_start_call_main",
            ]
        );
        let third = t
            .find("heaviest stack of site 3, app::cache::insert")
            .unwrap();
        let block: Vec<&str> = t[third..].lines().skip(1).take(6).collect();
        assert_eq!(block[5], "    (truncated)");
        assert!(!t.contains("heaviest stack of site 4"));
        // Fewer rows on request.
        let t2 = text(&p, 2);
        assert!(t2.contains("top 2 of 4 sites by alloc_space"));
        assert!(!t2.contains("app::cache::insert"));
    }
}
