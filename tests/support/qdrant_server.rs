//! A Qdrant server process of a test's own, for what the shared test server (started by
//! `scripts/ensure-qdrant.sh`, reached through `QDRANT_URL`) cannot show: an API key, TLS, a
//! restart in the middle of a run, a cluster.
//!
//! The binary is the first of `QDRANT_BIN`, `qdrant` on `PATH` and `../shared/bin/qdrant` next
//! to the repository. Where there is none, [`QdrantServer::start`] prints a loud `SKIPPED` line
//! and returns `None`, so the test passes on a machine without a server (and says so).
//!
//! Every server listens on 127.0.0.1 only, on ports picked free at start, with its storage in
//! its own temporary directory; it is killed when dropped.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The Qdrant server version the tests run against (`../shared/bin/qdrant`), and that
/// `docker-compose.yml` and `pipelines/compose.toml` name (`tests/compose.rs` checks them).
#[allow(dead_code)]
pub const TESTED_VERSION: &str = "1.19.0";

/// The Qdrant server binary, if this machine has one.
pub fn qdrant_bin() -> Option<PathBuf> {
    if let Some(bin) = std::env::var_os("QDRANT_BIN").filter(|b| !b.is_empty()) {
        let bin = PathBuf::from(bin);
        if bin.is_file() {
            return Some(bin);
        }
    }
    if let Some(path) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&path) {
            let bin = dir.join("qdrant");
            if bin.is_file() {
                return Some(bin);
            }
        }
    }
    let shared = Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/bin/qdrant");
    shared.is_file().then_some(shared)
}

/// The Qdrant server binary, or `None` after a loud `SKIPPED` line naming `test`.
pub fn qdrant_bin_or_skip(test: &str) -> Option<PathBuf> {
    let bin = qdrant_bin();
    if bin.is_none() {
        eprintln!(
            "SKIPPED: no Qdrant server binary — {test} did not run (set QDRANT_BIN, put `qdrant` \
             on PATH, or place it at ../shared/bin/qdrant)"
        );
    }
    bin
}

/// A free TCP port on 127.0.0.1 (free when this returns; the server binds it right after).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}

/// How to start one server.
#[derive(Debug, Clone, Default)]
pub struct ServerOptions {
    /// Extra `QDRANT__…` environment settings.
    pub env: Vec<(String, String)>,
    /// Extra command-line arguments (`--uri`, `--bootstrap` for a cluster).
    pub args: Vec<String>,
    /// The server speaks TLS (readiness is then checked over https, certificate not verified).
    pub tls: bool,
    /// Cluster mode: a p2p port is picked and `QDRANT__CLUSTER__ENABLED=true` set.
    pub cluster: bool,
}

impl ServerOptions {
    /// Adds the environment setting `key=value`.
    #[allow(dead_code)]
    pub fn env(mut self, key: &str, value: impl Into<String>) -> Self {
        self.env.push((key.to_owned(), value.into()));
        self
    }
}

/// A running Qdrant server of one test.
pub struct QdrantServer {
    bin: PathBuf,
    dir: tempfile::TempDir,
    child: Option<Child>,
    /// REST port.
    pub http_port: u16,
    /// gRPC port (what `rag-ingest` talks to).
    pub grpc_port: u16,
    /// Peer-to-peer port (cluster mode only).
    pub p2p_port: u16,
    options: ServerOptions,
}

impl QdrantServer {
    /// Starts a server with `options` and waits (up to 60 s) until it is ready; `None` after a
    /// loud SKIPPED line when this machine has no server binary. Panics if it does not start.
    #[allow(dead_code)]
    pub async fn start(test: &str, options: ServerOptions) -> Option<Self> {
        let bin = qdrant_bin_or_skip(test)?;
        let server = QdrantServer {
            bin,
            dir: tempfile::tempdir().expect("temp dir"),
            child: None,
            http_port: free_port(),
            grpc_port: free_port(),
            p2p_port: if options.cluster { free_port() } else { 0 },
            options,
        };
        Some(server.launch().await)
    }

    /// Starts one peer of a cluster (cluster mode, `--uri` its own p2p URL) and waits until it
    /// is ready: the first peer of a new cluster with `bootstrap = None`, a joining peer with
    /// the p2p URL of a running one ([`p2p_url`](Self::p2p_url)). `None` after a loud SKIPPED
    /// line when this machine has no server binary.
    #[allow(dead_code)]
    pub async fn start_peer(test: &str, bootstrap: Option<String>) -> Option<Self> {
        let bin = qdrant_bin_or_skip(test)?;
        let p2p_port = free_port();
        let mut args = vec!["--uri".to_owned(), format!("http://127.0.0.1:{p2p_port}")];
        if let Some(url) = bootstrap {
            args.push("--bootstrap".to_owned());
            args.push(url);
        }
        let server = QdrantServer {
            bin,
            dir: tempfile::tempdir().expect("temp dir"),
            child: None,
            http_port: free_port(),
            grpc_port: free_port(),
            p2p_port,
            options: ServerOptions {
                args,
                cluster: true,
                ..ServerOptions::default()
            },
        };
        Some(server.launch().await)
    }

    /// How many peers this peer's view of the cluster holds (`GET /cluster`); 0 if it does
    /// not answer.
    #[allow(dead_code)]
    pub fn cluster_peers(&self) -> usize {
        self.http_get("/cluster")
            .and_then(|body| serde_json::from_str::<serde_json::Value>(&body).ok())
            .and_then(|v| v["result"]["peers"].as_object().map(|p| p.len()))
            .unwrap_or(0)
    }

    /// Spawns the process and waits until it is ready.
    async fn launch(mut self) -> Self {
        self.spawn();
        self.wait_ready(Duration::from_secs(60)).await;
        self
    }

    fn spawn(&mut self) {
        let storage = self.dir.path().join("storage");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .expect("server log file");
        let mut cmd = Command::new(&self.bin);
        cmd.env("QDRANT__SERVICE__HOST", "127.0.0.1")
            .env("QDRANT__SERVICE__HTTP_PORT", self.http_port.to_string())
            .env("QDRANT__SERVICE__GRPC_PORT", self.grpc_port.to_string())
            .env("QDRANT__STORAGE__STORAGE_PATH", &storage)
            .env(
                "QDRANT__STORAGE__SNAPSHOTS_PATH",
                self.dir.path().join("snapshots"),
            )
            .env("QDRANT__TELEMETRY_DISABLED", "true")
            .env("QDRANT__LOG_LEVEL", "WARN")
            .current_dir(self.dir.path())
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log handle"))
            .stderr(log);
        if self.options.cluster {
            cmd.env("QDRANT__CLUSTER__ENABLED", "true")
                .env("QDRANT__CLUSTER__P2P__PORT", self.p2p_port.to_string());
        }
        for (key, value) in &self.options.env {
            cmd.env(key, value);
        }
        cmd.args(&self.options.args);
        self.child = Some(cmd.spawn().expect("the Qdrant server starts"));
    }

    /// The server's log file.
    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("qdrant.log")
    }

    /// The last lines of the server log (for failure messages).
    pub fn log_tail(&self) -> String {
        let log = std::fs::read_to_string(self.log_path()).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }

    fn scheme(&self) -> &'static str {
        if self.options.tls { "https" } else { "http" }
    }

    /// The gRPC URL clients use.
    pub fn grpc_url(&self) -> String {
        format!("{}://127.0.0.1:{}", self.scheme(), self.grpc_port)
    }

    /// The REST URL.
    pub fn http_url(&self) -> String {
        format!("{}://127.0.0.1:{}", self.scheme(), self.http_port)
    }

    /// The p2p URL of this peer (cluster mode).
    #[allow(dead_code)]
    pub fn p2p_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.p2p_port)
    }

    /// `GET path` on the REST port through curl; the body when it answered 2xx.
    pub fn http_get(&self, path: &str) -> Option<String> {
        let mut cmd = Command::new("curl");
        cmd.args(["-sf", "-k", "--max-time", "3"]);
        if let Some((_, key)) = self
            .options
            .env
            .iter()
            .find(|(k, _)| k == "QDRANT__SERVICE__API_KEY")
        {
            cmd.args(["-H", &format!("api-key: {key}")]);
        }
        let out = cmd
            .arg(format!("{}{path}", self.http_url()))
            .output()
            .ok()?;
        out.status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Polls `/readyz` until it answers; panics with the log's tail after `timeout` or if the
    /// process exits.
    pub async fn wait_ready(&mut self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            if self.http_get("/readyz").is_some() {
                return;
            }
            if let Some(child) = self.child.as_mut()
                && let Ok(Some(status)) = child.try_wait()
            {
                panic!(
                    "the Qdrant server exited during start-up ({status}); log:\n{}",
                    self.log_tail()
                );
            }
            assert!(
                Instant::now() < deadline,
                "the Qdrant server was not ready within {timeout:?}; log:\n{}",
                self.log_tail()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Kills the process at once (SIGKILL), as a crash would; storage is kept.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Stops the process gracefully (SIGTERM, then SIGKILL after 20 s); storage is kept.
    #[allow(dead_code)]
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = Command::new("kill")
                .args(["-TERM", &child.id().to_string()])
                .status();
            let deadline = Instant::now() + Duration::from_secs(20);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = child.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the process again on the same ports and storage (after [`kill`](Self::kill) or
    /// [`stop`](Self::stop)) and waits until it is ready.
    #[allow(dead_code)]
    pub async fn restart(&mut self) {
        assert!(self.child.is_none(), "restart a stopped server only");
        self.spawn();
        self.wait_ready(Duration::from_secs(60)).await;
    }

    /// Whether the process is running.
    #[allow(dead_code)]
    pub fn is_running(&mut self) -> bool {
        match self.child.as_mut() {
            Some(child) => matches!(child.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// Its storage directory.
    #[allow(dead_code)]
    pub fn storage_dir(&self) -> PathBuf {
        self.dir.path().join("storage")
    }
}

impl Drop for QdrantServer {
    fn drop(&mut self) {
        self.kill();
    }
}
