//! NAT traversal end to end, in the namespace test bed (`tests/netbed`): native peers as
//! separate processes behind cone, full-cone and symmetric NATs and on the public network,
//! coturn as STUN and TURN server, the signaller minting TURN credentials per peer.
//!
//! A second test puts a headless Chromium viewer behind a symmetric NAT.
//!
//! Needs root, network namespaces, iproute2, iptables and coturn (the browser test also
//! Chromium, Node.js and the built client), so these are ignored by a plain `cargo test`;
//! scripts/test runs them as root:
//! `cargo test -p treecast-peer --test nat -- --ignored --nocapture`.

mod netbed;

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use netbed::{FULL_CONE_PORTS, Netbed, SERVER_IP, SIGNALLER_PORT, Site, TURN_PORT};
use serde_json::Value;
use treecast_core::protocol::IceServer;
use treecast_core::turn::{Secret, TurnRest};

/// Longest wait for anything that should happen.
const LIVENESS: Duration = Duration::from_secs(60);
const TURN_SECRET: &str = "netbed-shared-secret";
const STREAM_KBPS: u32 = 150;

/// The room, in join order (broadcaster first). Placement is the room's choice, but the
/// broadcaster's two slots go to the first two viewers: a symmetric one (relayed from the
/// cone broadcaster) and a full-cone one (direct), so both kinds of link always occur; the
/// rest spreads relays and children over every kind of site.
const ROOM: [(&str, Site); 12] = [
    ("b-cone", Site::Cone),
    ("v1-sym", Site::Symmetric),
    ("v2-full", Site::FullCone),
    ("v3-cone", Site::Cone),
    ("v4-sym", Site::Symmetric),
    ("v5-pub", Site::Public),
    ("v6-sym", Site::Symmetric),
    ("v7-sym", Site::Symmetric),
    ("v8-cone", Site::Cone),
    ("v9-pub", Site::Public),
    ("v10-sym", Site::Symmetric),
    ("v11-full", Site::FullCone),
];

struct Member {
    name: &'static str,
    site: Site,
}

/// Every viewer receives; every link is of the kind the hole-punching matrix predicts for
/// its two ends' sites (through TURN exactly when neither end can be reached directly),
/// as both ends and the room's snapshot report it.
#[test]
#[ignore = "needs root and network namespaces: scripts/test runs it"]
fn every_viewer_receives_and_turn_carries_only_what_hole_punching_cannot() {
    let (relayed, links) = run_room(&ROOM);
    assert!(
        relayed > 0 && relayed < links,
        "the room should have relayed and direct links ({relayed} of {links} relayed)"
    );
}

/// Starts the bed, coturn, the signaller and `room` (joined one by one, in order), waits
/// until every viewer receives and every link's kind is known, checks each link against
/// the matrix, prints the numbers, and returns how many links go through TURN, of how many.
fn run_room(room_plan: &[(&'static str, Site)]) -> (usize, usize) {
    let started = Instant::now();
    let mut bed = Netbed::new();
    bed.start_coturn(TURN_SECRET);
    let signaller = bed.start_signaller(signaller_config());
    let (room, token) = create_room(&bed, signaller);
    let mut members = Vec::new();
    for (i, &(name, site)) in room_plan.iter().enumerate() {
        let token = (i == 0).then_some(token.as_str());
        spawn_native(&mut bed, signaller, &room, token, name, site);
        members.push(Member { name, site });
        // One at a time, so the room places them in this order.
        let placed = |s: &Value| {
            if i == 0 {
                s["peer"].is_u64()
            } else {
                s["parent"].is_u64()
            }
        };
        wait_for(&bed, &format!("{name} to join and be placed"), |bed| {
            bed.process(name)
                .and_then(|p| p.latest())
                .is_some_and(|s| placed(&s))
        });
    }
    let joined = started.elapsed();

    // Every viewer receives, and keeps receiving.
    wait_for(&bed, "every viewer's first packet", |bed| {
        viewers(&members).all(|m| received(bed, m.name) > 0)
    });
    let before: BTreeMap<&str, u64> = viewers(&members)
        .map(|m| (m.name, received(&bed, m.name)))
        .collect();
    wait_for(&bed, "every viewer's packet count to advance", |bed| {
        viewers(&members).all(|m| received(bed, m.name) > before[m.name])
    });

    // Every link has a selected pair, seen from both ends and in the room's snapshot.
    wait_for(&bed, "every link's candidate-pair type", |bed| {
        let statuses = bed.statuses();
        let snapshot = snapshot(bed, signaller, &room);
        viewers(&members).all(|m| {
            let s = &statuses[m.name];
            let parent = s["parent"].as_u64();
            let parent_view = parent.and_then(|p| {
                let parent_status = statuses.values().find(|v| v["peer"].as_u64() == Some(p))?;
                parent_status["links"][s["peer"].as_u64()?.to_string()].as_str()
            });
            let in_snapshot = snapshot_peer(&snapshot, s["peer"].as_u64())
                .is_some_and(|p| p["link"].is_string() && p["parent"].as_u64() == parent);
            s["link"].is_string() && parent_view.is_some() && in_snapshot
        })
    });
    let statuses = bed.statuses();
    let snapshot = snapshot(&bed, signaller, &room);
    let site_of_peer: BTreeMap<u64, (&str, Site)> = members
        .iter()
        .filter_map(|m| Some((statuses[m.name]["peer"].as_u64()?, (m.name, m.site))))
        .collect();

    let mut rows = Vec::new();
    let mut wrong = Vec::new();
    let mut relayed = 0;
    for m in viewers(&members) {
        let s = &statuses[m.name];
        let me = s["peer"].as_u64().expect("a joined viewer has an id");
        let parent = s["parent"].as_u64().expect("a placed viewer has a parent");
        let (parent_name, parent_site) = site_of_peer[&parent];
        let child_view = s["link"].as_str().unwrap_or("?");
        let parent_status = &statuses[parent_name];
        let parent_view = parent_status["links"][me.to_string()]
            .as_str()
            .unwrap_or("?");
        let room_view = snapshot_peer(&snapshot, Some(me))
            .and_then(|p| p["link"].as_str())
            .unwrap_or("?");
        let expect_relay = m.site.needs_relay_with(parent_site);
        // A relayed link is relayed from both ends' point of view: the end with the relay
        // candidate knows for sure, the other sees the relay's address.
        let views = [child_view, parent_view, room_view];
        let ok = if expect_relay {
            views.iter().all(|v| *v == "relay")
        } else {
            views
                .iter()
                .all(|v| matches!(*v, "host" | "srflx" | "prflx"))
        };
        if views.contains(&"relay") {
            relayed += 1;
        }
        let row = format!(
            "{parent_name:>9} ({:>9}) -> {:<9} ({:>9}): child sees {child_view:<5}, parent sees \
             {parent_view:<5}, room shows {room_view:<5}; expected {}",
            parent_site.name(),
            m.name,
            m.site.name(),
            if expect_relay { "relay" } else { "direct" }
        );
        if !ok {
            wrong.push(row.clone());
        }
        rows.push(row);
    }
    println!("links (parent -> child):\n  {}", rows.join("\n  "));

    // Join (process start) to first packet, per site of the viewer and per kind of its link.
    let mut by_site: BTreeMap<&str, Vec<u64>> = BTreeMap::new();
    let mut by_link: BTreeMap<&str, Vec<u64>> = BTreeMap::new();
    for m in viewers(&members) {
        let s = &statuses[m.name];
        if let Some(ms) = s["first_packet_ms"].as_u64() {
            by_site.entry(m.site.name()).or_default().push(ms);
            let link = s["link"].as_str().unwrap_or("?");
            by_link.entry(link).or_default().push(ms);
        }
    }
    for (what, groups) in [("site", by_site), ("link", by_link)] {
        println!("join to first packet, per {what}:");
        for (group, mut times) in groups {
            times.sort_unstable();
            println!(
                "  {group:<9}: median {} ms, max {} ms, all {times:?}",
                times[times.len() / 2],
                times[times.len() - 1]
            );
        }
    }
    let links = members.len() - 1;
    println!(
        "links through TURN: {relayed} of {links} ({:.0} %); every peer placed after {:.1} s, \
         test done after {:.1} s",
        100.0 * relayed as f64 / links as f64,
        joined.as_secs_f64(),
        started.elapsed().as_secs_f64()
    );
    assert!(
        wrong.is_empty(),
        "links not of the kind the hole-punching matrix predicts:\n  {}",
        wrong.join("\n  ")
    );
    // The signaller counts the links its peers report, by kind (the counter is process-wide:
    // other tests' rooms in this process may add to it, never take away).
    let (status, metrics) = get(&bed, signaller, "/metrics");
    assert_eq!(status, 200, "{metrics}");
    let counted = |kind: &str| -> u64 {
        let series = format!("treecast_links_total{{kind=\"{kind}\"}} ");
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(series.as_str()))
            .and_then(|v| v.trim().parse::<f64>().ok())
            .map_or(0, |v| v as u64)
    };
    let counted_relayed = counted("relay");
    let counted_direct: u64 = ["host", "srflx", "prflx"].into_iter().map(counted).sum();
    println!("treecast_links_total: relay {counted_relayed}, direct {counted_direct}");
    assert!(
        counted_relayed >= relayed as u64 && counted_direct >= (links - relayed) as u64,
        "/metrics counts fewer links than the room has: relay {counted_relayed} (room: \
         {relayed}), direct {counted_direct} (room: {})",
        links - relayed
    );
    (relayed, links)
}

fn viewers(members: &[Member]) -> impl Iterator<Item = &Member> {
    members.iter().skip(1)
}

fn received(bed: &Netbed, name: &str) -> u64 {
    bed.process(name)
        .and_then(|p| p.latest())
        .and_then(|s| s["received"].as_u64())
        .unwrap_or(0)
}

/// Root and relay fan-out 2, STUN and TURN on coturn.
fn signaller_config() -> treecast_signaller::Config {
    let mut config = treecast_signaller::Config::default();
    config.limits.max_connections_per_ip = 10_000;
    config.limits.room_creation_burst = 1_000;
    config.room.root_fanout = 2;
    config.room.relay_fanout = 2;
    config.room.stream_kbps = STREAM_KBPS;
    config.room.ice_servers = vec![IceServer {
        urls: vec![format!("stun:{SERVER_IP}:{TURN_PORT}")],
        username: None,
        credential: None,
    }];
    config.room.turn = Some(TurnRest {
        urls: vec![format!("turn:{SERVER_IP}:{TURN_PORT}?transport=udp")],
        secret: Secret::new(TURN_SECRET),
        ttl: Duration::from_secs(600),
    });
    config
}

/// One REST request to the signaller, from inside the public namespace.
fn request(bed: &Netbed, signaller: std::net::SocketAddr, method: &str, path: &str) -> Value {
    let (method_owned, path_owned) = (method.to_owned(), path.to_owned());
    let response = bed.in_public(async move {
        treecast_signaller::client::request(
            &signaller.to_string(),
            &method_owned,
            &path_owned,
            None,
            LIVENESS,
        )
        .await
    });
    let r = response.unwrap_or_else(|e| panic!("{method} {path}: {e}"));
    assert!(
        (200..300).contains(&r.status),
        "{method} {path}: {} {}",
        r.status,
        r.body
    );
    r.json()
        .unwrap_or_else(|e| panic!("{method} {path}: not JSON ({e}): {}", r.body))
}

fn create_room(bed: &Netbed, signaller: std::net::SocketAddr) -> (String, String) {
    assert_eq!(signaller.port(), SIGNALLER_PORT);
    let created = request(bed, signaller, "POST", "/api/rooms");
    (
        created["room"].as_str().expect("a room id").to_owned(),
        created["token"].as_str().expect("a token").to_owned(),
    )
}

fn snapshot(bed: &Netbed, signaller: std::net::SocketAddr, room: &str) -> Value {
    request(bed, signaller, "GET", &format!("/api/rooms/{room}"))
}

fn snapshot_peer(snapshot: &Value, id: Option<u64>) -> Option<&Value> {
    let id = id?;
    snapshot["peers"]
        .as_array()?
        .iter()
        .find(|p| p["id"].as_u64() == Some(id))
}

/// Polls `done` until it holds; fails after [`LIVENESS`] with every process's log tail.
fn wait_for(bed: &Netbed, what: &str, mut done: impl FnMut(&Netbed) -> bool) {
    let deadline = Instant::now() + LIVENESS;
    while !done(bed) {
        assert!(
            Instant::now() < deadline,
            "timed out after {LIVENESS:?} waiting for {what}; statuses: {:#?}{}",
            bed.statuses(),
            bed.tails(15)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A headless Chromium viewer behind a symmetric NAT receives from a native broadcaster
/// behind a cone NAT: the link can only go through TURN (coturn, credentials minted by the
/// room). The synthetic stream does not decode, so it counts RTP packets and bytes from
/// `getStats`, and reads the selected candidate pair's types there.
///
/// Needs what the browser tests need (Chromium, Node.js, `npm ci` in tests/browser, the
/// client built into `web/pkg` before this crate's signaller dependency was compiled);
/// scripts/test runs it after the browser tests.
#[test]
#[ignore = "needs root, network namespaces, Chromium and the built web client: scripts/test runs it"]
fn a_browser_behind_a_symmetric_nat_receives_through_turn() {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let script = repo.join("tests/browser/netns-viewer.mjs");
    for (tool, install) in [("node", "nodejs"), ("chromium", "chromium")] {
        assert!(
            netbed::on_path(tool),
            "this test needs `{tool}`: install the Debian package `{install}`"
        );
    }
    assert!(
        repo.join("tests/browser/node_modules/playwright-core")
            .is_dir(),
        "this test needs playwright-core: run `npm ci` in tests/browser"
    );
    let mut bed = Netbed::new();
    bed.start_coturn(TURN_SECRET);
    let signaller = bed.start_signaller(signaller_config());
    let (client, _) = get(&bed, signaller, "/assets/pkg/treecast_client_bg.wasm");
    assert_eq!(
        client, 200,
        "the signaller has no browser client: run scripts/build-client, then run this again \
         (the signaller embeds web/ when it is compiled)"
    );
    let (room, token) = create_room(&bed, signaller);
    spawn_native(
        &mut bed,
        signaller,
        &room,
        Some(&token),
        "broadcaster",
        Site::Cone,
    );
    wait_for(&bed, "the broadcaster to join", |bed| {
        bed.process("broadcaster")
            .and_then(|p| p.latest())
            .is_some_and(|s| s["peer"].is_u64())
    });

    let viewer = bed.host(Site::Symmetric);
    let url = format!("http://{signaller}/watch/{room}");
    let args = [script.display().to_string(), url];
    // Chromium's profile goes under the bed's directory, which goes with the bed.
    let tmp = bed.dir.display().to_string();
    bed.spawn(
        "browser",
        &viewer.ns,
        Path::new("node"),
        &args,
        &[("TMPDIR", &tmp)],
        true,
    );
    let status = |bed: &Netbed| bed.process("browser").and_then(|p| p.latest());
    wait_for(&bed, "the browser's first packets", |bed| {
        status(bed).is_some_and(|s| s["packets"].as_u64() > Some(0))
    });
    let first = status(&bed).expect("a status line");
    wait_for(&bed, "the browser's packet count to advance", |bed| {
        status(bed).is_some_and(|s| s["packets"].as_u64() > first["packets"].as_u64())
    });
    let last = status(&bed).expect("a status line");
    println!(
        "browser behind a symmetric NAT: first packets after {} ms (page start), \
         selected pair {} / {}, {} packets and {} bytes so far",
        first["ms"], last["local"], last["remote"], last["packets"], last["bytes"]
    );
    let pair = [last["local"].as_str(), last["remote"].as_str()];
    assert!(
        pair.contains(&Some("relay")),
        "a symmetric NAT below a cone NAT can only be reached through TURN, yet the browser \
         selected {pair:?}"
    );
}

/// A GET to the signaller from inside the public namespace: status and body.
fn get(bed: &Netbed, signaller: std::net::SocketAddr, path: &str) -> (u16, String) {
    let path_owned = path.to_owned();
    let r = bed
        .in_public(async move {
            treecast_signaller::client::request(
                &signaller.to_string(),
                "GET",
                &path_owned,
                None,
                LIVENESS,
            )
            .await
        })
        .unwrap_or_else(|e| panic!("GET {path}: {e}"));
    (r.status, r.body)
}

/// Without TURN, a viewer behind a symmetric NAT placed below a cone-NAT broadcaster has
/// no path to it: its ICE fails, it reports `link_failed`, and the room moves it below the
/// viewer on the public network, which it can reach.
#[test]
#[ignore = "needs root and network namespaces: scripts/test runs it"]
fn without_turn_an_unreachable_parent_is_reported_and_the_viewer_moves() {
    let mut bed = Netbed::new();
    bed.start_coturn(TURN_SECRET);
    let mut config = signaller_config();
    config.room.turn = None;
    let signaller = bed.start_signaller(config);
    let (room, token) = create_room(&bed, signaller);
    spawn_native(
        &mut bed,
        signaller,
        &room,
        Some(&token),
        "b-cone",
        Site::Cone,
    );
    wait_for(&bed, "the broadcaster to join", |bed| {
        latest(bed, "b-cone").is_some_and(|s| s["peer"].is_u64())
    });
    spawn_native(&mut bed, signaller, &room, None, "v1-pub", Site::Public);
    wait_for(&bed, "v1-pub's first packet", |bed| {
        latest(bed, "v1-pub").is_some_and(|s| s["received"].as_u64() > Some(0))
    });
    let public = latest(&bed, "v1-pub").expect("a status")["peer"].clone();
    let started = Instant::now();
    spawn_native(&mut bed, signaller, &room, None, "v2-sym", Site::Symmetric);
    // It joins below the broadcaster (a free root slot), fails there, and moves.
    wait_for(&bed, "v2-sym to receive from v1-pub", |bed| {
        latest(bed, "v2-sym")
            .is_some_and(|s| s["parent"] == public && s["received"].as_u64() > Some(0))
    });
    println!(
        "without TURN, symmetric below cone: receiving from the public viewer {:.1} s after \
         joining",
        started.elapsed().as_secs_f64()
    );
    // The room counted the failure (the counter is process-wide: other tests may add).
    let (status, metrics) = get(&bed, signaller, "/metrics");
    assert_eq!(status, 200, "{metrics}");
    let failures = metrics
        .lines()
        .find_map(|l| l.strip_prefix("treecast_ice_failures_total "))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .unwrap_or(0.0);
    assert!(failures >= 1.0, "no ICE failure counted: {metrics}");
}

/// Starts a native peer at a new host of `site`; the broadcaster when `token` is given.
/// Returns the host's namespace.
fn spawn_native(
    bed: &mut Netbed,
    signaller: std::net::SocketAddr,
    room: &str,
    token: Option<&str>,
    name: &str,
    site: Site,
) -> String {
    let host = bed.host(site);
    let mut args = vec![
        "--url".to_owned(),
        format!("ws://{signaller}/ws"),
        "--room".to_owned(),
        room.to_owned(),
        "--threads".to_owned(),
        "2".to_owned(),
        "--bind-ip".to_owned(),
        host.ip.to_string(),
        "--json".to_owned(),
    ];
    if site == Site::FullCone {
        args.push("--udp-ports".to_owned());
        args.push(format!(
            "{}-{}",
            FULL_CONE_PORTS.start(),
            FULL_CONE_PORTS.end()
        ));
    }
    match token {
        Some(token) => args.extend([
            "broadcast".to_owned(),
            "--token".to_owned(),
            token.to_owned(),
            "--kbps".to_owned(),
            STREAM_KBPS.to_string(),
        ]),
        None => args.push("view".to_owned()),
    }
    let log = std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".to_owned());
    let peer_bin = Path::new(env!("CARGO_BIN_EXE_treecast-peer"));
    bed.spawn(name, &host.ns, peer_bin, &args, &[("RUST_LOG", &log)], true);
    host.ns
}

/// A process's last status line.
fn latest(bed: &Netbed, name: &str) -> Option<Value> {
    bed.process(name).and_then(|p| p.latest())
}
