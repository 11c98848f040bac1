//! Cluster-mode measurements (docs/performance.md, "Signalling across nodes"): starts its
//! own signaller processes on one `redis-server` (or one node without Redis), drives one
//! room through them and prints what it measured.
//!
//! - `room`: a broadcaster and N native viewers joined round-robin across the nodes (the
//!   room is created on the first); Redis commands per join (`CONFIG RESETSTAT` before,
//!   `INFO commandstats` after), per second in a quiet window, and per relay death (repair);
//!   each node's resident memory.
//! - `joins`: WebSocket-only viewers joining as fast as they can, round-robin across the
//!   nodes: joins per second and hello → parent latency.
//! - `failover`: native peers on every node; K times, `kill -9` the room's owner, time
//!   until a viewer joining through a surviving node is welcomed and placed, count the
//!   packets every viewer missed across it (from the broadcaster's sequence numbers), and
//!   start the killed node again.
//!
//! Nodes are `treecast-signaller` processes on 127.0.0.1 (`--base-port` upward) with
//! `--stun-port 0`; Redis is reached with `redis-cli`. Logs go to `--logs`. Nothing is
//! asserted: bounds only stop waiting. Raise `ulimit -n` for large N.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::{Child, Command};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand};
use futures_util::{SinkExt, StreamExt};
use hdrhistogram::Histogram;
use serde_json::{Value, json};
use tokio::sync::{Semaphore, mpsc, watch};
use tokio_tungstenite::tungstenite::Message;
use treecast_core::agent::Phase;
use treecast_peer::load::process_memory_mb;
use treecast_peer::media::now_us;
use treecast_peer::{Peer, PeerConfig, Role};

/// The key every node signs resume claims with (cluster mode needs one, ≥ 32 characters).
const KEY: &str = "cluster-bench resume key, the same on every node";

#[derive(Parser)]
struct Cli {
    /// The signaller binary.
    #[arg(long, default_value = "target/release/treecast-signaller")]
    signaller: PathBuf,
    /// Port of the redis-server on 127.0.0.1 the nodes share; absent: one node without
    /// Redis (`--nodes` is then ignored).
    #[arg(long)]
    redis_port: Option<u16>,
    /// Signaller processes.
    #[arg(long, default_value_t = 3)]
    nodes: usize,
    /// Port of the first node; the others follow.
    #[arg(long, default_value_t = 18300)]
    base_port: u16,
    /// Root and relay fan-out.
    #[arg(long, default_value_t = 3)]
    fanout: u32,
    /// Directory for the nodes' logs.
    #[arg(long, default_value = "/tmp/cluster-bench")]
    logs: PathBuf,
    /// Tokio worker threads of this process (the native peers).
    #[arg(long, default_value_t = 4)]
    threads: usize,
    #[command(subcommand)]
    command: Mode,
}

#[derive(Subcommand)]
enum Mode {
    /// Native viewers; Redis commands per join, per quiet second and per repair; RSS.
    Room {
        #[arg(long, default_value_t = 100)]
        viewers: usize,
        #[arg(long, default_value_t = 20)]
        join_every_ms: u64,
        #[arg(long, default_value_t = 150)]
        kbps: u32,
        #[arg(long, default_value_t = 25)]
        fps: u32,
        /// Quiet window, s.
        #[arg(long, default_value_t = 10)]
        steady_secs: u64,
        /// Relays killed, one after another.
        #[arg(long, default_value_t = 5)]
        kills: usize,
        /// Longest wait for every viewer's first packet, s.
        #[arg(long, default_value_t = 120)]
        join_bound_secs: u64,
    },
    /// WebSocket-only viewers joining with bounded concurrency; joins per second.
    Joins {
        #[arg(long, default_value_t = 10_000)]
        viewers: usize,
        #[arg(long, default_value_t = 500)]
        concurrency: usize,
    },
    /// Kill the owner K times; failover time and packets missed.
    Failover {
        #[arg(long, default_value_t = 30)]
        viewers: usize,
        #[arg(long, default_value_t = 20)]
        kills: usize,
        #[arg(long, default_value_t = 150)]
        kbps: u32,
    },
}

/// One signaller process.
struct Node {
    port: u16,
    child: Option<Child>,
}

/// The nodes and the Redis they share.
struct Cluster {
    cli_signaller: PathBuf,
    redis_port: Option<u16>,
    fanout: u32,
    logs: PathBuf,
    nodes: Vec<Node>,
    starts: usize,
}

impl Cluster {
    async fn start(cli: &Cli) -> Self {
        std::fs::create_dir_all(&cli.logs).expect("log directory");
        let count = if cli.redis_port.is_some() {
            cli.nodes
        } else {
            1
        };
        let mut cluster = Self {
            cli_signaller: cli.signaller.clone(),
            redis_port: cli.redis_port,
            fanout: cli.fanout,
            logs: cli.logs.clone(),
            nodes: (0..count)
                .map(|i| Node {
                    port: cli.base_port + i as u16,
                    child: None,
                })
                .collect(),
            starts: 0,
        };
        if cluster.redis_port.is_some() {
            cluster.redis(&["FLUSHALL"]);
        }
        for i in 0..count {
            cluster.spawn(i).await;
        }
        cluster
    }

    /// Starts node `i` (again) and waits until it accepts connections.
    async fn spawn(&mut self, i: usize) {
        let port = self.nodes[i].port;
        self.starts += 1;
        let log = std::fs::File::create(self.logs.join(format!("node{i}-{}.log", self.starts)))
            .expect("log file");
        let fanout = self.fanout.to_string();
        let mut cmd = Command::new(&self.cli_signaller);
        cmd.args(["--bind", &format!("127.0.0.1:{port}"), "--stun-port", "0"])
            .args(["--max-connections-per-ip", "100000"])
            .args(["--root-fanout", &fanout, "--relay-fanout", &fanout])
            .env("TREECAST_RESUME_KEY", KEY)
            .stdout(log.try_clone().expect("log file"))
            .stderr(log);
        if let Some(r) = self.redis_port {
            cmd.args(["--redis", &format!("redis://127.0.0.1:{r}/")]);
        }
        self.nodes[i].child = Some(cmd.spawn().expect("the signaller starts"));
        let deadline = Instant::now() + Duration::from_secs(20);
        while tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_err()
        {
            assert!(Instant::now() < deadline, "node {i} never listened");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// `kill -9` node `i`.
    fn kill(&mut self, i: usize) {
        if let Some(mut c) = self.nodes[i].child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn url(&self, i: usize) -> String {
        format!("ws://127.0.0.1:{}/ws", self.nodes[i].port)
    }

    fn authority(&self, i: usize) -> String {
        format!("127.0.0.1:{}", self.nodes[i].port)
    }

    fn rss_mb(&self) -> Vec<f64> {
        self.nodes
            .iter()
            .map(|n| {
                let Some(c) = &n.child else { return 0.0 };
                let status =
                    std::fs::read_to_string(format!("/proc/{}/status", c.id())).unwrap_or_default();
                status
                    .lines()
                    .find(|l| l.starts_with("VmRSS:"))
                    .and_then(|l| l.split_whitespace().nth(1))
                    .and_then(|v| v.parse::<f64>().ok())
                    .unwrap_or(0.0)
                    / 1024.0
            })
            .collect()
    }

    fn redis(&self, args: &[&str]) -> String {
        let Some(port) = self.redis_port else {
            return String::new();
        };
        let out = Command::new("redis-cli")
            .args(["-p", &port.to_string()])
            .args(args)
            .output()
            .expect("redis-cli runs");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn reset_stats(&self) {
        self.redis(&["CONFIG", "RESETSTAT"]);
    }

    /// Calls per command since the last reset, without this tool's own.
    fn command_stats(&self) -> BTreeMap<String, u64> {
        self.redis(&["INFO", "commandstats"])
            .lines()
            .filter_map(|l| {
                let (name, rest) = l.strip_prefix("cmdstat_")?.split_once(':')?;
                let calls = rest
                    .strip_prefix("calls=")?
                    .split(',')
                    .next()?
                    .parse()
                    .ok()?;
                (name != "info" && name != "config|resetstat").then(|| (name.to_owned(), calls))
            })
            .collect()
    }

    /// The node answering the room's snapshot: its owner.
    async fn owner(&self, room: &str) -> Option<usize> {
        for i in 0..self.nodes.len() {
            if self.nodes[i].child.is_none() {
                continue;
            }
            let r = treecast_signaller::client::request(
                &self.authority(i),
                "GET",
                &format!("/api/rooms/{room}"),
                None,
                Duration::from_secs(5),
            )
            .await;
            if r.is_ok_and(|r| r.status == 200) {
                return Some(i);
            }
        }
        None
    }

    async fn snapshot(&self, i: usize, room: &str) -> Option<Value> {
        let r = treecast_signaller::client::request(
            &self.authority(i),
            "GET",
            &format!("/api/rooms/{room}"),
            None,
            Duration::from_secs(5),
        )
        .await
        .ok()?;
        (r.status == 200).then(|| r.json().ok()).flatten()
    }

    async fn create_room(&self) -> (String, String) {
        let r = treecast_signaller::client::request(
            &self.authority(0),
            "POST",
            "/api/rooms",
            None,
            Duration::from_secs(10),
        )
        .await
        .expect("POST /api/rooms");
        let v = r.json().expect("room JSON");
        (
            v["room"].as_str().expect("room").to_owned(),
            v["token"].as_str().expect("token").to_owned(),
        )
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for i in 0..self.nodes.len() {
            self.kill(i);
        }
    }
}

fn print_commands(what: &str, stats: &BTreeMap<String, u64>, per: f64) {
    let total: u64 = stats.values().sum();
    let mut rows: Vec<(&String, &u64)> = stats.iter().collect();
    rows.sort_by(|a, b| b.1.cmp(a.1));
    let detail: Vec<String> = rows
        .iter()
        .map(|(n, c)| format!("{n} {:.2}", **c as f64 / per))
        .collect();
    println!(
        "{what}: {total} commands, {:.2} per unit ({})",
        total as f64 / per,
        detail.join(", ")
    );
}

fn summary(h: &Histogram<u64>, unit: f64) -> String {
    if h.is_empty() {
        return "no samples".into();
    }
    format!(
        "p50 {:.1} p95 {:.1} p99 {:.1} max {:.1} (n = {})",
        h.value_at_quantile(0.5) as f64 / unit,
        h.value_at_quantile(0.95) as f64 / unit,
        h.value_at_quantile(0.99) as f64 / unit,
        h.max() as f64 / unit,
        h.len()
    )
}

fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("constant bounds")
}

/// A phase boundary with the wall clock, to line up with `redis-cli MONITOR` output.
fn stamp(what: &str) {
    println!("[{:.6}] {what}", now_us() as f64 / 1e6);
}

fn uptime() -> String {
    std::fs::read_to_string("/proc/loadavg").unwrap_or_default()
}

fn main() {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr)
        .init();
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(cli.threads.max(1))
        .enable_all()
        .build()
        .expect("runtime")
        .block_on(async {
            let mut cluster = Cluster::start(&cli).await;
            println!(
                "{} node(s){}; load {}",
                cluster.nodes.len(),
                cli.redis_port
                    .map_or(" without Redis".into(), |p| format!(" on redis :{p}")),
                uptime().trim()
            );
            match cli.command {
                Mode::Room {
                    viewers,
                    join_every_ms,
                    kbps,
                    fps,
                    steady_secs,
                    kills,
                    join_bound_secs,
                } => {
                    room(
                        &cluster,
                        viewers,
                        Duration::from_millis(join_every_ms),
                        (kbps, fps),
                        Duration::from_secs(steady_secs),
                        kills,
                        Duration::from_secs(join_bound_secs),
                    )
                    .await
                }
                Mode::Joins {
                    viewers,
                    concurrency,
                } => joins(&cluster, viewers, concurrency).await,
                Mode::Failover {
                    viewers,
                    kills,
                    kbps,
                } => failover(&mut cluster, viewers, kills, kbps).await,
            }
            println!("load at the end {}", uptime().trim());
        });
}

fn native(url: &str, room: &str, role: Role) -> PeerConfig {
    let mut c = PeerConfig::new(url, room, role);
    c.use_ice_servers = false;
    c
}

async fn start_broadcaster(url: &str, room: &str, token: &str, kbps: u32, fps: u32) -> Peer {
    let mut b = native(url, room, Role::Broadcaster);
    b.token = Some(token.to_owned());
    b.stream_kbps = kbps;
    b.fps = fps;
    let b = Peer::start(b).expect("broadcaster");
    let deadline = Instant::now() + Duration::from_secs(10);
    while b.status().peer_id.is_none() {
        assert!(
            Instant::now() < deadline,
            "the broadcaster was not welcomed"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    b
}

fn receiving(v: &Peer) -> bool {
    v.stats().first_packet_us.load(Ordering::Relaxed) != 0
}

async fn room(
    cluster: &Cluster,
    n: usize,
    join_every: Duration,
    (kbps, fps): (u32, u32),
    steady: Duration,
    kills: usize,
    join_bound: Duration,
) {
    let (room, token) = cluster.create_room().await;
    let broadcaster = start_broadcaster(&cluster.url(0), &room, &token, kbps, fps).await;
    let nodes = cluster.nodes.len();

    cluster.reset_stats();
    stamp("joins start");
    let started = Instant::now();
    let mut viewers = Vec::with_capacity(n);
    let mut every = tokio::time::interval(join_every.max(Duration::from_millis(1)));
    for i in 0..n {
        every.tick().await;
        viewers.push(Peer::start(native(&cluster.url(i % nodes), &room, Role::Viewer)).unwrap());
    }
    let deadline = Instant::now() + join_bound;
    while Instant::now() < deadline && !viewers.iter().all(receiving) {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let all_in = started.elapsed();
    // The last joins' reports (`connecting`, `receiving`) and keyframe requests.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let join_span = started.elapsed();
    let join_stats = cluster.command_stats();
    stamp("joins end");
    let got = viewers.iter().filter(|v| receiving(v)).count();
    let mut joins = histogram();
    for v in &viewers {
        let s = v.stats();
        let first = s.first_packet_us.load(Ordering::Relaxed);
        if first != 0 {
            let _ = joins.record(
                first
                    .saturating_sub(s.started_us.load(Ordering::Relaxed))
                    .max(1),
            );
        }
    }
    println!(
        "{n} viewers round-robin over {nodes} node(s), one every {join_every:?}: {got} receiving after {all_in:.2?}; join to first packet (ms) {}",
        summary(&joins, 1000.0)
    );
    let owner = cluster.owner(&room).await;
    if let Some(snap) = match owner {
        Some(i) => cluster.snapshot(i, &room).await,
        None => None,
    } {
        println!(
            "owner node {owner:?}: viewers {}, max depth {}, per depth {}",
            snap["viewers"], snap["max_depth"], snap["depth_histogram"]
        );
    }
    print_commands(
        &format!("join phase ({join_span:.2?}, per join)"),
        &join_stats,
        n as f64,
    );
    println!(
        "RSS per node after the joins (MB): {:?}; this process {:.0} MB; load {}",
        cluster.rss_mb(),
        process_memory_mb().0,
        uptime().trim()
    );

    cluster.reset_stats();
    tokio::time::sleep(steady).await;
    let quiet = cluster.command_stats();
    print_commands(
        &format!("quiet window ({steady:?}, per second)"),
        &quiet,
        steady.as_secs_f64(),
    );
    let quiet_rate = quiet.values().sum::<u64>() as f64 / steady.as_secs_f64();

    let mut repairs = BTreeMap::new();
    let mut repair_time = Duration::ZERO;
    let mut deaths = 0;
    let mut interruptions = histogram();
    let mut seed = 0x9e37_79b9_7f4a_7c15_u64;
    for _ in 0..kills {
        let statuses: Vec<_> = viewers.iter().map(|v| v.status()).collect();
        let relays: Vec<usize> = (0..viewers.len())
            .filter(|&i| !statuses[i].children.is_empty())
            .collect();
        if relays.is_empty() {
            break;
        }
        seed = seed
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        let victim = relays[(seed >> 33) as usize % relays.len()];
        let by_id: BTreeMap<u64, usize> = statuses
            .iter()
            .enumerate()
            .filter_map(|(i, s)| Some((s.peer_id?.0, i)))
            .collect();
        let mut below = Vec::new();
        let mut frontier: Vec<u64> = statuses[victim].children.iter().map(|p| p.0).collect();
        while let Some(p) = frontier.pop() {
            if let Some(&i) = by_id.get(&p) {
                below.push(i);
                frontier.extend(statuses[i].children.iter().map(|c| c.0));
            }
        }
        cluster.reset_stats();
        stamp("relay death");
        let t0 = Instant::now();
        let killed = now_us();
        for &i in &below {
            viewers[i].stats().arm_recovery(killed);
        }
        let dead = viewers.swap_remove(victim);
        let moved = viewers.len();
        let below: Vec<usize> = below
            .into_iter()
            .map(|i| if i == moved { victim } else { i })
            .collect();
        dead.kill().await;
        let deadline = Instant::now() + Duration::from_secs(15);
        let recovered = |v: &Peer| v.stats().recovered_us.load(Ordering::Relaxed) != 0;
        while Instant::now() < deadline && !below.iter().all(|&i| recovered(&viewers[i])) {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        // Late reports of the moved peers, as in the join phase.
        tokio::time::sleep(Duration::from_secs(3)).await;
        repair_time += t0.elapsed();
        stamp("repair window end");
        deaths += 1;
        for (k, c) in cluster.command_stats() {
            *repairs.entry(k).or_insert(0) += c;
        }
        for &i in &below {
            let r = viewers[i].stats().recovered_us.load(Ordering::Relaxed);
            if r != 0 {
                let _ = interruptions.record(r.saturating_sub(killed).max(1));
            }
        }
        println!(
            "relay death: {} children, {} below, {} recovered",
            statuses[victim].children.len(),
            below.len(),
            below.iter().filter(|&&i| recovered(&viewers[i])).count()
        );
    }
    if deaths > 0 {
        print_commands(
            &format!("repairs ({deaths}, {repair_time:.2?} in all, per repair)"),
            &repairs,
            deaths as f64,
        );
        let total: u64 = repairs.values().sum();
        println!(
            "per repair without the quiet rate ({quiet_rate:.1}/s over {repair_time:.2?}): {:.1}",
            (total as f64 - quiet_rate * repair_time.as_secs_f64()) / deaths as f64
        );
        println!(
            "interruption of the dead relays' descendants (ms): {}",
            summary(&interruptions, 1000.0)
        );
    }
    println!("RSS per node at the end (MB): {:?}", cluster.rss_mb());
    for v in viewers {
        v.leave_now().await;
    }
    broadcaster.leave_now().await;
}

/// A WebSocket-only peer: hello, then waits for the message `until` (`parent` for a
/// viewer, `welcome` for the broadcaster; hello → it timed), then reads (answering pings)
/// until told to stop.
async fn ws_peer(
    url: String,
    hello: Value,
    until: &'static str,
    permits: Arc<Semaphore>,
    done: mpsc::UnboundedSender<Result<Duration, String>>,
    mut stop: watch::Receiver<bool>,
) {
    let Ok(permit) = permits.acquire_owned().await else {
        return;
    };
    let mut ws = match tokio_tungstenite::connect_async(url.as_str()).await {
        Ok((ws, _)) => ws,
        Err(e) => {
            let _ = done.send(Err(format!("connect: {e}")));
            return;
        }
    };
    let t0 = Instant::now();
    if ws.send(Message::text(hello.to_string())).await.is_err() {
        let _ = done.send(Err("send".into()));
        return;
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let result = loop {
        match tokio::time::timeout_at(deadline, ws.next()).await {
            Err(_) => break Err("no parent in time".to_owned()),
            Ok(Some(Ok(Message::Text(t)))) => {
                let v: Value = serde_json::from_str(t.as_str()).unwrap_or_default();
                match v["type"].as_str() {
                    Some(t) if t == until => break Ok(t0.elapsed()),
                    Some("error") => break Err(format!("error {}", v["code"])),
                    _ => {}
                }
            }
            Ok(Some(Ok(_))) => {}
            Ok(Some(Err(e))) => break Err(format!("socket: {e}")),
            Ok(None) => break Err("closed".to_owned()),
        }
    };
    drop(permit);
    let ok = result.is_ok();
    let _ = done.send(result);
    drop(done);
    if !ok {
        return;
    }
    loop {
        tokio::select! {
            _ = stop.wait_for(|s| *s) => break,
            next = ws.next() => if !matches!(next, Some(Ok(_))) { return },
        }
    }
    let _ = ws
        .send(Message::text(json!({"type": "leave"}).to_string()))
        .await;
    let _ = ws.close(None).await;
}

async fn joins(cluster: &Cluster, n: usize, concurrency: usize) {
    let (room, token) = cluster.create_room().await;
    let nodes = cluster.nodes.len();
    let (stop_tx, stop) = watch::channel(false);
    let (done_tx, mut done) = mpsc::unbounded_channel();
    let permits = Arc::new(Semaphore::new(1));
    let hello =
        |role: &str| json!({"type": "hello", "room": room, "role": role, "uplink_kbps": 2000});
    let mut b = hello("broadcaster");
    b["token"] = json!(token);
    let (b_tx, mut b_done) = mpsc::unbounded_channel();
    let broadcaster = tokio::spawn(ws_peer(
        cluster.url(0),
        b,
        "welcome",
        Arc::clone(&permits),
        b_tx,
        stop.clone(),
    ));
    if let Some(Err(e)) = b_done.recv().await {
        println!("the broadcaster could not join: {e}");
        return;
    }

    cluster.reset_stats();
    let permits = Arc::new(Semaphore::new(concurrency.max(1)));
    let started = Instant::now();
    let mut tasks = Vec::with_capacity(n);
    for i in 0..n {
        tasks.push(tokio::spawn(ws_peer(
            cluster.url(i % nodes),
            hello("viewer"),
            "parent",
            Arc::clone(&permits),
            done_tx.clone(),
            stop.clone(),
        )));
    }
    drop(done_tx);
    let mut latency = histogram();
    let mut failures: BTreeMap<String, usize> = BTreeMap::new();
    let mut last = started;
    while let Some(r) = done.recv().await {
        match r {
            Ok(d) => {
                let _ = latency.record((d.as_micros() as u64).max(1));
                last = Instant::now();
            }
            Err(e) => *failures.entry(e).or_default() += 1,
        }
    }
    let secs = last.duration_since(started).as_secs_f64().max(1e-6);
    let joined = latency.len();
    println!(
        "{joined}/{n} WebSocket viewers placed over {nodes} node(s) in {secs:.2} s: {:.0} joins/s (concurrency {concurrency}); load {}",
        joined as f64 / secs,
        uptime().trim()
    );
    println!("hello -> parent (ms): {}", summary(&latency, 1000.0));
    for (why, count) in &failures {
        println!("failed: {count} x {why}");
    }
    let stats = cluster.command_stats();
    if !stats.is_empty() {
        print_commands("Redis, per placed viewer", &stats, joined.max(1) as f64);
    }
    println!("RSS per node (MB): {:?}", cluster.rss_mb());
    let _ = stop_tx.send(true);
    for t in tasks {
        let _ = t.await;
    }
    let _ = broadcaster.await;
}

/// Sequence-number marks of a viewer (as peer/tests/common's `Mark`).
#[derive(Clone, Copy)]
struct Mark {
    next_seq: u64,
    received: u64,
    duplicates: u64,
}

impl Mark {
    fn of(p: &Peer) -> Self {
        let s = p.stats();
        Self {
            next_seq: s.next_seq.load(Ordering::Relaxed),
            received: s.packets_received.load(Ordering::Relaxed),
            duplicates: s.reordered_or_duplicate.load(Ordering::Relaxed),
        }
    }

    /// Sequence numbers sent between `self` and `later` that never arrived.
    fn missing_until(self, later: Mark) -> i64 {
        let span = later.next_seq as i64 - self.next_seq as i64;
        let unique =
            (later.received - self.received) as i64 - (later.duplicates - self.duplicates) as i64;
        span - unique
    }
}

async fn failover(cluster: &mut Cluster, n: usize, kills: usize, kbps: u32) {
    let (room, token) = cluster.create_room().await;
    let nodes = cluster.nodes.len();
    let broadcaster = start_broadcaster(&cluster.url(0), &room, &token, kbps, 25).await;
    let mut viewers = Vec::new();
    for i in 0..n {
        viewers.push(Peer::start(native(&cluster.url(i % nodes), &room, Role::Viewer)).unwrap());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline && !viewers.iter().all(receiving) {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    println!(
        "{} of {n} viewers receiving; load {}",
        viewers.iter().filter(|v| receiving(v)).count(),
        uptime().trim()
    );

    let mut welcome = histogram();
    let mut placed = histogram();
    let mut rebuilt = histogram();
    let mut worst_missing = 0;
    let mut missing_total = 0;
    let mut lost_peers = 0;
    for k in 0..kills {
        let Some(owner) = cluster.owner(&room).await else {
            println!("kill {k}: no owner answers; stopping");
            break;
        };
        let expected = cluster
            .snapshot(owner, &room)
            .await
            .map_or(0, |s| s["peers"].as_array().map_or(0, Vec::len));
        let marks: Vec<Mark> = viewers.iter().map(Mark::of).collect();
        for v in viewers.iter().chain([&broadcaster]) {
            v.stats().longest_gap_us.store(0, Ordering::Relaxed);
        }
        let edge = (owner + 1) % nodes;
        cluster.kill(owner);
        let t0 = Instant::now();
        let joiner = Peer::start(native(&cluster.url(edge), &room, Role::Viewer)).unwrap();
        // As a supervisor would: a fresh process on the same address, so the killed node's
        // peers (the broadcaster among them at first) have somewhere to reconnect. Without
        // it they cannot come back and the room ends when the rebuild window closes.
        cluster.spawn(owner).await;
        let (mut w, mut p) = (None, None);
        let deadline = t0 + Duration::from_secs(30);
        while p.is_none() && Instant::now() < deadline {
            let s = joiner.status();
            if w.is_none() && s.peer_id.is_some() {
                w = Some(t0.elapsed());
            }
            if s.depth.is_some() {
                p = Some(t0.elapsed());
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        // The room back whole: every peer there before, on whichever node owns it now.
        let mut back = None;
        let mut new_owner = None;
        while back.is_none() && Instant::now() < deadline {
            if let Some(i) = cluster.owner(&room).await
                && let Some(s) = cluster.snapshot(i, &room).await
                && s["peers"].as_array().map_or(0, Vec::len) > expected
            {
                back = Some(t0.elapsed());
                new_owner = Some(i);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline
            && !viewers
                .iter()
                .chain([&broadcaster, &joiner])
                .all(|v| v.status().phase == Phase::Joined)
        {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        tokio::time::sleep(Duration::from_secs(3)).await;
        let missing: Vec<i64> = viewers
            .iter()
            .zip(&marks)
            .map(|(v, m)| m.missing_until(Mark::of(v)))
            .collect();
        let longest_gap = viewers
            .iter()
            .map(|v| v.stats().longest_gap_us.load(Ordering::Relaxed))
            .max()
            .unwrap_or(0);
        let worst = missing.iter().copied().max().unwrap_or(0);
        worst_missing = worst_missing.max(worst);
        missing_total += missing.iter().filter(|&&m| m > 0).sum::<i64>();
        let now_peers = match cluster.owner(&room).await {
            Some(i) => cluster
                .snapshot(i, &room)
                .await
                .map_or(0, |s| s["peers"].as_array().map_or(0, Vec::len)),
            None => 0,
        };
        // The joiner is one more; fewer means the rebuild lost someone.
        lost_peers += (expected + 1).saturating_sub(now_peers);
        if let Some(d) = w {
            let _ = welcome.record((d.as_micros() as u64).max(1));
        }
        if let Some(d) = p {
            let _ = placed.record((d.as_micros() as u64).max(1));
        }
        if let Some(d) = back {
            let _ = rebuilt.record((d.as_micros() as u64).max(1));
        }
        println!(
            "kill {k}: owner node {owner} -> node {new_owner:?}; joiner welcomed {w:.2?}, placed {p:.2?}; room whole {back:.2?}; peers {expected} -> {now_peers}; missed packets: worst viewer {worst}, sum {}; longest inter-packet gap {} ms; load {}",
            missing.iter().filter(|&&m| m > 0).sum::<i64>(),
            longest_gap / 1000,
            uptime().trim()
        );
        viewers.push(joiner);
    }
    println!(
        "failover, kill -9 -> joiner welcomed (ms): {}",
        summary(&welcome, 1000.0)
    );
    println!(
        "failover, kill -9 -> joiner placed (ms): {}",
        summary(&placed, 1000.0)
    );
    println!(
        "kill -9 -> room whole on the new owner (ms): {}",
        summary(&rebuilt, 1000.0)
    );
    println!(
        "packets missed across all failovers: worst viewer in one failover {worst_missing}, sum over viewers and failovers {missing_total}; peers lost by rebuilds {lost_peers}"
    );
    for v in viewers {
        v.leave_now().await;
    }
    broadcaster.leave_now().await;
}
