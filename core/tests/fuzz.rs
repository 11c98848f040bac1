//! Fuzzing on stable Rust: proptest's generators and shrinking, run again and again with
//! fresh seeds until a time budget is spent.
//!
//! - `decoder`: any text, and JSON shaped like client messages (right and wrong field
//!   names, types and ranges), through `ClientMessage::decode`: it never panics, and what
//!   it accepts encodes back to the same message.
//! - `room`: one room fed arbitrary input sequences from several connections, as a
//!   driver would deliver them (hellos on fresh connections, messages only from joined
//!   ones, time moving forward), with messages built from that same hostile JSON: after
//!   every input the tree's invariants hold and the room never addresses a connection it
//!   closed.
//!
//! `TREECAST_FUZZ_SECS` sets each target's budget (default 3 s, so `cargo test` stays
//! quick; scripts/test gives 60 s). `TREECAST_FUZZ_SEED` replays a run: every run prints
//! its seed, and a failure prints the smallest input that fails.

use std::collections::{BTreeSet, HashMap};
use std::time::{Duration, Instant};

use proptest::prelude::*;
use proptest::test_runner::{Config, RngAlgorithm, TestCaseError, TestRng, TestRunner};
use serde_json::{Map, Value, json};
use treecast_core::protocol::{CLIENT_TYPES, ClientMessage, EndReason, Hello, Role, ServerMessage};
use treecast_core::room::{ConnId, Input, Output, Room, RoomConfig};
use treecast_core::{PeerId, RoomId};

const TOKEN: &str = "fuzz-token";

fn budget() -> Duration {
    let secs = std::env::var("TREECAST_FUZZ_SECS")
        .ok()
        .and_then(|s| s.parse::<u64>().ok())
        .unwrap_or(3);
    Duration::from_secs(secs)
}

/// Runs `test` on values of `strategy` with new seeds until the budget is spent; panics
/// with the seed and the shrunk failing value on the first failure.
fn fuzz<S: Strategy>(name: &str, strategy: S, test: impl Fn(S::Value) -> Result<(), TestCaseError>)
where
    S::Value: std::fmt::Debug,
{
    let base: u64 = std::env::var("TREECAST_FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(1, |d| d.as_nanos() as u64)
        });
    let started = Instant::now();
    let (mut rounds, mut cases) = (0u64, 0u64);
    while rounds == 0 || started.elapsed() < budget() {
        let seed = base.wrapping_add(rounds);
        let mut bytes = [0u8; 32];
        bytes[..8].copy_from_slice(&seed.to_le_bytes());
        let config = Config {
            cases: 32,
            failure_persistence: None,
            ..Config::default()
        };
        let mut runner =
            TestRunner::new_with_rng(config, TestRng::from_seed(RngAlgorithm::ChaCha, &bytes));
        if let Err(e) = runner.run(&strategy, &test) {
            panic!("{name}: seed {seed} (TREECAST_FUZZ_SEED={seed} replays it): {e}");
        }
        rounds += 1;
        cases += 32;
    }
    eprintln!(
        "{name}: {cases} cases in {:.1} s, seeds {base}..{}",
        started.elapsed().as_secs_f64(),
        base.wrapping_add(rounds)
    );
}

/// Values of every JSON type, biased toward the edges of the protocol's ranges.
fn scalar() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        prop_oneof![
            Just(0i64),
            Just(1),
            Just(-1),
            Just(u32::MAX as i64),
            Just(u32::MAX as i64 + 1),
            Just((1i64 << 53) - 1),
            0i64..20,
        ]
        .prop_map(Value::from),
        prop_oneof![
            Just(0.5f64),
            Just(1.5),
            Just(-0.0),
            Just(1e300),
            any::<f64>()
        ]
        .prop_map(|f| serde_json::Number::from_f64(f).map_or(Value::Null, Value::Number)),
        prop_oneof![
            Just("r".to_owned()),
            Just(TOKEN.to_owned()),
            Just("viewer".to_owned()),
            Just("broadcaster".to_owned()),
            Just("receiving".to_owned()),
            Just("stalled".to_owned()),
            Just("connecting".to_owned()),
            Just("relay".to_owned()),
            Just("direct".to_owned()),
            Just("cone".to_owned()),
            Just("symmetric".to_owned()),
            ".{0,12}",
        ]
        .prop_map(Value::from),
    ]
}

const KEYS: &[&str] = &[
    "type",
    "v",
    "room",
    "role",
    "token",
    "uplink_kbps",
    "resume",
    "to",
    "data",
    "state",
    "loss",
    "latency_ms",
    "delivered",
    "peer",
    "kbps",
    "link",
    "nat",
    "relay",
    "linger",
    "mode",
    "link",
];

/// Every type a client may send, and one only the server sends.
fn message_type() -> impl Strategy<Value = &'static str> {
    prop::sample::select([&CLIENT_TYPES[..], &["pong"]].concat())
}

/// Arbitrary JSON with protocol-like keys, nested a little.
fn json_value() -> impl Strategy<Value = Value> {
    scalar().prop_recursive(3, 24, 5, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            prop::collection::vec((prop::sample::select(KEYS), inner), 0..5).prop_map(|kv| {
                Value::Object(kv.into_iter().map(|(k, v)| (k.to_owned(), v)).collect())
            }),
        ]
    })
}

/// A client message as JSON: mostly well-formed with one field wrong or missing, sometimes
/// anything at all.
fn message_json() -> impl Strategy<Value = Value> {
    let well_formed = prop_oneof![
        2 => Just(json!({"type": "ping"})),
        1 => Just(json!({"type": "leave"})),
        1 => Just(json!({"type": "leave", "linger": true})),
        4 => (0u64..12, json_value()).prop_map(|(to, data)| json!({"type": "signal", "to": to, "data": data})),
        6 => (
            prop::sample::select(&["connecting", "receiving", "stalled"][..]),
            prop::option::of(0.0f32..1.0),
            prop::option::of(0u32..5_000),
            prop::collection::vec((0u64..12, 0u32..5_000), 0..3),
        )
            .prop_map(|(state, loss, uplink, delivered)| {
                let mut r = json!({"type": "report", "state": state});
                if let Some(l) = loss {
                    r["loss"] = json!(l);
                }
                if let Some(u) = uplink {
                    r["uplink_kbps"] = json!(u);
                }
                if !delivered.is_empty() {
                    r["delivered"] = delivered
                        .into_iter()
                        .map(|(peer, kbps)| json!({"peer": peer, "kbps": kbps}))
                        .collect();
                }
                r
            }),
        2 => (
            prop::sample::select(&["public", "full_cone", "cone", "symmetric", "unknown"][..]),
            any::<bool>()
        )
            .prop_map(|(nat, relay)| json!({"type": "connectivity", "nat": nat, "relay": relay})),
        2 => (0u64..12).prop_map(|peer| json!({"type": "link_failed", "peer": peer})),
    ];
    let mutated = (
        well_formed.clone(),
        prop::sample::select(KEYS),
        prop::option::of(scalar()),
    )
        .prop_map(|(mut m, key, value)| {
            if let Value::Object(map) = &mut m {
                match value {
                    Some(v) => {
                        map.insert(key.to_owned(), v);
                    }
                    None => {
                        map.remove(key);
                    }
                }
            }
            m
        });
    let anything = (message_type(), json_value()).prop_map(|(ty, v)| {
        let mut map = match v {
            Value::Object(map) => map,
            other => Map::from_iter([("data".to_owned(), other)]),
        };
        map.insert("type".to_owned(), Value::from(ty));
        Value::Object(map)
    });
    prop_oneof![5 => well_formed, 3 => mutated, 2 => anything]
}

/// What the decoder must survive: any text, JSON of the wrong shape, deep nesting.
fn decoder_input() -> impl Strategy<Value = String> {
    prop_oneof![
        ".{0,64}",
        message_json().prop_map(|v| v.to_string()),
        json_value().prop_map(|v| v.to_string()),
        (message_json(), 0usize..200).prop_map(|(v, n)| {
            // Cut short at a char boundary: half-sent frames.
            let text = v.to_string();
            let cut = text
                .char_indices()
                .map(|(i, _)| i)
                .nth(n)
                .unwrap_or(text.len());
            text[..cut].to_owned()
        }),
        (100usize..300).prop_map(|n| format!(
            r#"{{"type":"signal","to":1,"data":{}0{}}}"#,
            "[".repeat(n),
            "]".repeat(n)
        )),
    ]
}

#[test]
fn decoder() {
    fuzz("decoder", decoder_input(), |text| {
        if let Ok(msg) = ClientMessage::decode(&text) {
            // A loss too large for an f32 decodes as infinity, which JSON cannot carry
            // back; the room refuses any loss outside 0..=1 (`invalid_field`).
            if let ClientMessage::Report(r) = &msg
                && r.loss.is_some_and(|l| !(0.0..=1.0).contains(&l))
            {
                return Ok(());
            }
            let again = ClientMessage::decode(&msg.to_json());
            prop_assert_eq!(again.as_ref().ok(), Some(&msg), "{}", text);
        }
        Ok(())
    });
}

/// One thing a driver may deliver to the room.
#[derive(Debug, Clone)]
enum Step {
    /// A `hello` on a fresh connection: role, which token, uplink, and whether to resume
    /// (a token the room handed out, picked by index, or a forged one).
    Hello {
        broadcaster: bool,
        right_token: bool,
        uplink: Option<u32>,
        resume: Option<Option<usize>>,
    },
    /// A message (as JSON, decoded as the driver would) from a joined connection.
    Message {
        pick: usize,
        json: Value,
    },
    Alive {
        pick: usize,
    },
    Disconnected {
        pick: usize,
    },
    /// Time passes by this many milliseconds, then due timers fire; with `heartbeat`,
    /// every joined connection showed a sign of life first, as live clients do.
    Wait {
        ms: u64,
        heartbeat: bool,
    },
}

fn room_step() -> impl Strategy<Value = Step> {
    prop_oneof![
        4 => (
            prop::bool::weighted(0.1),
            prop::bool::weighted(0.8),
            prop::option::of(prop_oneof![0u32..5_000, Just(u32::MAX)]),
            prop::option::weighted(0.15, prop::option::weighted(0.8, any::<usize>())),
        )
            .prop_map(|(broadcaster, right_token, uplink, resume)| Step::Hello {
                broadcaster,
                right_token,
                uplink,
                resume,
            }),
        10 => (any::<usize>(), message_json()).prop_map(|(pick, json)| Step::Message { pick, json }),
        1 => any::<usize>().prop_map(|pick| Step::Alive { pick }),
        2 => any::<usize>().prop_map(|pick| Step::Disconnected { pick }),
        3 => (prop_oneof![4 => 0u64..50, 4 => 0u64..3_000, 1 => 0u64..20_000], prop::bool::weighted(0.8))
            .prop_map(|(ms, heartbeat)| Step::Wait { ms, heartbeat }),
    ]
}

/// The driver's side: which connections are joined, which the room closed, the resume
/// tokens it handed out.
struct Driver {
    room: Room,
    now: Duration,
    next_conn: u64,
    joined: Vec<ConnId>,
    closed: BTreeSet<ConnId>,
    gone: BTreeSet<ConnId>,
    resumes: Vec<String>,
    peers: HashMap<ConnId, PeerId>,
}

impl Driver {
    fn new(config: RoomConfig) -> Self {
        let room = Room::new(
            RoomId::new("r").unwrap(),
            TOKEN.to_owned(),
            config,
            7,
            Duration::ZERO,
        );
        Self {
            room,
            now: Duration::ZERO,
            next_conn: 0,
            joined: Vec::new(),
            closed: BTreeSet::new(),
            gone: BTreeSet::new(),
            resumes: Vec::new(),
            peers: HashMap::new(),
        }
    }

    fn input(&mut self, input: Input) -> Result<(), TestCaseError> {
        self.room.handle(self.now, input);
        while let Some(out) = self.room.poll_output() {
            match out {
                Output::Send { conn, msg } => {
                    prop_assert!(!self.closed.contains(&conn), "sent to closed {conn:?}");
                    prop_assert!(!self.gone.contains(&conn), "sent to gone {conn:?}");
                    if let ServerMessage::Welcome {
                        resume, peer_id, ..
                    } = msg
                    {
                        self.resumes.push(resume);
                        self.peers.insert(conn, peer_id);
                        if !self.joined.contains(&conn) {
                            self.joined.push(conn);
                        }
                    }
                }
                Output::Close { conn } => {
                    self.closed.insert(conn);
                    self.joined.retain(|c| *c != conn);
                }
                Output::Event(_) => {}
            }
        }
        if let Err(e) = self.room.tree().invariants() {
            return Err(TestCaseError::fail(format!("tree invariant: {e:?}")));
        }
        if let Some(due) = self.room.poll_timeout() {
            // A timer in the past would spin a driver; one exactly now fires on the next tick.
            prop_assert!(
                due >= self.now || self.room.ended().is_some(),
                "timer {due:?} before {:?}",
                self.now
            );
        }
        Ok(())
    }

    fn pick(&self, pick: usize) -> Option<ConnId> {
        (!self.joined.is_empty()).then(|| self.joined[pick % self.joined.len()])
    }

    /// Whether `conn` may end the room now (by leaving or dropping): the broadcaster does
    /// so only now and then, or most sequences would test an ended room.
    fn may_end(&self, conn: ConnId, pick: usize) -> bool {
        conn != ConnId(0) || pick % 16 == 0
    }

    fn step(&mut self, step: Step) -> Result<(), TestCaseError> {
        match step {
            Step::Hello {
                broadcaster,
                right_token,
                uplink,
                resume,
            } => {
                let conn = ConnId(self.next_conn);
                self.next_conn += 1;
                let resume = resume.map(|pick| match pick {
                    Some(i) if !self.resumes.is_empty() => {
                        self.resumes[i % self.resumes.len()].clone()
                    }
                    _ => "feedfacefeedface".to_owned(),
                });
                let hello = Hello {
                    v: 1,
                    room: RoomId::new("r").unwrap(),
                    role: if broadcaster {
                        Role::Broadcaster
                    } else {
                        Role::Viewer
                    },
                    token: (broadcaster && right_token).then(|| TOKEN.to_owned()),
                    uplink_kbps: uplink,
                    resume,
                    // Links are checked by the driver before the room sees a hello.
                    link: None,
                    claim: None,
                };
                self.input(Input::Hello { conn, hello })
            }
            Step::Message { pick, json } => {
                let Some(conn) = self.pick(pick) else {
                    return Ok(());
                };
                // The driver answers what does not decode itself; `hello` on a joined
                // connection reaches the room (it answers `already_joined`).
                match ClientMessage::decode(&json.to_string()) {
                    Ok(ClientMessage::Leave { .. }) if !self.may_end(conn, pick / 7) => Ok(()),
                    Ok(msg) => self.input(Input::Message { conn, msg }),
                    Err(_) => Ok(()),
                }
            }
            Step::Alive { pick } => match self.pick(pick) {
                Some(conn) => self.input(Input::Alive { conn }),
                None => Ok(()),
            },
            Step::Disconnected { pick } => match self.pick(pick) {
                Some(conn) if self.may_end(conn, pick / 7) => {
                    self.joined.retain(|c| *c != conn);
                    self.gone.insert(conn);
                    self.input(Input::Disconnected { conn })
                }
                _ => Ok(()),
            },
            Step::Wait { ms, heartbeat } => {
                if heartbeat {
                    for conn in self.joined.clone() {
                        self.input(Input::Alive { conn })?;
                    }
                }
                self.now += Duration::from_millis(ms);
                self.input(Input::Tick)
            }
        }
    }
}

fn room_case(config: RoomConfig, steps: Vec<Step>, end: bool) -> Result<(), TestCaseError> {
    let mut d = Driver::new(config);
    // Usually a broadcaster first, so that the tree grows; sometimes none at all.
    d.step(Step::Hello {
        broadcaster: true,
        right_token: true,
        uplink: Some(3_000),
        resume: None,
    })?;
    for step in steps {
        d.step(step)?;
    }
    if end {
        // An operator ends the room: everyone is told and closed, nothing is left due.
        d.input(Input::End(EndReason::Shutdown))?;
        prop_assert!(d.joined.is_empty(), "still open: {:?}", d.joined);
    }
    Ok(())
}

#[test]
fn room() {
    let configs = prop_oneof![
        Just(RoomConfig::default()),
        Just(RoomConfig {
            root_fanout: 2,
            relay_fanout: 2,
            max_depth: 4,
            max_peers: 12,
            ..RoomConfig::default()
        }),
        Just(RoomConfig {
            handover_timeout: Duration::ZERO,
            warm_standby: false,
            ..RoomConfig::default()
        }),
    ];
    fuzz(
        "room",
        (
            configs,
            prop::collection::vec(room_step(), 20..200),
            any::<bool>(),
        ),
        |(config, steps, end)| room_case(config, steps, end),
    );
}
