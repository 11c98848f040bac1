//! `treecast-load`: opens many viewer WebSockets against a running signaller and measures
//! how fast they join and get placed in the relay tree.
//!
//! It only talks to the URL it is given (default `ws://127.0.0.1:8080/ws`), and it stops
//! by itself: every wait has a deadline, and the hold time is fixed.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use clap::Parser;
use futures_util::{SinkExt, StreamExt};
use hdrhistogram::Histogram;
use serde_json::{Value, json};
use tokio::net::TcpStream;
use tokio::sync::{Semaphore, mpsc, watch};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

type Socket = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// Load generator for the treecast signaller: joins N viewers to one room with bounded
/// concurrency, reports join rate and latency percentiles (hello→welcome, hello→parent),
/// how many were placed and how deep the tree got, holds the connections (answering
/// pings), then leaves.
///
/// Each connection is a file descriptor here and in the server: raise the limit in both
/// shells first, e.g. `ulimit -n 65536`, and start the server with a high enough
/// `--max-connections-per-ip` (all load comes from one address).
#[derive(Debug, Parser)]
#[command(name = "treecast-load", version)]
struct Args {
    /// WebSocket URL of the signaller (plain ws:// only).
    #[arg(long, default_value = "ws://127.0.0.1:8080/ws")]
    url: String,

    /// Join this existing room instead of creating one (POST /api/rooms on the same host).
    #[arg(long)]
    room: Option<String>,

    /// Broadcaster token of --room; with it, the tool also connects as the broadcaster.
    #[arg(long, requires = "room")]
    token: Option<String>,

    /// Viewers to open.
    #[arg(short = 'n', long, default_value_t = 1000)]
    clients: usize,

    /// Viewers joining at the same time.
    #[arg(long, default_value_t = 100)]
    concurrency: usize,

    /// Uplink each viewer declares, in kbit/s (sets its relay capacity).
    #[arg(long, default_value_t = 2_000)]
    uplink_kbps: u32,

    /// Seconds to hold every connection open after the joins.
    #[arg(long, default_value_t = 10)]
    hold: u64,

    /// Seconds a viewer may take to connect, be welcomed and get a parent.
    #[arg(long, default_value_t = 60)]
    join_timeout: u64,

    /// Soak instead: for this many seconds, every viewer churns (joins, reports every 2 s,
    /// then leaves, vanishes, or drops and resumes, and joins again); then checks that the
    /// server's peers and connections return to zero.
    #[arg(long, value_name = "SECS")]
    churn: Option<u64>,

    /// Shortest and longest viewer session in the soak, seconds.
    #[arg(long, default_value_t = 5)]
    session_min: u64,
    #[arg(long, default_value_t = 60)]
    session_max: u64,

    /// The server's process id: the soak samples its resident memory (Linux /proc).
    #[arg(long)]
    server_pid: Option<u32>,

    /// Seed of the soak's choices.
    #[arg(long, default_value_t = 1)]
    seed: u64,
}

/// What one viewer saw while joining.
#[derive(Debug, Default)]
struct JoinReport {
    welcome: Option<Duration>,
    parent: Option<Duration>,
    depth: Option<u32>,
    failure: Option<String>,
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let args = Args::parse();
    match run(args).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("treecast-load: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> Result<(), String> {
    let authority =
        treecast_signaller::client::authority_of(&args.url).map_err(|e| e.to_string())?;
    let (room, token) = match &args.room {
        Some(room) => (room.clone(), args.token.clone()),
        None => {
            let (status, body) = http(&authority, "POST", "/api/rooms").await?;
            if status != 201 {
                return Err(format!("creating a room answered {status}: {body}"));
            }
            let v: Value =
                serde_json::from_str(&body).map_err(|e| format!("bad room JSON: {e}"))?;
            let room = v["room"]
                .as_str()
                .ok_or("no room id in the answer")?
                .to_owned();
            (room, v["token"].as_str().map(str::to_owned))
        }
    };
    if let Some(secs) = args.churn {
        return soak::run(&args, &authority, &room, token.as_deref(), secs).await;
    }
    println!(
        "treecast-load: {} viewers against {} in room {room} (concurrency {})",
        args.clients, args.url, args.concurrency
    );

    // Viewers leave first, then the broadcaster (whose leaving ends the room).
    let (stop_tx, stop) = watch::channel(false);
    let (stop_broadcaster_tx, stop_broadcaster) = watch::channel(false);
    let lost = Arc::new(AtomicUsize::new(0));
    let join_timeout = Duration::from_secs(args.join_timeout);

    let broadcaster = match &token {
        Some(token) => {
            let hello = json!({"type": "hello", "room": room, "role": "broadcaster", "token": token, "uplink_kbps": args.uplink_kbps});
            let mut ws = connect(&args.url).await?;
            send(&mut ws, &hello).await?;
            let report = wait_joined(&mut ws, Instant::now(), false, join_timeout).await;
            if let Some(f) = report.failure {
                return Err(format!("the broadcaster could not join: {f}"));
            }
            Some(tokio::spawn(hold(ws, stop_broadcaster, Arc::clone(&lost))))
        }
        None => None,
    };

    let permits = Arc::new(Semaphore::new(args.concurrency.max(1)));
    let (report_tx, mut reports) = mpsc::unbounded_channel();
    let started = Instant::now();
    let mut viewers = Vec::with_capacity(args.clients);
    for _ in 0..args.clients {
        let hello = json!({"type": "hello", "room": room, "role": "viewer", "uplink_kbps": args.uplink_kbps});
        viewers.push(tokio::spawn(viewer(
            args.url.clone(),
            hello,
            Arc::clone(&permits),
            report_tx.clone(),
            stop.clone(),
            Arc::clone(&lost),
            join_timeout,
        )));
    }
    drop(report_tx);

    let mut welcome = histogram();
    let mut parent = histogram();
    let (mut joined, mut placed, mut max_depth) = (0usize, 0usize, 0u32);
    let mut failures: std::collections::BTreeMap<String, usize> = Default::default();
    let mut last_join = started;
    while let Some(r) = reports.recv().await {
        if let Some(w) = r.welcome {
            joined += 1;
            let _ = welcome.record(micros(w));
            last_join = Instant::now();
        }
        if let Some(p) = r.parent {
            placed += 1;
            let _ = parent.record(micros(p));
        }
        max_depth = max_depth.max(r.depth.unwrap_or(0));
        if let Some(f) = r.failure {
            *failures.entry(f).or_default() += 1;
        }
    }
    let join_secs = last_join.duration_since(started).as_secs_f64().max(1e-6);
    println!(
        "joined {joined}/{} in {join_secs:.2} s: {:.0} joins/s",
        args.clients,
        joined as f64 / join_secs
    );
    println!("placed (got a parent) {placed}, max depth from parent messages {max_depth}");
    print_latency("hello -> welcome", &welcome);
    print_latency("hello -> parent ", &parent);
    for (why, n) in &failures {
        println!("failed: {n} × {why}");
    }
    match http(&authority, "GET", &format!("/api/rooms/{room}")).await {
        Ok((200, body)) => {
            if let Ok(snap) = serde_json::from_str::<Value>(&body) {
                println!(
                    "server snapshot: viewers {}, waiting {}, max_depth {}, peers per depth {}",
                    snap["viewers"], snap["waiting"], snap["max_depth"], snap["depth_histogram"]
                );
            }
        }
        Ok((status, body)) => println!("snapshot answered {status}: {body}"),
        Err(e) => println!("snapshot failed: {e}"),
    }

    println!("holding the connections for {} s", args.hold);
    tokio::time::sleep(Duration::from_secs(args.hold)).await;
    println!(
        "connections lost while holding: {}",
        lost.load(Ordering::Relaxed)
    );
    let leaving = Instant::now();
    let _ = stop_tx.send(true);
    for v in viewers {
        let _ = v.await;
    }
    let _ = stop_broadcaster_tx.send(true);
    if let Some(b) = broadcaster {
        let _ = b.await;
    }
    println!("all left in {:.2} s", leaving.elapsed().as_secs_f64());
    Ok(())
}

/// One viewer: join (within the concurrency limit), report, hold, leave.
async fn viewer(
    url: String,
    hello: Value,
    permits: Arc<Semaphore>,
    reports: mpsc::UnboundedSender<JoinReport>,
    stop: watch::Receiver<bool>,
    lost: Arc<AtomicUsize>,
    timeout: Duration,
) {
    let Ok(permit) = permits.acquire_owned().await else {
        return;
    };
    let mut ws = match tokio::time::timeout(timeout, connect(&url)).await {
        Ok(Ok(ws)) => ws,
        Ok(Err(e)) => return failed(&reports, e),
        Err(_) => return failed(&reports, "connect timed out".into()),
    };
    let t0 = Instant::now();
    if let Err(e) = send(&mut ws, &hello).await {
        return failed(&reports, e);
    }
    let report = wait_joined(&mut ws, t0, true, timeout).await;
    drop(permit);
    let ok = report.failure.is_none();
    let _ = reports.send(report);
    drop(reports); // the join phase ends when every viewer has reported
    if ok {
        hold(ws, stop, lost).await;
    }
}

fn failed(reports: &mpsc::UnboundedSender<JoinReport>, why: String) {
    let _ = reports.send(JoinReport {
        failure: Some(why),
        ..Default::default()
    });
}

/// Reads until `welcome` (and `parent`, if `want_parent`), timing both from `t0`.
async fn wait_joined(
    ws: &mut Socket,
    t0: Instant,
    want_parent: bool,
    timeout: Duration,
) -> JoinReport {
    let mut report = JoinReport::default();
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if report.welcome.is_some() && (report.parent.is_some() || !want_parent) {
            return report;
        }
        let next = match tokio::time::timeout_at(deadline, ws.next()).await {
            Ok(next) => next,
            Err(_) => {
                let what = if report.welcome.is_some() {
                    "parent"
                } else {
                    "welcome"
                };
                report.failure = Some(format!("no {what} in time"));
                return report;
            }
        };
        match next {
            Some(Ok(Message::Text(t))) => {
                let Ok(v) = serde_json::from_str::<Value>(t.as_str()) else {
                    continue;
                };
                match v["type"].as_str() {
                    Some("welcome") => report.welcome = Some(t0.elapsed()),
                    Some("parent") => {
                        report.parent.get_or_insert_with(|| t0.elapsed());
                        report.depth = v["depth"].as_u64().map(|d| d as u32);
                    }
                    Some("error") => {
                        report.failure = Some(format!("error {}", v["code"]));
                        return report;
                    }
                    _ => {}
                }
            }
            Some(Ok(_)) => {}
            Some(Err(e)) => {
                report.failure = Some(format!("socket error: {e}"));
                return report;
            }
            None => {
                report.failure = Some("closed by the server".into());
                return report;
            }
        }
    }
}

/// Keeps reading (which answers pings) until told to stop, then leaves.
async fn hold(mut ws: Socket, mut stop: watch::Receiver<bool>, lost: Arc<AtomicUsize>) {
    loop {
        tokio::select! {
            _ = stop.wait_for(|s| *s) => break,
            next = ws.next() => match next {
                Some(Ok(_)) => {}
                Some(Err(_)) | None => {
                    lost.fetch_add(1, Ordering::Relaxed);
                    return;
                }
            },
        }
    }
    let _ = tokio::time::timeout(Duration::from_secs(10), async {
        let _ = send(&mut ws, &json!({"type": "leave"})).await;
        let _ = ws.close(None).await;
        while let Some(Ok(_)) = ws.next().await {}
    })
    .await;
}

async fn connect(url: &str) -> Result<Socket, String> {
    let config = WebSocketConfig::default()
        .read_buffer_size(4 * 1024)
        .write_buffer_size(0);
    tokio_tungstenite::connect_async_with_config(url, Some(config), true)
        .await
        .map(|(ws, _)| ws)
        .map_err(|e| format!("connect: {e}"))
}

async fn send(ws: &mut Socket, v: &Value) -> Result<(), String> {
    ws.send(Message::text(v.to_string()))
        .await
        .map_err(|e| format!("send: {e}"))
}

fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 3_600_000_000, 3).unwrap_or_else(|_| unreachable!("valid bounds"))
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX).max(1)
}

fn print_latency(what: &str, h: &Histogram<u64>) {
    if h.is_empty() {
        println!("{what}: no samples");
        return;
    }
    let ms = |us: u64| us as f64 / 1000.0;
    println!(
        "{what}: p50 {:.1} ms  p90 {:.1} ms  p99 {:.1} ms  max {:.1} ms  (n = {})",
        ms(h.value_at_quantile(0.50)),
        ms(h.value_at_quantile(0.90)),
        ms(h.value_at_quantile(0.99)),
        ms(h.max()),
        h.len()
    );
}

/// One request to the signaller's REST API; status and body.
async fn http(authority: &str, method: &str, path: &str) -> Result<(u16, String), String> {
    let r =
        treecast_signaller::client::request(authority, method, path, None, Duration::from_secs(30))
            .await
            .map_err(|e| e.to_string())?;
    Ok((r.status, r.body))
}

/// The churn soak (`--churn`): many viewers joining, reporting and leaving in every way a
/// client can, for a long time; what matters is what is left afterwards.
mod soak {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::time::{Duration, Instant};

    use futures_util::{SinkExt, StreamExt};
    use rand_chacha::ChaCha8Rng;
    use rand_core::{Rng, SeedableRng};
    use serde_json::{Value, json};
    use tokio::sync::watch;

    use super::{Args, Socket, connect, http, send};

    /// Counters shared by the churning viewers.
    #[derive(Default)]
    struct Counts {
        joins: AtomicU64,
        resumes: AtomicU64,
        resume_refused: AtomicU64,
        leaves: AtomicU64,
        vanished: AtomicU64,
        reports: AtomicU64,
        errors: AtomicU64,
        failures: AtomicU64,
        /// Error codes the server sent, with how often.
        codes: std::sync::Mutex<std::collections::BTreeMap<String, u64>>,
    }

    impl Counts {
        fn error(&self, v: &Value) {
            self.errors.fetch_add(1, Ordering::Relaxed);
            let code = v["code"].as_str().unwrap_or("?").to_owned();
            if let Ok(mut codes) = self.codes.lock() {
                *codes.entry(code).or_default() += 1;
            }
        }

        fn line(&self) -> String {
            let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
            let codes = self
                .codes
                .lock()
                .map(|c| format!("{c:?}"))
                .unwrap_or_default();
            format!(
                "joins {} resumes {} (refused {}) leaves {} vanished {} reports {} errors {} {codes} failed {}",
                g(&self.joins),
                g(&self.resumes),
                g(&self.resume_refused),
                g(&self.leaves),
                g(&self.vanished),
                g(&self.reports),
                g(&self.errors),
                g(&self.failures)
            )
        }
    }

    pub(super) async fn run(
        args: &Args,
        authority: &str,
        room: &str,
        token: Option<&str>,
        secs: u64,
    ) -> Result<(), String> {
        let token = token.ok_or("the soak needs the room's broadcaster token (--token)")?;
        println!(
            "treecast-load soak: {} churning viewers for {secs} s against {} in room {room} \
             (sessions {}-{} s)",
            args.clients, args.url, args.session_min, args.session_max
        );
        let mut broadcaster = connect(&args.url).await?;
        let hello = json!({"type": "hello", "room": room, "role": "broadcaster", "token": token, "uplink_kbps": args.uplink_kbps});
        send(&mut broadcaster, &hello).await?;
        let (stop_tx, stop) = watch::channel(false);
        let b_counts = Arc::new(Counts::default());
        let b = tokio::spawn(session_loop(
            broadcaster,
            Duration::from_secs(5),
            stop.clone(),
            Arc::clone(&b_counts),
        ));

        let counts = Arc::new(Counts::default());
        let started = Instant::now();
        let end = started + Duration::from_secs(secs);
        let mut viewers = Vec::with_capacity(args.clients);
        let session = (
            args.session_min.max(1),
            args.session_max.max(args.session_min.max(1)),
        );
        for i in 0..args.clients {
            let rng = ChaCha8Rng::seed_from_u64(args.seed.wrapping_mul(1_000_003) + i as u64);
            viewers.push(tokio::spawn(churner(
                args.url.clone(),
                room.to_owned(),
                args.uplink_kbps,
                session,
                end,
                rng,
                Arc::clone(&counts),
            )));
            // Spread the first joins over the first few seconds.
            tokio::time::sleep(Duration::from_millis(2)).await;
        }

        let rss_at = |pid: Option<u32>| pid.and_then(rss_kib);
        let mut rss_after_warmup: Option<u64> = None;
        let (mut rss_min, mut rss_max) = (u64::MAX, 0u64);
        let mut tick = tokio::time::interval(Duration::from_secs(30));
        tick.tick().await;
        while Instant::now() < end {
            tick.tick().await;
            let m = metrics(authority).await;
            let rss = rss_at(args.server_pid);
            let t = started.elapsed().as_secs();
            // Warm-up: the first full session length and a minute more.
            if t >= args.session_max + 60
                && let Some(r) = rss
            {
                rss_after_warmup.get_or_insert(r);
                rss_min = rss_min.min(r);
                rss_max = rss_max.max(r);
            }
            println!(
                "t={t:>4}s server: connections {} peers {} rooms {} rss {} | {}",
                m.connections,
                m.peers,
                m.rooms,
                rss.map_or("?".into(), |r| format!("{} MiB", r / 1024)),
                counts.line()
            );
        }

        println!("stopping: every viewer ends its session, then the broadcaster leaves");
        let _ = stop_tx.send(true);
        for v in viewers {
            let _ = v.await;
        }
        let _ = b.await;
        // Vanished peers keep their place for the resume grace period (10 s by default).
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut m = metrics(authority).await;
        while (m.connections > 0.0 || m.peers > 0.0) && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_secs(1)).await;
            m = metrics(authority).await;
        }
        println!("totals: {}", counts.line());
        println!(
            "after: connections {} peers {} rooms {} rss {}",
            m.connections,
            m.peers,
            m.rooms,
            rss_at(args.server_pid).map_or("?".into(), |r| format!("{} MiB", r / 1024))
        );
        if let Some(first) = rss_after_warmup {
            println!(
                "rss after warm-up: first {} KiB, min {rss_min} KiB, max {rss_max} KiB ({:+.1} % max over first)",
                first,
                (rss_max as f64 / first as f64 - 1.0) * 100.0
            );
        }
        if m.connections > 0.0 || m.peers > 0.0 {
            return Err(format!(
                "leaked: {} connections and {} peers still counted a minute after everyone left",
                m.connections, m.peers
            ));
        }
        println!("no leak: connections and peers back to zero");
        Ok(())
    }

    /// One viewer slot: sessions back to back until `end`.
    async fn churner(
        url: String,
        room: String,
        uplink: u32,
        (min, max): (u64, u64),
        end: Instant,
        mut rng: ChaCha8Rng,
        counts: Arc<Counts>,
    ) {
        let mut resume: Option<String> = None;
        while Instant::now() < end {
            let mut hello =
                json!({"type": "hello", "room": room, "role": "viewer", "uplink_kbps": uplink});
            if let Some(r) = resume.take() {
                hello["resume"] = json!(r);
            }
            let resuming = hello.get("resume").is_some();
            let Ok(Ok(mut ws)) = tokio::time::timeout(Duration::from_secs(30), connect(&url)).await
            else {
                counts.failures.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            };
            if send(&mut ws, &hello).await.is_err() {
                counts.failures.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            let Some(welcome) = wait_welcome(&mut ws, &counts).await else {
                if resuming {
                    counts.resume_refused.fetch_add(1, Ordering::Relaxed);
                }
                // As a page does: wait a little before trying again.
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            };
            if resuming {
                counts.resumes.fetch_add(1, Ordering::Relaxed);
            } else {
                counts.joins.fetch_add(1, Ordering::Relaxed);
            }
            let token = welcome["resume"].as_str().map(str::to_owned);
            let length = Duration::from_secs(min + rng.next_u64() % (max - min + 1));
            let until = (Instant::now() + length).min(end);
            let alive = live(&mut ws, until, &counts).await;
            if !alive {
                continue;
            }
            match rng.next_u64() % 10 {
                // Leaves properly.
                0..=5 => {
                    let _ = send(&mut ws, &json!({"type": "leave"})).await;
                    let _ = ws.close(None).await;
                    counts.leaves.fetch_add(1, Ordering::Relaxed);
                }
                // Vanishes: the socket is dropped without a close frame.
                6 | 7 => {
                    drop(ws);
                    counts.vanished.fetch_add(1, Ordering::Relaxed);
                }
                // Signalling blip: drops, then resumes its place within the grace period.
                _ => {
                    drop(ws);
                    resume = token;
                    let ms = 200 + rng.next_u64() % 3_000;
                    tokio::time::sleep(Duration::from_millis(ms)).await;
                    continue;
                }
            }
            let ms = rng.next_u64() % 2_000;
            tokio::time::sleep(Duration::from_millis(ms)).await;
        }
    }

    async fn wait_welcome(ws: &mut Socket, counts: &Counts) -> Option<Value> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            match tokio::time::timeout_at(deadline, ws.next()).await {
                Ok(Some(Ok(msg))) => {
                    let Ok(text) = msg.to_text() else { continue };
                    let Ok(v) = serde_json::from_str::<Value>(text) else {
                        continue;
                    };
                    match v["type"].as_str() {
                        Some("welcome") => return Some(v),
                        Some("error") => {
                            counts.error(&v);
                            return None;
                        }
                        _ => {}
                    }
                }
                _ => {
                    counts.failures.fetch_add(1, Ordering::Relaxed);
                    return None;
                }
            }
        }
    }

    /// Reads (answering pings) and reports `receiving` every 2 s, as a watching page does,
    /// until `until`. False if the server closed the socket.
    async fn live(ws: &mut Socket, until: Instant, counts: &Counts) -> bool {
        let mut report = tokio::time::interval(Duration::from_secs(2));
        let until = tokio::time::Instant::from_std(until);
        loop {
            tokio::select! {
                _ = tokio::time::sleep_until(until) => return true,
                _ = report.tick() => {
                    let r = json!({"type": "report", "state": "receiving", "loss": 0.0});
                    if ws.send(tungstenite_text(&r)).await.is_err() {
                        counts.failures.fetch_add(1, Ordering::Relaxed);
                        return false;
                    }
                    counts.reports.fetch_add(1, Ordering::Relaxed);
                }
                next = ws.next() => match next {
                    Some(Ok(msg)) => {
                        if let Ok(v) = serde_json::from_str::<Value>(msg.to_text().unwrap_or(""))
                            && v["type"] == "error"
                        {
                            counts.error(&v);
                        }
                    }
                    Some(Err(_)) | None => {
                        counts.failures.fetch_add(1, Ordering::Relaxed);
                        return false;
                    }
                },
            }
        }
    }

    fn tungstenite_text(v: &Value) -> tokio_tungstenite::tungstenite::Message {
        tokio_tungstenite::tungstenite::Message::text(v.to_string())
    }

    /// The broadcaster: reports now and then until told to stop, then leaves.
    async fn session_loop(
        mut ws: Socket,
        every: Duration,
        mut stop: watch::Receiver<bool>,
        counts: Arc<Counts>,
    ) {
        let mut tick = tokio::time::interval(every);
        loop {
            tokio::select! {
                // It only ever changes to true.
                _ = stop.changed() => break,
                _ = tick.tick() => {
                    if send(&mut ws, &json!({"type": "ping"})).await.is_err() {
                        counts.failures.fetch_add(1, Ordering::Relaxed);
                        return;
                    }
                }
                next = ws.next() => match next {
                    Some(Ok(msg)) => {
                        if let Ok(v) = serde_json::from_str::<Value>(msg.to_text().unwrap_or(""))
                            && v["type"] == "error"
                        {
                            println!("the broadcaster got an error: {v}");
                        }
                    }
                    other => {
                        println!("the broadcaster's socket ended: {other:?}");
                        counts.failures.fetch_add(1, Ordering::Relaxed);
                        return;
                    }
                },
            }
        }
        let _ = send(&mut ws, &json!({"type": "leave"})).await;
        let _ = ws.close(None).await;
    }

    /// The server's gauges from `/metrics`.
    struct Gauges {
        connections: f64,
        peers: f64,
        rooms: f64,
    }

    async fn metrics(authority: &str) -> Gauges {
        let body = match http(authority, "GET", "/metrics").await {
            Ok((200, body)) => body,
            _ => String::new(),
        };
        let gauge = |name: &str| {
            body.lines()
                .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
                .unwrap_or(f64::NAN)
        };
        Gauges {
            connections: gauge("treecast_connections"),
            peers: gauge("treecast_peers"),
            rooms: gauge("treecast_rooms"),
        }
    }

    /// Resident memory of a process, KiB.
    fn rss_kib(pid: u32) -> Option<u64> {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))?
            .split_whitespace()
            .next()?
            .parse()
            .ok()
    }
}
