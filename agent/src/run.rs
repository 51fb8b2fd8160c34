//! `pipelens run`: open a session, start the requested collectors, serve
//! `/metrics` and `/healthz` until stopped, stop cleanly, write the summary.

use std::{net::SocketAddr, path::PathBuf, time::Duration, time::Instant};

use anyhow::{Context as _, bail};
use tokio_util::sync::CancellationToken;

use crate::{
    collector::{Collector, CollectorKind, Health, Status},
    connections::Connections,
    memory::collector::Memory,
    queries::QueriesAnalyser,
    record::{self, Recording, book::Book},
    server,
    session::Session,
    streams::{Analyser, Payload},
    summary,
    targets::Selection,
    telemetry,
    websocket::analyser::WebAnalyser,
};

/// What `pipelens run` was asked for (the CLI's `run` flags).
#[derive(Clone, Debug)]
pub struct Options {
    pub selection: Selection,
    /// Empty: every collector.
    pub collectors: Vec<CollectorKind>,
    pub listen: SocketAddr,
    /// `None`: until SIGINT or SIGTERM.
    pub duration: Option<Duration>,
    pub syscall_hooks: bool,
    pub capture_bytes: usize,
    pub memory_sample_bytes: u64,
    pub memory_allocs: bool,
    /// Quoted identifiers masked in query templates.
    pub mask_identifiers: bool,
    pub summary_json: Option<PathBuf>,
    /// Resident bytes the agent keeps below by shedding (`crate::budget`).
    pub memory_limit: u64,
    /// `pipelens record`: the snapshot to write, and its interval.
    pub record: Option<record::Plan>,
}

impl Options {
    /// The requested kinds, each once, in a stable order.
    fn requested(&self) -> Vec<CollectorKind> {
        if self.collectors.is_empty() {
            return CollectorKind::ALL.to_vec();
        }
        let mut kinds = self.collectors.clone();
        kinds.sort();
        kinds.dedup();
        kinds
    }
}

/// The collectors of a run: adding one means adding it here.
fn collectors(opts: &Options, requested: &[CollectorKind]) -> Vec<Box<dyn Collector>> {
    let mut list: Vec<Box<dyn Collector>> = Vec::new();
    let wants = |kind| requested.contains(&kind);
    // Payload analysers share one capture object.
    let protocols: Vec<CollectorKind> = requested
        .iter()
        .copied()
        .filter(|k| analyser(*k).is_some())
        .collect();
    if !protocols.is_empty() {
        list.push(Box::new(Payload {
            kinds: protocols,
            capture_bytes: opts.capture_bytes,
            analyser,
        }));
    }
    if wants(CollectorKind::Connections) {
        list.push(Box::new(Connections {
            syscall_hooks: opts.syscall_hooks,
        }));
    }
    if wants(CollectorKind::Memory) {
        list.push(Box::new(Memory {
            syscall_hooks: opts.syscall_hooks,
            growth_mean: opts.memory_sample_bytes,
            alloc_pids: if opts.memory_allocs {
                opts.selection.pids.clone()
            } else {
                Vec::new()
            },
        }));
    }
    list
}

/// The payload analyser of a protocol collector.
fn analyser(kind: CollectorKind) -> Option<Box<dyn Analyser>> {
    match kind {
        CollectorKind::Queries => Some(Box::new(QueriesAnalyser::new().0)),
        CollectorKind::Websocket => Some(Box::new(WebAnalyser::new().0)),
        CollectorKind::Connections | CollectorKind::Memory => None,
    }
}

pub async fn run(opts: Options) -> anyhow::Result<()> {
    let started = Instant::now();
    opts.selection.validate()?;
    // A summary that cannot be written must fail now, not after the run.
    if let Some(path) = &opts.summary_json {
        crate::output::check_writable(path).context("--summary-json")?;
    }
    if let Some(plan) = &opts.record {
        crate::output::check_writable(&plan.output).context("--output")?;
    }
    let requested = opts.requested();
    if opts.memory_allocs {
        if opts.selection.pids.is_empty() {
            bail!(
                "--memory-allocs puts uprobes on the allocator of --pid targets only, and none \
                 is given: add --pid PID (--comm and --all targets are profiled by growth only)"
            );
        }
        if !requested.contains(&CollectorKind::Memory) {
            bail!("--memory-allocs needs the memory collector: add memory to --collectors");
        }
        if !crate::privileges::can_attach_uprobes() {
            bail!(
                "--memory-allocs needs CAP_SYS_ADMIN: without it {}",
                crate::privileges::UPROBES_NEED_SYS_ADMIN
            );
        }
    }

    crate::queries::sql::mask_quoted_identifiers(opts.mask_identifiers);
    let book = opts.record.as_ref().map(|_| Book::default());
    let handle = telemetry::install(book.clone())?;
    let health = Health::new(&requested);
    let listener = server::bind(opts.listen).await?;
    log::info!(
        "serving /metrics and /healthz on http://{}",
        listener.local_addr()?
    );
    let session = Session::open(opts.selection.clone())?;

    let shutdown = CancellationToken::new();
    let server_task = tokio::spawn(server::serve(
        listener,
        handle.clone(),
        health.clone(),
        server::Limits::default(),
        shutdown.clone(),
    ));
    let upkeep = {
        let handle = handle.clone();
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(5));
            loop {
                tokio::select! {
                    _ = tick.tick() => handle.run_upkeep(),
                    () = shutdown.cancelled() => break,
                }
            }
        })
    };

    let mut running = Vec::new();
    for collector in collectors(&opts, &requested) {
        let kinds = collector.kinds();
        match collector.start(&session) {
            Ok(attached) => {
                for kind in &kinds {
                    for hook in attached.hooks() {
                        metrics::gauge!(
                            "pipelens_collector_hook_info",
                            "collector" => kind.name(),
                            "hook" => hook.hook,
                            "kind" => hook.kind,
                            "target" => hook.target,
                        )
                        .set(1.0);
                    }
                    health.set(*kind, Status::Up);
                }
                running.push((kinds, attached.spawn(shutdown.clone())));
            }
            Err(e) => {
                for kind in &kinds {
                    log::error!("collector {kind} is down: {e}");
                    health.set(*kind, Status::Down(e.to_string()));
                }
            }
        }
    }
    if running.is_empty() {
        shutdown.cancel();
        bail!("no collector could be attached: {:?}", health.snapshot());
    }
    log::info!("attached in {:.0?}", started.elapsed());
    // Loading parsed the kernel's BTF (tens of MiB, freed since): hand the
    // heap it left back to the kernel.
    crate::budget::trim();
    // Governed from here: the peak of loading is over.
    let governor = tokio::spawn(crate::budget::govern(opts.memory_limit, shutdown.clone()));

    let mut recording =
        opts.record.clone().zip(book).map(|(plan, book)| {
            Recording::start(plan, book, opts.selection.clone(), opts.duration)
        });
    wait_for_stop(opts.duration, recording.as_mut(), &session).await?;
    log::info!("stopping");
    shutdown.cancel();
    let mut sections = Vec::new();
    for (kinds, task) in running {
        let names: Vec<&str> = kinds.iter().map(|k| k.name()).collect();
        match task.await {
            Ok(Ok(s)) => sections.extend(s),
            Ok(Err(e)) => log::error!("collector {} failed: {e}", names.join(",")),
            Err(e) => log::error!("collector {} panicked: {e}", names.join(",")),
        }
    }
    // The last interval ends once the collectors have drained the kernel.
    let recorded = recording.map(|r| r.finish(&session));
    drop(session);
    let _ = upkeep.await;
    let _ = governor.await;
    if let Ok(Err(e)) = server_task.await {
        log::warn!("http server: {e}");
    }

    if let Some(path) = &opts.summary_json {
        let doc = summary::build(started.elapsed(), &health, sections);
        summary::write(path, &doc)?;
        log::info!("summary written to {}", path.display());
    }
    if let Some(written) = recorded {
        log::info!("snapshot written to {}", written?.display());
    }
    Ok(())
}

/// Until the duration is over or a signal; a recording's intervals are
/// closed meanwhile, and it ends early, partial, once its `--pid` targets
/// are all gone or a signal cut the duration short.
async fn wait_for_stop(
    duration: Option<Duration>,
    mut recording: Option<&mut Recording>,
    session: &Session,
) -> anyhow::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let started = Instant::now();
    let sleep = async {
        match duration {
            Some(d) => tokio::time::sleep(d).await,
            None => std::future::pending().await,
        }
    };
    tokio::pin!(sleep);
    let period = recording
        .as_ref()
        .map_or(Duration::from_secs(3600), |r| r.interval());
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
    loop {
        tokio::select! {
            () = &mut sleep => return Ok(()),
            _ = term.recv() => break,
            _ = int.recv() => break,
            _ = tick.tick() => {
                if let Some(r) = recording.as_deref_mut() {
                    r.close_interval(session);
                    if r.targets_gone() {
                        return Ok(());
                    }
                }
            }
        }
    }
    if let (Some(r), Some(d)) = (recording, duration) {
        r.mark_partial(format!(
            "stopped by a signal after {:.1} s of {:.1} s",
            started.elapsed().as_secs_f64(),
            d.as_secs_f64()
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn options(collectors: Vec<CollectorKind>) -> Options {
        Options {
            selection: Selection {
                all: true,
                pids: Vec::new(),
                comms: Vec::new(),
            },
            collectors,
            listen: "127.0.0.1:0".parse().unwrap(),
            duration: None,
            syscall_hooks: false,
            capture_bytes: 4096,
            memory_limit: 128 << 20,
            memory_sample_bytes: 0,
            memory_allocs: false,
            mask_identifiers: false,
            summary_json: None,
            record: None,
        }
    }

    #[test]
    fn every_requested_kind_is_carried_by_exactly_one_collector() {
        for requested in [
            CollectorKind::ALL.to_vec(),
            vec![CollectorKind::Websocket],
            vec![CollectorKind::Memory, CollectorKind::Queries],
            vec![CollectorKind::Connections],
        ] {
            let opts = options(requested.clone());
            let mut carried: Vec<CollectorKind> = collectors(&opts, &opts.requested())
                .iter()
                .flat_map(|c| c.kinds())
                .collect();
            carried.sort();
            assert_eq!(carried, opts.requested(), "{requested:?}");
        }
    }

    #[test]
    fn requested_kinds_are_deduplicated_and_default_to_all() {
        assert_eq!(options(Vec::new()).requested(), CollectorKind::ALL);
        let opts = options(vec![
            CollectorKind::Queries,
            CollectorKind::Connections,
            CollectorKind::Queries,
        ]);
        assert_eq!(
            opts.requested(),
            [CollectorKind::Connections, CollectorKind::Queries]
        );
    }
}
