//! The binary's TURN flags: REST credentials for an external TURN server (coturn) and the
//! embedded TURN server. The shared secret is read from a file or the environment, never
//! from a flag, where every user of the machine would see it in `ps`.

use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

use ipnet::IpNet;
use treecast_core::turn::{Secret, TurnRest};
use treecast_signaller::{Config, ConfigError, PortRange, TurnServerConfig};

/// Environment variable holding the TURN shared secret (the file flag wins over it).
pub const SECRET_ENV: &str = "TREECAST_TURN_SECRET";

/// TURN settings on the command line.
#[derive(Debug, clap::Args)]
pub struct TurnArgs {
    /// A TURN URL whose credentials are minted per peer, e.g.
    /// `turn:turn.example.org:3478?transport=udp` (repeat for several; replaces the
    /// configured list). Needs the shared secret.
    #[arg(
        long = "turn-url",
        env = "TREECAST_TURN_URLS",
        value_name = "URL",
        value_delimiter = ','
    )]
    turn_urls: Vec<String>,

    /// File holding the secret shared with the TURN server (coturn's static-auth-secret);
    /// or set TREECAST_TURN_SECRET.
    #[arg(long, env = "TREECAST_TURN_SECRET_FILE", value_name = "FILE")]
    turn_secret_file: Option<PathBuf>,

    /// How long minted TURN credentials allow new allocations [default: 600]; peers get
    /// fresh ones before they expire.
    #[arg(long, env = "TREECAST_TURN_TTL_SECS", value_name = "SECS")]
    turn_ttl_secs: Option<u64>,

    /// Run the embedded TURN server on this UDP port (0: none) [default: none].
    #[arg(long, env = "TREECAST_TURN_PORT", value_name = "PORT")]
    turn_port: Option<u16>,

    /// Address the embedded TURN server listens and relays on [default: the --bind address,
    /// which must then be a specific one].
    #[arg(long, env = "TREECAST_TURN_RELAY_IP", value_name = "IP")]
    turn_relay_ip: Option<IpAddr>,

    /// UDP ports the embedded TURN server relays from [default: 49152-65535].
    #[arg(long, env = "TREECAST_TURN_RELAY_PORTS", value_name = "FIRST-LAST")]
    turn_relay_ports: Option<PortRange>,

    /// Realm of the embedded TURN server [default: treecast].
    #[arg(long, env = "TREECAST_TURN_REALM", value_name = "REALM")]
    turn_realm: Option<String>,

    /// A loopback, private, link-local or CGNAT network the embedded TURN server may relay
    /// to (repeat for several); by default it relays to public addresses only.
    #[arg(
        long = "turn-allow-peer",
        env = "TREECAST_TURN_ALLOW_PEERS",
        value_name = "CIDR",
        value_delimiter = ','
    )]
    turn_allow_peers: Vec<IpNet>,

    /// Live allocations one peer may hold on the embedded TURN server [default: 12].
    #[arg(long, env = "TREECAST_TURN_MAX_ALLOCATIONS_PER_PEER", value_name = "N")]
    turn_max_allocations_per_peer: Option<u32>,
}

impl TurnArgs {
    /// Lays the flags (and `secret_from_env`, the value of [`SECRET_ENV`]) over `config`.
    pub fn apply(
        self,
        config: &mut Config,
        secret_from_env: Option<String>,
    ) -> Result<(), ConfigError> {
        let invalid = |s: String| ConfigError::Invalid(s);
        let secret = match &self.turn_secret_file {
            Some(path) => Some(read_secret(path)?),
            // An empty variable (a blank line in an environment file) counts as unset.
            None => secret_from_env
                .filter(|s| !s.trim().is_empty())
                .map(|s| Secret::new(s.trim())),
        };
        if !self.turn_urls.is_empty() || secret.is_some() || self.turn_ttl_secs.is_some() {
            let rest = config.room.turn.get_or_insert_with(|| TurnRest {
                urls: Vec::new(),
                secret: Secret::default(),
                ttl: TurnRest::DEFAULT_TTL,
            });
            if !self.turn_urls.is_empty() {
                rest.urls = self.turn_urls;
            }
            if let Some(secret) = secret {
                rest.secret = secret;
            }
            if let Some(secs) = self.turn_ttl_secs {
                rest.ttl = Duration::from_secs(secs);
            }
        }
        match self.turn_port {
            Some(0) => config.turn_server = None,
            Some(port) => {
                config
                    .turn_server
                    .get_or_insert_with(TurnServerConfig::default)
                    .port = port
            }
            None => {}
        }
        let embedded_flags = self.turn_relay_ip.is_some()
            || self.turn_relay_ports.is_some()
            || self.turn_realm.is_some()
            || !self.turn_allow_peers.is_empty()
            || self.turn_max_allocations_per_peer.is_some();
        let Some(server) = &mut config.turn_server else {
            if embedded_flags {
                return Err(invalid(
                    "the embedded TURN server's flags need --turn-port (or [turn_server] in \
                     the configuration file)"
                        .into(),
                ));
            }
            return Ok(());
        };
        if let Some(ip) = self.turn_relay_ip {
            server.relay_ip = Some(ip);
        }
        if let Some(ports) = self.turn_relay_ports {
            server.relay_ports = ports;
        }
        if let Some(realm) = self.turn_realm {
            server.realm = realm;
        }
        if !self.turn_allow_peers.is_empty() {
            server.allow_peers = self.turn_allow_peers;
        }
        if let Some(n) = self.turn_max_allocations_per_peer {
            server.max_allocations_per_peer = n;
        }
        Ok(())
    }
}

/// The secret in `path`, without surrounding whitespace (files end with a newline).
fn read_secret(path: &std::path::Path) -> Result<Secret, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_owned(),
        source,
    })?;
    let secret = text.trim();
    if secret.is_empty() {
        return Err(ConfigError::Invalid(format!(
            "the TURN secret file {} is empty",
            path.display()
        )));
    }
    Ok(Secret::new(secret))
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Debug, Parser)]
    struct Flags {
        #[command(flatten)]
        turn: TurnArgs,
    }

    fn apply(args: &[&str], env_secret: Option<&str>) -> Result<Config, ConfigError> {
        let flags = Flags::try_parse_from(std::iter::once("test").chain(args.iter().copied()))
            .map_err(|e| ConfigError::Invalid(e.to_string()))?;
        let mut config = Config::default();
        flags
            .turn
            .apply(&mut config, env_secret.map(str::to_owned))?;
        config.validate()?;
        Ok(config)
    }

    #[test]
    fn the_secret_comes_from_a_file_before_the_environment() {
        let file =
            std::env::temp_dir().join(format!("treecast-turn-secret-{}", std::process::id()));
        std::fs::write(&file, "from-file\n").unwrap();
        let path = file.to_str().unwrap();
        let c = apply(
            &["--turn-url", "turn:x:3478", "--turn-secret-file", path],
            Some("env"),
        )
        .unwrap();
        let rest = c.room.turn.unwrap();
        assert_eq!(rest.secret.expose(), b"from-file");
        assert_eq!(rest.ttl, TurnRest::DEFAULT_TTL);
        let c = apply(
            &["--turn-url", "turn:x:3478", "--turn-ttl-secs", "120"],
            Some("env"),
        )
        .unwrap();
        let rest = c.room.turn.unwrap();
        assert_eq!(rest.secret.expose(), b"env");
        assert_eq!(rest.ttl, Duration::from_secs(120));
        std::fs::write(&file, "\n").unwrap();
        let e = apply(&["--turn-url", "turn:x", "--turn-secret-file", path], None).unwrap_err();
        assert!(e.to_string().contains("empty"), "{e}");
        std::fs::remove_file(&file).unwrap();
    }

    #[test]
    fn the_embedded_server_is_opt_in_and_needs_the_secret() {
        assert!(apply(&[], None).unwrap().turn_server.is_none());
        assert!(apply(&[], Some(" ")).unwrap().room.turn.is_none());
        let c = apply(
            &[
                "--turn-port",
                "3480",
                "--turn-allow-peer",
                "10.0.0.0/8",
                "--turn-relay-ports",
                "50000-50010",
            ],
            Some("s"),
        )
        .unwrap();
        let server = c.turn_server.unwrap();
        assert_eq!(server.port, 3480);
        assert_eq!(server.allow_peers.len(), 1);
        assert_eq!(server.relay_ports.first, 50000);
        assert!(
            apply(&["--turn-port", "0"], Some("s")).is_err(),
            "a secret with no server"
        );
        for (args, says) in [
            (&["--turn-port", "3480"][..], "shared secret"),
            (&["--turn-relay-ip", "127.0.0.1"][..], "--turn-port"),
            (&["--turn-url", "turn:x"][..], "empty secret"),
        ] {
            let e = apply(args, None).unwrap_err().to_string();
            assert!(e.contains(says), "{args:?}: {e}");
        }
    }
}
