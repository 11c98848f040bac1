//! `treecast-peer`: one native peer (broadcaster or viewer), or many (`load`), against a
//! running signaller.

use std::time::Duration;

use clap::{Parser, Subcommand};
use treecast_peer::load::{self, LoadConfig};
use treecast_peer::{Peer, PeerConfig, Role};

#[derive(Parser)]
#[command(
    about = "Native treecast peer: broadcast a synthetic stream, view and relay it, or load-test"
)]
struct Cli {
    /// Signaller WebSocket URL.
    #[arg(long, default_value = "ws://127.0.0.1:8080/ws")]
    url: String,
    /// Room id (`load` creates one when absent).
    #[arg(long)]
    room: Option<String>,
    /// Tokio worker threads. More than the cores: a worker busy with one connection's
    /// crypto would otherwise leave other sockets unread (with 2 workers on 2 cores a
    /// relay with 50 children lost packets; 4 did not).
    #[arg(long, default_value_t = 4)]
    threads: usize,
    /// Address the media sockets bind (broadcast, view).
    #[arg(long, default_value = "127.0.0.1")]
    bind_ip: std::net::IpAddr,
    /// UDP ports the media sockets bind, one per connection, as `FIRST-LAST` (broadcast,
    /// view; default: any). For a host behind a router that forwards exactly these ports.
    #[arg(long, value_parser = parse_port_range)]
    udp_ports: Option<std::ops::RangeInclusive<u16>>,
    /// Uplink announced in `hello`, kbit/s (broadcast, view): the room gives the peer
    /// capacity = uplink × 80 % / its stream_kbps children, capped by its fan-out limit.
    #[arg(long)]
    uplink_kbps: Option<u32>,
    /// Print the status as one JSON object per line every second instead of a text line
    /// every two (broadcast, view).
    #[arg(long)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Broadcast a synthetic VP8-shaped RTP stream.
    Broadcast {
        /// Broadcaster token from `POST /api/rooms`.
        #[arg(long)]
        token: String,
        /// Stream bitrate in kbit/s.
        #[arg(long, default_value_t = 500)]
        kbps: u32,
    },
    /// View (and relay) the stream.
    View,
    /// Start a broadcaster and N viewers in this process, measure join time, latency per
    /// depth, per-hop delay, interruptions after relay deaths, CPU and memory, and print a
    /// report. Raise `ulimit -n` and the signaller's `--max-connections-per-ip` for large N.
    Load {
        /// Number of viewers.
        #[arg(long, default_value_t = 50)]
        peers: usize,
        /// Delay between joins, in ms.
        #[arg(long, default_value_t = 20)]
        join_every_ms: u64,
        /// Broadcaster token for `--room` (otherwise no broadcaster is started there).
        #[arg(long)]
        token: Option<String>,
        /// Stream bitrate in kbit/s.
        #[arg(long, default_value_t = 150)]
        kbps: u32,
        /// Stream frames per second.
        #[arg(long, default_value_t = 25)]
        fps: u32,
        /// Uplink the viewers announce, kbit/s (capacity = uplink × 80 % / the signaller's
        /// stream_kbps, capped by its fan-out limit).
        #[arg(long)]
        uplink_kbps: Option<u32>,
        /// Steady measurement window, s.
        #[arg(long, default_value_t = 10)]
        measure_secs: u64,
        /// Relays to kill abruptly, one after another.
        #[arg(long, default_value_t = 3)]
        kills: usize,
        /// Longest wait for a dead relay's descendants to receive again, s.
        #[arg(long, default_value_t = 15)]
        recovery_bound_secs: u64,
        /// Pause between a recovery and the next death, s.
        #[arg(long, default_value_t = 4)]
        kill_gap_secs: u64,
        /// Longest wait for every viewer's first packet, s.
        #[arg(long, default_value_t = 120)]
        join_bound_secs: u64,
        /// Seed of the victim choice.
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Viewers' stall window at depth 1, ms (default: the peer's).
        #[arg(long)]
        stall_after_ms: Option<u64>,
        /// Viewers' extra stall window per level, ms (default: the peer's).
        #[arg(long)]
        stall_step_ms: Option<u64>,
        /// Use the signaller's STUN/TURN servers (off: loopback only).
        #[arg(long)]
        ice_servers: bool,
        /// Also write the report as JSON to this file.
        #[arg(long)]
        json: Option<std::path::PathBuf>,
    },
    /// Probe this host's NAT class against a STUN server with an alternate port (the
    /// signaller's) and print it as one JSON line:
    /// `{"nat":"cone","local":…,"mapped_primary":…,"mapped_alternate":…}`.
    NatProbe {
        /// The STUN server's primary address, e.g. 203.0.113.1:3478.
        #[arg(long)]
        server: std::net::SocketAddr,
        /// Its alternate address [default: the next port of the same IP].
        #[arg(long)]
        alternate: Option<std::net::SocketAddr>,
        /// Local address to probe from [default: the wildcard of the server's family].
        #[arg(long)]
        bind: Option<std::net::IpAddr>,
        /// Local port to probe from (0: any; a NAT test bed may forward one port).
        #[arg(long, default_value_t = 0)]
        port: u16,
        /// How long each test waits for its answer, ms.
        #[arg(long, default_value_t = 1500)]
        timeout_ms: u64,
    },
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // Logs on stderr: stdout carries the status lines and the load report.
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(cli.threads.max(1))
        .enable_all()
        .build()?
        .block_on(run(cli))
}

fn parse_port_range(s: &str) -> Result<std::ops::RangeInclusive<u16>, String> {
    let (first, last) = s.split_once('-').unwrap_or((s, s));
    let port = |p: &str| p.trim().parse::<u16>().map_err(|e| format!("{p:?}: {e}"));
    let (first, last) = (port(first)?, port(last)?);
    if first == 0 || last < first {
        return Err(format!(
            "{s:?} is not a port range FIRST-LAST with 0 < FIRST <= LAST"
        ));
    }
    Ok(first..=last)
}

async fn run(cli: Cli) -> Result<(), Box<dyn std::error::Error>> {
    let room = || cli.room.clone().ok_or("--room is required");
    let config = |role| -> Result<PeerConfig, Box<dyn std::error::Error>> {
        let mut c = PeerConfig::new(&cli.url, room()?, role);
        c.bind_ip = cli.bind_ip;
        c.udp_ports = cli.udp_ports.clone();
        c.uplink_kbps = cli.uplink_kbps;
        Ok(c)
    };
    let peer = match cli.command {
        Command::Broadcast { ref token, kbps } => {
            let mut c = config(Role::Broadcaster)?;
            c.token = Some(token.clone());
            c.stream_kbps = kbps;
            Peer::start(c)?
        }
        Command::View => Peer::start(config(Role::Viewer)?)?,
        Command::Load {
            peers,
            join_every_ms,
            token,
            kbps,
            fps,
            uplink_kbps,
            measure_secs,
            kills,
            recovery_bound_secs,
            kill_gap_secs,
            join_bound_secs,
            seed,
            stall_after_ms,
            stall_step_ms,
            ice_servers,
            json,
        } => {
            let mut c = LoadConfig::new(&cli.url);
            c.room = cli.room.clone();
            c.token = token;
            c.peers = peers;
            c.join_every = Duration::from_millis(join_every_ms);
            c.stream_kbps = kbps;
            c.fps = fps;
            c.uplink_kbps = uplink_kbps;
            c.measure = Duration::from_secs(measure_secs);
            c.kills = kills;
            c.recovery_bound = Duration::from_secs(recovery_bound_secs);
            c.kill_gap = Duration::from_secs(kill_gap_secs);
            c.join_bound = Duration::from_secs(join_bound_secs);
            c.seed = seed;
            c.stall_after = stall_after_ms.map(Duration::from_millis);
            c.stall_step_per_depth = stall_step_ms.map(Duration::from_millis);
            c.use_ice_servers = ice_servers;
            let report = load::run(c).await?;
            print!("{}", report.table());
            if let Some(path) = json {
                std::fs::write(&path, serde_json::to_string_pretty(&report)?)?;
            }
            return Ok(());
        }
        Command::NatProbe {
            server,
            alternate,
            bind,
            port,
            timeout_ms,
        } => return nat_probe(server, alternate, bind, port, timeout_ms).await,
    };
    let mut every = tokio::time::interval(Duration::from_secs(if cli.json { 1 } else { 2 }));
    loop {
        tokio::select! {
            _ = every.tick() => {
                if cli.json {
                    println!("{}", status_json(&peer));
                    continue;
                }
                let s = peer.status();
                let received = peer.stats().packets_received.load(std::sync::atomic::Ordering::Relaxed);
                let p50 = peer.stats().latency_quantile(0.5).unwrap_or(0);
                println!("depth {:?} children {} received {received} latency p50 {p50} µs", s.depth, s.children.len());
            }
            _ = tokio::signal::ctrl_c() => break,
        }
    }
    peer.leave().await;
    Ok(())
}

/// `nat-probe`: one probe, printed as a JSON line.
async fn nat_probe(
    server: std::net::SocketAddr,
    alternate: Option<std::net::SocketAddr>,
    bind: Option<std::net::IpAddr>,
    port: u16,
    timeout_ms: u64,
) -> Result<(), Box<dyn std::error::Error>> {
    let alternate = match alternate {
        Some(a) => a,
        None => std::net::SocketAddr::new(
            server.ip(),
            server
                .port()
                .checked_add(1)
                .ok_or("no port after --server's")?,
        ),
    };
    let bind = bind.unwrap_or(if server.is_ipv4() {
        std::net::Ipv4Addr::UNSPECIFIED.into()
    } else {
        std::net::Ipv6Addr::UNSPECIFIED.into()
    });
    let probed = treecast_peer::nat::probe(
        std::net::SocketAddr::new(bind, port),
        server,
        alternate,
        Duration::from_millis(timeout_ms),
    )
    .await?;
    let addr = |a: Option<std::net::SocketAddr>| a.map(|a| a.to_string());
    println!(
        "{}",
        serde_json::json!({
            "nat": probed.nat,
            "local": probed.local.to_string(),
            "mapped_primary": addr(probed.mapped_primary),
            "mapped_alternate": addr(probed.mapped_alternate),
        })
    );
    Ok(())
}

/// One machine-readable status line: the agent's view (peer id, phase, depth, parent,
/// children), media counters, failed parent links, the NAT probe's class, and the candidate-pair type of the link to the parent and of
/// every open connection.
fn status_json(peer: &Peer) -> serde_json::Value {
    use std::sync::atomic::Ordering::Relaxed;
    let s = peer.status();
    let stats = peer.stats();
    let since_start_ms = |us: u64| {
        let started = stats.started_us.load(Relaxed);
        (us > 0).then(|| us.saturating_sub(started) / 1000)
    };
    let links: std::collections::BTreeMap<String, &str> = stats
        .links
        .lock()
        .map(|l| l.iter().map(|(p, k)| (p.to_string(), k.as_str())).collect())
        .unwrap_or_default();
    let parent_link = s.parent.and_then(|p| links.get(&p.0.to_string()).copied());
    serde_json::json!({
        "peer": s.peer_id.map(|p| p.0),
        "phase": format!("{:?}", s.phase).to_lowercase(),
        "depth": s.depth,
        "parent": s.parent.map(|p| p.0),
        "children": s.children.iter().map(|p| p.0).collect::<Vec<_>>(),
        "received": stats.packets_received.load(Relaxed),
        "bytes": stats.bytes_received.load(Relaxed),
        "links_failed": stats.links_failed.load(Relaxed),
        "nat": stats.nat_probe.lock().ok().and_then(|p| p.as_ref().map(|p| p.nat)),
        "sent": stats.packets_sent.load(Relaxed),
        "first_packet_ms": since_start_ms(stats.first_packet_us.load(Relaxed)),
        "longest_gap_ms": stats.longest_gap_us.load(Relaxed) / 1000,
        "link": parent_link,
        "links": links,
    })
}
