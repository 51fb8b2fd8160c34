//! Headless Chromium (Debian's `chromium`, installed by `cargo xtask
//! setup`) as a test peer for the review's HTML reports: a page is loaded
//! from a file with the network off, screenshotted, and every console
//! message it caused is collected.

use std::{path::Path, process::Command, time::Duration};

use crate::TempDir;

/// What a page did in the browser.
pub struct Rendered {
    /// Console messages and failed loads (the page must have none).
    pub console: Vec<String>,
    pub width: u32,
    pub height: u32,
    /// RGB pixels, row by row.
    pub pixels: Vec<[u8; 3]>,
}

impl Rendered {
    /// Pixels neither white nor near it, in the rows from `top` (a fraction
    /// of the height) down: where charts and text were drawn.
    pub fn inked_fraction(&self, top: f64) -> f64 {
        let first = (self.height as f64 * top) as usize * self.width as usize;
        let region = &self.pixels[first.min(self.pixels.len())..];
        let inked = region.iter().filter(|p| p.iter().any(|c| *c < 200)).count();
        inked as f64 / region.len().max(1) as f64
    }

    /// Distinct colours drawn: a chart's lines and fills, not just text.
    pub fn colours(&self) -> usize {
        let mut seen = std::collections::HashSet::new();
        for p in &self.pixels {
            seen.insert(*p);
        }
        seen.len()
    }
}

/// Loads `page` in headless Chromium (1200 × 2400, no network) and takes
/// its screenshot.
pub fn render(page: &Path) -> Rendered {
    let dir = TempDir::new("chromium");
    let shot = dir.path.join("page.png");
    let url = format!(
        "file://{}",
        page.canonicalize().expect("page path").display()
    );
    let mut child = Command::new("chromium")
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--no-first-run",
            "--enable-logging=stderr",
            "--v=0",
            // Nothing may be fetched: a report is one self-contained file.
            "--proxy-server=127.0.0.1:9",
            "--window-size=1200,2400",
        ])
        .arg(format!(
            "--user-data-dir={}",
            dir.path.join("profile").display()
        ))
        .arg(format!("--screenshot={}", shot.display()))
        .arg(&url)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("chromium (cargo xtask setup installs it)");
    let deadline = std::time::Instant::now() + crate::patience(Duration::from_secs(60));
    while child.try_wait().expect("wait").is_none() {
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            panic!("chromium did not finish rendering {url}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let out = child.wait_with_output().expect("chromium output");
    let stderr = String::from_utf8_lossy(&out.stderr);
    let console = stderr
        .lines()
        .filter(|l| l.contains(":CONSOLE") || l.contains("net::ERR_"))
        .map(str::to_owned)
        .collect();
    let file = std::fs::File::open(&shot)
        .unwrap_or_else(|e| panic!("no screenshot of {url} ({e}): {stderr}"));
    let decoder = png::Decoder::new(std::io::BufReader::new(file));
    let mut reader = decoder.read_info().expect("a PNG");
    let mut buf = vec![0; reader.output_buffer_size().expect("size")];
    let info = reader.next_frame(&mut buf).expect("a frame");
    let channels = info.color_type.samples();
    let pixels = buf[..info.buffer_size()]
        .chunks(channels)
        .map(|c| [c[0], c[1], c[2]])
        .collect();
    Rendered {
        console,
        width: info.width,
        height: info.height,
        pixels,
    }
}
