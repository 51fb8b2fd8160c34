//! pipelens: eBPF observability for a running service, without touching it.

use clap::Parser as _;
use pipelens::{check, cli, memory, run};

fn main() -> std::process::ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    let cli = cli::Cli::parse();
    let result = match cli.command {
        cli::Command::Run(args) => tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .map_err(anyhow::Error::from)
            .and_then(|rt| rt.block_on(run::run(args.into_options()))),
        cli::Command::Memory(args) => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(anyhow::Error::from)
            .and_then(|rt| rt.block_on(memory::command::run(args.into_options()))),
        cli::Command::Check => match check::run() {
            Ok(true) => Ok(()),
            Ok(false) => Err(anyhow::anyhow!(
                "some hooks or collectors are not usable here"
            )),
            Err(e) => Err(e),
        },
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
