//! The binary's flags laid over a configuration file, checked from the outside: what a
//! client is told in `welcome`.

mod common;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};

use common::Client;

/// A signaller process, killed when dropped (also when an assertion fails).
struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Writes `toml` to a file of its own and starts the binary on it with `extra` flags.
fn start(name: &str, toml: &str, extra: &[&str]) -> (Server, Option<SocketAddr>) {
    let dir = std::env::temp_dir().join(format!("treecast-flags-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("treecast.toml");
    std::fs::write(&file, toml).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_treecast-signaller"))
        .arg("--config")
        .arg(&file)
        .args(["--bind", "127.0.0.1:0", "--stun-port", "0", "--log", "info"])
        .args(extra)
        .env_remove("TREECAST_CONFIG")
        .env_remove("TREECAST_ICE_SERVERS")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = BufReader::new(child.stdout.take().unwrap());
    // The address is logged once it listens; a refused configuration ends the process.
    let addr = stdout.lines().map_while(Result::ok).find_map(|line| {
        let rest = line.split("listening on http://").nth(1)?;
        rest.split_whitespace().next()?.parse().ok()
    });
    // The file is read before the server listens, or never.
    let _ = std::fs::remove_dir_all(&dir);
    (Server(child), addr)
}

const FILE_WITH_ICE: &str = r#"
[[room.ice_servers]]
urls = ["stun:stun.example.org:3478"]
"#;

async fn welcome_ice_servers(addr: SocketAddr) -> serde_json::Value {
    let (room, _) = common::create_room(addr).await;
    let mut viewer = Client::connect(addr).await;
    viewer
        .send_json(&serde_json::json!({"type": "hello", "room": room, "role": "viewer"}))
        .await;
    viewer.expect_welcome().await["ice_servers"].clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ice_server_none_empties_the_list_the_file_filled() {
    let (_server, addr) = start("file", FILE_WITH_ICE, &[]);
    let listed = welcome_ice_servers(addr.expect("the server starts")).await;
    assert_eq!(
        listed[0]["urls"][0], "stun:stun.example.org:3478",
        "{listed}"
    );

    let (_server, addr) = start("none", FILE_WITH_ICE, &["--ice-server", "none"]);
    let listed = welcome_ice_servers(addr.expect("the server starts")).await;
    assert_eq!(listed, serde_json::json!([]), "{listed}");
}

#[test]
fn ice_server_none_with_urls_is_refused_with_a_reason() {
    let (mut server, addr) = start(
        "mixed",
        FILE_WITH_ICE,
        &[
            "--ice-server",
            "none",
            "--ice-server",
            "stun:other.example.org",
        ],
    );
    assert!(addr.is_none(), "the server started");
    let status = server.0.wait().unwrap();
    assert!(!status.success());
    let mut err = String::new();
    std::io::Read::read_to_string(server.0.stderr.as_mut().unwrap(), &mut err).unwrap();
    assert!(err.contains("--ice-server none"), "{err}");
}
