//! Who may do what: the operator's secret, room-creation grants, and the checks the HTTP
//! API makes with them.
//!
//! - The **operator secret** (`[access] admin_secret`, or `TREECAST_ADMIN_SECRET` read by
//!   the binary) unlocks the room listing, every room's snapshot and event stream, and
//!   room creation. Sent as `Authorization: Bearer <secret>`, compared in constant time.
//!   When the server listens beyond loopback (or creation needs grants) and no secret is
//!   configured, one is generated at start and written to `[access] secret_file`
//!   (mode 0600); the log names the file, never the secret.
//! - A **grant** is a JWT (HS256, `exp`/`nbf` required, `scope = "rooms:create"`) signed
//!   with a key derived from the operator secret; with `[access] create = "token"` it is
//!   what `POST /api/rooms` needs. `treecast-signaller mint-token` mints one.
//!
//! - A **private room** has its own random HMAC key, made when the room is and never
//!   stored or sent anywhere. Its viewers need a **link token** signed with it: a JWT
//!   (HS256) naming the room, an expiry, an optional number of uses and a random nonce.
//!   The room's task checks it at `hello` ([`PrivateRoom::admit`]); a missing or forged
//!   token is refused exactly like a room that does not exist.
//!
//! With neither a secret nor a non-loopback listener, everything stays open as it always
//! was: one person trying the server on their own machine needs no credentials.

use std::collections::HashMap;
use std::io::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use jsonwebtoken::crypto::{CryptoProvider, JwkUtils, JwtSigner, JwtVerifier};
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::signature::{self, Signer, Verifier};
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use ring::hmac;
use serde::{Deserialize, Serialize};
use treecast_core::protocol::{ErrorCode, Hello};
use treecast_core::turn::Secret;
use treecast_core::{PeerId, RoomId};

/// Environment variable the binary reads the operator secret from.
pub const ADMIN_SECRET_ENV: &str = "TREECAST_ADMIN_SECRET";

/// The scope a grant must carry to create rooms.
pub const CREATE_SCOPE: &str = "rooms:create";

/// Seconds of clock difference tolerated on a grant's `exp` and `nbf` (between the host
/// that minted it and this one).
pub const GRANT_LEEWAY_SECS: u64 = 30;

/// `[access]`: operator credentials and who may create rooms.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AccessConfig {
    /// The operator secret. Absent: `TREECAST_ADMIN_SECRET` (the binary lays it over this),
    /// else the contents of `secret_file` if it exists, else none on a loopback-only
    /// listener (everything open) and a generated one anywhere else.
    pub admin_secret: Option<Secret>,
    /// Where a generated operator secret is written (mode 0600) and read back on the next
    /// start; relative paths are relative to the working directory.
    pub secret_file: PathBuf,
    /// Who may create rooms: `open` (anyone) or `token` (a grant, or the operator secret).
    pub create: CreateMode,
    /// Longest lifetime of a private room's viewer link, in milliseconds (whole seconds
    /// count); also the lifetime of a link asked for without `expires_in_s`.
    #[serde(with = "crate::config::millis")]
    pub max_link_ttl: Duration,
}

/// Default [`AccessConfig::max_link_ttl`]: a day.
pub const DEFAULT_MAX_LINK_TTL: Duration = Duration::from_secs(24 * 3_600);

/// Most uses one viewer link may allow.
pub const MAX_LINK_USES: u32 = 1_000_000;

impl Default for AccessConfig {
    fn default() -> Self {
        Self {
            admin_secret: None,
            secret_file: PathBuf::from("treecast-admin-secret"),
            create: CreateMode::Open,
            max_link_ttl: DEFAULT_MAX_LINK_TTL,
        }
    }
}

/// Who may create rooms.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum CreateMode {
    /// Anyone who reaches the server.
    #[default]
    Open,
    /// Only with a grant (or the operator secret) in `Authorization: Bearer`.
    Token,
}

/// Why the access settings could not be put into effect.
#[derive(Debug, thiserror::Error)]
pub enum AccessError {
    /// The secret file could not be read or written.
    #[error("cannot use the operator secret file {path}: {source}")]
    File {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The secret is empty.
    #[error("the operator secret in {0} is empty")]
    Empty(String),
    /// No randomness for a new secret.
    #[error("cannot generate an operator secret: no randomness from the OS")]
    Random,
}

/// The access rules in force on one server.
#[derive(Debug)]
pub(crate) struct Access {
    operator: Option<OperatorKey>,
    /// Who may create rooms.
    pub create: CreateMode,
    /// Longest lifetime of a viewer link, whole seconds (at least one).
    pub max_link_ttl_s: u64,
}

struct OperatorKey {
    /// Random per process: the secret is compared as HMAC tags, in constant time and
    /// whatever the candidate's length.
    compare: hmac::Key,
    tag: hmac::Tag,
    grants: Vec<u8>,
}

impl std::fmt::Debug for OperatorKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("OperatorKey(<redacted>)")
    }
}

impl Access {
    /// Puts `config` into effect for a server listening on `local`.
    pub(crate) fn resolve(
        config: &AccessConfig,
        local: Option<SocketAddr>,
    ) -> Result<Self, AccessError> {
        let loopback = local.is_some_and(|a| a.ip().is_loopback());
        let secret = match &config.admin_secret {
            Some(s) if s.is_empty() => {
                return Err(AccessError::Empty("access.admin_secret".into()));
            }
            Some(s) => Some(s.clone()),
            None if config.secret_file.exists() => Some(read_secret_file(&config.secret_file)?),
            None if loopback && config.create == CreateMode::Open => None,
            None => Some(generate_secret_file(&config.secret_file)?),
        };
        let operator = secret.map(|s| OperatorKey::new(s.expose())).transpose()?;
        if operator.is_none() {
            tracing::info!(
                "no operator secret: the room list, dashboards and room creation are open to \
                 anyone who reaches this loopback address (behind a reverse proxy that is \
                 everyone: set TREECAST_ADMIN_SECRET or [access] admin_secret)"
            );
        }
        Ok(Self {
            operator,
            create: config.create,
            max_link_ttl_s: config.max_link_ttl.as_secs().max(1),
        })
    }

    /// Whether operator credentials are needed at all.
    pub(crate) fn operator_required(&self) -> bool {
        self.operator.is_some()
    }

    /// Whether `bearer` is the operator secret (always true when there is none).
    pub(crate) fn is_operator(&self, bearer: Option<&str>) -> bool {
        match (&self.operator, bearer) {
            (None, _) => true,
            (Some(key), Some(b)) => {
                hmac::verify(&key.compare, b.as_bytes(), key.tag.as_ref()).is_ok()
            }
            (Some(_), None) => false,
        }
    }

    /// Checks a room-creation grant.
    pub(crate) fn check_grant(&self, token: &str) -> Result<GrantClaims, GrantRefusal> {
        let Some(key) = &self.operator else {
            return Err(GrantRefusal::Invalid);
        };
        verify_grant(&key.grants, token)
    }
}

impl OperatorKey {
    fn new(secret: &[u8]) -> Result<Self, AccessError> {
        let rng = ring::rand::SystemRandom::new();
        let compare =
            hmac::Key::generate(hmac::HMAC_SHA256, &rng).map_err(|_| AccessError::Random)?;
        Ok(Self {
            tag: hmac::sign(&compare, secret),
            compare,
            grants: grant_key(secret),
        })
    }
}

/// Whether two secrets are equal, in time independent of where they differ.
pub(crate) fn same_secret(a: &str, b: &str) -> bool {
    // A fixed key is enough: the tags only stand in for the values during the comparison.
    let key = hmac::Key::new(hmac::HMAC_SHA256, b"treecast secret comparison");
    hmac::verify(&key, a.as_bytes(), hmac::sign(&key, b.as_bytes()).as_ref()).is_ok()
}

/// Reads a secret file written by [`generate_secret_file`] (or by the operator).
pub fn read_secret_file(path: &Path) -> Result<Secret, AccessError> {
    let file_err = |source| AccessError::File {
        path: path.to_owned(),
        source,
    };
    let text = std::fs::read_to_string(path).map_err(file_err)?;
    let secret = text.trim();
    if secret.is_empty() {
        return Err(AccessError::Empty(path.display().to_string()));
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt as _;
        if let Ok(meta) = std::fs::metadata(path)
            && meta.permissions().mode() & 0o077 != 0
        {
            tracing::warn!(
                "the operator secret file {} can be read by other users; \
                 run chmod 600 on it",
                path.display()
            );
        }
    }
    tracing::info!(
        "operator secret read from {}; send it as \"Authorization: Bearer <secret>\"",
        path.display()
    );
    Ok(Secret::new(secret))
}

/// Generates a 256-bit secret and writes it, as 64 hex digits, to a new file only this
/// user can read. Logs where it is, never what it is.
fn generate_secret_file(path: &Path) -> Result<Secret, AccessError> {
    let file_err = |source| AccessError::File {
        path: path.to_owned(),
        source,
    };
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes).map_err(|_| AccessError::Random)?;
    let secret: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut file = options.open(path).map_err(file_err)?;
    file.write_all(format!("{secret}\n").as_bytes())
        .and_then(|()| file.sync_all())
        .map_err(file_err)?;
    let shown = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_owned());
    tracing::warn!(
        "this server is reachable beyond loopback and no operator secret was configured: \
         generated one in {} (readable only by this user). The dashboard and the room API \
         ask for it.",
        shown.display()
    );
    Ok(Secret::new(secret))
}

/// The claims of a room-creation grant.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GrantClaims {
    /// Who the grant is for (free text, shown in logs).
    pub sub: String,
    /// What it allows: [`CREATE_SCOPE`].
    pub scope: String,
    /// Issued at (Unix seconds).
    pub iat: u64,
    /// Not valid before (Unix seconds).
    pub nbf: u64,
    /// Expires at (Unix seconds).
    pub exp: u64,
}

/// Why a grant was refused. Each reads as a sentence for the client.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum GrantRefusal {
    /// Past its `exp`.
    #[error("The grant has expired; ask the operator for a new one.")]
    Expired,
    /// Before its `nbf`.
    #[error("The grant is not valid yet.")]
    NotYetValid,
    /// Not signed with this server's key, or tampered with.
    #[error("The grant was not issued by this server's operator.")]
    Forged,
    /// Not a JWT, or its claims are missing or mistyped.
    #[error("The grant is not a valid token.")]
    Invalid,
    /// Valid, but for something else.
    #[error("The grant does not allow creating rooms.")]
    WrongScope,
}

/// The HMAC key grants are signed with: derived from the operator secret so a grant never
/// reveals anything about the secret itself.
fn grant_key(secret: &[u8]) -> Vec<u8> {
    let key = hmac::Key::new(hmac::HMAC_SHA256, secret);
    hmac::sign(&key, b"treecast room-creation grant key v1")
        .as_ref()
        .to_vec()
}

/// Mints a room-creation grant for `sub`, valid from `nbf` to `exp` (Unix seconds), signed
/// with the key derived from the operator `secret`.
pub fn mint_grant(secret: &[u8], sub: &str, nbf: u64, exp: u64) -> Result<String, String> {
    mint_claims(
        secret,
        &GrantClaims {
            sub: sub.to_owned(),
            scope: CREATE_SCOPE.to_owned(),
            iat: now_unix(),
            nbf,
            exp,
        },
    )
}

/// Mints a grant with exactly these claims (tests use it for odd scopes).
pub fn mint_claims(secret: &[u8], claims: &GrantClaims) -> Result<String, String> {
    install_provider();
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        claims,
        &EncodingKey::from_secret(&grant_key(secret)),
    )
    .map_err(|e| e.to_string())
}

fn verify_grant(key: &[u8], token: &str) -> Result<GrantClaims, GrantRefusal> {
    install_provider();
    let mut validation = Validation::new(Algorithm::HS256);
    validation.validate_nbf = true;
    validation.leeway = GRANT_LEEWAY_SECS;
    validation.set_required_spec_claims(&["exp", "nbf", "sub"]);
    let data =
        jsonwebtoken::decode::<GrantClaims>(token, &DecodingKey::from_secret(key), &validation)
            .map_err(|e| match e.kind() {
                ErrorKind::ExpiredSignature => GrantRefusal::Expired,
                ErrorKind::ImmatureSignature => GrantRefusal::NotYetValid,
                ErrorKind::InvalidSignature | ErrorKind::InvalidAlgorithm => GrantRefusal::Forged,
                _ => GrantRefusal::Invalid,
            })?;
    if data.claims.scope != CREATE_SCOPE {
        return Err(GrantRefusal::WrongScope);
    }
    Ok(data.claims)
}

/// Seconds since the Unix epoch.
pub fn now_unix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default()
}

/// The claims of a private room's viewer link.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LinkClaims {
    /// The room it opens (checked too, though another room's key could not have signed it).
    pub room: String,
    /// Expires at (Unix seconds).
    pub exp: u64,
    /// How many joins it allows; absent: any number until it expires.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_uses: Option<u32>,
    /// 128 random bits as 32 hex digits: uses are counted per nonce.
    pub nonce: String,
}

/// A private room's signing key: 256 random bits, held by the room's task and handle, and
/// forgotten with the room.
pub(crate) struct LinkKey([u8; 32]);

impl std::fmt::Debug for LinkKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("LinkKey(<redacted>)")
    }
}

/// Why a link token does not let its bearer in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum LinkRefusal {
    /// Not signed with this room's key, not a token, or naming another room.
    Invalid,
    /// Genuine, past its `exp`.
    Expired,
}

impl LinkKey {
    /// A key from its bytes (derived from the server's key).
    pub(crate) fn from_bytes(key: [u8; 32]) -> Self {
        Self(key)
    }

    /// A fresh key from the OS's randomness.
    #[cfg(test)]
    pub(crate) fn generate() -> Result<Self, getrandom::Error> {
        let mut key = [0u8; 32];
        getrandom::fill(&mut key)?;
        Ok(Self(key))
    }

    /// Signs a link for `room`, valid until `exp` (Unix seconds), for at most `max_uses`
    /// joins, with a fresh nonce.
    pub(crate) fn mint(
        &self,
        room: &RoomId,
        exp: u64,
        max_uses: Option<u32>,
    ) -> Result<String, String> {
        let mut nonce = [0u8; 16];
        getrandom::fill(&mut nonce).map_err(|e| e.to_string())?;
        self.mint_claims(&LinkClaims {
            room: room.as_str().to_owned(),
            exp,
            max_uses,
            nonce: nonce.iter().map(|b| format!("{b:02x}")).collect(),
        })
    }

    fn mint_claims(&self, claims: &LinkClaims) -> Result<String, String> {
        install_provider();
        jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            claims,
            &EncodingKey::from_secret(&self.0),
        )
        .map_err(|e| e.to_string())
    }

    /// Checks a link for `room` at `now` (Unix seconds). The signature is checked first:
    /// only a genuine token can be told apart as expired.
    pub(crate) fn verify(
        &self,
        room: &RoomId,
        token: &str,
        now: u64,
    ) -> Result<LinkClaims, LinkRefusal> {
        install_provider();
        let mut validation = Validation::new(Algorithm::HS256);
        // The expiry is checked below against the caller's clock, with no leeway: the
        // same server signs and checks.
        validation.validate_exp = false;
        validation.leeway = 0;
        validation.set_required_spec_claims(&["exp"]);
        let claims = jsonwebtoken::decode::<LinkClaims>(
            token,
            &DecodingKey::from_secret(&self.0),
            &validation,
        )
        .map_err(|_| LinkRefusal::Invalid)?
        .claims;
        if claims.room != room.as_str() {
            return Err(LinkRefusal::Invalid);
        }
        if now >= claims.exp {
            return Err(LinkRefusal::Expired);
        }
        Ok(claims)
    }
}

/// How a `hello` got past a private room's door.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Admit {
    /// The broadcaster token, or a resume token the room handed out: no link needed, no
    /// use counted.
    Free,
    /// A valid link: one use of this nonce is counted if the room welcomes the peer as new.
    Link(String),
}

/// A private room's door, kept by its task: the key, the uses counted per link nonce, and
/// the resume tokens of the peers it let in (so a resume needs no link and costs no use).
#[derive(Debug)]
pub(crate) struct PrivateRoom {
    key: std::sync::Arc<LinkKey>,
    room: RoomId,
    token: std::sync::Arc<str>,
    uses: HashMap<String, u32>,
    resumes: HashMap<String, PeerId>,
    resume_of: HashMap<PeerId, String>,
}

impl PrivateRoom {
    /// The door of `room`, whose broadcaster token is `token`.
    pub(crate) fn new(
        key: std::sync::Arc<LinkKey>,
        room: RoomId,
        token: std::sync::Arc<str>,
    ) -> Self {
        Self {
            key,
            room,
            token,
            uses: HashMap::new(),
            resumes: HashMap::new(),
            resume_of: HashMap::new(),
        }
    }

    /// Whether `hello` may go on to the room at `now` (Unix seconds), or the code to refuse
    /// it with. Anything short of a genuine link for this room (or the broadcaster token, or
    /// a resume token this room issued) is `unknown_room`, as if there were no room.
    pub(crate) fn admit(&self, hello: &Hello, now: u64) -> Result<Admit, ErrorCode> {
        if hello
            .token
            .as_deref()
            .is_some_and(|t| same_secret(t, &self.token))
        {
            return Ok(Admit::Free);
        }
        if hello
            .resume
            .as_deref()
            .is_some_and(|r| self.resumes.contains_key(r))
        {
            return Ok(Admit::Free);
        }
        let Some(link) = hello.link.as_deref() else {
            return Err(ErrorCode::UnknownRoom);
        };
        let claims = self
            .key
            .verify(&self.room, link, now)
            .map_err(|r| match r {
                LinkRefusal::Invalid => ErrorCode::UnknownRoom,
                LinkRefusal::Expired => ErrorCode::LinkExpired,
            })?;
        if let Some(max) = claims.max_uses
            && self.uses.get(&claims.nonce).copied().unwrap_or(0) >= max
        {
            return Err(ErrorCode::LinkUsedUp);
        }
        Ok(Admit::Link(claims.nonce))
    }

    /// The room welcomed `peer` with resume token `resume`; `admit` is how its `hello` got
    /// in. A new peer let in by a link uses it once.
    pub(crate) fn welcomed(&mut self, peer: PeerId, resume: &str, resumed: bool, admit: &Admit) {
        if !resumed && let Admit::Link(nonce) = admit {
            *self.uses.entry(nonce.clone()).or_insert(0) += 1;
        }
        if self.resume_of.insert(peer, resume.to_owned()).is_none() {
            self.resumes.insert(resume.to_owned(), peer);
        }
    }

    /// `peer` left the room for good: its resume token opens nothing any more.
    pub(crate) fn left(&mut self, peer: PeerId) {
        if let Some(resume) = self.resume_of.remove(&peer) {
            self.resumes.remove(&resume);
        }
    }
}

/// HS256 over `ring`, already in the build for TLS: `jsonwebtoken` otherwise wants
/// RustCrypto's whole RSA/ECDSA/EdDSA stack or aws-lc, for an algorithm we never accept.
static PROVIDER: CryptoProvider = CryptoProvider {
    signer_factory: hs256_signer,
    verifier_factory: hs256_verifier,
    jwk_utils: JwkUtils::new_unimplemented(),
};

fn install_provider() {
    // Fails only if already installed: by this function, since nothing else does.
    let _ = PROVIDER.install_default();
}

struct RingHs256(hmac::Key);

fn hs256_key(algorithm: &Algorithm, secret: &[u8]) -> jsonwebtoken::errors::Result<RingHs256> {
    if *algorithm != Algorithm::HS256 {
        return Err(ErrorKind::InvalidAlgorithm.into());
    }
    Ok(RingHs256(hmac::Key::new(hmac::HMAC_SHA256, secret)))
}

fn hs256_signer(
    algorithm: &Algorithm,
    key: &EncodingKey,
) -> jsonwebtoken::errors::Result<Box<dyn JwtSigner>> {
    Ok(Box::new(hs256_key(algorithm, key.try_get_hmac_secret()?)?))
}

fn hs256_verifier(
    algorithm: &Algorithm,
    key: &DecodingKey,
) -> jsonwebtoken::errors::Result<Box<dyn JwtVerifier>> {
    Ok(Box::new(hs256_key(algorithm, key.try_get_hmac_secret()?)?))
}

impl Signer<Vec<u8>> for RingHs256 {
    fn try_sign(&self, msg: &[u8]) -> Result<Vec<u8>, signature::Error> {
        Ok(hmac::sign(&self.0, msg).as_ref().to_vec())
    }
}

impl Verifier<Vec<u8>> for RingHs256 {
    fn verify(&self, msg: &[u8], tag: &Vec<u8>) -> Result<(), signature::Error> {
        hmac::verify(&self.0, msg, tag).map_err(|_| signature::Error::new())
    }
}

impl JwtSigner for RingHs256 {
    fn algorithm(&self) -> Algorithm {
        Algorithm::HS256
    }
}

impl JwtVerifier for RingHs256 {
    fn algorithm(&self) -> Algorithm {
        Algorithm::HS256
    }
}

/// The token of an `Authorization: Bearer <token>` header.
pub(crate) fn bearer(headers: &axum::http::HeaderMap) -> Option<&str> {
    let value = headers
        .get(axum::http::header::AUTHORIZATION)?
        .to_str()
        .ok()?;
    let (scheme, token) = value.split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

/// Reads a duration like `90s`, `30m`, `1h` or `7d` (a bare number is seconds).
pub fn parse_ttl(text: &str) -> Result<u64, String> {
    let text = text.trim();
    let (digits, unit) = match text.find(|c: char| !c.is_ascii_digit()) {
        Some(i) => text.split_at(i),
        None => (text, "s"),
    };
    let n: u64 = digits
        .parse()
        .map_err(|_| format!("{text:?} is not a duration like 90s, 30m, 1h or 7d"))?;
    let unit = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3_600,
        "d" => 86_400,
        _ => return Err(format!("{text:?}: the unit must be s, m, h or d")),
    };
    n.checked_mul(unit)
        .filter(|&s| s > 0)
        .ok_or_else(|| format!("{text:?} must be above zero and below centuries"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grants_check_signature_time_and_scope() {
        let key = grant_key(b"s3cret");
        let now = now_unix();
        let good = mint_grant(b"s3cret", "ops", now - 10, now + 3_600).unwrap();
        assert_eq!(verify_grant(&key, &good).unwrap().sub, "ops");
        let forged = mint_grant(b"other", "ops", now - 10, now + 3_600).unwrap();
        assert_eq!(verify_grant(&key, &forged), Err(GrantRefusal::Forged));
        let old = mint_grant(b"s3cret", "ops", now - 7_200, now - 3_600).unwrap();
        assert_eq!(verify_grant(&key, &old), Err(GrantRefusal::Expired));
        let early = mint_grant(b"s3cret", "ops", now + 3_600, now + 7_200).unwrap();
        assert_eq!(verify_grant(&key, &early), Err(GrantRefusal::NotYetValid));
        assert_eq!(verify_grant(&key, "nope"), Err(GrantRefusal::Invalid));
        let other = mint_claims(
            b"s3cret",
            &GrantClaims {
                sub: "x".into(),
                scope: "rooms:list".into(),
                iat: now,
                nbf: now,
                exp: now + 60,
            },
        )
        .unwrap();
        assert_eq!(verify_grant(&key, &other), Err(GrantRefusal::WrongScope));
    }

    #[test]
    fn a_mistyped_nbf_is_refused_not_ignored() {
        // GHSA-h395-gr6q-cpjc: a string `nbf` must not count as "no nbf".
        let key = grant_key(b"k");
        let header = r#"{"alg":"HS256","typ":"JWT"}"#;
        let claims =
            r#"{"sub":"x","scope":"rooms:create","iat":1,"nbf":"99999999999","exp":99999999999}"#;
        use base64_url as b64;
        let signing_input = format!("{}.{}", b64(header), b64(claims));
        let tag = hmac::sign(
            &hmac::Key::new(hmac::HMAC_SHA256, &key),
            signing_input.as_bytes(),
        );
        let token = format!("{signing_input}.{}", b64_bytes(tag.as_ref()));
        assert!(verify_grant(&key, &token).is_err());

        fn base64_url(s: &str) -> String {
            b64_bytes(s.as_bytes())
        }
        fn b64_bytes(bytes: &[u8]) -> String {
            const A: &[u8; 64] =
                b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
            let mut out = String::new();
            for chunk in bytes.chunks(3) {
                let n = chunk
                    .iter()
                    .enumerate()
                    .fold(0u32, |n, (i, b)| n | u32::from(*b) << (16 - 8 * i));
                for i in 0..=chunk.len() {
                    out.push(char::from(A[(n >> (18 - 6 * i) & 63) as usize]));
                }
            }
            out
        }
    }

    fn hello(link: Option<&str>, resume: Option<&str>, token: Option<&str>) -> Hello {
        Hello {
            v: 1,
            room: RoomId::new("room-a").unwrap(),
            role: treecast_core::protocol::Role::Viewer,
            token: token.map(str::to_owned),
            uplink_kbps: None,
            resume: resume.map(str::to_owned),
            link: link.map(str::to_owned),
            claim: None,
        }
    }

    #[test]
    fn link_tokens_are_checked_signature_first() {
        let room = RoomId::new("room-a").unwrap();
        let other_room = RoomId::new("room-b").unwrap();
        let key = LinkKey::generate().unwrap();
        let other_key = LinkKey::generate().unwrap();
        let now = 1_000_000;
        let good = key.mint(&room, now + 60, Some(3)).unwrap();
        let claims = key.verify(&room, &good, now).unwrap();
        assert_eq!((claims.exp, claims.max_uses), (now + 60, Some(3)));
        assert_eq!(claims.nonce.len(), 32);
        assert_eq!(
            key.verify(&room, &good, now + 60),
            Err(LinkRefusal::Expired)
        );
        // Another key's token, even expired, is only ever "invalid".
        let foreign = other_key.mint(&room, now - 10, None).unwrap();
        assert_eq!(key.verify(&room, &foreign, now), Err(LinkRefusal::Invalid));
        // Signed by this key for another room id.
        let misnamed = key.mint(&other_room, now + 60, None).unwrap();
        assert_eq!(key.verify(&room, &misnamed, now), Err(LinkRefusal::Invalid));
        assert_eq!(key.verify(&room, "a.b.c", now), Err(LinkRefusal::Invalid));
        // Two links never share a nonce.
        let again = key.mint(&room, now + 60, Some(3)).unwrap();
        assert_ne!(key.verify(&room, &again, now).unwrap().nonce, claims.nonce);
    }

    #[test]
    fn a_private_room_counts_uses_per_link_and_frees_resumes() {
        let room = RoomId::new("room-a").unwrap();
        let key = std::sync::Arc::new(LinkKey::generate().unwrap());
        let mut door = PrivateRoom::new(key.clone(), room.clone(), "b-token".into());
        let now = now_unix();
        let once = key.mint(&room, now + 60, Some(1)).unwrap();
        assert_eq!(
            door.admit(&hello(None, None, None), now),
            Err(ErrorCode::UnknownRoom)
        );
        assert_eq!(
            door.admit(&hello(None, None, Some("b-token")), now),
            Ok(Admit::Free)
        );
        let Ok(admit @ Admit::Link(_)) = door.admit(&hello(Some(&once), None, None), now) else {
            panic!("a genuine link is let in");
        };
        // Refused by the room (no welcome): nothing counted, the link still works.
        assert!(door.admit(&hello(Some(&once), None, None), now).is_ok());
        door.welcomed(PeerId(7), "r7", false, &admit);
        assert_eq!(
            door.admit(&hello(Some(&once), None, None), now),
            Err(ErrorCode::LinkUsedUp)
        );
        // Its resume needs no link and costs nothing.
        assert_eq!(
            door.admit(&hello(None, Some("r7"), None), now),
            Ok(Admit::Free)
        );
        door.welcomed(PeerId(7), "r7", true, &Admit::Free);
        door.left(PeerId(7));
        assert_eq!(
            door.admit(&hello(None, Some("r7"), None), now),
            Err(ErrorCode::UnknownRoom)
        );
    }

    #[test]
    fn secrets_compare_whole() {
        assert!(same_secret("abc", "abc"));
        assert!(!same_secret("abc", "abd"));
        assert!(!same_secret("abc", "abcd"));
        assert!(!same_secret("", "a"));
    }

    #[test]
    fn ttls_read_like_people_write_them() {
        assert_eq!(parse_ttl("1h"), Ok(3_600));
        assert_eq!(parse_ttl("90"), Ok(90));
        assert_eq!(parse_ttl("7d"), Ok(604_800));
        assert!(parse_ttl("0s").is_err());
        assert!(parse_ttl("1y").is_err());
        assert!(parse_ttl("h").is_err());
    }
}
