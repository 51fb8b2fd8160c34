//! Child processes a test owns: however the test ends (assertion, panic,
//! early return), each one is signalled, given a moment, killed if it
//! lingers, and reaped, so that no agent keeps probes attached and no
//! server keeps a port after its test.

use std::{
    process::{Child, Command, ExitStatus},
    time::{Duration, Instant},
};

/// How long a child may take to exit after its stop signal on drop.
const GRACE: Duration = Duration::from_secs(10);

pub struct Owned {
    child: Option<Child>,
    name: String,
    /// Sent on drop: SIGINT for the agent (it writes its summary and
    /// detaches), SIGTERM for servers, SIGKILL for helpers.
    on_drop: i32,
}

impl Owned {
    /// Starts `cmd`, owned at once; panics naming `name` if it cannot start.
    pub fn spawn(name: &str, cmd: &mut Command, on_drop: i32) -> Owned {
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name}: {e}"));
        Owned {
            child: Some(child),
            name: name.to_owned(),
            on_drop,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child().id()
    }

    pub fn child(&self) -> &Child {
        self.child.as_ref().expect("not stopped yet")
    }

    pub fn child_mut(&mut self) -> &mut Child {
        self.child.as_mut().expect("not stopped yet")
    }

    /// Its exit status, if it has exited.
    pub fn exited(&mut self) -> Option<ExitStatus> {
        self.child_mut().try_wait().expect("wait")
    }

    /// Polls `ready` until it holds; panics if the child exits first or
    /// `timeout` passes.
    pub fn wait_until(&mut self, what: &str, timeout: Duration, mut ready: impl FnMut() -> bool) {
        let start = Instant::now();
        loop {
            if ready() {
                return;
            }
            if let Some(status) = self.exited() {
                panic!("{} exited before {what}: {status}", self.name);
            }
            assert!(
                start.elapsed() < timeout,
                "{}: not {what} after {timeout:?}",
                self.name
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Sends `signal` and waits up to `timeout` for the child to exit on
    /// its own; its status.
    pub fn stop(mut self, signal: i32, timeout: Duration) -> ExitStatus {
        let mut child = self.child.take().expect("not stopped yet");
        send(&child, signal);
        let start = Instant::now();
        loop {
            if let Some(status) = child.try_wait().expect("wait") {
                return status;
            }
            if start.elapsed() > timeout {
                let _ = child.kill();
                let _ = child.wait();
                panic!("{} ignored signal {signal} for {timeout:?}", self.name);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits for the child to exit by itself; its status.
    pub fn wait(mut self) -> ExitStatus {
        let mut child = self.child.take().expect("not stopped yet");
        child.wait().expect("wait")
    }
}

fn send(child: &Child, signal: i32) {
    let pid = i32::try_from(child.id()).expect("pid");
    // SAFETY: kill(2) on a child we spawned and have not reaped, so the
    // pid cannot have been reused.
    unsafe { libc::kill(pid, signal) };
}

impl Drop for Owned {
    fn drop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        send(&child, self.on_drop);
        let start = Instant::now();
        while start.elapsed() < GRACE {
            if !matches!(child.try_wait(), Ok(None)) {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        eprintln!(
            "{} still running {GRACE:?} after signal {}: killed",
            self.name, self.on_drop
        );
        let _ = child.kill();
        let _ = child.wait();
    }
}
