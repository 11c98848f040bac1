//! Random models: arrivals, session lengths, capacities, NAT classes, positions and
//! latencies.
//!
//! Each model draws from its own ChaCha stream derived from the scenario seed, so changing
//! one model (say, the session distribution) does not reshuffle the others.

use rand_chacha::ChaCha8Rng;
use rand_core::{Rng, SeedableRng};
use rand_distr::{Distribution, Exp, LogNormal, Pareto, Weibull};

use treecast_core::protocol::NatClass;

use crate::scenario::{Capacity, Connectivity, Latency, Scenario, Session};

/// Independent random streams, one per model.
#[derive(Debug, Clone)]
pub struct Streams {
    /// Arrival times.
    pub arrivals: ChaCha8Rng,
    /// Session lengths and crash-or-leave.
    pub sessions: ChaCha8Rng,
    /// Capacity classes.
    pub capacity: ChaCha8Rng,
    /// Positions on the latency plane.
    pub latency: ChaCha8Rng,
    /// Connection set-up jitter.
    pub connect: ChaCha8Rng,
    /// NAT classes.
    pub nat: ChaCha8Rng,
}

impl Streams {
    /// Streams for a seed.
    pub fn new(seed: u64) -> Self {
        let stream = |i: u64| {
            let mut rng = ChaCha8Rng::seed_from_u64(seed);
            rng.set_stream(i);
            rng
        };
        Self {
            arrivals: stream(1),
            sessions: stream(2),
            capacity: stream(3),
            latency: stream(4),
            connect: stream(5),
            nat: stream(6),
        }
    }
}

/// A uniform draw in [0, 1).
pub fn unit(rng: &mut ChaCha8Rng) -> f64 {
    (rng.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
}

/// An exponential draw with the given mean.
pub fn exponential(rng: &mut ChaCha8Rng, mean: f64) -> f64 {
    -mean * (1.0 - unit(rng)).ln()
}

/// Draws session lengths in seconds.
#[derive(Debug, Clone)]
pub enum SessionModel {
    /// Nobody leaves.
    Forever,
    /// Exponential.
    Exponential(Exp<f64>),
    /// Lognormal.
    Lognormal(LogNormal<f64>),
    /// Pareto.
    Pareto(Pareto<f64>),
    /// Weibull.
    Weibull(Weibull<f64>),
}

impl SessionModel {
    /// The model for a validated scenario.
    pub fn new(session: &Session) -> Self {
        // Parameters were validated, so construction cannot fail; fall back to "forever"
        // rather than panic if a caller skipped validation.
        match *session {
            Session::Forever => Self::Forever,
            Session::Exponential { mean_s } => {
                Exp::new(1.0 / mean_s).map_or(Self::Forever, Self::Exponential)
            }
            Session::Lognormal { mu, sigma } => {
                LogNormal::new(mu, sigma).map_or(Self::Forever, Self::Lognormal)
            }
            Session::Pareto { scale_s, shape } => {
                Pareto::new(scale_s, shape).map_or(Self::Forever, Self::Pareto)
            }
            Session::Weibull { scale_s, shape } => {
                Weibull::new(scale_s, shape).map_or(Self::Forever, Self::Weibull)
            }
        }
    }

    /// A session length in seconds (infinite for `Forever`).
    pub fn sample(&self, rng: &mut ChaCha8Rng) -> f64 {
        match self {
            Self::Forever => f64::INFINITY,
            Self::Exponential(d) => d.sample(rng),
            Self::Lognormal(d) => d.sample(rng),
            Self::Pareto(d) => d.sample(rng),
            Self::Weibull(d) => d.sample(rng),
        }
    }
}

/// Draws a capacity class: children a peer can feed.
#[derive(Debug, Clone)]
pub struct CapacityModel {
    /// Cumulative normalised shares with the class's children.
    cumulative: Vec<(f64, u32)>,
}

impl CapacityModel {
    /// The model for a scenario's capacity section.
    pub fn new(capacity: &Capacity) -> Self {
        let total: f64 = capacity.classes.iter().map(|c| c.fraction).sum();
        let mut acc = 0.0;
        let cumulative = capacity
            .classes
            .iter()
            .map(|c| {
                acc += c.fraction / total;
                (acc, c.children)
            })
            .collect();
        Self { cumulative }
    }

    /// Children it can feed.
    pub fn sample(&self, rng: &mut ChaCha8Rng) -> u32 {
        let u = unit(rng);
        self.cumulative
            .iter()
            .find(|(c, _)| u < *c)
            .or(self.cumulative.last())
            .map_or(0, |&(_, k)| k)
    }
}

/// Draws a viewer's NAT class.
#[derive(Debug, Clone)]
pub struct NatModel {
    /// Cumulative normalised shares with their class; classes with no share are left out.
    cumulative: Vec<(f64, NatClass)>,
}

impl NatModel {
    /// The model for a scenario's connectivity section.
    pub fn new(connectivity: &Connectivity) -> Self {
        let shares = connectivity.shares();
        let total: f64 = shares.iter().map(|(_, s)| s).sum();
        let mut acc = 0.0;
        let cumulative = shares
            .iter()
            .filter(|(_, s)| *s > 0.0)
            .map(|&(class, s)| {
                acc += s / total;
                (acc, class)
            })
            .collect();
        Self { cumulative }
    }

    /// A class. With a single class nothing is drawn, so the stream is left untouched.
    pub fn sample(&self, rng: &mut ChaCha8Rng) -> NatClass {
        if let [(_, only)] = self.cumulative[..] {
            return only;
        }
        let u = unit(rng);
        self.cumulative
            .iter()
            .find(|(c, _)| u < *c)
            .or(self.cumulative.last())
            .map_or(NatClass::Cone, |&(_, class)| class)
    }
}

/// Where a peer sits for latency purposes.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Position {
    x: f32,
    y: f32,
    height: f32,
    /// Host index in a latency matrix (when one is used).
    host: u32,
}

/// One-way delays between peers and to the signaller.
#[derive(Debug, Clone)]
pub struct LatencyModel {
    radius: f64,
    height_mean: f64,
    matrix: Option<Vec<Vec<f32>>>,
}

/// A latency matrix file that cannot be used.
#[derive(Debug, thiserror::Error)]
#[error("latency matrix {path}: {message}")]
pub struct MatrixError {
    path: String,
    message: String,
}

impl LatencyModel {
    /// The model for a scenario's latency section (reads the matrix file, if any).
    pub fn new(latency: &Latency) -> Result<Self, MatrixError> {
        let matrix = match &latency.matrix_file {
            None => None,
            Some(path) => Some(read_matrix(path)?),
        };
        Ok(Self {
            radius: latency.plane_radius_ms,
            height_mean: latency.height_mean_ms,
            matrix,
        })
    }

    /// A random position for a new peer.
    pub fn place(&self, rng: &mut ChaCha8Rng) -> Position {
        if let Some(m) = &self.matrix {
            return Position {
                host: (unit(rng) * m.len() as f64) as u32,
                ..Position::default()
            };
        }
        let r = self.radius * unit(rng).sqrt();
        let theta = std::f64::consts::TAU * unit(rng);
        Position {
            x: (r * theta.cos()) as f32,
            y: (r * theta.sin()) as f32,
            height: exponential(rng, self.height_mean) as f32,
            host: 0,
        }
    }

    /// One-way delay between two peers, ms.
    pub fn between(&self, a: Position, b: Position) -> f64 {
        if let Some(m) = &self.matrix {
            return f64::from(m[a.host as usize][b.host as usize]);
        }
        let (dx, dy) = (f64::from(a.x - b.x), f64::from(a.y - b.y));
        (dx * dx + dy * dy).sqrt() + f64::from(a.height) + f64::from(b.height)
    }

    /// One-way delay between a peer and the signaller (at the centre, or host 0), ms.
    pub fn to_server(&self, a: Position) -> f64 {
        if let Some(m) = &self.matrix {
            return f64::from(m[a.host as usize][0]);
        }
        let (x, y) = (f64::from(a.x), f64::from(a.y));
        (x * x + y * y).sqrt() + f64::from(a.height)
    }
}

fn read_matrix(path: &str) -> Result<Vec<Vec<f32>>, MatrixError> {
    let err = |message: String| MatrixError {
        path: path.to_owned(),
        message,
    };
    let text = std::fs::read_to_string(path).map_err(|e| err(e.to_string()))?;
    let rows: Vec<Vec<f32>> = text
        .lines()
        .filter(|l| !l.trim().is_empty() && !l.trim_start().starts_with('#'))
        .enumerate()
        .map(|(i, line)| {
            line.split(|c: char| c == ',' || c.is_whitespace())
                .filter(|s| !s.is_empty())
                .map(|v| {
                    v.parse::<f32>()
                        .ok()
                        .filter(|x| x.is_finite() && *x >= 0.0)
                        .ok_or_else(|| err(format!("row {}: {v:?} is not a delay in ms", i + 1)))
                })
                .collect()
        })
        .collect::<Result<_, _>>()?;
    if rows.is_empty() || rows.iter().any(|r| r.len() != rows.len()) {
        return Err(err(format!(
            "expected a square matrix, got {} rows of lengths {:?}",
            rows.len(),
            rows.iter().map(Vec::len).take(5).collect::<Vec<_>>()
        )));
    }
    Ok(rows)
}

/// Draws arrival times by thinning a Poisson process at the schedule's peak rate.
#[derive(Debug, Clone)]
pub struct ArrivalModel {
    scenario: crate::scenario::Arrivals,
    peak: f64,
}

impl ArrivalModel {
    /// The model for a scenario.
    pub fn new(scenario: &Scenario) -> Self {
        Self {
            peak: scenario.arrivals.max_rate(),
            scenario: scenario.arrivals.clone(),
        }
    }

    /// The first Poisson arrival after `t` (seconds), or None if the rate is zero.
    pub fn next_after(&self, t: f64, rng: &mut ChaCha8Rng) -> Option<f64> {
        if self.peak <= 0.0 {
            return None;
        }
        let mut t = t;
        // Thinning: candidates at the peak rate, each kept with probability rate(t)/peak.
        // Bounded so a schedule that drops to zero for ever cannot loop for ever.
        for _ in 0..1_000_000 {
            t += exponential(rng, 1.0 / self.peak);
            if unit(rng) * self.peak < self.scenario.rate_at(t) {
                return Some(t);
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capacity_shares_are_respected() {
        let model = CapacityModel::new(&Capacity::default());
        let mut rng = Streams::new(3).capacity;
        let n = 100_000;
        let zeros = (0..n).filter(|_| model.sample(&mut rng) == 0).count();
        let share = zeros as f64 / n as f64;
        assert!((share - 0.3).abs() < 0.01, "{share}");
    }

    #[test]
    fn nat_shares_are_respected() {
        let connectivity = Connectivity {
            public: 2.0,
            cone: 6.0,
            symmetric: 2.0,
            ..Connectivity::default()
        };
        let model = NatModel::new(&connectivity);
        let mut rng = Streams::new(3).nat;
        let n = 100_000;
        let draws: Vec<NatClass> = (0..n).map(|_| model.sample(&mut rng)).collect();
        let share = |c| draws.iter().filter(|&&d| d == c).count() as f64 / n as f64;
        assert!((share(NatClass::Public) - 0.2).abs() < 0.01);
        assert!((share(NatClass::Symmetric) - 0.2).abs() < 0.01);
        assert!((share(NatClass::Cone) - 0.6).abs() < 0.01);
        assert_eq!(share(NatClass::Blocked), 0.0);
        // 0.2 symmetric: symmetric pairs 0.04 plus symmetric-cone pairs 2 × 0.2 × 0.6.
        assert!((connectivity.indirect_pair_share() - 0.28).abs() < 1e-9);
    }

    #[test]
    fn session_means_match() {
        let model = SessionModel::new(&Session::Exponential { mean_s: 60.0 });
        let mut rng = Streams::new(3).sessions;
        let n = 100_000;
        let mean = (0..n).map(|_| model.sample(&mut rng)).sum::<f64>() / n as f64;
        assert!((mean - 60.0).abs() < 1.0, "{mean}");
    }

    #[test]
    fn latency_is_symmetric_and_positive() {
        let model = LatencyModel::new(&Latency::default()).unwrap();
        let mut rng = Streams::new(1).latency;
        let (a, b) = (model.place(&mut rng), model.place(&mut rng));
        assert_eq!(model.between(a, b), model.between(b, a));
        assert!(model.between(a, b) > 0.0);
        assert!(model.to_server(a) <= 60.0 + 8.0 * 20.0);
    }

    #[test]
    fn bad_matrices_are_explained() {
        let dir = std::env::temp_dir().join(format!("treecast-matrix-{}", std::process::id()));
        std::fs::write(&dir, "0,1\n1\n").unwrap();
        let latency = Latency {
            matrix_file: Some(dir.display().to_string()),
            ..Latency::default()
        };
        let e = LatencyModel::new(&latency).unwrap_err().to_string();
        assert!(e.contains("square"), "{e}");
        std::fs::remove_file(dir).ok();
    }
}
