//! A `rag-ingest worker` child process, shared by the tests (`tests/common`) and the benches
//! (`benches/support`): its stderr (the log) and stdout (the exit report) are collected line
//! by line as they come, and the process is killed when the handle is dropped, also when the
//! test or bench panics.
//!
//! Each test binary uses a part of this module; the items some of them leave unused carry
//! `#[allow(dead_code)]`.

use std::io::{BufRead, Read};
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// How to start a worker: `<binary> <global_args> worker --pipeline <pipeline> <args>`.
#[allow(dead_code)]
pub struct Launch<'a> {
    /// The `rag-ingest` binary (the tests' `CARGO_BIN_EXE_rag-ingest`, a bench's snapshot of
    /// the release build).
    pub binary: &'a Path,
    /// Global flags, before the `worker` subcommand (e.g. `--log-format text`).
    pub global_args: &'a [&'a str],
    /// The pipeline file.
    pub pipeline: &'a Path,
    /// Flags after `--pipeline <file>` (e.g. `--exit-when-idle`).
    pub args: &'a [&'a str],
    /// Environment variables on top of the defaults (`RUST_LOG` at info with lapin and
    /// qdrant_edge at warn, `NO_COLOR=1`), which they may override.
    pub env: &'a [(&'a str, &'a str)],
    /// With `Some(core)`, the process may run on that CPU core only (`taskset -c <core>`,
    /// which then executes the worker in its place, so [`WorkerProcess::id`] is the worker's
    /// pid).
    pub core: Option<usize>,
    /// Put in front of every failure message (e.g. `BENCH FAILED: `).
    pub failure: &'static str,
}

/// A typed log event of the worker (`--log-format json`): its `event` field and the fields
/// it must carry (see `src/telemetry/events.rs`).
#[allow(dead_code)]
#[derive(Debug, Clone, Copy)]
pub struct Event {
    /// The `event` field.
    pub name: &'static str,
    /// Other fields the line must have, with their values.
    pub fields: &'static [(&'static str, &'static str)],
}

impl Event {
    /// The event `name`, whatever its fields.
    #[allow(dead_code)]
    pub const fn named(name: &'static str) -> Self {
        Event { name, fields: &[] }
    }
}

/// How many lines of `output` (a worker's log, as [`WorkerProcess::wait_exit`] returns it)
/// are `event`.
#[allow(dead_code)]
pub fn count_events(output: &str, event: &Event) -> usize {
    output.lines().filter(|l| is_event(l, event)).count()
}

/// The worker consumes (model loaded, store open, topology declared).
#[allow(dead_code)]
pub const CONSUMING: Event = Event {
    name: "worker_consuming",
    fields: &[],
};
/// A document was embedded and written.
#[allow(dead_code)]
pub const STORED: Event = Event {
    name: "message_settled",
    fields: &[("outcome", "stored")],
};
/// A message was settled without a write of its own (unchanged, deleted or stale).
#[allow(dead_code)]
pub const SETTLED: Event = Event {
    name: "message_settled",
    fields: &[],
};
/// A message was older than the stored version and skipped.
#[allow(dead_code)]
pub const STALE: Event = Event {
    name: "message_settled",
    fields: &[("outcome", "stale")],
};
/// A message was dead-lettered.
#[allow(dead_code)]
pub const DEAD_LETTERED: Event = Event {
    name: "message_dead_lettered",
    fields: &[],
};
/// The model is loaded.
#[allow(dead_code)]
pub const MODEL_LOADED: Event = Event {
    name: "model_loaded",
    fields: &[],
};

/// Whether log `line` is the JSON event `event`; a field that is not a string matches the
/// text of its JSON value (`3`, `true`).
fn is_event(line: &str, event: &Event) -> bool {
    // The event's name appears verbatim in any line that holds it (names need no escaping):
    // skip parsing the others.
    if !line.contains(event.name) {
        return false;
    }
    let Ok(line) = serde_json::from_str::<serde_json::Value>(line) else {
        return false;
    };
    let matches = |field: Option<&serde_json::Value>, want: &str| match field {
        Some(serde_json::Value::String(s)) => s == want,
        Some(other) => serde_json::to_string(other).is_ok_and(|text| text == want),
        None => false,
    };
    let f = line.get("fields");
    let f = |name: &str| f.and_then(|f| f.get(name));
    matches(f("event"), event.name) && event.fields.iter().all(|&(k, v)| matches(f(k), v))
}

/// Lines of one output stream, with a condition variable signalled on every new line.
#[derive(Default)]
struct Lines {
    lines: Mutex<Vec<String>>,
    grew: Condvar,
}

impl Lines {
    fn lock(&self) -> MutexGuard<'_, Vec<String>> {
        self.lines.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Collects the lines of `stream` on a thread of its own until it ends.
    #[allow(dead_code)]
    fn collect(self: &Arc<Self>, stream: impl Read + Send + 'static) -> JoinHandle<()> {
        let sink = Arc::clone(self);
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stream).lines() {
                let Ok(line) = line else { break };
                sink.lock().push(line);
                sink.grew.notify_all();
            }
            // Wake waiters once more at end of stream (the process is exiting).
            sink.grew.notify_all();
        })
    }
}

/// A running `rag-ingest worker` process whose stderr and stdout lines are collected as
/// they come.
pub struct WorkerProcess {
    child: Child,
    stderr: Arc<Lines>,
    stdout: Arc<Lines>,
    readers: Vec<JoinHandle<()>>,
    failure: &'static str,
}

impl WorkerProcess {
    /// Starts the worker `launch` describes; panics if the binary cannot be started. (The
    /// tests and the benches each add a `start` of their own on top.)
    #[allow(dead_code)]
    pub fn launch(launch: Launch<'_>) -> Self {
        let mut command = match launch.core {
            Some(core) => {
                let mut c = Command::new("taskset");
                c.args(["-c", &core.to_string()]).arg(launch.binary);
                c
            }
            None => Command::new(launch.binary),
        };
        command
            .args(launch.global_args)
            .args(["worker", "--pipeline"])
            .arg(launch.pipeline)
            .args(launch.args)
            .env("RUST_LOG", "info,lapin=warn,qdrant_edge=warn")
            .env("NO_COLOR", "1")
            .envs(launch.env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = command.spawn().unwrap_or_else(|e| {
            panic!(
                "{}the worker binary {} does not start: {e}",
                launch.failure,
                launch.binary.display()
            )
        });
        let stderr = Arc::new(Lines::default());
        let stdout = Arc::new(Lines::default());
        let readers = vec![
            stderr.collect(child.stderr.take().expect("stderr is piped")),
            stdout.collect(child.stdout.take().expect("stdout is piped")),
        ];
        WorkerProcess {
            child,
            stderr,
            stdout,
            readers,
            failure: launch.failure,
        }
    }

    /// The process id.
    #[allow(dead_code)]
    pub fn id(&self) -> u32 {
        self.child.id()
    }

    /// The exit status if the process has exited.
    #[allow(dead_code)]
    pub fn exited(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// Log (stderr) lines so far that are `event` (the worker logs JSON, `--log-format json`).
    #[allow(dead_code)]
    pub fn count(&self, event: &Event) -> usize {
        self.stderr
            .lock()
            .iter()
            .filter(|l| is_event(l, event))
            .count()
    }

    /// The whole log (stderr) so far.
    #[allow(dead_code)]
    pub fn log(&self) -> String {
        self.stderr.lock().join("\n")
    }

    /// The worker's exit report (`--report json`): its last stdout line as JSON, or `None`
    /// if it printed none (yet) or the line is not JSON.
    #[allow(dead_code)]
    pub fn report(&self) -> Option<serde_json::Value> {
        let lines = self.stdout.lock();
        let last = lines.iter().rev().find(|l| !l.trim().is_empty())?;
        serde_json::from_str(last).ok()
    }

    /// Sends `signal` (`KILL`, `TERM`, `INT`) with kill(1); panics if that fails.
    #[allow(dead_code)]
    pub fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .args(["-s", signal, &self.child.id().to_string()])
            .status()
            .expect("kill runs");
        assert!(status.success(), "kill -s {signal} {}", self.child.id());
    }

    /// Waits (polling every `every`) until `check` holds; panics naming `what`, with the
    /// log, if the worker exits first or `timeout` passes.
    #[allow(dead_code)]
    pub async fn wait_until(
        &mut self,
        what: &str,
        timeout: Duration,
        every: Duration,
        mut check: impl FnMut(&Self) -> bool,
    ) {
        let deadline = Instant::now() + timeout;
        while !check(self) {
            if let Some(status) = self.exited() {
                panic!(
                    "{}the worker exited ({status}) while waiting for {what}:\n{}",
                    self.failure,
                    self.log()
                );
            }
            assert!(
                Instant::now() < deadline,
                "{}timed out after {timeout:?} waiting for {what}:\n{}",
                self.failure,
                self.log()
            );
            tokio::time::sleep(every).await;
        }
    }

    /// Waits until at least `n` documents were stored ([`STORED`] events); panics
    /// if the worker exits first or a minute passes.
    #[allow(dead_code)]
    pub async fn wait_stored(&mut self, n: usize) {
        let what = format!("{n} stored documents");
        self.wait_until(
            &what,
            Duration::from_secs(60),
            Duration::from_millis(20),
            |w| w.count(&STORED) >= n,
        )
        .await;
    }

    /// Blocks until `n` log lines are `event`, woken by every new line. Panics with the
    /// log if the worker exits first or `timeout` passes.
    #[allow(dead_code)]
    pub fn wait_for(&mut self, event: &Event, n: usize, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        let mut lines = self.stderr.lock();
        // Lines only ever get appended: each is looked at once, so waiting for the n-th of
        // a frequent event costs O(lines), not O(lines²) (the benches wait for hundreds of
        // `document stored` lines while the worker they measure runs on the same cores).
        let (mut seen, mut found) = (0, 0);
        loop {
            found += lines[seen..].iter().filter(|l| is_event(l, event)).count();
            seen = lines.len();
            if found >= n {
                return;
            }
            let now = Instant::now();
            if now >= deadline {
                drop(lines);
                panic!(
                    "{}fewer than {n} {event:?} events within {timeout:?}; worker \
                     log:\n{}",
                    self.failure,
                    self.log()
                );
            }
            // Wake at least every 200 ms to notice a worker that died without output.
            let wait = (deadline - now).min(Duration::from_millis(200));
            lines = self
                .stderr
                .grew
                .wait_timeout(lines, wait)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
            if let Some(status) = self.child.try_wait().ok().flatten() {
                drop(lines);
                if self.count(event) >= n {
                    return;
                }
                panic!(
                    "{}the worker exited ({status}) before {n} {event:?} events; \
                     worker log:\n{}",
                    self.failure,
                    self.log()
                );
            }
        }
    }

    /// The exit status if the process has exited; kills it and panics with the log once
    /// `deadline` (the end of `timeout`) has passed.
    fn exit_by(&mut self, deadline: Instant, timeout: Duration) -> Option<ExitStatus> {
        if let Some(status) = self.exited() {
            return Some(status);
        }
        if Instant::now() >= deadline {
            let _ = self.child.kill();
            let _ = self.child.wait();
            panic!(
                "{}the worker did not exit within {timeout:?}:\n{}",
                self.failure,
                self.log()
            );
        }
        None
    }

    /// Reads the rest of the output; returns `status` with the whole output: the log
    /// (stderr), then what the worker printed on stdout (its `--report json` exit report).
    fn finish(mut self, status: ExitStatus) -> (ExitStatus, String) {
        for reader in self.readers.drain(..) {
            let _ = reader.join();
        }
        let mut output = self.log();
        for line in self.stdout.lock().iter() {
            output.push('\n');
            output.push_str(line);
        }
        (status, output)
    }

    /// Waits (polling every 20 ms) for the process to exit; returns its status and whole
    /// log. Kills it and panics if it is still running after `timeout`.
    #[allow(dead_code)]
    pub async fn wait_exit(mut self, timeout: Duration) -> (ExitStatus, String) {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.exit_by(deadline, timeout) {
                return self.finish(status);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Like [`wait_exit`](Self::wait_exit), blocking the thread (for code outside a
    /// runtime).
    #[allow(dead_code)]
    pub fn wait_exit_blocking(mut self, timeout: Duration) -> (ExitStatus, String) {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.exit_by(deadline, timeout) {
                return self.finish(status);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for WorkerProcess {
    fn drop(&mut self) {
        // A failed test or bench must not leave a worker behind.
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Count `name` of the worker's exit report (`--report json`: one JSON object such as
/// `{"stored":3,…}` on stdout, the last line of what [`WorkerProcess::wait_exit`] returns);
/// panics (with the output) if there is no report or it lacks `name`.
#[allow(dead_code)]
pub fn final_count(output: &str, name: &str) -> u64 {
    output
        .lines()
        .rev()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|v| v.get("fields").is_none() && v.get(name).is_some())
        .and_then(|report| report.get(name)?.as_u64())
        .unwrap_or_else(|| panic!("no exit report with {name:?} in the worker output:\n{output}"))
}
