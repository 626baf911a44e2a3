//! Failover on a 3-node RabbitMQ cluster (issue 14, item 4): `scripts/rabbitmq-cluster.sh`
//! starts three nodes of the test's own on loopback; the pipeline's quorum queues get a replica
//! on each. A worker process (the real binary) is given all three URLs in `broker.url`. In the
//! middle of the run the node leading the main queue's quorum, which the worker is connected
//! to, is killed (SIGKILL). The worker reconnects to a surviving node, a second batch is
//! submitted through the surviving nodes, and at the end every confirmed document is in the
//! store exactly once (one point per chunk, nothing missing, nothing extra).
//!
//! Slow (three nodes to boot, ~1 minute): `cargo test --test cluster_rabbitmq -- --ignored`.
//! Prints `rabbitmq-cluster: confirmed=N stored=N lost=0 duplicated=0 reconnects=K`.

mod common;

#[path = "support/rabbitmq_node.rs"]
mod rabbitmq_node;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::{TestPipeline, WorkerProcess, embedder, final_count, within, write_pipeline_file};
use rabbitmq_node::free_port;
use rag_ingest::embed::Embedder;
use rag_ingest::message::Document;
use rag_ingest::queue::{Submitter, Topology};
use rag_ingest::setup;
use rag_ingest::store::VectorStore;

/// Documents submitted before the leader is killed, and after.
const BEFORE: usize = 240;
const AFTER: usize = 60;

fn cluster_script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/rabbitmq-cluster.sh")
}

/// The three-node cluster; stopped on drop (also when the test panics).
struct Cluster {
    dir: PathBuf,
    prefix: String,
    urls: Vec<String>,
    ports: Vec<u16>,
    alive: [bool; 3],
}

impl Cluster {
    fn start(dir: &Path) -> Self {
        let prefix = format!("rag-cl-{}", &uuid::Uuid::new_v4().simple().to_string()[..6]);
        let port_numbers: Vec<u16> = (0..3).map(|_| free_port()).collect();
        let ports: Vec<String> = port_numbers.iter().map(u16::to_string).collect();
        let dist: Vec<String> = (0..3).map(|_| free_port().to_string()).collect();
        let cluster = Cluster {
            dir: dir.to_path_buf(),
            prefix: prefix.clone(),
            urls: ports
                .iter()
                .map(|p| format!("amqp://guest:guest@127.0.0.1:{p}/%2f"))
                .collect(),
            ports: port_numbers,
            alive: [true; 3],
        };
        common::run_ok(
            Command::new(cluster_script())
                .args(["start", &dir.display().to_string(), &prefix])
                .env("RABBITMQ_CLUSTER_PORTS", ports.join(" "))
                .env("RABBITMQ_CLUSTER_DIST_PORTS", dist.join(" ")),
        );
        cluster
    }

    /// The node name of node `i` (0-based).
    fn node(&self, i: usize) -> String {
        format!("{}-{}@localhost", self.prefix, i + 1)
    }

    /// `rabbitmqctl` against node `i` (0-based); `None` if it fails (e.g. the node is down).
    fn ctl(&self, i: usize, args: &[&str]) -> Option<String> {
        let n = (i + 1).to_string();
        let dir = self.dir.display().to_string();
        let mut all = vec!["ctl", dir.as_str(), n.as_str()];
        all.extend_from_slice(args);
        let out = Command::new(cluster_script()).args(&all).output().ok()?;
        out.status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// `rabbitmqctl` against the first live node; panics if none answers.
    fn ctl_any(&self, args: &[&str]) -> String {
        (0..3)
            .filter(|&i| self.alive[i])
            .find_map(|i| self.ctl(i, args))
            .unwrap_or_else(|| panic!("no live node answers rabbitmqctl {args:?}"))
    }

    /// SIGKILLs node `i` (0-based).
    fn kill(&mut self, i: usize) {
        let out = Command::new(cluster_script())
            .args([
                "kill",
                &self.dir.display().to_string(),
                &(i + 1).to_string(),
            ])
            .output()
            .expect("kill runs");
        assert!(out.status.success(), "node {} killed", i + 1);
        self.alive[i] = false;
    }

    /// The leader and the members of `queue`'s quorum, as a live node reports them.
    fn quorum(&self, queue: &str) -> (String, Vec<String>) {
        let out = self.ctl_any(&["-q", "list_queues", "name", "leader", "members"]);
        let line = out
            .lines()
            .find(|l| l.split('\t').next() == Some(queue))
            .unwrap_or_else(|| panic!("{queue} is not listed: {out}"));
        let mut cols = line.split('\t');
        let _ = cols.next();
        let leader = cols.next().unwrap_or_default().to_string();
        let members = cols
            .next()
            .unwrap_or_default()
            .trim_matches(|c| c == '[' || c == ']')
            .split(',')
            .map(|m| m.trim().trim_matches('\'').to_string())
            .filter(|m| !m.is_empty())
            .collect();
        (leader, members)
    }

    /// The live nodes (0-based) on which a connection of `pipeline`'s worker is open (known by
    /// the server port it connected to; `list_connections` lists the whole cluster's).
    fn worker_nodes(&self, pipeline: &str) -> Vec<usize> {
        let wanted = format!("\"rag-ingest worker {pipeline}\"");
        let out = self.ctl_any(&["-q", "list_connections", "port", "client_properties"]);
        let mut nodes: Vec<usize> = out
            .lines()
            .filter(|l| l.contains(&wanted))
            .filter_map(|l| l.split('\t').next()?.trim().parse::<u16>().ok())
            .filter_map(|port| self.ports.iter().position(|&p| p == port))
            .filter(|&i| self.alive[i])
            .collect();
        nodes.sort_unstable();
        nodes.dedup();
        nodes
    }

    /// Messages (ready and unacknowledged) in `queue`.
    fn messages(&self, queue: &str) -> u64 {
        let out = self.ctl_any(&["-q", "list_queues", "name", "messages"]);
        out.lines()
            .find_map(|l| {
                let mut cols = l.split('\t');
                (cols.next() == Some(queue)).then(|| cols.next())?
            })
            .and_then(|n| n.trim().parse().ok())
            .unwrap_or_else(|| panic!("{queue} is not listed: {out}"))
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let _ = Command::new(cluster_script())
            .args(["stop", &self.dir.display().to_string()])
            .output();
    }
}

/// Submits `docs` with confirms through a new submitter (all URLs); returns how many the
/// broker confirmed.
async fn submit(config: &rag_ingest::config::PipelineConfig, docs: &[Document]) -> usize {
    let submitter = within("connect to the cluster", Submitter::connect(config))
        .await
        .expect("a live node accepts the submitter");
    let results = within("submit", submitter.submit_all(docs, |_, _| {})).await;
    within("close", submitter.close()).await;
    results.iter().filter(|r| r.is_ok()).count()
}

/// Polls `check` every 200 ms for up to `secs`; panics naming `what` (with the worker log).
async fn wait_for(
    worker: &mut WorkerProcess,
    secs: u64,
    what: &str,
    check: impl FnMut(&WorkerProcess) -> bool,
) {
    let (timeout, every) = (Duration::from_secs(secs), Duration::from_millis(200));
    worker.wait_until(what, timeout, every, check).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "starts a 3-node RabbitMQ cluster (~1 minute): run with --ignored"]
async fn killing_the_quorum_leader_loses_and_duplicates_nothing() {
    let state = tempfile::tempdir().expect("temp dir");
    let mut cluster = Cluster::start(&state.path().join("cluster"));

    let mut t = TestPipeline::new(
        "cluster",
        "[worker]\nconcurrency = 4\nshutdown_grace_secs = 10\nreconnect_give_up_secs = 120\n",
    );
    t.config.broker.url = cluster.urls.join(",");
    let file = write_pipeline_file(&t);
    let config = rag_ingest::config::PipelineConfig::load(&file).expect("the cluster config loads");
    assert_eq!(config.broker.urls().len(), 3);
    let main_queue = Topology::new(&config).main_queue();

    let docs = common::short_docs("acme", "cl", BEFORE + AFTER);
    let (before, after) = docs.split_at(BEFORE);
    let mut confirmed = submit(&config, before).await;
    assert_eq!(
        confirmed, BEFORE,
        "every document of the first batch confirmed"
    );

    // The pipeline's quorum queues are replicated on all three nodes.
    let topology = Topology::new(&config);
    let mut queues = vec![topology.main_queue(), topology.dlq()];
    queues.extend(topology.retry_queues());
    for queue in &queues {
        let (_, members) = cluster.quorum(queue);
        let mut want: Vec<String> = (0..3).map(|i| cluster.node(i)).collect();
        let mut got = members.clone();
        want.sort();
        got.sort();
        assert_eq!(got, want, "{queue} has a replica on every node");
    }

    let mut worker = WorkerProcess::start(&file, false);
    let settled = |w: &WorkerProcess| w.count(&common::SETTLED);
    wait_for(&mut worker, 120, "the first documents stored", |w| {
        settled(w) >= 40
    })
    .await;

    // Kill the node that leads the main queue. The worker connects to the first URL and the
    // queue was declared there (client-local leader placement), so it is the worker's node.
    let (leader, _) = cluster.quorum(&main_queue);
    let leader_index = (0..3)
        .find(|&i| cluster.node(i) == leader)
        .unwrap_or_else(|| panic!("leader {leader} is not a cluster node"));
    let worker_nodes = cluster.worker_nodes(&config.name);
    assert_eq!(
        worker_nodes,
        [leader_index],
        "the worker is connected to the leader {leader}"
    );
    let settled_at_kill = settled(&worker);
    assert!(
        settled_at_kill < BEFORE,
        "the kill must come in the middle of the run ({settled_at_kill} of {BEFORE} done)"
    );
    cluster.kill(leader_index);
    eprintln!(
        "killed {leader} (the main queue's leader and the worker's node) with {settled_at_kill} of {BEFORE} documents settled"
    );

    // The worker reconnects to a surviving node; the queue gets a new leader there.
    wait_for(
        &mut worker,
        90,
        "the worker's connection on a surviving node",
        |_| !cluster.worker_nodes(&config.name).is_empty(),
    )
    .await;
    let (new_leader, _) = cluster.quorum(&main_queue);
    assert_ne!(new_leader, leader, "a new leader was elected");

    // Producers fail over too: the first URL is dead, a surviving node takes the batch.
    confirmed += submit(&config, after).await;
    assert_eq!(
        confirmed,
        BEFORE + AFTER,
        "every document of the second batch confirmed"
    );

    wait_for(
        &mut worker,
        240,
        "every document settled and the queue empty",
        |w| settled(w) >= confirmed && cluster.messages(&main_queue) == 0,
    )
    .await;
    worker.signal("TERM");
    let (status, log) = worker.wait_exit(Duration::from_secs(30)).await;
    assert_eq!(
        status.code(),
        Some(0),
        "the worker exits 0 on SIGTERM:\n{log}"
    );
    let reconnects = final_count(&log, "reconnects");
    assert!(reconnects >= 1, "the worker reconnected:\n{log}");
    let dead = final_count(&log, "dead_lettered");
    assert_eq!(dead, 0, "nothing dead-lettered:\n{log}");

    // Every confirmed document is stored exactly once: one point per chunk.
    let store = {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            match setup::open_store(&config, embedder().fingerprint()) {
                Ok(store) => break store,
                Err(e) => {
                    assert!(Instant::now() < deadline, "the store stays locked: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    };
    let (mut stored, mut lost, mut duplicated) = (0usize, 0usize, 0usize);
    let mut expected_points = 0usize;
    for doc in &docs {
        let want = common::expected_chunks(&config, doc);
        expected_points += want;
        let got = store
            .count(&doc.tenant, Some(&doc.document_id))
            .await
            .expect("count");
        match got {
            0 => lost += 1,
            n if n == want => stored += 1,
            n if n > want => duplicated += 1,
            _ => lost += 1,
        }
    }
    let tenant = docs[0].tenant.clone();
    let total = store.count(&tenant, None).await.expect("count all");
    println!(
        "rabbitmq-cluster: confirmed={confirmed} stored={stored} lost={lost} duplicated={duplicated} reconnects={reconnects}"
    );
    assert_eq!(lost, 0, "nothing confirmed is lost");
    assert_eq!(duplicated, 0, "nothing is stored twice");
    assert_eq!(stored, confirmed);
    assert_eq!(total, expected_points, "no stray points");
    drop(cluster);
}
