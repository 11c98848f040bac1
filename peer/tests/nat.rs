//! NAT traversal end to end, in the namespace test bed (`tests/netbed`): native peers as
//! separate processes behind cone, full-cone and symmetric NATs and on the public network,
//! coturn as STUN and TURN server, the signaller minting TURN credentials per peer.
//!
//! A second test puts a headless Chromium viewer behind a symmetric NAT; a third runs
//! without TURN and checks that a failed link moves the viewer. Two more use the
//! signaller's embedded STUN server (so peers probe their NAT class) and no TURN: one checks
//! that placement alone serves every viewer some free parent can reach and tells the
//! others `no_route`, one caps a relay's uplink with `tc` and checks that the room sheds a
//! child and media recovers.
//!
//! Needs root, network namespaces, iproute2 (`ip`, `tc`), iptables and coturn (the
//! browser test also Chromium, Node.js and the built client), so these are ignored by a
//! plain `cargo test`; scripts/test runs them as root:
//! `cargo test -p treecast-peer --test nat -- --ignored --nocapture`.

mod netbed;

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use netbed::{FULL_CONE_PORTS, Host, Netbed, SERVER_IP, SIGNALLER_PORT, Site, TURN_PORT};
use serde_json::Value;
use treecast_core::protocol::IceServer;
use treecast_core::turn::{Secret, TurnRest};

/// Longest wait for anything that should happen.
const LIVENESS: Duration = Duration::from_secs(60);
const TURN_SECRET: &str = "netbed-shared-secret";
/// The operator secret: the signaller binds beyond loopback, so the room snapshots the
/// tests read need it (without one the server would write a generated secret to disk).
const ADMIN_SECRET: &str = "netbed-operator-secret";
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

    // Media bytes by kind of link: what each viewer received from its parent (payload
    // bytes; no viewer has moved yet, so each one's total came over its one link).
    let statuses = bed.statuses();
    let (mut relayed_bytes, mut all_bytes) = (0u64, 0u64);
    for m in viewers(&members) {
        let s = &statuses[m.name];
        let bytes = s["bytes"].as_u64().unwrap_or(0);
        all_bytes += bytes;
        if s["link"].as_str() == Some("relay") {
            relayed_bytes += bytes;
        }
    }
    println!(
        "media bytes through TURN: {relayed_bytes} of {all_bytes} ({:.0} %)",
        100.0 * relayed_bytes as f64 / all_bytes.max(1) as f64
    );

    kill_a_relay_behind_a_nat(&mut bed, &members);
    (relayed, links)
}

/// SIGKILLs a relay behind a NAT (a symmetric one if any) and measures how long each of
/// its children goes without packets: its longest gap between two packets, which the
/// death makes (steady state has gaps of a frame or two).
fn kill_a_relay_behind_a_nat(bed: &mut Netbed, members: &[Member]) {
    let statuses = bed.statuses();
    let relay = viewers(members)
        .filter(|m| m.site != Site::Public)
        .filter(|m| {
            statuses[m.name]["children"]
                .as_array()
                .is_some_and(|c| !c.is_empty())
        })
        .max_by_key(|m| m.site == Site::Symmetric)
        .expect("the room has a relay behind a NAT");
    let dead = statuses[relay.name]["peer"].clone();
    let children: Vec<&Member> = viewers(members)
        .filter(|m| statuses[m.name]["parent"] == dead)
        .collect();
    let started = Instant::now();
    bed.kill(relay.name);
    // A status line is printed every second: first one naming a new parent over a link
    // with a selected pair, then packets counted after that line.
    wait_for(
        bed,
        "the dead relay's children to get a new parent",
        |bed| {
            children.iter().all(|m| {
                latest(bed, m.name).is_some_and(|s| {
                    s["parent"] != dead && s["parent"].is_u64() && s["link"].is_string()
                })
            })
        },
    );
    let moved: BTreeMap<&str, u64> = children
        .iter()
        .map(|m| (m.name, received(bed, m.name)))
        .collect();
    wait_for(bed, "the dead relay's children to receive again", |bed| {
        children
            .iter()
            .all(|m| received(bed, m.name) > moved[m.name] + 5)
    });
    let waited = started.elapsed();
    let rows: Vec<String> = children
        .iter()
        .map(|m| {
            let s = latest(bed, m.name).expect("a status");
            format!(
                "{} ({}): {} ms without packets, now on a {} link",
                m.name,
                m.site.name(),
                s["longest_gap_ms"],
                s["link"].as_str().unwrap_or("?")
            )
        })
        .collect();
    println!(
        "killed relay {} ({}); its children receive again within {:.1} s (polled):\n  {}",
        relay.name,
        relay.site.name(),
        waited.as_secs_f64(),
        rows.join("\n  ")
    );
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
    config.access.admin_secret = Some(Secret::new(ADMIN_SECRET));
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
        treecast_signaller::client::request_with_auth(
            &signaller.to_string(),
            &method_owned,
            &path_owned,
            None,
            Some(ADMIN_SECRET),
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
            treecast_signaller::client::request_with_auth(
                &signaller.to_string(),
                "GET",
                &path_owned,
                None,
                Some(ADMIN_SECRET),
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
    spawn_peer(bed, signaller, room, token, name, site, None).ns
}

/// [`spawn_native`], announcing `uplink_kbps` when given (which sets the capacity the
/// room gives the peer). Returns the host.
fn spawn_peer(
    bed: &mut Netbed,
    signaller: std::net::SocketAddr,
    room: &str,
    token: Option<&str>,
    name: &str,
    site: Site,
    uplink_kbps: Option<u32>,
) -> Host {
    let host = bed.host(site);
    let mut args = vec![
        "--url".to_owned(),
        format!("ws://{signaller}/ws"),
        format!("--room={room}"),
        "--threads".to_owned(),
        "2".to_owned(),
        "--bind-ip".to_owned(),
        host.ip.to_string(),
        "--json".to_owned(),
    ];
    if let Some(kbps) = uplink_kbps {
        args.push("--uplink-kbps".to_owned());
        args.push(kbps.to_string());
    }
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
    host
}

/// A process's last status line.
fn latest(bed: &Netbed, name: &str) -> Option<Value> {
    bed.process(name).and_then(|p| p.latest())
}

/// Capacity from the uplink a peer announces, at [`STREAM_KBPS`] and the room's 80 %
/// usable share: 100 kbit/s → 0 children, 200 → 1, 400 → 2.
const UPLINK_LEAF: u32 = 100;
const UPLINK_ONE_CHILD: u32 = 200;
const UPLINK_TWO_CHILDREN: u32 = 400;

/// Root and relay fan-out 2, no TURN at all; with [`Netbed::start_signaller_with_stun`]
/// the only ICE server is the signaller's own STUN server, against which peers probe
/// their NAT class.
fn no_turn_config() -> treecast_signaller::Config {
    let mut config = signaller_config();
    config.room.turn = None;
    config.room.ice_servers = Vec::new();
    config
}

/// A process's peer in the room's snapshot.
fn room_peer(snapshot: &Value, bed: &Netbed, name: &str) -> Option<Value> {
    let id = latest(bed, name)?["peer"].as_u64();
    snapshot_peer(snapshot, id).cloned()
}

/// Joins `name` at a new host of `site` and waits until its NAT probe has run, checks the
/// class it found against the host's router, and waits until the room knows the class and
/// has either placed the peer or told it why it waits. Returns the host and how long the
/// probe took from the process's start (to its first status line showing the class).
fn join_and_probe(
    bed: &mut Netbed,
    signaller: std::net::SocketAddr,
    room: &str,
    token: Option<&str>,
    name: &str,
    site: Site,
    uplink_kbps: u32,
) -> (Host, Duration) {
    let started = Instant::now();
    let host = spawn_peer(bed, signaller, room, token, name, site, Some(uplink_kbps));
    wait_for(bed, &format!("{name}'s NAT probe"), |bed| {
        latest(bed, name).is_some_and(|s| s["nat"].is_string())
    });
    let probed = started.elapsed();
    let found = latest(bed, name).expect("a status")["nat"].clone();
    assert_eq!(
        found.as_str(),
        Some(site.nat_class()),
        "{name} sits behind a {} router, yet its NAT probe found {found}",
        site.name()
    );
    let broadcaster = token.is_some();
    wait_for(
        bed,
        &format!("the room to know {name}'s class and place it or say why not"),
        |bed| {
            let snapshot = snapshot(bed, signaller, room);
            room_peer(&snapshot, bed, name).is_some_and(|p| {
                p["nat"] == found
                    && (broadcaster || p["parent"].is_u64() || p["waiting"].is_string())
            })
        },
    );
    (host, probed)
}

/// Without TURN, placement alone decides who can receive: every viewer that some parent
/// with a free slot can reach directly (by the hole-punching matrix) is placed there and
/// receives, without a single failed ICE attempt; the others wait, and the room says why
/// (`waiting: "no_route"`). A full-cone relay joining later gives the waiting symmetric
/// viewer a parent it can reach; the blocked viewer (no UDP at all) keeps waiting. Every
/// peer's NAT probe against the signaller's STUN server finds its router's kind.
#[test]
#[ignore = "needs root and network namespaces: scripts/test runs it"]
fn without_turn_placement_serves_every_reachable_viewer_and_tells_the_others_why() {
    let started = Instant::now();
    let mut bed = Netbed::new();
    let signaller = bed.start_signaller_with_stun(no_turn_config());
    let (room, token) = create_room(&bed, signaller);
    // The broadcaster's two slots go to two relays; the symmetric relay's slots are of no
    // use to a cone or symmetric viewer, the cone relay's one slot only to a cone viewer.
    // v3-cone's best slots are equal in depth, and the symmetric relay's has more room:
    // only NAT-aware placement puts it below the cone relay.
    let plan = [
        ("b-pub", Site::Public, UPLINK_TWO_CHILDREN),
        ("r1-sym", Site::Symmetric, UPLINK_TWO_CHILDREN),
        ("r2-cone", Site::Cone, UPLINK_ONE_CHILD),
        ("v3-cone", Site::Cone, UPLINK_LEAF),
        ("v4-sym", Site::Symmetric, UPLINK_LEAF),
        ("v5-blocked", Site::Blocked, UPLINK_LEAF),
    ];
    let mut probes = Vec::new();
    for (i, &(name, site, uplink)) in plan.iter().enumerate() {
        let token = (i == 0).then_some(token.as_str());
        let (_, probed) = join_and_probe(&mut bed, signaller, &room, token, name, site, uplink);
        probes.push(format!(
            "{name}: {} in {} ms",
            site.nat_class(),
            probed.as_millis()
        ));
    }
    let id = |bed: &Netbed, name: &str| latest(bed, name).expect("a status")["peer"].clone();
    let parent_of = |snapshot: &Value, bed: &Netbed, name: &str| {
        room_peer(snapshot, bed, name).map_or(Value::Null, |p| p["parent"].clone())
    };
    let snap = snapshot(&bed, signaller, &room);
    assert_eq!(
        parent_of(&snap, &bed, "r1-sym"),
        id(&bed, "b-pub"),
        "{snap:#}"
    );
    assert_eq!(
        parent_of(&snap, &bed, "r2-cone"),
        id(&bed, "b-pub"),
        "{snap:#}"
    );
    assert_eq!(
        parent_of(&snap, &bed, "v3-cone"),
        id(&bed, "r2-cone"),
        "the cone viewer can reach the cone relay, not the symmetric one: {snap:#}"
    );
    let reachable = ["r1-sym", "r2-cone", "v3-cone"];
    wait_for(&bed, "every reachable viewer's first packet", |bed| {
        reachable.iter().all(|n| received(bed, n) > 0)
    });
    let before: BTreeMap<&str, u64> = reachable.iter().map(|n| (*n, received(&bed, n))).collect();
    wait_for(
        &bed,
        "every reachable viewer's packet count to advance",
        |bed| reachable.iter().all(|n| received(bed, n) > before[n]),
    );
    // The unreachable ones wait, and keep waiting (three status lines later, nothing came).
    std::thread::sleep(Duration::from_secs(3));
    let snap = snapshot(&bed, signaller, &room);
    for name in ["v4-sym", "v5-blocked"] {
        let p = room_peer(&snap, &bed, name).expect("in the room");
        assert!(
            p["parent"].is_null() && p["waiting"] == "no_route",
            "{name} has no parent it can reach, so it should wait with no_route: {p:#}"
        );
        assert_eq!(
            received(&bed, name),
            0,
            "{name} received media with no parent"
        );
    }

    // A full-cone relay: it reaches the symmetric relay's free slot, and the symmetric
    // viewer reaches it.
    let relay_joined = Instant::now();
    let (_, probed) = join_and_probe(
        &mut bed,
        signaller,
        &room,
        None,
        "r6-full",
        Site::FullCone,
        UPLINK_ONE_CHILD,
    );
    probes.push(format!("r6-full: full_cone in {} ms", probed.as_millis()));
    wait_for(&bed, "v4-sym to receive below the full-cone relay", |bed| {
        let r6 = latest(bed, "r6-full").map(|s| s["peer"].clone());
        latest(bed, "v4-sym")
            .is_some_and(|s| Some(&s["parent"]) == r6.as_ref() && s["received"].as_u64() > Some(0))
    });
    let unblocked = relay_joined.elapsed();
    let snap = snapshot(&bed, signaller, &room);
    assert_eq!(
        parent_of(&snap, &bed, "r6-full"),
        id(&bed, "r1-sym"),
        "{snap:#}"
    );
    let blocked = room_peer(&snap, &bed, "v5-blocked").expect("in the room");
    assert!(
        blocked["parent"].is_null() && blocked["waiting"] == "no_route",
        "nobody can reach a host without UDP: {blocked:#}"
    );
    assert_eq!(received(&bed, "v5-blocked"), 0);
    let receiving = ["r1-sym", "r2-cone", "v3-cone", "r6-full", "v4-sym"];
    let before: BTreeMap<&str, u64> = receiving.iter().map(|n| (*n, received(&bed, n))).collect();
    wait_for(
        &bed,
        "every placed viewer's packet count to advance",
        |bed| receiving.iter().all(|n| received(bed, n) > before[n]),
    );
    let failed: u64 = bed
        .statuses()
        .values()
        .filter_map(|s| s["links_failed"].as_u64())
        .sum();
    assert_eq!(
        failed, 0,
        "placement alone should need no failed ICE attempt"
    );
    println!(
        "NAT probes (process start to class known): {}",
        probes.join(", ")
    );
    println!(
        "without TURN: v4-sym waited with no_route, then received {:.1} s after a full-cone \
         relay joined; v5-blocked waits; no ICE failure; test done after {:.1} s",
        unblocked.as_secs_f64(),
        started.elapsed().as_secs_f64()
    );
}

/// Loss above this share of packets, in a child's report, counts against its parent
/// (the room's `loss_threshold`).
const LOSS_THRESHOLD: f64 = 0.05;

/// A relay whose uplink is capped (a token bucket on its host's egress) below what its two
/// children need: both report loss, the room lowers the relay's capacity to one and moves
/// one child to another parent, and both children then receive steadily with loss back
/// under the threshold.
#[test]
#[ignore = "needs root and network namespaces: scripts/test runs it"]
fn a_relay_with_a_capped_uplink_sheds_a_child_and_media_recovers() {
    let mut bed = Netbed::new();
    let signaller = bed.start_signaller_with_stun(no_turn_config());
    let (room, token) = create_room(&bed, signaller);
    // Both of the relay's children below it: the broadcaster's other slot is held by a
    // leaf while they join, and freed for the second relay afterwards.
    let plan = [
        ("b-pub", Site::Public, UPLINK_TWO_CHILDREN),
        ("r1-cone", Site::Cone, UPLINK_TWO_CHILDREN),
        ("filler", Site::Public, UPLINK_LEAF),
        ("v1-pub", Site::Public, UPLINK_LEAF),
        ("v2-pub", Site::Public, UPLINK_LEAF),
    ];
    let mut relay_host = None;
    for (i, &(name, site, uplink)) in plan.iter().enumerate() {
        let token = (i == 0).then_some(token.as_str());
        let (host, _) = join_and_probe(&mut bed, signaller, &room, token, name, site, uplink);
        if name == "r1-cone" {
            relay_host = Some(host);
        }
    }
    let relay_host = relay_host.expect("the relay joined");
    let id = |bed: &Netbed, name: &str| latest(bed, name).expect("a status")["peer"].clone();
    let r1 = id(&bed, "r1-cone");
    let children = ["v1-pub", "v2-pub"];
    let snap = snapshot(&bed, signaller, &room);
    for name in children {
        assert_eq!(
            room_peer(&snap, &bed, name).map(|p| p["parent"].clone()),
            Some(r1.clone()),
            "{name} should be below the relay: {snap:#}"
        );
    }
    bed.interrupt("filler");
    join_and_probe(
        &mut bed,
        signaller,
        &room,
        None,
        "r2-pub",
        Site::Public,
        UPLINK_ONE_CHILD,
    );
    let r2 = id(&bed, "r2-pub");
    let snap = snapshot(&bed, signaller, &room);
    assert_eq!(
        room_peer(&snap, &bed, "r2-pub").map(|p| p["parent"].clone()),
        Some(id(&bed, "b-pub")),
        "the second relay takes the freed slot: {snap:#}"
    );
    // Steady and clean before the cap: links older than the room's 3 s settle window.
    wait_for(&bed, "the relay's children to receive", |bed| {
        children.iter().all(|n| received(bed, n) > 0)
    });
    std::thread::sleep(Duration::from_secs(4));
    let loss_of = |snap: &Value, bed: &Netbed, name: &str| {
        room_peer(snap, bed, name).and_then(|p| p["loss"].as_f64())
    };
    let snap = snapshot(&bed, signaller, &room);
    for name in children {
        let loss = loss_of(&snap, &bed, name);
        assert!(
            loss.is_some_and(|l| l <= LOSS_THRESHOLD),
            "{name} should receive cleanly before the cap, reports loss {loss:?}"
        );
    }
    let gaps_before: Vec<String> = children
        .iter()
        .map(|n| {
            format!(
                "{n} {} ms",
                latest(&bed, n).expect("a status")["longest_gap_ms"]
            )
        })
        .collect();

    // Two streams need ~2 × 160 kbit/s with packet overhead; 260 fits one and a half.
    const CAP_KBIT: u32 = 260;
    bed.cap_uplink(&relay_host, CAP_KBIT);
    let capped = Instant::now();
    let (mut loss_seen, mut moved) = (None, None);
    wait_for(
        &bed,
        "a child's loss report and the relay's lower capacity",
        |bed| {
            let snap = snapshot(bed, signaller, &room);
            if loss_seen.is_none()
                && children
                    .iter()
                    .any(|n| loss_of(&snap, bed, n).is_some_and(|l| l > LOSS_THRESHOLD))
            {
                loss_seen = Some(capped.elapsed());
            }
            let capacity = room_peer(&snap, bed, "r1-cone").and_then(|p| p["capacity"].as_u64());
            let parents: Vec<Value> = children
                .iter()
                .map(|n| room_peer(&snap, bed, n).map_or(Value::Null, |p| p["parent"].clone()))
                .collect();
            let done = capacity.is_some_and(|c| c < 2) && parents.contains(&r2);
            if done {
                moved = Some(capped.elapsed());
            }
            done
        },
    );
    let moved = moved.expect("set when the wait ended");
    let loss_seen = loss_seen.unwrap_or(moved);
    let snap = snapshot(&bed, signaller, &room);
    let parents: Vec<Value> = children
        .iter()
        .map(|n| room_peer(&snap, &bed, n).map_or(Value::Null, |p| p["parent"].clone()))
        .collect();
    assert!(
        parents.contains(&r1) && parents.contains(&r2),
        "one child should stay below the capped relay and one move to the other: {snap:#}"
    );
    assert_eq!(
        room_peer(&snap, &bed, "r1-cone").and_then(|p| p["capacity"].as_u64()),
        Some(1),
        "the capped relay's capacity drops to one below its two children: {snap:#}"
    );

    // Recovered: both children's latest reports under the threshold, packets advancing.
    let mut recovered = None;
    wait_for(&bed, "both children to receive cleanly again", |bed| {
        let snap = snapshot(bed, signaller, &room);
        let clean = children
            .iter()
            .all(|n| loss_of(&snap, bed, n).is_some_and(|l| l <= LOSS_THRESHOLD));
        if clean && recovered.is_none() {
            recovered = Some((capped.elapsed(), children.map(|n| received(bed, n))));
        }
        if !clean {
            recovered = None;
        }
        // Clean for two seconds in a row, with packets arriving.
        recovered.as_ref().is_some_and(|(at, counts)| {
            capped.elapsed() > *at + Duration::from_secs(2)
                && children
                    .iter()
                    .zip(counts)
                    .all(|(n, c)| received(bed, n) > *c + 25)
        })
    });
    let (recovered_at, _) = recovered.expect("set when the wait ended");
    // And it stays so: steady for three more seconds, no further move.
    let counts = children.map(|n| received(&bed, n));
    std::thread::sleep(Duration::from_secs(3));
    let snap = snapshot(&bed, signaller, &room);
    for (n, c) in children.iter().zip(counts) {
        let now = received(&bed, n);
        assert!(now > c + 50, "{n} received {} packets in 3 s", now - c);
        let loss = loss_of(&snap, &bed, n);
        assert!(
            loss.is_some_and(|l| l <= LOSS_THRESHOLD),
            "{n} reports loss {loss:?} after the repair"
        );
    }
    let after: Vec<Value> = children
        .iter()
        .map(|n| room_peer(&snap, &bed, n).map_or(Value::Null, |p| p["parent"].clone()))
        .collect();
    assert_eq!(after, parents, "the children moved again: {snap:#}");
    let gaps_after: Vec<String> = children
        .iter()
        .map(|n| {
            format!(
                "{n} {} ms",
                latest(&bed, n).expect("a status")["longest_gap_ms"]
            )
        })
        .collect();
    println!(
        "relay uplink capped at {CAP_KBIT} kbit/s (two children of {STREAM_KBPS} kbit/s): \
         loss > 5 % in the room after {:.1} s, capacity lowered and a child moved after \
         {:.1} s, both children clean again after {:.1} s; longest packet gap per child \
         before: {}, after: {}",
        loss_seen.as_secs_f64(),
        moved.as_secs_f64(),
        recovered_at.as_secs_f64(),
        gaps_before.join(", "),
        gaps_after.join(", ")
    );
}
