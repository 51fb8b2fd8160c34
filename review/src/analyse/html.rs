//! The review as one self-contained HTML page: inline CSS, the charts as
//! inline SVG drawn with `plotters`, no script and nothing fetched.

use std::fmt::Write as _;

use plotters::prelude::*;

use super::{Analysis, IntervalPoint, human_bytes};

const MIB: f64 = 1024.0 * 1024.0;
const PALETTE: [RGBColor; 6] = [
    RGBColor(31, 119, 180),
    RGBColor(214, 39, 40),
    RGBColor(44, 160, 44),
    RGBColor(255, 127, 14),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
];

/// Text made safe for HTML element content and attribute values.
pub(super) fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// One line of a chart: its name and (seconds from start, value) points.
struct Line {
    name: String,
    points: Vec<(f64, f64)>,
}

/// The end of an interval, where its reading belongs on the time axis.
fn at(p: &IntervalPoint) -> f64 {
    p.start_seconds + p.duration_seconds
}

/// A line chart as an SVG document, or why it could not be drawn.
fn chart(title: &str, unit: &str, lines: &[Line]) -> Result<String, String> {
    let xmax = lines
        .iter()
        .flat_map(|l| l.points.iter().map(|p| p.0))
        .fold(0.0, f64::max)
        .max(1.0);
    let ymax = lines
        .iter()
        .flat_map(|l| l.points.iter().map(|p| p.1))
        .fold(0.0, f64::max);
    let ymax = if ymax > 0.0 { ymax * 1.1 } else { 1.0 };
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (720, 260)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| e.to_string())?;
        let mut c = ChartBuilder::on(&root)
            .caption(title, ("sans-serif", 16))
            .margin(10)
            .x_label_area_size(32)
            .y_label_area_size(60)
            .build_cartesian_2d(0f64..xmax, 0f64..ymax)
            .map_err(|e| e.to_string())?;
        c.configure_mesh()
            .x_desc("seconds from start")
            .y_desc(unit)
            .draw()
            .map_err(|e| e.to_string())?;
        for (i, line) in lines.iter().enumerate() {
            let color = PALETTE[i % PALETTE.len()];
            c.draw_series(LineSeries::new(line.points.iter().copied(), &color))
                .map_err(|e| e.to_string())?
                .label(line.name.as_str())
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], color));
        }
        if lines.len() > 1 {
            c.configure_series_labels()
                .background_style(WHITE.mix(0.85))
                .border_style(BLACK)
                .position(SeriesLabelPosition::UpperLeft)
                .draw()
                .map_err(|e| e.to_string())?;
        }
        root.present().map_err(|e| e.to_string())?;
    }
    Ok(svg)
}

/// The three charts of the timeline: response p95, statements/s, RSS.
fn charts(timeline: &[IntervalPoint]) -> Vec<(String, Result<String, String>)> {
    let series = |name: &str, f: &dyn Fn(&IntervalPoint) -> Option<f64>| Line {
        name: name.to_owned(),
        points: timeline
            .iter()
            .filter_map(|p| f(p).map(|v| (at(p), v)))
            .collect(),
    };
    let mut out = Vec::new();
    let p95: Vec<Line> = [
        series("WebSocket response p95", &|p| {
            p.websocket_response_p95_seconds.map(|s| s * 1e3)
        }),
        series("HTTP request p95", &|p| {
            p.http_request_p95_seconds.map(|s| s * 1e3)
        }),
    ]
    .into_iter()
    .filter(|l| !l.points.is_empty())
    .collect();
    if !p95.is_empty() {
        let title = "Response time p95 per interval";
        out.push((title.to_owned(), chart(title, "ms", &p95)));
    }
    let title = "Statements per second";
    out.push((
        title.to_owned(),
        chart(
            title,
            "statements/s",
            &[series("statements/s", &|p| Some(p.statements_per_second))],
        ),
    ));
    let mut processes: Vec<&String> = timeline.iter().flat_map(|p| p.rss_bytes.keys()).collect();
    processes.sort();
    processes.dedup();
    if !processes.is_empty() {
        let lines: Vec<Line> = processes
            .into_iter()
            .map(|name| {
                series(name, &|p| {
                    p.rss_bytes.get(name.as_str()).map(|b| *b as f64 / MIB)
                })
            })
            .collect();
        let title = "Resident memory";
        out.push((title.to_owned(), chart(title, "MiB", &lines)));
    }
    out
}

const STYLE: &str = "body{font-family:sans-serif;max-width:60em;margin:2em auto;padding:0 1em;\
color:#222}table{border-collapse:collapse}td,th{padding:.2em .8em;border-bottom:1px solid \
#ddd;text-align:left}td.n{text-align:right}code{background:#f4f4f4;padding:0 .2em}\
.finding{border-left:4px solid #d62728;padding:.2em 1em;margin:1em 0}.kind{color:#666;\
font-size:.9em}figure{margin:1em 0}";

impl Analysis {
    /// The review as one HTML page.
    pub(super) fn render_html(&self) -> String {
        let o = &self.overview;
        let mut h = String::new();
        let _ = write!(
            h,
            "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
             <title>Performance review</title><style>{STYLE}</style></head><body>\n\
             <h1>Performance review</h1>\n<h2>Overview</h2>\n<table>\n"
        );
        for (k, v) in o.lines() {
            let _ = writeln!(h, "<tr><th>{}</th><td>{}</td></tr>", escape(&k), escape(&v));
        }
        h.push_str("</table>\n");
        for (title, mix) in o.mixes() {
            if mix.is_empty() {
                continue;
            }
            let _ = writeln!(h, "<h3>{}</h3>\n<table>", escape(title));
            for s in mix {
                let _ = writeln!(
                    h,
                    "<tr><td class=\"n\">{:.1} %</td><td class=\"n\">{}</td>\
                     <td><code>{}</code></td></tr>",
                    s.share * 100.0,
                    s.count,
                    escape(&s.name)
                );
            }
            h.push_str("</table>\n");
        }
        h.push_str("<h2>Timeline</h2>\n");
        for (title, svg) in charts(&o.timeline) {
            match svg {
                Ok(svg) => {
                    let _ = writeln!(
                        h,
                        "<figure role=\"img\" aria-label=\"{}\">{svg}</figure>",
                        escape(&title)
                    );
                }
                Err(e) => {
                    let _ = writeln!(
                        h,
                        "<p>The chart “{}” could not be drawn: {}</p>",
                        escape(&title),
                        escape(&e)
                    );
                }
            }
        }
        h.push_str("<h2>Findings</h2>\n");
        if self.findings.is_empty() {
            h.push_str("<p>No findings.</p>\n");
        }
        for (n, f) in self.findings.iter().enumerate() {
            let _ = write!(
                h,
                "<section class=\"finding\"><h3>{}. {} <span class=\"kind\">{}</span></h3>\n\
                 <p><strong>Cost:</strong> {}</p>\n",
                n + 1,
                escape(&f.title),
                f.kind.as_str(),
                escape(&f.cost_line())
            );
            if !f.subjects.is_empty() {
                h.push_str("<p><strong>Subjects:</strong></p><ul>");
                for s in &f.subjects {
                    let _ = write!(h, "<li><code>{}</code></li>", escape(s));
                }
                h.push_str("</ul>\n");
            }
            h.push_str("<p><strong>Evidence:</strong></p><ul>");
            for e in &f.evidence {
                let _ = write!(h, "<li>{}</li>", escape(e));
            }
            let _ = writeln!(
                h,
                "</ul>\n<p><strong>Fix:</strong> {}</p></section>",
                escape(&f.suggestion)
            );
        }
        let peak: Vec<String> = o
            .peak_rss
            .iter()
            .map(|p| {
                format!(
                    "{}[{}] {}",
                    p.process,
                    p.pid,
                    human_bytes(p.peak_rss_bytes as f64)
                )
            })
            .collect();
        if !peak.is_empty() {
            let _ = writeln!(
                h,
                "<p class=\"kind\">Peak resident memory: {}</p>",
                escape(&peak.join(", "))
            );
        }
        h.push_str("</body></html>\n");
        h
    }
}

#[cfg(test)]
mod tests {
    use super::super::{Format, analyse, tests::slow_demo_for_html};
    use super::escape;

    #[test]
    fn the_page_is_self_contained_with_a_chart_per_series() {
        let a = analyse(&slow_demo_for_html());
        let page = a.render(Format::Html);
        assert!(page.starts_with("<!DOCTYPE html>"), "{page}");
        assert!(page.trim_end().ends_with("</html>"));
        // p95, statements/s and RSS.
        assert_eq!(page.matches("<svg").count(), 3, "{page}");
        assert!(page.contains("<text"), "charts carry their axis labels");
        for fetch in ["<script", "src=", "href=", "@import", "url("] {
            assert!(!page.contains(fetch), "{fetch} in the page");
        }
        let positions: Vec<usize> = a
            .findings
            .iter()
            .map(|f| page.find(&escape(&f.title)).expect("every finding"))
            .collect();
        assert!(positions.len() >= 4 && positions.windows(2).all(|w| w[0] < w[1]));
        // A template holding `<` is escaped, never markup.
        assert!(page.contains("kind &lt; $2"), "{page}");
        assert!(!page.contains("kind < $2"));
    }

    #[test]
    fn escape_leaves_no_markup() {
        assert_eq!(escape("a<b>&\"c'"), "a&lt;b&gt;&amp;&quot;c&#39;");
    }
}
