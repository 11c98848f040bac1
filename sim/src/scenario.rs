//! Scenario files: what to simulate, as TOML. Every field has a default, documented in
//! `docs/simulator.md` with the study it comes from.

use std::path::Path;

use serde::{Deserialize, Serialize};
use treecast_core::protocol::NatClass;
use treecast_core::room::{RoomConfig, Tuning};

/// A whole simulation run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Scenario {
    /// Free text shown in reports.
    pub name: String,
    /// Seed of every random stream; same seed, same scenario ⇒ byte-identical output.
    pub seed: u64,
    /// Simulated time, in seconds.
    pub duration_s: f64,
    /// How often the whole population is sampled for depth, latency and load, in seconds.
    pub sample_interval_s: f64,
    /// Statistics ignore the first seconds (the audience building up), except the time
    /// series, which covers the whole run.
    pub warmup_s: f64,
    /// Viewer arrivals.
    pub arrivals: Arrivals,
    /// How long viewers stay.
    pub session: Session,
    /// Upload capacity classes.
    pub capacity: Capacity,
    /// NAT classes, ICE failure and the TURN relay.
    pub connectivity: Connectivity,
    /// Network latency between peers and to the signaller.
    pub latency: Latency,
    /// Delays of the media path and of failure detection.
    pub timing: Timing,
    /// Share of departures that are crashes (no `leave`), 0..=1.
    pub crash_fraction: f64,
    /// Share of departures that are in-app leaves (the page's leave control: the page
    /// stays up and can keep forwarding), 0..=1. The rest of the departures, neither
    /// crashes nor in-app leaves, are tab closes: `leave` sent, media stopped at once.
    pub in_app_leave_fraction: f64,
    /// Client mechanisms under study, all off by default.
    pub client: Client,
    /// The room's operator settings, exactly as the signaller takes them.
    pub room: RoomConfig,
    /// Settings an operator changes mid-run (`[[events]]`), as `PATCH /api/rooms/{room}`
    /// does on the signaller.
    pub events: Vec<ScriptedChange>,
}

/// An operator's change of the room's settings at a simulated time: absent fields stay.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ScriptedChange {
    /// When, in simulated seconds.
    pub at_s: f64,
    /// New `room.root_fanout`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub root_fanout: Option<u32>,
    /// New `room.relay_fanout`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub relay_fanout: Option<u32>,
    /// New `room.max_depth`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_depth: Option<u32>,
    /// New `room.max_peers` (most viewers; named as in the HTTP API).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_viewers: Option<u32>,
}

impl ScriptedChange {
    /// The change as the room takes it.
    pub fn tuning(&self) -> Tuning {
        Tuning {
            root_fanout: self.root_fanout,
            relay_fanout: self.relay_fanout,
            max_depth: self.max_depth,
            max_peers: self.max_viewers,
        }
    }
}

impl Default for Scenario {
    fn default() -> Self {
        Self {
            name: "unnamed".into(),
            seed: 1,
            duration_s: 600.0,
            sample_interval_s: 10.0,
            warmup_s: 0.0,
            arrivals: Arrivals::default(),
            session: Session::default(),
            capacity: Capacity::default(),
            connectivity: Connectivity::default(),
            latency: Latency::default(),
            timing: Timing::default(),
            crash_fraction: 0.2,
            in_app_leave_fraction: 0.0,
            client: Client::default(),
            room: sim_room_config(),
            events: Vec::new(),
        }
    }
}

/// The signaller's defaults, less the two features that cost O(N) per period and that the
/// simulator does not model: heartbeats (crashes are detected by the modelled socket close
/// and by children's stall reports) and periodic audience broadcasts.
pub fn sim_room_config() -> RoomConfig {
    RoomConfig {
        heartbeat_timeout: None,
        audience_interval: None,
        max_peers: u32::MAX,
        // Simulated peers need no STUN servers; an empty list also saves cloning it into
        // every welcome.
        ice_servers: Vec::new(),
        ..RoomConfig::default()
    }
}

/// [`sim_room_config`] with the given fan-out limits and depth limit.
pub fn sim_room_config_with(root_fanout: u32, relay_fanout: u32, max_depth: u32) -> RoomConfig {
    RoomConfig {
        root_fanout,
        relay_fanout,
        max_depth,
        ..sim_room_config()
    }
}

/// Viewer arrival process. Arrival processes add up: a flash crowd on top of a Poisson
/// stream is `flash` plus `rate_per_s`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Arrivals {
    /// Poisson arrivals per second (0: none). Overridden by `schedule` where given.
    pub rate_per_s: f64,
    /// Piecewise-constant rates: `[[start_s, rate_per_s], ...]`, repeating every
    /// `period_s` if set (e.g. a daily shape). Empty: constant `rate_per_s`.
    pub schedule: Vec<[f64; 2]>,
    /// Period of `schedule` in seconds (0: no repeat; the last rate holds).
    pub period_s: f64,
    /// Viewers arriving at the start, uniformly spread over `flash_over_s`.
    pub flash_peers: u64,
    /// Spread of the flash crowd, in seconds.
    pub flash_over_s: f64,
}

impl Default for Arrivals {
    fn default() -> Self {
        Self {
            rate_per_s: 1.0,
            schedule: Vec::new(),
            period_s: 0.0,
            flash_peers: 0,
            flash_over_s: 60.0,
        }
    }
}

impl Arrivals {
    /// The Poisson rate at simulated second `t`.
    pub fn rate_at(&self, t: f64) -> f64 {
        if self.schedule.is_empty() {
            return self.rate_per_s;
        }
        let t = if self.period_s > 0.0 {
            t % self.period_s
        } else {
            t
        };
        self.schedule
            .iter()
            .take_while(|[start, _]| *start <= t)
            .last()
            .map_or(0.0, |[_, rate]| *rate)
    }

    /// The highest rate the schedule reaches (for thinning).
    pub fn max_rate(&self) -> f64 {
        self.schedule
            .iter()
            .map(|[_, r]| *r)
            .fold(self.rate_per_s.max(0.0), f64::max)
    }
}

/// Session length distribution, in seconds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "model", rename_all = "snake_case", deny_unknown_fields)]
pub enum Session {
    /// Nobody leaves.
    Forever,
    /// Exponential with this mean.
    Exponential {
        /// Mean session, seconds.
        mean_s: f64,
    },
    /// Lognormal: ln(session) ~ Normal(mu, sigma).
    Lognormal {
        /// Mean of ln(seconds).
        mu: f64,
        /// Standard deviation of ln(seconds).
        sigma: f64,
    },
    /// Pareto (type I) with minimum `scale_s` and tail index `shape`.
    Pareto {
        /// Minimum session, seconds.
        scale_s: f64,
        /// Tail index (> 1 for a finite mean).
        shape: f64,
    },
    /// Weibull with scale and shape.
    Weibull {
        /// Scale, seconds.
        scale_s: f64,
        /// Shape (< 1: heavy early departures).
        shape: f64,
    },
}

impl Default for Session {
    fn default() -> Self {
        Self::Exponential { mean_s: 600.0 }
    }
}

/// One class of peers by how many children they can feed at the stream bitrate.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CapacityClass {
    /// Children a peer of this class can feed (its uplink is sized for exactly that).
    pub children: u32,
    /// Share of peers in this class; shares are normalised.
    pub fraction: f64,
}

/// Upload capacity mix.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Capacity {
    /// Capacity classes (declared uplink = children × stream bitrate / usable share).
    pub classes: Vec<CapacityClass>,
    /// Children the broadcaster can feed (before the operator's root fan-out limit).
    pub broadcaster_children: u32,
}

impl Default for Capacity {
    fn default() -> Self {
        Self {
            classes: vec![
                CapacityClass {
                    children: 0,
                    fraction: 0.3,
                },
                CapacityClass {
                    children: 1,
                    fraction: 0.2,
                },
                CapacityClass {
                    children: 2,
                    fraction: 0.25,
                },
                CapacityClass {
                    children: 4,
                    fraction: 0.25,
                },
            ],
            broadcaster_children: 4,
        }
    }
}

/// How peers reach each other: their NAT classes (as [`NatClass::direct`] pairs them),
/// when they report them, how long ICE takes to give up on a pair that cannot connect,
/// and whether a TURN relay carries such pairs instead.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Connectivity {
    /// Share of viewers with no NAT; shares of the five classes are normalised.
    pub public: f64,
    /// Share of viewers behind a full-cone (or address-restricted) NAT.
    pub full_cone: f64,
    /// Share of viewers behind a port-restricted cone NAT.
    pub cone: f64,
    /// Share of viewers behind a symmetric NAT.
    pub symmetric: f64,
    /// Share of viewers with UDP blocked: only TURN reaches them.
    pub blocked: f64,
    /// The broadcaster's class.
    pub broadcaster: NatClass,
    /// A peer reports its class this long after its welcome (candidate gathering), ms;
    /// negative: never, and the room keeps it as `unknown` (placed as `cone`).
    pub report_ms: f64,
    /// ICE gives up on a pair that cannot connect directly, with no relay, this long
    /// after the offer/answer; the child then sends `link_failed`, ms.
    pub ice_fail_ms: f64,
    /// A TURN relay is available: the room is configured with a `turn:` server, and pairs
    /// that cannot connect directly connect through the relay.
    pub turn: bool,
    /// Extra one-way delay of a link through the relay, also added once to its set-up
    /// (the allocation), ms.
    pub turn_extra_ms: f64,
}

impl Default for Connectivity {
    fn default() -> Self {
        Self {
            public: 0.0,
            full_cone: 0.0,
            cone: 1.0,
            symmetric: 0.0,
            blocked: 0.0,
            broadcaster: NatClass::Public,
            report_ms: 200.0,
            ice_fail_ms: 5_000.0,
            turn: false,
            turn_extra_ms: 20.0,
        }
    }
}

impl Connectivity {
    /// The viewer classes with their shares, as written (not normalised).
    pub fn shares(&self) -> [(NatClass, f64); 5] {
        [
            (NatClass::Public, self.public),
            (NatClass::FullCone, self.full_cone),
            (NatClass::Cone, self.cone),
            (NatClass::Symmetric, self.symmetric),
            (NatClass::Blocked, self.blocked),
        ]
    }

    /// Share of random viewer pairs that cannot connect directly under these shares.
    pub fn indirect_pair_share(&self) -> f64 {
        let shares = self.shares();
        let total: f64 = shares.iter().map(|(_, s)| s).sum();
        if total <= 0.0 {
            return 0.0;
        }
        let mut indirect = 0.0;
        for (a, sa) in shares {
            for (b, sb) in shares {
                if !a.direct(b) {
                    indirect += sa * sb;
                }
            }
        }
        indirect / (total * total)
    }
}

/// Latency model: network coordinates, or a measured matrix.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Latency {
    /// Peers sit uniformly in a disc of this radius (ms of one-way delay), the signaller at
    /// its centre; one-way delay = distance + both heights (Vivaldi's 2-D + height model).
    pub plane_radius_ms: f64,
    /// Mean of the exponentially distributed per-host height (access link), ms.
    pub height_mean_ms: f64,
    /// Optional CSV file of one-way delays in ms (square matrix, one row per host); peers
    /// are mapped to hosts at random. Overrides the coordinates.
    pub matrix_file: Option<String>,
}

impl Default for Latency {
    fn default() -> Self {
        Self {
            plane_radius_ms: 60.0,
            height_mean_ms: 8.0,
            matrix_file: None,
        }
    }
}

/// Media path and detection delays, in milliseconds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Timing {
    /// Connection set-up after both ends know of each other: offer/answer through the
    /// signaller plus ICE and DTLS, on top of the modelled round trips. Mean, ms.
    pub connect_ms: f64,
    /// Added delay per relaying hop (decode/re-encode, jitter buffer), ms.
    pub hop_ms: f64,
    /// Frames missing for this long make a peer at depth 1 report its parent stalled, ms.
    pub stall_window_ms: f64,
    /// Extra wait per level below depth 1 before reporting, so the peer nearest a failure
    /// reports first (as the browser client does), ms.
    pub stall_step_ms: f64,
    /// No byte at all from its parent for this long (plus `stall_step_ms` per level below
    /// depth 1) makes a peer report a stall before its frame window runs out: the page's
    /// `silence_after`. Applies to the peers whose own link went dark (a crashed or departed
    /// parent), ms; 0 turns it off (the native peer has no such rule).
    pub silence_ms: f64,
    /// How long the signaller takes to notice a crashed peer's socket, ms.
    pub crash_detect_ms: f64,
    /// Once the signaller says a peer's parent disconnected, media missing for this long
    /// is reported as a stall at once, whatever the depth (the client's
    /// `parent_lost_after`), ms.
    pub parent_lost_ms: f64,
    /// A new parent that delivers no media for this long is reported stalled (the
    /// client's connect watchdog; it catches parents that died before the link came up), ms.
    pub connect_fail_ms: f64,
}

impl Default for Timing {
    fn default() -> Self {
        Self {
            connect_ms: 250.0,
            hop_ms: 16.0,
            stall_window_ms: 1_000.0,
            stall_step_ms: 100.0,
            silence_ms: 400.0,
            crash_detect_ms: 5_000.0,
            parent_lost_ms: 400.0,
            connect_fail_ms: 8_000.0,
        }
    }
}

/// Client mechanisms that are modelled before (or while) the real clients have them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Client {
    /// Make-before-break: a viewer moved by the room keeps the media of its old link until
    /// the new one carries media (or `bridge_timeout_ms` passes), and a parent told to
    /// drop a child keeps forwarding until the child closes the link. An in-app leave
    /// keeps forwarding (and being fed) until its children have moved or the timeout.
    pub make_before_break: bool,
    /// The longest an old link is kept after a move or an in-app leave, ms.
    pub bridge_timeout_ms: f64,
    /// Warm standby: the clients prepare the standby links the room asks for
    /// (`standby`, when `room.warm_standby` is on), as they would a media link, and a
    /// `parent` or `child` naming a peer over one that is up gets media after one round
    /// trip between the two instead of the signalled offer/answer and
    /// `timing.connect_ms`. Off: they ignore `standby`, as the web page and the native
    /// peer do, and every link is made cold.
    pub warm_standby: bool,
}

impl Default for Client {
    fn default() -> Self {
        Self {
            make_before_break: false,
            bridge_timeout_ms: 5_000.0,
            warm_standby: false,
        }
    }
}

/// A scenario that cannot run.
#[derive(Debug, thiserror::Error)]
pub enum ScenarioError {
    /// The file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// The TOML is malformed or has unknown or mistyped keys.
    #[error("{path}: {message}")]
    Parse {
        /// The file.
        path: String,
        /// What the parser said.
        message: String,
    },
    /// A value is out of range.
    #[error("invalid scenario: {0}")]
    Invalid(String),
    /// A `--set` override does not apply.
    #[error("cannot set {key}: {message}")]
    Override {
        /// The dotted key.
        key: String,
        /// Why.
        message: String,
    },
}

impl Scenario {
    /// Reads and validates a scenario file.
    pub fn load(path: &Path) -> Result<Self, ScenarioError> {
        let text = std::fs::read_to_string(path).map_err(|source| ScenarioError::Read {
            path: path.display().to_string(),
            source,
        })?;
        let value: toml::Value = toml::from_str(&text).map_err(|e| ScenarioError::Parse {
            path: path.display().to_string(),
            message: e.to_string(),
        })?;
        Self::from_value(value, &path.display().to_string())
    }

    /// Builds a scenario from a TOML value (after `--set` overrides) and validates it.
    /// Keys of `[room]` apply on top of [`sim_room_config`], not of the signaller's
    /// defaults, so a partial `[room]` keeps heartbeats and audience broadcasts off.
    pub fn from_value(mut value: toml::Value, origin: &str) -> Result<Self, ScenarioError> {
        if let Some(table) = value.as_table_mut() {
            let mut room = toml::Value::try_from(sim_room_config())
                .ok()
                .and_then(|v| v.as_table().cloned())
                .unwrap_or_default();
            if let Some(given) = table.get("room").and_then(toml::Value::as_table) {
                room.extend(given.clone());
            }
            table.insert("room".into(), toml::Value::Table(room));
        }
        let scenario: Scenario =
            value
                .try_into()
                .map_err(|e: toml::de::Error| ScenarioError::Parse {
                    path: origin.to_owned(),
                    message: e.to_string(),
                })?;
        scenario.validate()?;
        Ok(scenario)
    }

    /// Checks ranges a run depends on.
    pub fn validate(&self) -> Result<(), ScenarioError> {
        let bad = |s: &str| Err(ScenarioError::Invalid(s.to_owned()));
        if !(self.duration_s > 0.0 && self.duration_s.is_finite()) {
            return bad("duration_s must be a positive number of seconds");
        }
        if !(self.warmup_s >= 0.0 && self.warmup_s < self.duration_s) {
            return bad("warmup_s must be at least 0 and shorter than duration_s");
        }
        if self.sample_interval_s.is_nan() || self.sample_interval_s <= 0.0 {
            return bad("sample_interval_s must be positive");
        }
        if !(0.0..=1.0).contains(&self.crash_fraction) {
            return bad("crash_fraction must be between 0 and 1");
        }
        if !(0.0..=1.0).contains(&self.in_app_leave_fraction)
            || self.crash_fraction + self.in_app_leave_fraction > 1.0 + 1e-9
        {
            return bad(
                "in_app_leave_fraction must be between 0 and 1, and crash_fraction + \
                 in_app_leave_fraction at most 1 (the rest are tab closes)",
            );
        }
        for e in &self.events {
            if !(e.at_s.is_finite() && e.at_s >= 0.0 && e.at_s < self.duration_s) {
                return bad("events: at_s must be at least 0 and before duration_s");
            }
            if e.root_fanout == Some(0) {
                return bad("events: root_fanout must be at least 1");
            }
            if e.max_depth == Some(0) {
                return bad("events: max_depth must be at least 1");
            }
        }
        if !(self.client.bridge_timeout_ms.is_finite() && self.client.bridge_timeout_ms >= 0.0) {
            return bad("client.bridge_timeout_ms must be at least 0");
        }
        let c = &self.connectivity;
        let shares = c.shares();
        if shares.iter().any(|(_, s)| !(s.is_finite() && *s >= 0.0))
            || shares.iter().map(|(_, s)| s).sum::<f64>() <= 0.0
        {
            return bad(
                "connectivity shares (public, full_cone, cone, symmetric, blocked) must be \
                 numbers of at least 0, and at least one must be positive",
            );
        }
        if c.broadcaster == NatClass::Unknown {
            return bad(
                "connectivity.broadcaster must be a class (public, full_cone, cone, symmetric \
                 or blocked); use report_ms < 0 for peers that never report theirs",
            );
        }
        if !c.report_ms.is_finite() {
            return bad("connectivity.report_ms must be a number of ms (negative: never)");
        }
        if !(c.turn_extra_ms.is_finite() && c.turn_extra_ms >= 0.0) {
            return bad("connectivity.turn_extra_ms must be at least 0");
        }
        if !(c.ice_fail_ms.is_finite() && c.ice_fail_ms >= 0.0) {
            return bad("connectivity.ice_fail_ms must be at least 0");
        }
        if c.ice_fail_ms >= self.timing.connect_fail_ms {
            return bad(
                "connectivity.ice_fail_ms must be shorter than timing.connect_fail_ms: \
                 otherwise the connect watchdog reports the parent stalled before ICE gives up",
            );
        }
        if self.capacity.classes.is_empty()
            || self
                .capacity
                .classes
                .iter()
                .any(|c| c.fraction.is_nan() || c.fraction < 0.0)
            || self
                .capacity
                .classes
                .iter()
                .map(|c| c.fraction)
                .sum::<f64>()
                <= 0.0
        {
            return bad("capacity.classes needs at least one class with a positive fraction");
        }
        if self.arrivals.rate_per_s < 0.0 || self.arrivals.schedule.iter().any(|[_, r]| *r < 0.0) {
            return bad("arrival rates must not be negative");
        }
        if self.arrivals.flash_peers > 0
            && (self.arrivals.flash_over_s.is_nan() || self.arrivals.flash_over_s < 0.0)
        {
            return bad("arrivals.flash_over_s must not be negative");
        }
        let ok = match self.session {
            Session::Forever => true,
            Session::Exponential { mean_s } => mean_s > 0.0,
            Session::Lognormal { sigma, .. } => sigma >= 0.0,
            Session::Pareto { scale_s, shape } => scale_s > 0.0 && shape > 0.0,
            Session::Weibull { scale_s, shape } => scale_s > 0.0 && shape > 0.0,
        };
        if !ok {
            return bad("session parameters must be positive");
        }
        if self.room.heartbeat_timeout.is_some() {
            return bad(
                "room.heartbeat_timeout must be 0 (off): simulated peers send no heartbeats; \
                 crashes are detected after timing.crash_detect_ms instead",
            );
        }
        if self.arrivals.schedule.windows(2).any(|w| w[0][0] > w[1][0]) {
            return bad("arrivals.schedule must be sorted by start time");
        }
        if self.room.stream_kbps == 0 || self.room.usable_uplink_percent == 0 {
            return bad("room.stream_kbps and room.usable_uplink_percent must be positive");
        }
        Ok(())
    }
}

/// Applies `key=value` to a TOML document; `key` is dotted (`room.relay_fanout`), `value`
/// is parsed as TOML (numbers, booleans, strings, arrays), falling back to a string.
pub fn set_value(doc: &mut toml::Value, key: &str, value: &str) -> Result<(), ScenarioError> {
    let err = |message: &str| ScenarioError::Override {
        key: key.to_owned(),
        message: message.to_owned(),
    };
    let parsed: toml::Value = toml::from_str::<toml::Table>(&format!("v = {value}"))
        .ok()
        .and_then(|mut t| t.remove("v"))
        .unwrap_or_else(|| toml::Value::String(value.to_owned()));
    let mut parts = key.split('.').peekable();
    let mut cur = doc;
    while let Some(part) = parts.next() {
        let table = cur
            .as_table_mut()
            .ok_or_else(|| err("a parent of this key is not a table"))?;
        if parts.peek().is_none() {
            table.insert(part.to_owned(), parsed);
            return Ok(());
        }
        cur = table
            .entry(part.to_owned())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
    }
    Err(err("empty key"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_validate_and_round_trip() {
        let s = Scenario::default();
        s.validate().unwrap();
        let text = toml::to_string(&s).unwrap();
        let back = Scenario::from_value(toml::from_str(&text).unwrap(), "t").unwrap();
        assert_eq!(back, s);
    }

    #[test]
    fn overrides_parse_typed_values() {
        let mut doc = toml::Value::try_from(Scenario::default()).unwrap();
        set_value(&mut doc, "room.relay_fanout", "6").unwrap();
        set_value(&mut doc, "session.mean_s", "30.5").unwrap();
        let s = Scenario::from_value(doc, "t").unwrap();
        assert_eq!(s.room.relay_fanout, 6);
        assert_eq!(s.session, Session::Exponential { mean_s: 30.5 });
    }

    #[test]
    fn unknown_keys_and_bad_ranges_are_refused() {
        let doc: toml::Value = toml::from_str("durration_s = 5").unwrap();
        let e = Scenario::from_value(doc, "x.toml").unwrap_err().to_string();
        assert!(e.contains("durration_s"), "{e}");
        let doc: toml::Value = toml::from_str("crash_fraction = 2.0").unwrap();
        assert!(matches!(
            Scenario::from_value(doc, "x"),
            Err(ScenarioError::Invalid(_))
        ));
        // Crashes and in-app leaves share the departures; tab closes are the rest.
        let doc: toml::Value =
            toml::from_str("crash_fraction = 0.5\nin_app_leave_fraction = 0.6").unwrap();
        assert!(matches!(
            Scenario::from_value(doc, "x"),
            Err(ScenarioError::Invalid(_))
        ));
        let doc: toml::Value = toml::from_str(
            "crash_fraction = 0.2\nin_app_leave_fraction = 0.8\n[client]\nmake_before_break = true",
        )
        .unwrap();
        let s = Scenario::from_value(doc, "x").unwrap();
        assert!(s.client.make_before_break && !s.client.warm_standby);
        let doc: toml::Value = toml::from_str("[client]\nbridge_timeout_ms = -1").unwrap();
        assert!(matches!(
            Scenario::from_value(doc, "x"),
            Err(ScenarioError::Invalid(_))
        ));
    }

    #[test]
    fn connectivity_is_checked() {
        let refused = |text: &str| {
            let doc: toml::Value = toml::from_str(text).unwrap();
            match Scenario::from_value(doc, "x") {
                Err(ScenarioError::Invalid(m)) => m,
                other => panic!("{text}: {other:?}"),
            }
        };
        assert!(refused("[connectivity]\nsymmetric = -0.1").contains("shares"));
        assert!(refused("[connectivity]\ncone = 0.0").contains("positive"));
        assert!(refused("[connectivity]\nice_fail_ms = 9000").contains("connect_fail_ms"));
        assert!(refused("[connectivity]\nbroadcaster = \"unknown\"").contains("report_ms"));
        let doc: toml::Value =
            toml::from_str("[connectivity]\nbroadcaster = \"carrier_grade\"").unwrap();
        assert!(matches!(
            Scenario::from_value(doc, "x"),
            Err(ScenarioError::Parse { .. })
        ));
        let doc: toml::Value = toml::from_str(
            "[connectivity]\nsymmetric = 1\nturn = true\nreport_ms = -1\nbroadcaster = \"full_cone\"",
        )
        .unwrap();
        let s = Scenario::from_value(doc, "x").unwrap();
        assert!(s.connectivity.turn && s.connectivity.broadcaster == NatClass::FullCone);
        // `cone` keeps its default share of 1: half symmetric, half cone.
        assert_eq!(s.connectivity.indirect_pair_share(), 0.75);
    }

    #[test]
    fn schedules_repeat_with_their_period() {
        let a = Arrivals {
            schedule: vec![[0.0, 1.0], [10.0, 5.0]],
            period_s: 20.0,
            ..Arrivals::default()
        };
        assert_eq!(a.rate_at(5.0), 1.0);
        assert_eq!(a.rate_at(15.0), 5.0);
        assert_eq!(a.rate_at(25.0), 1.0);
        assert_eq!(a.max_rate(), 5.0);
    }
}
