//! A test's own RabbitMQ node on loopback, through `scripts/rabbitmq-node.sh` (never the
//! machine's rabbit@localhost on 5672), stopped when the guard is dropped, also when the test
//! panics.

use std::path::{Path, PathBuf};
use std::process::Command;

// The includers (tests/broker_tls.rs, tests/cluster_rabbitmq.rs) have `mod common`.
use crate::common::{run_ok, stdout};

/// The node script.
#[allow(dead_code)]
pub fn node_script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/rabbitmq-node.sh")
}

/// A loopback port that was free a moment ago.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}

/// Runs `scripts/rabbitmq-node.sh ARGS`; returns its stdout, or panics with its output
/// unless it succeeds.
#[allow(dead_code)]
pub fn run_node_script(args: &[&str]) -> String {
    stdout(&run_ok(Command::new(node_script()).args(args)))
}

/// Writes a self-signed CA and a server certificate for 127.0.0.1/localhost into `dir`
/// (`ca.pem`, `server.pem`, `server.key`).
#[allow(dead_code)]
pub fn make_certificates(dir: &Path) {
    run_node_script(&["certs", &dir.display().to_string()]);
}

/// A running node; stopped on drop.
#[allow(dead_code)]
pub struct RabbitNode {
    /// Short node name (the node is `<name>@localhost`).
    pub name: String,
    /// The node's state directory.
    pub dir: PathBuf,
    /// Plain AMQP port on 127.0.0.1.
    #[allow(dead_code)]
    pub amqp_port: u16,
    /// TLS (amqps) port on 127.0.0.1, if started with certificates.
    pub tls_port: Option<u16>,
    running: bool,
}

impl RabbitNode {
    /// Starts node `<name>@localhost` with its state under `dir`, on free loopback ports; with
    /// `certs` (a directory from [`make_certificates`]) also an amqps listener. Panics if the
    /// node does not come up (the script waits at most 90 s).
    #[allow(dead_code)]
    pub fn start(name: &str, dir: &Path, certs: Option<&Path>) -> Self {
        let amqp_port = free_port();
        let dist_port = free_port();
        let tls_port = certs.map(|_| free_port());
        let mut args = vec![
            "start".to_string(),
            name.to_string(),
            dir.display().to_string(),
            amqp_port.to_string(),
            dist_port.to_string(),
        ];
        if let (Some(port), Some(certs)) = (tls_port, certs) {
            args.push(port.to_string());
            args.push(certs.display().to_string());
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        // The guard exists before the start, so a node that half-started is stopped too.
        let node = RabbitNode {
            name: name.to_string(),
            dir: dir.to_path_buf(),
            amqp_port,
            tls_port,
            running: true,
        };
        run_node_script(&args);
        node
    }

    /// `rabbitmqctl -n <node> ARGS` with the node's cookie; panics unless it succeeds.
    #[allow(dead_code)]
    pub fn ctl(&self, args: &[&str]) -> String {
        let dir = self.dir.display().to_string();
        let mut all = vec!["ctl", self.name.as_str(), dir.as_str()];
        all.extend_from_slice(args);
        run_node_script(&all)
    }

    /// Stops the node (SIGTERM, then SIGKILL).
    #[allow(dead_code)]
    pub fn stop(&mut self) {
        if self.running {
            self.running = false;
            let _ = Command::new(node_script())
                .args(["stop", &self.name, &self.dir.display().to_string()])
                .output();
        }
    }
}

impl Drop for RabbitNode {
    fn drop(&mut self) {
        self.stop();
    }
}
