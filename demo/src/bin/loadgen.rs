//! `loadgen`: drives `pipeline` and prints a JSON summary of exactly what it
//! did (see `loadgen --help`).

use clap::Parser as _;
use pipelens_demo::loadgen::{self, LoadgenSettings};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn")).init();
    let settings = LoadgenSettings::parse();
    let summary_path = settings.summary.clone();
    let summary = loadgen::run(settings).await;
    let json = serde_json::to_string_pretty(&summary)?;
    if let Some(path) = summary_path {
        std::fs::write(&path, format!("{json}\n"))
            .map_err(|e| anyhow::anyhow!("writing {}: {e}", path.display()))?;
    }
    println!("{json}");
    Ok(())
}
