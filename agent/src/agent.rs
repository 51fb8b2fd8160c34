//! `pipelens run`: attach, serve, stop cleanly, write the summary.

use std::{
    sync::{Arc, Mutex},
    time::Instant,
};

use anyhow::{Context as _, bail};
use tokio_util::sync::CancellationToken;

use crate::{
    btf,
    cli::RunArgs,
    collector::{CollectorKind, Health, Status},
    connections::{ConnectionTracker, ConnectionsCollector},
    memory::collector::MemoryCollector,
    objects::Loader,
    privileges, process, queries,
    queries::QueriesAnalyser,
    server,
    streams::{Analyser, StreamsCollector},
    summary,
    targets::{Selection, TargetTracker},
    telemetry, tracefs, websocket,
    websocket::analyser::WebAnalyser,
};

pub async fn run(args: RunArgs) -> anyhow::Result<()> {
    let started = Instant::now();
    let selection = Selection {
        all: args.all,
        pids: args.pids.clone(),
        comms: args.comms.clone(),
    };
    selection.validate()?;
    privileges::check()?;
    let requested: Vec<CollectorKind> = if args.collectors.is_empty() {
        CollectorKind::ALL.to_vec()
    } else {
        let mut v = args.collectors.clone();
        v.sort();
        v.dedup();
        v
    };

    let handle = telemetry::install()?;
    let health = Health::new(&requested);
    let listener = server::bind(args.listen).await?;
    log::info!(
        "serving /metrics and /healthz on http://{}",
        listener.local_addr()?
    );

    tracefs::ensure_mounted()?;
    let offsets = btf::kernel_offsets().context("resolving kernel structure offsets")?;
    let loader = Loader::new(selection.agent_config(), offsets)?;
    let targets =
        TargetTracker::start(&loader, &selection).context("following target processes")?;

    let shutdown = CancellationToken::new();
    let server_task = tokio::spawn(server::serve(
        listener,
        handle.clone(),
        health.clone(),
        shutdown.clone(),
    ));
    let upkeep = {
        let handle = handle.clone();
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(std::time::Duration::from_secs(5));
            loop {
                tokio::select! {
                    _ = tick.tick() => handle.run_upkeep(),
                    () = shutdown.cancelled() => break,
                }
            }
        })
    };

    let mut tasks = Vec::new();
    let mut stream_tasks = Vec::new();
    let mut memory_tasks = Vec::new();
    let mut trackers: Vec<(CollectorKind, Arc<Mutex<ConnectionTracker>>)> = Vec::new();
    let mut queries_summary = None;
    // Payload analysers share one capture object.
    let mut analysers: Vec<Box<dyn Analyser>> = Vec::new();
    let mut analyser_kinds = Vec::new();
    if requested.contains(&CollectorKind::Queries) {
        let (analyser, summary) = QueriesAnalyser::new();
        analysers.push(Box::new(analyser));
        analyser_kinds.push(CollectorKind::Queries);
        queries_summary = Some(summary);
    }
    let mut web_summary = None;
    if requested.contains(&CollectorKind::Websocket) {
        let (analyser, summary) = WebAnalyser::new();
        analysers.push(Box::new(analyser));
        analyser_kinds.push(CollectorKind::Websocket);
        web_summary = Some(summary);
    }
    if !analysers.is_empty() {
        match StreamsCollector::start(&loader, args.capture_bytes as usize, analysers) {
            Ok(collector) => {
                for kind in &analyser_kinds {
                    health.set(*kind, Status::Up);
                    // One way on every kernel so far: the syscall tracepoints.
                    metrics::gauge!(
                        "pipelens_collector_hook_info",
                        "collector" => kind.to_string(),
                        "hook" => "payload",
                        "kind" => "tracepoint",
                        "target" => "syscalls:sys_{enter,exit}_{read,write,readv,writev,recvfrom,sendto,recvmsg,sendmsg}",
                    )
                    .set(1.0);
                }
                stream_tasks.push(tokio::spawn(collector.run(shutdown.clone())));
            }
            Err(e) => {
                for kind in &analyser_kinds {
                    log::error!("collector {kind} is down: {e}");
                    health.set(*kind, Status::Down(e.to_string()));
                }
            }
        }
    }
    for kind in &requested {
        match kind {
            CollectorKind::Queries | CollectorKind::Websocket => {}
            CollectorKind::Memory => {
                let alloc_pids = if args.memory_allocs {
                    args.pids.clone()
                } else {
                    Vec::new()
                };
                match MemoryCollector::start(
                    &loader,
                    args.syscall_hooks,
                    args.memory_sample_bytes,
                    &alloc_pids,
                ) {
                    Ok(collector) => {
                        health.set(*kind, Status::Up);
                        memory_tasks.push(collector.spawn(shutdown.clone()));
                    }
                    Err(e) => {
                        log::error!("collector {kind} is down: {e}");
                        health.set(*kind, Status::Down(e.to_string()));
                    }
                }
            }
            CollectorKind::Connections => {
                match ConnectionsCollector::start(&loader, args.syscall_hooks) {
                    Ok(mut collector) => {
                        let tgids = if selection.all {
                            all_processes()
                        } else {
                            targets.current()
                        };
                        match collector.seed_existing(&tgids) {
                            Ok(n) => log::info!("connections: {n} existing connection(s) seeded"),
                            Err(e) => log::warn!("connections: seeding existing connections: {e}"),
                        }
                        trackers.push((*kind, collector.tracker()));
                        health.set(*kind, Status::Up);
                        tasks.push(tokio::spawn(collector.run(shutdown.clone())));
                    }
                    Err(e) => {
                        log::error!("collector {kind} is down: {e}");
                        health.set(*kind, Status::Down(e.to_string()));
                    }
                }
            }
        }
    }
    if !requested
        .iter()
        .any(|k| health.snapshot().get(k).is_some_and(|s| *s == Status::Up))
    {
        shutdown.cancel();
        bail!("no collector could be attached: {:?}", health.snapshot());
    }
    log::info!("attached in {:.0?}", started.elapsed());

    wait_for_stop(args.duration).await?;
    log::info!("stopping");
    shutdown.cancel();
    for task in tasks {
        match task.await {
            Ok(Ok(collector)) => drop(collector),
            Ok(Err(e)) => log::error!("collector failed: {e}"),
            Err(e) => log::error!("collector task panicked: {e}"),
        }
    }
    for task in stream_tasks {
        match task.await {
            Ok(Ok(collector)) => drop(collector),
            Ok(Err(e)) => log::error!("payload capture failed: {e}"),
            Err(e) => log::error!("payload capture task panicked: {e}"),
        }
    }
    let mut memory_summary = None;
    for task in memory_tasks {
        match tokio::task::spawn_blocking(move || task.join()).await {
            Ok(Ok(Ok(doc))) => memory_summary = Some(doc),
            Ok(Ok(Err(e))) => log::error!("memory collector failed: {e}"),
            Ok(Err(_)) => log::error!("memory collector thread panicked"),
            Err(e) => log::error!("memory collector task panicked: {e}"),
        }
    }
    drop(targets);
    drop(loader);
    let _ = upkeep.await;
    if let Ok(Err(e)) = server_task.await {
        log::warn!("http server: {e}");
    }

    if let Some(path) = &args.summary_json {
        let mut doc = summary::build(started.elapsed(), &health, &trackers);
        if let Some(q) = &queries_summary {
            doc["queries"] = queries::summary(q);
        }
        if let Some(w) = &web_summary {
            doc["websocket"] = websocket::analyser::summary(w);
        }
        if let Some(m) = memory_summary {
            doc["memory"] = m;
        }
        summary::write(path, &doc)?;
        log::info!("summary written to {}", path.display());
    }
    Ok(())
}

fn all_processes() -> Vec<u32> {
    process::parent_map().into_keys().collect()
}

async fn wait_for_stop(duration: Option<std::time::Duration>) -> anyhow::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let sleep = async {
        match duration {
            Some(d) => tokio::time::sleep(d).await,
            None => std::future::pending().await,
        }
    };
    tokio::select! {
        () = sleep => {}
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    Ok(())
}
