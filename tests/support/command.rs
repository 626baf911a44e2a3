//! Running a helper command (the binary under test, `rabbitmqctl`, a script) in a test.

use std::io::Read;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

/// How long [`run_ok`] lets a command run: it bounds a hang, it does not time the command.
const RUN_LIMIT: Duration = Duration::from_secs(600);

/// Runs `cmd` to completion (stdin closed) and returns its output, as [`Command::output`]
/// does, but kills it and panics with what it printed so far if it is still running after
/// `limit`: a hung child fails its test, naming the command, instead of hanging the suite.
#[allow(dead_code)]
pub fn output_within(cmd: &mut Command, limit: Duration) -> Output {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("{cmd:?} does not start: {e}"));
    let stdout = drain(child.stdout.take());
    let stderr = drain(child.stderr.take());
    let deadline = Instant::now() + limit;
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(20));
            }
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                let out = stdout.join().unwrap_or_default();
                let err = stderr.join().unwrap_or_default();
                panic!(
                    "{cmd:?} still running after {limit:?}, killed:\n--- stdout\n{}\n--- stderr\n{}",
                    String::from_utf8_lossy(&out),
                    String::from_utf8_lossy(&err)
                );
            }
        }
    };
    Output {
        status,
        stdout: stdout.join().unwrap_or_default(),
        stderr: stderr.join().unwrap_or_default(),
    }
}

/// Reads `pipe` to its end on a thread of its own (so a chatty child never blocks on a full
/// pipe while the caller polls it).
fn drain<R: Read + Send + 'static>(pipe: Option<R>) -> std::thread::JoinHandle<Vec<u8>> {
    std::thread::spawn(move || {
        let mut bytes = Vec::new();
        if let Some(mut pipe) = pipe {
            let _ = pipe.read_to_end(&mut bytes);
        }
        bytes
    })
}

/// Runs `cmd` to completion and returns its output; panics naming the command, with its
/// exit status, stdout and stderr, if it cannot be started, does not succeed or is still
/// running after 10 minutes.
#[allow(dead_code)]
pub fn run_ok(cmd: &mut Command) -> Output {
    let out = output_within(cmd, RUN_LIMIT);
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\n--- stdout\n{}\n--- stderr\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// The stdout of `out` as text.
#[allow(dead_code)]
pub fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}
