//! A NAT test bed made of network namespaces: a "public" network, NAT routers of the three
//! kinds the internet has, hosts behind them, and processes running inside.
//!
//! ```text
//!   public namespace: bridge br0 203.0.113.0/24, 203.0.113.1 = signaller + coturn
//!     ├─ public host    203.0.113.(10+i)          (no NAT)
//!     └─ router N: wan  203.0.113.(100+N) ── lan 10.201.N.1/24 ── host 10.201.N.2
//! ```
//! Router kinds (iptables in the router's namespace):
//! - cone: `MASQUERADE` (endpoint-independent mapping, port-restricted filtering);
//! - symmetric: `MASQUERADE --random-fully` (a new public port per destination);
//! - full cone: cone plus a DNAT of [`FULL_CONE_PORTS`] to the host, which must bind its
//!   media sockets there (`treecast-peer --udp-ports`);
//! - blocked: cone plus a FORWARD rule dropping all UDP, so only TCP (the signaller)
//!   gets through, as behind a firewall that allows nothing but web traffic.
//!
//! Every router drops unsolicited new inbound packets on its WAN. Without that, a peer's
//! early packet leaves a conntrack entry that makes the router remap the real flow to
//! another port, and cone-to-cone fails for the wrong reason.
//!
//! Everything on the public network has a default route to [`NOWHERE`], a gateway whose
//! address resolves (statically) to a MAC nobody has: packets to private addresses leave
//! and vanish, as on the internet. Without it, sending to a peer's host candidate
//! (10.201.N.2) fails at once with "network unreachable", and coturn closes the whole
//! allocation on that error, so no relayed connection ever works.
//!
//! One host per router: two hosts behind one router would reach each other over their LAN
//! (host candidates), which says nothing about NAT traversal.
//!
//! Namespace names carry a per-bed tag (process id and a counter), so concurrent runs never
//! collide; interfaces live only inside the bed's namespaces (none in the caller's), so
//! their short fixed names and the 203.0.113.0/24 and 10.201.0.0/16 addresses cannot clash
//! either. The caller reaches the public network through [`Netbed::in_public`], which runs
//! a future on a thread that entered the public namespace; the signaller runs there too.
//! Drop kills every process (their whole process groups), stops that thread and deletes the
//! namespaces, which takes every veth and bridge with them, also when the test panics.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::fs::File;
use std::future::Future;
use std::io::{BufRead, BufReader};
use std::net::{Ipv4Addr, SocketAddr};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use nix::sched::CloneFlags;
use nix::sys::signal::Signal;
use nix::unistd::Pid;
use serde_json::Value;

/// The public network's server address: the signaller and coturn listen here.
pub const SERVER_IP: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 1);
/// The public network's default gateway, which drops everything (see the module docs).
pub const NOWHERE: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 254);
/// The MAC address [`NOWHERE`] resolves to: locally administered, owned by no interface.
const NOWHERE_MAC: &str = "02:00:00:00:00:fe";
/// UDP ports a full-cone router forwards to its host.
pub const FULL_CONE_PORTS: std::ops::RangeInclusive<u16> = 40000..=40063;
/// coturn's listening port.
pub const TURN_PORT: u16 = 3478;
/// The signaller's embedded STUN server's primary port (the alternate is the next one).
/// A test runs either this or coturn, which also listens on 3478.
pub const STUN_PORT: u16 = 3478;
/// The signaller's port (inside the bed's own namespace, so a fixed one is safe).
pub const SIGNALLER_PORT: u16 = 8080;

/// Where a host sits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Site {
    /// Directly on the public network.
    Public,
    /// Behind a router with endpoint-independent mapping and port-restricted filtering.
    Cone,
    /// Behind a router forwarding [`FULL_CONE_PORTS`] to the host: reachable by anyone.
    FullCone,
    /// Behind a router with a new mapping per destination.
    Symmetric,
    /// Behind a router that forwards no UDP at all.
    Blocked,
}

impl Site {
    /// Short name for reports.
    pub fn name(self) -> &'static str {
        match self {
            Self::Public => "public",
            Self::Cone => "cone",
            Self::FullCone => "full cone",
            Self::Symmetric => "symmetric",
            Self::Blocked => "blocked",
        }
    }

    /// The NAT class the signaller's STUN probe should find for a host here (as the
    /// protocol spells it).
    pub fn nat_class(self) -> &'static str {
        match self {
            Self::Public => "public",
            Self::Cone => "cone",
            Self::FullCone => "full_cone",
            Self::Symmetric => "symmetric",
            Self::Blocked => "blocked",
        }
    }

    /// Whether ICE between hosts at `self` and `other` needs a TURN relay: the hole-punching
    /// matrix (port-restricted cone or symmetric on both ends, at least one symmetric), or
    /// a blocked end (no UDP at all, only TURN over TCP could help).
    pub fn needs_relay_with(self, other: Site) -> bool {
        if self == Site::Blocked || other == Site::Blocked {
            return true;
        }
        let restricted = |s: Site| matches!(s, Site::Cone | Site::Symmetric);
        restricted(self)
            && restricted(other)
            && (self == Site::Symmetric || other == Site::Symmetric)
    }
}

/// A host namespace.
#[derive(Debug, Clone)]
pub struct Host {
    /// Its namespace.
    pub ns: String,
    /// Its address (what its sockets bind).
    pub ip: Ipv4Addr,
    /// Where it sits.
    pub site: Site,
}

/// A process running inside the bed.
pub struct Process {
    /// What the test calls it.
    pub name: String,
    child: Child,
    /// The last JSON object it printed on stdout (processes started with `json_stdout`).
    latest: Arc<Mutex<Option<Value>>>,
    reader: Option<JoinHandle<()>>,
    /// Its stderr (or whole output), for failure reports.
    pub log: PathBuf,
}

impl Process {
    /// The last JSON status line it printed, if any.
    pub fn latest(&self) -> Option<Value> {
        self.latest.lock().ok().and_then(|l| l.clone())
    }

    /// Whether it is still running.
    pub fn running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    fn kill(&mut self) {
        // Its own process group: `ip netns exec` execs the program, which may fork.
        let _ = nix::sys::signal::killpg(Pid::from_raw(self.child.id() as i32), Signal::SIGKILL);
        let _ = self.child.kill();
        let _ = self.child.wait();
        if let Some(r) = self.reader.take() {
            let _ = r.join();
        }
    }
}

/// The thread inside the public namespace and its runtime.
struct PublicThread {
    runtime: tokio::runtime::Handle,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

/// The test bed. See the module docs.
pub struct Netbed {
    tag: String,
    /// Logs, coturn's database; removed on success, kept (and named) on failure.
    pub dir: PathBuf,
    namespaces: Vec<String>,
    public_ns: String,
    processes: Vec<Process>,
    public: Option<PublicThread>,
    routers: u8,
    public_hosts: u8,
}

/// Tools the bed runs, and the Debian package that has each.
const TOOLS: [(&str, &str); 4] = [
    ("ip", "iproute2"),
    ("tc", "iproute2"),
    ("iptables", "iptables"),
    ("turnserver", "coturn"),
];

impl Netbed {
    /// Creates the public network. Fails with a sentence saying what is missing when not
    /// root or a tool is absent.
    pub fn new() -> Self {
        assert!(
            nix::unistd::Uid::effective().is_root(),
            "the NAT test bed needs root (network namespaces, iptables): run it as root, \
             e.g. `sudo -E cargo test -p treecast-peer --test nat -- --ignored`"
        );
        for (tool, package) in TOOLS {
            assert!(
                on_path(tool),
                "the NAT test bed needs `{tool}`: install the Debian package `{package}` \
                 (scripts/test does: apt-get install iproute2 iptables coturn)"
            );
        }
        static BEDS: AtomicU32 = AtomicU32::new(0);
        let tag = format!(
            "tb{}x{}",
            std::process::id(),
            BEDS.fetch_add(1, Ordering::Relaxed)
        );
        let dir = std::env::temp_dir().join(format!("treecast-{tag}"));
        std::fs::create_dir_all(&dir).expect("creating the bed's temporary directory");
        let public_ns = format!("{tag}-pub");
        let mut bed = Self {
            tag,
            dir,
            namespaces: Vec::new(),
            public_ns: public_ns.clone(),
            processes: Vec::new(),
            public: None,
            routers: 0,
            public_hosts: 0,
        };
        bed.add_namespace(&public_ns);
        let p = public_ns.as_str();
        ip(&["-n", p, "link", "add", "br0", "type", "bridge"]);
        ip(&[
            "-n",
            p,
            "addr",
            "add",
            &format!("{SERVER_IP}/24"),
            "dev",
            "br0",
        ]);
        ip(&["-n", p, "link", "set", "br0", "up"]);
        route_to_nowhere(p, "br0");
        bed.public = Some(PublicThread::start(&public_ns));
        bed
    }

    /// The bed's tag (the prefix of its namespace names).
    pub fn tag(&self) -> &str {
        &self.tag
    }

    fn add_namespace(&mut self, ns: &str) {
        ip(&["netns", "add", ns]);
        self.namespaces.push(ns.to_owned());
        ip(&["-n", ns, "link", "set", "lo", "up"]);
    }

    /// A veth from the public bridge (`bridge_port` on its side) to `wan` in `ns`.
    fn plug_into_public(&mut self, bridge_port: &str, ns: &str, wan: &str, addr: Ipv4Addr) {
        let p = self.public_ns.clone();
        ip(&[
            "-n",
            &p,
            "link",
            "add",
            bridge_port,
            "type",
            "veth",
            "peer",
            "name",
            wan,
            "netns",
            ns,
        ]);
        ip(&["-n", &p, "link", "set", bridge_port, "master", "br0", "up"]);
        ip(&["-n", ns, "addr", "add", &format!("{addr}/24"), "dev", wan]);
        ip(&["-n", ns, "link", "set", wan, "up"]);
        route_to_nowhere(ns, wan);
    }

    /// A host at `site`: on the public network, or behind a new router of that kind.
    pub fn host(&mut self, site: Site) -> Host {
        if site == Site::Public {
            self.public_hosts += 1;
            let i = self.public_hosts;
            let ns = format!("{}-p{i}", self.tag);
            let addr = Ipv4Addr::new(203, 0, 113, 10 + i);
            self.add_namespace(&ns);
            self.plug_into_public(&format!("ph{i}"), &ns, "eth0", addr);
            return Host { ns, ip: addr, site };
        }
        self.routers += 1;
        let n = self.routers;
        assert!(n <= 100, "at most 100 routers per bed");
        let router = format!("{}-r{n}", self.tag);
        let ns = format!("{}-h{n}", self.tag);
        let lan_router = Ipv4Addr::new(10, 201, n, 1);
        let addr = Ipv4Addr::new(10, 201, n, 2);
        self.add_namespace(&router);
        self.plug_into_public(
            &format!("rt{n}"),
            &router,
            "wan",
            Ipv4Addr::new(203, 0, 113, 100 + n),
        );
        self.add_namespace(&ns);
        ip(&[
            "-n", &router, "link", "add", "lan", "type", "veth", "peer", "name", "eth0", "netns",
            &ns,
        ]);
        ip(&[
            "-n",
            &router,
            "addr",
            "add",
            &format!("{lan_router}/24"),
            "dev",
            "lan",
        ]);
        ip(&["-n", &router, "link", "set", "lan", "up"]);
        ip(&[
            "-n",
            &ns,
            "addr",
            "add",
            &format!("{addr}/24"),
            "dev",
            "eth0",
        ]);
        ip(&["-n", &ns, "link", "set", "eth0", "up"]);
        ip(&[
            "-n",
            &ns,
            "route",
            "add",
            "default",
            "via",
            &lan_router.to_string(),
        ]);
        in_ns(&router, "sysctl", &["-qw", "net.ipv4.ip_forward=1"]);
        let mut masquerade = vec![
            "-t",
            "nat",
            "-A",
            "POSTROUTING",
            "-o",
            "wan",
            "-j",
            "MASQUERADE",
        ];
        if site == Site::Symmetric {
            masquerade.push("--random-fully");
        }
        in_ns(&router, "iptables", &masquerade);
        in_ns(
            &router,
            "iptables",
            &[
                "-A",
                "INPUT",
                "-i",
                "wan",
                "-m",
                "conntrack",
                "--ctstate",
                "NEW",
                "-j",
                "DROP",
            ],
        );
        if site == Site::Blocked {
            in_ns(
                &router,
                "iptables",
                &["-A", "FORWARD", "-p", "udp", "-j", "DROP"],
            );
        }
        if site == Site::FullCone {
            let ports = format!("{}:{}", FULL_CONE_PORTS.start(), FULL_CONE_PORTS.end());
            in_ns(
                &router,
                "iptables",
                &[
                    "-t",
                    "nat",
                    "-A",
                    "PREROUTING",
                    "-i",
                    "wan",
                    "-p",
                    "udp",
                    "--dport",
                    &ports,
                    "-j",
                    "DNAT",
                    "--to-destination",
                    &addr.to_string(),
                ],
            );
        }
        Host { ns, ip: addr, site }
    }

    /// Starts `program args` inside `ns` in its own process group. With `json_stdout`, its
    /// stdout is read line by line and the last JSON object kept ([`Process::latest`]);
    /// stderr (and otherwise stdout too) goes to a log file.
    pub fn spawn(
        &mut self,
        name: &str,
        ns: &str,
        program: &Path,
        args: &[String],
        env: &[(&str, &str)],
        json_stdout: bool,
    ) -> &mut Process {
        let log = self.dir.join(format!("{name}.log"));
        let log_file = File::create(&log).expect("creating a log file");
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", ns])
            .arg(program)
            .args(args)
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stderr(log_file.try_clone().expect("cloning a log file handle"))
            .process_group(0);
        cmd.stdout(if json_stdout {
            Stdio::piped()
        } else {
            Stdio::from(log_file)
        });
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("starting {} in {ns}: {e}", program.display()));
        let latest = Arc::new(Mutex::new(None));
        let reader = child.stdout.take().map(|out| {
            let latest = latest.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(out).lines() {
                    let Ok(line) = line else { break };
                    if let Ok(v) = serde_json::from_str::<Value>(&line)
                        && let Ok(mut l) = latest.lock()
                    {
                        *l = Some(v);
                    }
                }
            })
        });
        self.processes.push(Process {
            name: name.to_owned(),
            child,
            latest,
            reader,
            log,
        });
        self.processes.last_mut().expect("just pushed")
    }

    /// A process started with [`Netbed::spawn`], by name.
    pub fn process(&self, name: &str) -> Option<&Process> {
        self.processes.iter().find(|p| p.name == name)
    }

    /// Starts coturn on [`SERVER_IP`]:[`TURN_PORT`] (STUN and TURN over UDP, TURN REST
    /// credentials with `secret`) and waits until it listens.
    pub fn start_coturn(&mut self, secret: &str) -> SocketAddr {
        let ip = SERVER_IP.to_string();
        let args: Vec<String> = [
            "-n".to_owned(),
            format!("--listening-ip={ip}"),
            format!("--relay-ip={ip}"),
            format!("--listening-port={TURN_PORT}"),
            "--min-port=49152".to_owned(),
            "--max-port=49999".to_owned(),
            "--realm=treecast.test".to_owned(),
            "--use-auth-secret".to_owned(),
            format!("--static-auth-secret={secret}"),
            "--fingerprint".to_owned(),
            "--no-tls".to_owned(),
            "--no-dtls".to_owned(),
            "--no-cli".to_owned(),
            format!("--userdb={}", self.dir.join("turndb").display()),
            format!("--pidfile={}", self.dir.join("turn.pid").display()),
            // Its own log file: coturn flushes that one line by line, not stdout.
            format!("--log-file={}", self.dir.join("turnserver.log").display()),
            "--no-stdout-log".to_owned(),
            "--verbose".to_owned(),
            "--simple-log".to_owned(),
        ]
        .into();
        let ns = self.public_ns.clone();
        self.spawn("coturn", &ns, Path::new("turnserver"), &args, &[], false);
        let deadline = Instant::now() + Duration::from_secs(30);
        let port = format!("sport = :{TURN_PORT}");
        loop {
            let out = Command::new("ip")
                .args(["netns", "exec", &ns, "ss", "-Hlun", &port])
                .output()
                .expect("running ss");
            if !String::from_utf8_lossy(&out.stdout).trim().is_empty() {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "coturn did not listen on {ip}:{TURN_PORT} within 30 s; its log: {}",
                self.tail("coturn", 20)
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        SocketAddr::from((SERVER_IP, TURN_PORT))
    }

    /// Runs `future` on the thread inside the public namespace (sockets it opens live
    /// there) and waits for its output.
    pub fn in_public<F>(&self, future: F) -> F::Output
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        let public = self
            .public
            .as_ref()
            .expect("the public thread runs until drop");
        let (tx, rx) = std::sync::mpsc::channel();
        public.runtime.spawn(async move {
            let _ = tx.send(future.await);
        });
        rx.recv().expect("the public namespace's runtime stopped")
    }

    /// Starts a signaller with `config` on [`SERVER_IP`]:[`SIGNALLER_PORT`], in this
    /// process, on the public namespace's thread. Returns its address.
    pub fn start_signaller(&self, config: treecast_signaller::Config) -> SocketAddr {
        let addr = SocketAddr::from((SERVER_IP, SIGNALLER_PORT));
        let listener = self
            .in_public(async move { tokio::net::TcpListener::bind(addr).await })
            .unwrap_or_else(|e| panic!("binding the signaller to {addr}: {e}"));
        let public = self
            .public
            .as_ref()
            .expect("the public thread runs until drop");
        // Stops with the public thread's runtime, when the bed is dropped.
        public.runtime.spawn(async move {
            if let Err(e) =
                treecast_signaller::serve(listener, config, std::future::pending()).await
            {
                eprintln!("the signaller stopped: {e}");
            }
        });
        addr
    }

    /// Starts a signaller as [`Netbed::start_signaller`] does, with its embedded STUN
    /// server on [`SERVER_IP`]:[`STUN_PORT`] and the next port (the alternate one the NAT
    /// probe needs), which it hands to clients first in their ICE servers.
    pub fn start_signaller_with_stun(&self, config: treecast_signaller::Config) -> SocketAddr {
        let addr = SocketAddr::from((SERVER_IP, SIGNALLER_PORT));
        let (listener, stun) = self
            .in_public(async move {
                let listener = tokio::net::TcpListener::bind(addr)
                    .await
                    .map_err(|e| format!("binding the signaller to {addr}: {e}"))?;
                let stun = treecast_signaller::StunSockets::bind(SERVER_IP.into(), STUN_PORT)
                    .await
                    .map_err(|e| e.to_string())?;
                Ok::<_, String>((listener, stun))
            })
            .unwrap_or_else(|e| panic!("{e}"));
        let public = self
            .public
            .as_ref()
            .expect("the public thread runs until drop");
        public.runtime.spawn(async move {
            if let Err(e) =
                treecast_signaller::serve_with_stun(listener, stun, config, std::future::pending())
                    .await
            {
                eprintln!("the signaller stopped: {e}");
            }
        });
        addr
    }

    /// Caps what `host` sends (its LAN interface's egress, toward its router or the public
    /// bridge) with a token bucket: `rate_kbit` kbit/s, a 4 kB burst, and a queue of at most
    /// 100 ms; what does not fit is dropped, as at a saturated home uplink.
    pub fn cap_uplink(&self, host: &Host, rate_kbit: u32) {
        let rate = format!("{rate_kbit}kbit");
        in_ns(
            &host.ns,
            "tc",
            &[
                "qdisc", "add", "dev", "eth0", "root", "tbf", "rate", &rate, "burst", "4kb",
                "latency", "100ms",
            ],
        );
    }

    /// Asks a process to stop (SIGINT: a native peer leaves the room and exits) and waits
    /// up to 10 s for it, then kills it.
    pub fn interrupt(&mut self, name: &str) {
        let Some(p) = self.processes.iter_mut().find(|p| p.name == name) else {
            return;
        };
        let _ = nix::sys::signal::kill(Pid::from_raw(p.child.id() as i32), Signal::SIGINT);
        let deadline = Instant::now() + Duration::from_secs(10);
        while p.running() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        p.kill();
    }

    /// Kills a process (SIGKILL to its whole process group) and waits for it.
    pub fn kill(&mut self, name: &str) {
        if let Some(p) = self.processes.iter_mut().find(|p| p.name == name) {
            p.kill();
        }
    }

    /// The last `lines` lines of a process's log.
    pub fn tail(&self, name: &str, lines: usize) -> String {
        let Some(p) = self.process(name) else {
            return format!("(no process {name})");
        };
        let text = std::fs::read_to_string(&p.log).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        let from = all.len().saturating_sub(lines);
        format!(
            "\n--- {name} ({}) ---\n{}",
            p.log.display(),
            all[from..].join("\n")
        )
    }

    /// The last lines of every process's log, for a failure message.
    pub fn tails(&self, lines: usize) -> String {
        self.processes
            .iter()
            .map(|p| self.tail(&p.name, lines))
            .collect()
    }

    /// Each process's last JSON line, by name.
    pub fn statuses(&self) -> BTreeMap<String, Value> {
        self.processes
            .iter()
            .filter_map(|p| Some((p.name.clone(), p.latest()?)))
            .collect()
    }
}

impl Drop for Netbed {
    fn drop(&mut self) {
        for p in &mut self.processes {
            p.kill();
        }
        if let Some(mut public) = self.public.take() {
            if let Some(stop) = public.stop.take() {
                let _ = stop.send(());
            }
            if let Some(t) = public.thread.take() {
                let _ = t.join();
            }
        }
        // Routers and hosts first, the public network last; a namespace takes its veths
        // (both ends) and its bridge with it.
        for ns in self.namespaces.iter().rev() {
            let out = Command::new("ip").args(["netns", "del", ns]).output();
            if !out.is_ok_and(|o| o.status.success()) {
                eprintln!("netbed: could not delete namespace {ns}");
            }
        }
        if std::thread::panicking() {
            eprintln!("netbed: logs kept in {}", self.dir.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

impl PublicThread {
    fn start(ns: &str) -> Self {
        let path = format!("/run/netns/{ns}");
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let thread = std::thread::Builder::new()
            .name(format!("{ns}-thread"))
            .spawn(move || {
                let entered = File::open(&path).map_err(|e| e.to_string()).and_then(|f| {
                    nix::sched::setns(f, CloneFlags::CLONE_NEWNET).map_err(|e| e.to_string())
                });
                if let Err(e) = entered {
                    let _ = ready_tx.send(Err(format!("entering {path}: {e}")));
                    return;
                }
                // One thread, so every socket opened by the tasks is opened in this namespace.
                let runtime = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(r) => r,
                    Err(e) => {
                        let _ = ready_tx.send(Err(format!("building a runtime: {e}")));
                        return;
                    }
                };
                let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
                let _ = ready_tx.send(Ok((runtime.handle().clone(), stop)));
                runtime.block_on(async move {
                    let _ = stopped.await;
                });
                // Dropping the runtime here cancels the signaller and every other task.
            })
            .expect("spawning the public namespace's thread");
        let (runtime, stop) = ready_rx
            .recv()
            .expect("the public namespace's thread started")
            .unwrap_or_else(|e| panic!("{e}"));
        Self {
            runtime,
            stop: Some(stop),
            thread: Some(thread),
        }
    }
}

/// Whether `tool` is an executable file in a `PATH` directory.
pub fn on_path(tool: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|path| std::env::split_paths(&path).any(|dir| dir.join(tool).is_file()))
}

/// A default route in `ns` through `dev` to [`NOWHERE`].
fn route_to_nowhere(ns: &str, dev: &str) {
    let gateway = NOWHERE.to_string();
    ip(&[
        "-n",
        ns,
        "neigh",
        "add",
        &gateway,
        "lladdr",
        NOWHERE_MAC,
        "dev",
        dev,
        "nud",
        "permanent",
    ]);
    ip(&[
        "-n", ns, "route", "add", "default", "via", &gateway, "dev", dev,
    ]);
}

/// Runs `ip ARGS`; panics with its stderr when it fails.
fn ip(args: &[&str]) {
    run("ip", args);
}

/// Runs `program args` inside `ns`.
fn in_ns(ns: &str, program: &str, args: &[&str]) {
    let mut all = vec!["netns", "exec", ns, program];
    all.extend_from_slice(args);
    run("ip", &all);
}

fn run(program: &str, args: &[&str]) {
    let out = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("running {program}: {e}"));
    assert!(
        out.status.success(),
        "`{program} {}` failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr).trim()
    );
}
