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
        cli::Command::Record(args) => {
            args.into_options()
                .map_err(anyhow::Error::msg)
                .and_then(|opts| {
                    tokio::runtime::Builder::new_multi_thread()
                        .worker_threads(2)
                        .enable_all()
                        .build()
                        .map_err(anyhow::Error::from)
                        .and_then(|rt| rt.block_on(run::run(opts)))
                })
        }
        cli::Command::Analyse(args) => {
            return review_exit(pipelens::review::analyse(&args.into_options()));
        }
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
            eprintln!("error: {}", describe(&e));
            std::process::ExitCode::FAILURE
        }
    }
}

/// A review command's exit: 0 done, 2 on an error (a snapshot that cannot
/// be read, a bad targets file), so that 1 can mean "a target was missed".
fn review_exit(result: anyhow::Result<()>) -> std::process::ExitCode {
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", describe(&e));
            std::process::ExitCode::from(2)
        }
    }
}

/// The error and its causes on one line, each said once: many of our
/// errors already quote their source in their own message.
fn describe(e: &anyhow::Error) -> String {
    let mut text = e.to_string();
    for cause in e.chain().skip(1) {
        let cause = cause.to_string();
        if !text.contains(&cause) {
            text.push_str(": ");
            text.push_str(&cause);
        }
    }
    text
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_cause_quoted_by_its_error_is_said_once() {
        let io = std::io::Error::from(std::io::ErrorKind::PermissionDenied);
        let e = anyhow::Error::from(objects::LoadError::PinDir {
            path: "/sys/fs/bpf/pipelens/1".into(),
            source: io,
        })
        .context("opening the session");
        let text = super::describe(&e);
        assert_eq!(text.matches("permission denied").count(), 1, "{text}");
        assert!(
            text.starts_with("opening the session: cannot prepare"),
            "{text}"
        );
    }

    use pipelens::objects;
}
