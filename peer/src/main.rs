//! `treecast-peer`: one native peer (broadcaster or viewer), or many (`load`), against a
//! running signaller.

use std::time::Duration;

use clap::{Parser, Subcommand};
use treecast_peer::{Peer, PeerConfig, Role};

#[derive(Parser)]
#[command(about = "Native treecast peer: broadcast a synthetic stream, or view and relay it")]
struct Cli {
    /// Signaller WebSocket URL.
    #[arg(long, default_value = "ws://127.0.0.1:8080/ws")]
    url: String,
    /// Room id.
    #[arg(long)]
    room: String,
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
    /// Start N viewers in this process; every 2 s, print how many receive and the worst
    /// median latency (a first load mode: no percentile report yet).
    Load {
        /// Number of viewers.
        #[arg(long, default_value_t = 50)]
        peers: usize,
        /// Delay between joins, in ms.
        #[arg(long, default_value_t = 20)]
        join_every_ms: u64,
    },
}

#[tokio::main]
async fn main() -> Result<(), String> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .init();
    let cli = Cli::parse();
    let mut peers = Vec::new();
    match cli.command {
        Command::Broadcast { token, kbps } => {
            let mut c = PeerConfig::new(&cli.url, &cli.room, Role::Broadcaster);
            c.token = Some(token);
            c.stream_kbps = kbps;
            peers.push(Peer::start(c)?);
        }
        Command::View => peers.push(Peer::start(PeerConfig::new(
            &cli.url,
            &cli.room,
            Role::Viewer,
        ))?),
        Command::Load {
            peers: n,
            join_every_ms,
        } => {
            for _ in 0..n {
                peers.push(Peer::start(PeerConfig::new(
                    &cli.url,
                    &cli.room,
                    Role::Viewer,
                ))?);
                tokio::time::sleep(Duration::from_millis(join_every_ms)).await;
            }
        }
    }
    let mut every = tokio::time::interval(Duration::from_secs(2));
    loop {
        tokio::select! {
            _ = every.tick() => {
                let receiving = peers
                    .iter()
                    .filter(|p| p.stats().packets_received.load(std::sync::atomic::Ordering::Relaxed) > 0)
                    .count();
                let p50: Vec<u32> = peers.iter().filter_map(|p| p.stats().latency_quantile(0.5)).collect();
                let worst = p50.iter().max().copied().unwrap_or(0);
                println!("peers {} receiving {receiving} worst p50 latency {worst} us", peers.len());
            }
            _ = tokio::signal::ctrl_c() => break,
        }
    }
    for p in peers {
        p.leave().await;
    }
    Ok(())
}
