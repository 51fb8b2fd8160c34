//! The formats of a memory profile: a text report of the top allocation
//! sites, Brendan Gregg's folded stacks, an SVG flame graph and gzipped
//! pprof protobuf (for `go tool pprof`, Pyroscope and Grafana).
//!
//! The flame graph is drawn by `inferno`. The pprof messages are the
//! prost-derived `perftools.profiles` types of `libdd-profiling-protobuf`
//! (Datadog's libdatadog, `prost_impls` feature): they need neither protoc
//! nor a profiler runtime, where the `pprof` crate's `protos` come only with
//! its CPU profiler and signal handlers and `pprof_util` keeps its types
//! private.

use std::{
    collections::{BTreeMap, HashMap},
    fmt::Write as _,
    io::Write as _,
    sync::Arc,
};

use anyhow::Context as _;
use flate2::{Compression, write::GzEncoder};
use inferno::flamegraph::{self, Palette, color::BasicPalette};
use libdd_profiling_protobuf::prost_impls::{self as pb, Message as _};

use super::profile::{Frame, Profile, Stack};

// ---------------------------------------------------------------------------
// Allocation sites

/// How a plumbing rule matches a name.
#[derive(Clone, Copy, Debug)]
enum Rule {
    /// The whole name.
    Is(&'static str),
    /// The start of the name.
    Starts(&'static str),
}

use Rule::{Is, Starts};

impl Rule {
    fn matches(self, name: &str) -> bool {
        match self {
            Is(s) => name == s,
            Starts(s) => name.starts_with(s),
        }
    }
}

/// Modules whose every frame is plumbing: the C runtime and dynamic
/// loader, the C++ runtime and unwinder, the allocator libraries. Matched
/// on the start of the module's file name (`libc.so.6`,
/// `ld-linux-x86-64.so.2`, `libjemalloc.so.2`).
const PLUMBING_MODULES: &[&str] = &[
    "libc.so",
    "ld-linux",
    "ld-musl", // musl's libc and loader are one file
    "libstdc++",
    "libgcc_s",
    "libjemalloc",
    "libtcmalloc",
    "libmimalloc",
];

/// Functions that are plumbing in whatever module they are linked into
/// (allocators and Rust's allocation layers are usually linked
/// statically). Rust paths also match behind the `<` of a qualified path
/// (`<alloc::alloc::Global as core::alloc::Allocator>::allocate`).
const PLUMBING_FUNCTIONS: &[(&str, &[Rule])] = &[
    (
        "C allocator API",
        &[
            Is("malloc"),
            Is("calloc"),
            Is("realloc"),
            Is("reallocarray"),
            Is("free"),
            Is("posix_memalign"),
            Is("aligned_alloc"),
            Is("memalign"),
            Is("valloc"),
            Is("pvalloc"),
        ],
    ),
    (
        "glibc malloc internals",
        &[Starts("_int_"), Starts("__libc_"), Is("sysmalloc")],
    ),
    ("jemalloc", &[Starts("_rjem_"), Starts("je_")]),
    ("mimalloc", &[Starts("mi_"), Starts("_mi_")]),
    ("tcmalloc", &[Starts("tc_"), Starts("tcmalloc::")]),
    ("C++ allocation", &[Starts("operator new")]),
    (
        "memory fill and copy",
        &[
            Is("memset"),
            Is("memcpy"),
            Is("memmove"),
            Starts("__memset_"),
            Starts("__memmove_"),
            Starts("__memcpy_"),
        ],
    ),
    (
        "Rust allocator shims",
        &[
            Starts("__rust_alloc"), // and __rust_alloc_zeroed
            Starts("__rust_realloc"),
            Starts("__rdl_"),
            Starts("__rg_"),
            // The same shims as recent rustc names them (v0 mangling).
            Starts("__rustc::"),
        ],
    ),
    (
        "Rust allocation layers",
        &[
            Starts("std::alloc::"),
            Starts("alloc::alloc::"),
            Starts("alloc::raw_vec::"),
            Starts("core::alloc::"),
            Starts("<tikv_jemallocator::Jemalloc as core::alloc::global::GlobalAlloc>::"),
            Starts("<std::alloc::System as core::alloc::global::GlobalAlloc>::"),
        ],
    ),
];

/// Whether `frame` is allocator or runtime plumbing rather than the code
/// that asked for memory (see [`PLUMBING_MODULES`], [`PLUMBING_FUNCTIONS`]).
pub fn is_plumbing(frame: &Frame) -> bool {
    if PLUMBING_MODULES.iter().any(|m| frame.module.starts_with(m)) {
        return true;
    }
    let Some(name) = frame.function.as_deref() else {
        return false;
    };
    let bare = name.strip_prefix('<').unwrap_or(name);
    PLUMBING_FUNCTIONS
        .iter()
        .flat_map(|(_, rules)| rules.iter())
        .any(|r| r.matches(name) || r.matches(bare))
}

/// The allocation site of `stack`, as an index into `profile.frames`: its
/// innermost frame that is not plumbing ([`is_plumbing`]) nor an inlined
/// function known only by its short name, or its outermost
/// frame when every frame is.
///
/// Panics on a stack without frames.
pub fn site(profile: &Profile, stack: &Stack) -> usize {
    let at = site_position(profile, stack).expect("the allocation site of a stack without frames");
    stack.frames[at]
}

/// Where in `stack.frames` its allocation site is (`None`: no frames).
fn site_position(profile: &Profile, stack: &Stack) -> Option<usize> {
    stack
        .frames
        .iter()
        // DWARF names inlined functions without their path: an inlined
        // `std::alloc::alloc` reads as plain `alloc`, which no rule can
        // tell from user code. Such a frame is not the site; the function
        // it was inlined into is.
        .position(|&i| {
            let f = &profile.frames[i];
            let unqualified = f.inlined && f.function.as_deref().is_some_and(|n| !n.contains("::"));
            !unqualified && !is_plumbing(f)
        })
        .or(stack.frames.len().checked_sub(1))
}

// ---------------------------------------------------------------------------
// Text

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

// ---------------------------------------------------------------------------
// Folded stacks and flame graph

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

// ---------------------------------------------------------------------------
// pprof

/// The profile as a gzip-compressed `perftools.profiles.Profile`
/// (<https://github.com/google/pprof/blob/main/proto/profile.proto>), for
/// `go tool pprof`, Pyroscope and Grafana: one sample per stack with a
/// value (leaf first, a `truncated` label on truncated stacks), one
/// location per address with its inlined functions innermost first, one
/// function per name and file, one mapping per module from its load bias,
/// the notes as comments, the first column as period type (period: the
/// sampling mean) and default, and `drop_frames` naming the plumbing so
/// that pprof shows the allocation sites of [`site`] as flat values.
pub fn pprof(profile: &Profile) -> anyhow::Result<Vec<u8>> {
    let bytes = pprof_message(profile).encode_to_vec();
    let mut gz = GzEncoder::new(Vec::with_capacity(bytes.len() / 3), Compression::default());
    gz.write_all(&bytes)?;
    Ok(gz.finish()?)
}

/// The string table: "" first, each string once.
struct Strings {
    table: Vec<String>,
    index: HashMap<String, i64>,
}

impl Strings {
    fn new() -> Self {
        Strings {
            table: vec![String::new()],
            index: HashMap::from([(String::new(), 0)]),
        }
    }

    fn id(&mut self, s: &str) -> i64 {
        if let Some(&id) = self.index.get(s) {
            return id;
        }
        let id = self.table.len() as i64;
        self.table.push(s.to_string());
        self.index.insert(s.to_string(), id);
        id
    }
}

/// The frames of `stack` cut into pprof locations: the frames of one
/// address, inlined ones first, ending at the frame the address belongs to
/// (`inlined == false`). Recursion through one call site gives the same
/// address twice in a row, as two locations.
fn location_groups<'a>(profile: &Profile, stack: &'a Stack) -> Vec<&'a [usize]> {
    let mut groups = Vec::new();
    let mut start = 0;
    for (k, &i) in stack.frames.iter().enumerate() {
        let frame = &profile.frames[i];
        let next_elsewhere = stack
            .frames
            .get(k + 1)
            .is_none_or(|&n| profile.frames[n].address != frame.address);
        if !frame.inlined || next_elsewhere {
            groups.push(&stack.frames[start..=k]);
            start = k + 1;
        }
    }
    groups
}

/// A module as a pprof mapping, keyed by name and load bias.
struct MappingInfo {
    module: Arc<str>,
    start: u64,
    limit: u64,
    functions: bool,
    filenames: bool,
    line_numbers: bool,
    inline_frames: bool,
}

/// Where `module` goes among the mappings: pprof takes the first mapping
/// for the main binary, the process's executable.
fn mapping_rank(module: &str, process: &str) -> u8 {
    let library = module.starts_with('[') || module.contains(".so");
    if !library && !process.is_empty() && module.starts_with(process) {
        0
    } else if !library {
        1
    } else {
        2
    }
}

/// Frames of this module have no mapping: their address is all there is.
const UNKNOWN_MODULE: &str = "[unknown]";

/// `s` as a literal in an RE2 regular expression.
fn regex_literal(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if "\\.+*?()|[]{}^$".contains(c) {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// pprof's `drop_frames`, so that pprof front ends cut each stack at its
/// allocation site as [`site`] does: the plumbing functions found inside
/// a site, less every function found at or outside one (the C runtime's
/// `__libc_start_main` between `_start` and `main`, or a stack that is
/// all plumbing). `go tool pprof` scans each stack from its root, and at
/// the first matching frame past a non-matching one, drops that frame
/// and the frames it called. It matches the name cut at its first `(`,
/// so both forms are listed.
fn drop_frames(profile: &Profile, stacks: &[&Stack]) -> String {
    let mut inside = std::collections::BTreeSet::new();
    let mut outside = std::collections::HashSet::new();
    for stack in stacks {
        let Some(at) = site_position(profile, stack) else {
            continue;
        };
        for (k, &i) in stack.frames.iter().enumerate() {
            let name = profile.frames[i].name();
            if k < at {
                inside.insert(name);
            } else {
                outside.insert(name);
            }
        }
    }
    let mut alternatives = std::collections::BTreeSet::new();
    for name in inside.iter().filter(|n| !outside.contains(*n)) {
        if let Some(cut) = name.find('(').filter(|&k| k > 0) {
            alternatives.insert(regex_literal(&name[..cut]));
        }
        alternatives.insert(regex_literal(name));
    }
    alternatives.into_iter().collect::<Vec<_>>().join("|")
}

fn pprof_message(profile: &Profile) -> pb::Profile {
    let mut strings = Strings::new();
    let value_type = |strings: &mut Strings, c: usize| {
        let t = &profile.value_types[c];
        pb::ValueType {
            r#type: strings.id(t.name),
            unit: strings.id(t.unit),
        }
    };
    let sample_types: Vec<pb::ValueType> = (0..profile.value_types.len())
        .map(|c| value_type(&mut strings, c))
        .collect();
    let stacks: Vec<&Stack> = profile
        .stacks
        .iter()
        .filter(|s| s.values.iter().any(|v| *v != 0))
        .collect();

    // Mappings: one per module (and load bias) of the frames in use,
    // from the bias (address - module offset) to past the last address.
    let mut mapping_of: HashMap<(Arc<str>, u64), usize> = HashMap::new();
    let mut infos: Vec<MappingInfo> = Vec::new();
    for &i in stacks.iter().flat_map(|s| &s.frames) {
        let f = &profile.frames[i];
        if &*f.module == UNKNOWN_MODULE {
            continue;
        }
        let bias = f.address.wrapping_sub(f.module_offset);
        let m = *mapping_of
            .entry((f.module.clone(), bias))
            .or_insert_with(|| {
                infos.push(MappingInfo {
                    module: f.module.clone(),
                    start: bias.min(f.address),
                    limit: f.address + 1,
                    functions: false,
                    filenames: false,
                    line_numbers: false,
                    inline_frames: false,
                });
                infos.len() - 1
            });
        let info = &mut infos[m];
        info.start = info.start.min(f.address);
        info.limit = info.limit.max(f.address.saturating_add(1));
        info.functions |= f.function.is_some();
        info.filenames |= f.file.is_some();
        info.line_numbers |= f.line.is_some();
        info.inline_frames |= f.inlined || f.line.is_some();
    }
    let mut order: Vec<usize> = (0..infos.len()).collect();
    order.sort_by_key(|&m| mapping_rank(&infos[m].module, &profile.process));
    let mut mapping_ids = vec![0u64; infos.len()];
    let mut mappings = Vec::with_capacity(infos.len());
    for (n, &m) in order.iter().enumerate() {
        let info = &infos[m];
        mapping_ids[m] = n as u64 + 1;
        mappings.push(pb::Mapping {
            id: n as u64 + 1,
            memory_start: info.start,
            memory_limit: info.limit,
            file_offset: 0,
            filename: strings.id(&info.module),
            build_id: 0,
            has_functions: info.functions,
            has_filenames: info.filenames,
            has_line_numbers: info.line_numbers,
            has_inline_frames: info.inline_frames,
        });
    }

    // Functions by (name, file); locations by their frames; samples.
    let mut function_of: HashMap<(String, Option<Arc<str>>), u64> = HashMap::new();
    let mut functions: Vec<pb::Function> = Vec::new();
    let mut location_of: HashMap<&[usize], u64> = HashMap::new();
    let mut locations: Vec<pb::Location> = Vec::new();
    let mut samples = Vec::with_capacity(stacks.len());
    let truncated_key = strings.id("truncated");
    let truncated_value = strings.id("true");
    for stack in &stacks {
        let mut location_ids = Vec::new();
        for group in location_groups(profile, stack) {
            if let Some(&id) = location_of.get(group) {
                location_ids.push(id);
                continue;
            }
            let id = locations.len() as u64 + 1;
            location_of.insert(group, id);
            let outer = &profile.frames[group[group.len() - 1]];
            let mapping_id = mapping_of
                .get(&(
                    outer.module.clone(),
                    outer.address.wrapping_sub(outer.module_offset),
                ))
                .map_or(0, |&m| mapping_ids[m]);
            // Innermost first: the last line is the function the
            // others were inlined into.
            let lines = group
                .iter()
                .map(|&i| {
                    let f = &profile.frames[i];
                    let key = (f.name(), f.file.clone());
                    let function_id = match function_of.get(&key) {
                        Some(&id) => id,
                        None => {
                            let id = functions.len() as u64 + 1;
                            let name = strings.id(&key.0);
                            functions.push(pb::Function {
                                id,
                                name,
                                // No system name: we have no mangled
                                // name, and pprof leaves a name that
                                // differs from it as it is instead of
                                // cutting `<...>` out of it.
                                system_name: 0,
                                filename: strings.id(f.file.as_deref().unwrap_or("")),
                            });
                            function_of.insert(key, id);
                            id
                        }
                    };
                    pb::Line {
                        function_id,
                        line: f.line.map_or(0, i64::from),
                    }
                })
                .collect();
            locations.push(pb::Location {
                id,
                mapping_id,
                address: outer.address,
                lines,
                is_folded: false,
            });
            location_ids.push(id);
        }
        let labels = if stack.truncated {
            vec![pb::Label {
                key: truncated_key,
                str: truncated_value,
                num: 0,
                num_unit: 0,
            }]
        } else {
            Vec::new()
        };
        samples.push(pb::Sample {
            location_ids,
            values: stack.values.clone(),
            labels,
        });
    }

    let drop_frames = match drop_frames(profile, &stacks) {
        rx if rx.is_empty() => 0,
        rx => strings.id(&rx),
    };
    let period_type = (!profile.value_types.is_empty()).then(|| value_type(&mut strings, 0));
    let default_sample_type = profile
        .value_types
        .first()
        .map_or(0, |t| strings.id(t.name));
    let comment = profile.notes.iter().map(|n| strings.id(n)).collect();
    pb::Profile {
        sample_types,
        samples,
        mappings,
        locations,
        functions,
        string_table: strings.table,
        drop_frames,
        keep_frames: 0,
        time_nanos: profile.start_unix_nanos,
        duration_nanos: i64::try_from(profile.duration.as_nanos()).unwrap_or(i64::MAX),
        period_type,
        period: i64::try_from(profile.sample_mean_bytes).unwrap_or(i64::MAX),
        comment,
        default_sample_type,
    }
}

#[cfg(test)]
mod tests {
    use std::{io::Read as _, time::Duration};

    use super::super::profile::{ALLOC_OBJECTS, ALLOC_SPACE, INUSE_OBJECTS, INUSE_SPACE};
    use super::*;

    const MIB: i64 = 1 << 20;
    const KIB: i64 = 1 << 10;
    const LIBC: u64 = 0x7f00_0000_0000;
    const APP: u64 = 0x5555_0000_0000;
    const PLUGIN: u64 = 0x7f10_0000_0000;

    fn frame(
        base: u64,
        module: &str,
        offset: u64,
        function: Option<&str>,
        place: Option<(&str, u32)>,
        inlined: bool,
    ) -> Frame {
        Frame {
            address: base + offset,
            module: module.into(),
            module_offset: offset,
            function: function.map(Into::into),
            file: place.map(|(f, _)| f.into()),
            line: place.map(|(_, l)| l),
            inlined,
        }
    }

    // Indices into `synthetic().frames`.
    const MALLOC: usize = 0;
    const RUST_ALLOC: usize = 1;
    const READ_HEADER: usize = 2; // inlined into LOAD
    const LOAD: usize = 3;
    const MAIN: usize = 4;
    const START: usize = 5;
    const PLUGIN_STRIPPED: usize = 6;
    const CACHE_INSERT: usize = 7;
    const WORKER: usize = 8;
    const MAIN_OTHER_LINE: usize = 9;
    const CALLOC: usize = 10;
    const RUST_ALLOC_ZEROED: usize = 11;
    const GROW_ONE: usize = 12;

    /// Known stacks: an inlined frame, a stripped frame, a truncated
    /// stack, allocator plumbing from libc and Rust, two stacks that fold
    /// the same, a stack that is all plumbing and one without values.
    fn synthetic() -> Profile {
        let frames = vec![
            frame(LIBC, "libc.so.6", 0xa_5100, Some("malloc"), None, false),
            frame(APP, "app", 0x1200, Some("__rust_alloc"), None, false),
            frame(
                APP,
                "app",
                0x2400,
                Some("app::parse::read_header"),
                Some(("src/parse.rs", 12)),
                true,
            ),
            frame(
                APP,
                "app",
                0x2400,
                Some("app::parse::load"),
                Some(("src/parse.rs", 40)),
                false,
            ),
            frame(
                APP,
                "app",
                0x3000,
                Some("app::main"),
                Some(("src/main.rs", 7)),
                false,
            ),
            frame(
                LIBC,
                "libc.so.6",
                0x2_9d90,
                Some("__libc_start_call_main"),
                None,
                false,
            ),
            frame(PLUGIN, "libplugin.so", 0x4567, None, None, false),
            frame(
                APP,
                "app",
                0x5000,
                Some("app::cache::insert"),
                Some(("src/cache.rs", 88)),
                false,
            ),
            frame(
                APP,
                "app",
                0x6000,
                Some("app::worker<[u8; 4]>"),
                Some(("src/worker.rs", 3)),
                false,
            ),
            frame(
                APP,
                "app",
                0x3050,
                Some("app::main"),
                Some(("src/main.rs", 9)),
                false,
            ),
            frame(LIBC, "libc.so.6", 0xa_6000, Some("calloc"), None, false),
            frame(APP, "app", 0x1280, Some("__rust_alloc_zeroed"), None, false),
            frame(
                APP,
                "app",
                0x1400,
                Some("alloc::raw_vec::RawVecInner<A>::grow_one"),
                None,
                false,
            ),
        ];
        let stack = |frames: &[usize], values: [i64; 4], truncated: bool| Stack {
            frames: frames.to_vec(),
            values: values.to_vec(),
            truncated,
        };
        Profile {
            pid: 4242,
            process: "app".into(),
            mode: "allocs",
            start_unix_nanos: 1_700_000_000_000_000_000,
            duration: Duration::from_secs(10),
            value_types: vec![ALLOC_SPACE, ALLOC_OBJECTS, INUSE_SPACE, INUSE_OBJECTS],
            sample_mean_bytes: 512 * 1024,
            frames,
            stacks: vec![
                stack(
                    &[MALLOC, RUST_ALLOC, READ_HEADER, LOAD, MAIN, START],
                    [6 * MIB, 3, MIB, 1],
                    false,
                ),
                stack(
                    &[MALLOC, PLUGIN_STRIPPED, MAIN, START],
                    [3 * MIB, 2, 0, 0],
                    false,
                ),
                stack(
                    &[MALLOC, RUST_ALLOC, GROW_ONE, CACHE_INSERT, WORKER],
                    [MIB, 10, 512 * KIB, 5],
                    true,
                ),
                // Prints like the first stack in folded output: only the
                // line in main differs.
                stack(
                    &[
                        MALLOC,
                        RUST_ALLOC,
                        READ_HEADER,
                        LOAD,
                        MAIN_OTHER_LINE,
                        START,
                    ],
                    [2 * MIB, 1, 0, 0],
                    false,
                ),
                stack(
                    &[CALLOC, RUST_ALLOC_ZEROED, START],
                    [512 * KIB, 1, 0, 0],
                    false,
                ),
                stack(&[MALLOC, MAIN, START], [0, 0, 0, 0], false),
            ],
            notes: vec!["the process exited before the end".into()],
        }
    }

    #[test]
    fn site_skips_allocator_and_runtime_plumbing() {
        let p = synthetic();
        let sites: Vec<usize> = p.stacks.iter().map(|s| site(&p, s)).collect();
        assert_eq!(
            sites,
            [
                READ_HEADER,     // inlined frame under malloc and __rust_alloc
                PLUGIN_STRIPPED, // stripped, but not plumbing
                CACHE_INSERT,    // under alloc::raw_vec
                READ_HEADER,
                START, // all plumbing: the outermost frame
                MAIN,
            ]
        );
    }

    #[test]
    fn plumbing_rules() {
        let named = |module: &str, name: &str| frame(APP, module, 0x10, Some(name), None, false);
        for name in [
            "malloc",
            "_int_malloc",
            "__libc_calloc",
            "_rjem_malloc",
            "je_malloc_default",
            "mi_malloc_aligned",
            "tc_new",
            "operator new(unsigned long)",
            "operator new[](unsigned long)",
            "__rust_alloc",
            "__rust_alloc_zeroed",
            "__rust_realloc",
            "__rdl_alloc",
            "__rg_alloc",
            "std::alloc::default_alloc_error_hook",
            "alloc::alloc::exchange_malloc",
            "alloc::raw_vec::finish_grow",
            "<alloc::alloc::Global as core::alloc::Allocator>::allocate",
            "<alloc::raw_vec::RawVecInner>::grow_one",
            "<tikv_jemallocator::Jemalloc as core::alloc::global::GlobalAlloc>::alloc",
            "<std::alloc::System as core::alloc::global::GlobalAlloc>::alloc_zeroed",
            "core::alloc::layout::Layout::array",
            "memset",
            "__memset_avx2_unaligned_erms",
            "__memmove_avx_unaligned_erms",
        ] {
            assert!(is_plumbing(&named("app", name)), "{name}");
        }
        for module in [
            "libc.so.6",
            "ld-linux-x86-64.so.2",
            "libstdc++.so.6",
            "libjemalloc.so.2",
            "libtcmalloc.so.4",
            "libmimalloc.so.2",
            "libgcc_s.so.1",
        ] {
            assert!(is_plumbing(&named(module, "anything")), "{module}");
        }
        for name in [
            "app::main",
            "mallocate_things",
            "alloc::vec::Vec<T,A>::push",
            "<app::Pool as core::ops::Drop>::drop",
            "libcache::get",
        ] {
            assert!(!is_plumbing(&named("app", name)), "{name}");
        }
        assert!(!is_plumbing(&named("libcrypto.so.3", "EVP_CIPHER_CTX_new")));
        assert!(!is_plumbing(&frame(APP, "app", 0x10, None, None, false)));
    }

    #[test]
    fn human_units() {
        assert_eq!(human_bytes(0.0), "0 B");
        assert_eq!(human_bytes(512.0), "512 B");
        assert_eq!(human_bytes(1536.0), "1.5 KiB");
        assert_eq!(human_bytes(10.0 * MIB as f64), "10.0 MiB");
        assert_eq!(human_bytes(MIB as f64 - 10.0), "1.0 MiB");
        assert_eq!(human_bytes(3.0 * (1u64 << 40) as f64), "3.0 TiB");
    }

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

    fn decode(gz: &[u8]) -> pb::Profile {
        let mut raw = Vec::new();
        flate2::read::GzDecoder::new(gz)
            .read_to_end(&mut raw)
            .expect("gzip");
        pb::Profile::decode(raw.as_slice()).expect("perftools.profiles.Profile")
    }

    #[test]
    fn pprof_round_trip() {
        let p = synthetic();
        let bytes = pprof(&p).unwrap();
        assert_eq!(&bytes[..2], &[0x1f, 0x8b], "gzip magic");
        let d = decode(&bytes);
        let st = &d.string_table;
        let s = |i: i64| st[usize::try_from(i).unwrap()].as_str();

        // String table: "" first, each string once.
        assert_eq!(st[0], "");
        let mut sorted = st.clone();
        sorted.sort();
        sorted.dedup();
        assert_eq!(sorted.len(), st.len(), "duplicate strings");

        let types: Vec<(&str, &str)> = d
            .sample_types
            .iter()
            .map(|t| (s(t.r#type), s(t.unit)))
            .collect();
        assert_eq!(
            types,
            [
                ("alloc_space", "bytes"),
                ("alloc_objects", "count"),
                ("inuse_space", "bytes"),
                ("inuse_objects", "count"),
            ]
        );
        let period = d.period_type.unwrap();
        assert_eq!((s(period.r#type), s(period.unit)), ("alloc_space", "bytes"));
        assert_eq!(d.period, 512 * 1024);
        assert_eq!(s(d.default_sample_type), "alloc_space");
        assert_eq!(d.time_nanos, 1_700_000_000_000_000_000);
        assert_eq!(d.duration_nanos, 10_000_000_000);
        // pprof front ends cut the stacks at their sites.
        assert_eq!(
            s(d.drop_frames),
            "__rust_alloc|__rust_alloc_zeroed|alloc::raw_vec::RawVecInner<A>::grow_one|calloc|malloc"
        );
        assert_eq!(
            regex_literal("operator new[](unsigned long)"),
            r"operator new\[\]\(unsigned long\)"
        );
        let comments: Vec<&str> = d.comment.iter().map(|&c| s(c)).collect();
        assert_eq!(comments, ["the process exited before the end"]);

        // Samples: every stack with a value, the values as they were.
        assert_eq!(d.samples.len(), 5);
        for c in 0..4 {
            let sum: i64 = d.samples.iter().map(|x| x.values[c]).sum();
            assert_eq!(sum, p.total(c));
        }
        let truncated: Vec<bool> = d.samples.iter().map(|x| !x.labels.is_empty()).collect();
        assert_eq!(truncated, [false, false, true, false, false]);
        assert_eq!(s(d.samples[2].labels[0].key), "truncated");

        // One location per address (read_header and load share one), one
        // function per name and file (both app::main lines are one).
        assert_eq!(d.locations.len(), 12);
        assert_eq!(d.functions.len(), 12);
        let function = |id: u64| &d.functions[usize::try_from(id).unwrap() - 1];
        let location = |id: u64| &d.locations[usize::try_from(id).unwrap() - 1];
        for (i, l) in d.locations.iter().enumerate() {
            assert_eq!(l.id, i as u64 + 1);
        }
        for (i, f) in d.functions.iter().enumerate() {
            assert_eq!(f.id, i as u64 + 1);
            assert_eq!(f.system_name, 0, "no mangled names");
            assert!(usize::try_from(f.name).unwrap() < st.len());
        }
        // The first sample: leaf first; the inlined location lists the
        // inlined function first and its caller last.
        let first = &d.samples[0];
        let names: Vec<Vec<String>> = first
            .location_ids
            .iter()
            .map(|&id| {
                location(id)
                    .lines
                    .iter()
                    .map(|l| format!("{}:{}", s(function(l.function_id).name), l.line))
                    .collect()
            })
            .collect();
        assert_eq!(
            names,
            [
                vec!["malloc:0".to_string()],
                vec!["__rust_alloc:0".to_string()],
                vec![
                    "app::parse::read_header:12".to_string(),
                    "app::parse::load:40".to_string()
                ],
                vec!["app::main:7".to_string()],
                vec!["__libc_start_call_main:0".to_string()],
            ]
        );
        let parse = location(first.location_ids[2]);
        assert_eq!(parse.address, APP + 0x2400);
        assert_eq!(
            s(function(parse.lines[0].function_id).filename),
            "src/parse.rs"
        );

        // Mappings: the executable first, each module from its load bias.
        let files: Vec<&str> = d.mappings.iter().map(|m| s(m.filename)).collect();
        assert_eq!(files, ["app", "libc.so.6", "libplugin.so"]);
        let app = &d.mappings[0];
        assert_eq!((app.memory_start, app.memory_limit), (APP, APP + 0x6001));
        assert!(app.has_functions && app.has_filenames && app.has_line_numbers);
        let plugin = &d.mappings[2];
        assert!(!plugin.has_functions);
        assert_eq!(plugin.memory_start, PLUGIN);
        for l in &d.locations {
            let m = &d.mappings[usize::try_from(l.mapping_id).unwrap() - 1];
            assert!(m.memory_start <= l.address && l.address < m.memory_limit);
        }
    }

    /// `go tool pprof` reads the profile: the functions and the totals.
    /// Needs Go (`golang-go`); skipped without it unless `CI=true`.
    #[test]
    fn go_tool_pprof_reads_it() {
        let p = synthetic();
        let path =
            std::env::temp_dir().join(format!("pipelens-report-test-{}.pb.gz", std::process::id()));
        std::fs::write(&path, pprof(&p).unwrap()).unwrap();
        let run = |args: &[&str]| {
            std::process::Command::new("go")
                .args(["tool", "pprof"])
                .args(args)
                .arg(&path)
                .env("PPROF_TMPDIR", std::env::temp_dir())
                .output()
        };
        let top = match run(&["-top", "-sample_index=alloc_space"]) {
            Ok(out) => out,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let _ = std::fs::remove_file(&path);
                assert!(
                    std::env::var("CI").as_deref() != Ok("true"),
                    "go is not on PATH: CI needs golang-go to check the pprof output"
                );
                eprintln!("skipped: go is not on PATH (install golang-go)");
                return;
            }
            Err(e) => panic!("go tool pprof: {e}"),
        };
        let raw = run(&["-raw"]).unwrap();
        let _ = std::fs::remove_file(&path);
        let top_out = String::from_utf8_lossy(&top.stdout);
        let raw_out = String::from_utf8_lossy(&raw.stdout);
        println!("{top_out}\n{}", String::from_utf8_lossy(&top.stderr));
        println!("{raw_out}\n{}", String::from_utf8_lossy(&raw.stderr));
        assert!(top.status.success() && raw.status.success());
        assert!(top_out.contains("Type: alloc_space"), "{top_out}");
        // pprof picks its own unit: 12.5 MiB is "12800kB" or "12.50MB".
        assert!(
            top_out.contains("12800kB total") || top_out.contains("12.50MB total"),
            "{top_out}"
        );
        // drop_frames cut the stacks at their sites: the sites of the text
        // report hold the bytes themselves ("flat"), in the same order,
        // and the allocator frames are gone.
        let flat: Vec<String> = top_out
            .lines()
            .skip_while(|l| !l.trim_start().starts_with("flat"))
            .skip(1)
            .filter(|l| !l.trim_start().starts_with('0'))
            .map(|l| {
                let cells: Vec<&str> = l.split_whitespace().collect();
                // flat% and name: pprof versions differ in their units.
                format!("{} {}", cells[1], cells[5..].join(" "))
            })
            .collect();
        assert_eq!(
            flat,
            [
                "64.00% app::parse::read_header (inline)",
                "24.00% libplugin.so+0x4567",
                "8.00% app::cache::insert",
                "4.00% __libc_start_call_main",
            ],
            "{top_out}"
        );
        assert!(!top_out.contains("malloc"), "{top_out}");
        // Names as we gave them, not cut down by pprof's demangler.
        assert!(top_out.contains("app::worker<[u8; 4]>"), "{top_out}");
        for name in [
            "app::parse::read_header",
            "app::parse::load",
            "app::main",
            "libplugin.so+0x4567",
            "app::cache::insert",
            "malloc",
            "calloc",
        ] {
            assert!(raw_out.contains(name), "{name} missing from\n{raw_out}");
        }
        // Every column's values, and the notes.
        assert!(
            raw_out.contains(
                "alloc_space/bytes[dflt] alloc_objects/count inuse_space/bytes inuse_objects/count"
            ),
            "{raw_out}"
        );
        assert!(
            raw_out.contains("1048576         10     524288          5:"),
            "{raw_out}"
        );
        assert!(raw_out.contains("truncated:[true]"), "{raw_out}");
        assert!(
            raw_out.contains("Comment: the process exited before the end"),
            "{raw_out}"
        );
        assert!(raw_out.contains("Period: 524288"), "{raw_out}");
    }
}
