//! Running a helper command (the binary under test, `rabbitmqctl`, a script) in a test.

use std::process::{Command, Output};

/// Runs `cmd` to completion and returns its output; panics naming the command, with its
/// exit status, stdout and stderr, if it cannot be started or does not succeed.
#[allow(dead_code)]
pub fn run_ok(cmd: &mut Command) -> Output {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("{cmd:?} does not start: {e}"));
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
