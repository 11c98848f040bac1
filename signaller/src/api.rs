//! The HTTP API: rooms, snapshots, the dashboard event stream, health and metrics.
//!
//! Every failure is answered with a JSON body `{"code": ..., "message": ...}` using the
//! protocol's [`ErrorCode`]s, so programs can branch on `code` and people can read
//! `message`. Server faults are logged with their details; the client gets a sentence.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{ConnectInfo, Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures_util::{Stream, StreamExt as _};
use serde::{Deserialize, Serialize};
use tokio::sync::{broadcast, oneshot, watch};
use tokio::time::Instant;
use treecast_core::RoomId;
use treecast_core::protocol::ErrorCode;
use treecast_core::quality::{Quality, VideoFormat};
use treecast_core::room::{RoomConfig, RoomSettings, RoomSnapshot, Tuning};

use crate::access::{self, CreateMode, GrantRefusal};
use crate::room_task::{DashboardEvent, RoomCommand, RoomTask};
use crate::rooms::{self, AddError, RoomHandle};
use crate::server::ServerState;
use crate::telemetry;

/// An HTTP error answer: a status and the JSON body `{code, message}`.
#[derive(Debug)]
pub(crate) struct ApiError {
    status: StatusCode,
    code: ErrorCode,
    message: String,
}

impl ApiError {
    /// An error with the code's standard sentence and its usual status.
    pub(crate) fn new(code: ErrorCode) -> Self {
        Self::with(code, code.sentence())
    }

    /// An error with a specific sentence (counted in the errors metric, like the
    /// WebSocket's).
    pub(crate) fn with(code: ErrorCode, message: impl Into<String>) -> Self {
        telemetry::error_sent(code);
        Self {
            status: status_of(code),
            code,
            message: message.into(),
        }
    }

    /// A server fault: logs `detail`, counts it, and tells the client only a sentence.
    fn internal(detail: impl std::fmt::Display) -> Self {
        tracing::error!("HTTP request failed on the server: {detail}");
        Self::new(ErrorCode::Internal)
    }
}

/// The HTTP status that goes with an error code.
fn status_of(code: ErrorCode) -> StatusCode {
    match code {
        ErrorCode::UnknownRoom | ErrorCode::UnknownPeer => StatusCode::NOT_FOUND,
        ErrorCode::RoomEnded => StatusCode::GONE,
        ErrorCode::TooManyRooms | ErrorCode::ShuttingDown => StatusCode::SERVICE_UNAVAILABLE,
        ErrorCode::TooManyConnections | ErrorCode::RateLimited => StatusCode::TOO_MANY_REQUESTS,
        ErrorCode::TooLarge => StatusCode::PAYLOAD_TOO_LARGE,
        ErrorCode::WrongToken
        | ErrorCode::Forbidden
        | ErrorCode::LinkExpired
        | ErrorCode::LinkUsedUp => StatusCode::FORBIDDEN,
        ErrorCode::NotPrivate => StatusCode::CONFLICT,
        ErrorCode::Unauthorized => StatusCode::UNAUTHORIZED,
        ErrorCode::Internal => StatusCode::INTERNAL_SERVER_ERROR,
        _ => StatusCode::BAD_REQUEST,
    }
}

#[derive(Serialize)]
struct ErrorBody<'a> {
    code: &'a str,
    message: &'a str,
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = ErrorBody {
            code: self.code.as_str(),
            message: &self.message,
        };
        let mut response = (self.status, Json(body)).into_response();
        if self.status == StatusCode::UNAUTHORIZED {
            response.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                header::HeaderValue::from_static("Bearer"),
            );
        }
        response
    }
}

/// Refuses unless the request carries the operator secret (or the server has none).
fn require_operator(state: &ServerState, headers: &HeaderMap) -> Result<(), ApiError> {
    let bearer = access::bearer(headers);
    if state.access.is_operator(bearer) {
        return Ok(());
    }
    Err(match bearer {
        None => ApiError::with(
            ErrorCode::Unauthorized,
            "This needs the operator's secret: send \"Authorization: Bearer <secret>\".",
        ),
        Some(_) => ApiError::with(ErrorCode::Unauthorized, "The operator secret is not valid."),
    })
}

/// The room, if the request may see it: with the operator secret, or with this room's
/// broadcaster token. Anyone else gets the same `unauthorized` whether the room exists or
/// not, so the answer tells them nothing about which rooms there are.
///
/// Without an operator secret everyone counts as the operator, except for private rooms:
/// those show themselves only to their broadcaster token, and answer anyone else exactly
/// as a room that does not exist.
fn room_for(state: &ServerState, headers: &HeaderMap, room: &str) -> Result<RoomHandle, ApiError> {
    let bearer = access::bearer(headers);
    if state.access.is_operator(bearer) {
        let handle = find_room(state, room)?;
        let hidden = !state.access.operator_required()
            && handle.link_key.is_some()
            && !bearer.is_some_and(|b| access::same_secret(&handle.token, b));
        return if hidden {
            Err(unknown_room(room))
        } else {
            Ok(handle)
        };
    }
    let refused = || {
        ApiError::with(
            ErrorCode::Unauthorized,
            "This needs the operator's secret or this room's broadcaster token in \
             \"Authorization: Bearer\".",
        )
    };
    let token = bearer.ok_or_else(refused)?;
    let handle = RoomId::new(room)
        .ok()
        .and_then(|id| state.rooms.get(&id))
        .ok_or_else(refused)?;
    if access::same_secret(&handle.token, token) {
        Ok(handle)
    } else {
        Err(refused())
    }
}

/// With `[access] create = "token"`: refuses unless the request carries a valid grant or
/// the operator secret.
fn require_creation_right(state: &ServerState, headers: &HeaderMap) -> Result<(), ApiError> {
    if state.access.create == CreateMode::Open {
        return Ok(());
    }
    let bearer = access::bearer(headers);
    if state.access.operator_required() && state.access.is_operator(bearer) {
        return Ok(());
    }
    let Some(grant) = bearer else {
        return Err(ApiError::with(
            ErrorCode::Unauthorized,
            "Creating rooms on this server needs a grant from its operator: send \
             \"Authorization: Bearer <grant>\".",
        ));
    };
    match state.access.check_grant(grant) {
        Ok(claims) => {
            tracing::info!(grant = %claims.sub, "room creation allowed by a grant");
            Ok(())
        }
        Err(GrantRefusal::WrongScope) => Err(ApiError::with(
            ErrorCode::Forbidden,
            GrantRefusal::WrongScope.to_string(),
        )),
        Err(refusal) => Err(ApiError::with(ErrorCode::Unauthorized, refusal.to_string())),
    }
}

/// The answer to `GET /api/access`.
#[derive(Debug, Serialize)]
pub(crate) struct AccessInfo {
    /// Who may create rooms: `open` or `token`.
    create: CreateMode,
    /// Whether the listing, dashboards and snapshots need the operator secret.
    operator_required: bool,
}

/// `GET /api/access`: what this server asks of whom, so pages know to ask for a secret or
/// a grant before trying.
pub(crate) async fn access(State(state): State<Arc<ServerState>>) -> Json<AccessInfo> {
    Json(AccessInfo {
        create: state.access.create,
        operator_required: state.access.operator_required(),
    })
}

/// The answer to `POST /api/rooms`.
#[derive(Debug, Serialize)]
struct CreatedRoom {
    /// The new room's id.
    room: RoomId,
    /// The broadcaster token: whoever presents it in `hello` may broadcast.
    token: String,
    /// Where viewers watch, relative to this server.
    watch_url: String,
    /// The room's stream bitrate, kbit/s (the chosen quality's, or the server's default).
    stream_kbps: u32,
    /// The picture the broadcaster chose, if it chose one.
    #[serde(skip_serializing_if = "Option::is_none")]
    video: Option<VideoFormat>,
    /// Viewers need a signed link (`POST /api/rooms/{room}/links`).
    private: bool,
    /// The broadcast's title, as it will be shown.
    #[serde(skip_serializing_if = "Option::is_none")]
    title: Option<String>,
}

/// Largest `POST /api/rooms` body: a quality name fits many times over.
pub(crate) const MAX_ROOM_BODY: usize = 4 * 1024;

/// The optional body of `POST /api/rooms`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct NewRoom {
    /// A preset name (`"720p"`); absent: the server's `stream_kbps`, no picture told.
    #[serde(default)]
    quality: Option<String>,
    /// Viewers need a signed link (`POST /api/rooms/{room}/links`); absent: public.
    #[serde(default)]
    private: bool,
    /// The broadcast's title, shown to viewers ([`MAX_TITLE_CHARS`] at most).
    #[serde(default)]
    title: Option<String>,
    /// Room settings, the fields of [`SettingsRequest`] repeated: serde cannot flatten a
    /// struct into one that denies unknown fields. Absent ones are the server's.
    #[serde(default)]
    root_fanout: Option<u32>,
    #[serde(default)]
    relay_fanout: Option<u32>,
    #[serde(default)]
    max_depth: Option<u32>,
    #[serde(default)]
    max_viewers: Option<u32>,
}

/// The settings a request may choose for a room: at creation (`POST /api/rooms`) or while
/// it runs (`PATCH /api/rooms/{room}`). Each is bounded by the server's `[room]` value of
/// the same setting, which is its maximum (`max_viewers` by `max_peers`).
#[derive(Debug, Default, Clone, Copy, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct SettingsRequest {
    /// Most children the broadcaster may feed: 1 to the server's `root_fanout`.
    #[serde(default)]
    root_fanout: Option<u32>,
    /// Most children a viewer may feed: 0 (viewers never relay) to the server's
    /// `relay_fanout`.
    #[serde(default)]
    relay_fanout: Option<u32>,
    /// Deepest position: 1 to the server's `max_depth`.
    #[serde(default)]
    max_depth: Option<u32>,
    /// Most viewers: 1 to the server's `max_peers`.
    #[serde(default)]
    max_viewers: Option<u32>,
}

impl SettingsRequest {
    fn is_empty(&self) -> bool {
        self.root_fanout.is_none()
            && self.relay_fanout.is_none()
            && self.max_depth.is_none()
            && self.max_viewers.is_none()
    }

    /// The change, if each field is within the server's limits (`limits`, the `[room]`
    /// settings); `invalid_field` naming the first one that is not.
    pub(crate) fn tuning(&self, limits: &RoomConfig) -> Result<Tuning, ApiError> {
        let check = |field: &str, value: Option<u32>, min: u32, max: u32| match value {
            Some(v) if !(min..=max).contains(&v) => Err(ApiError::with(
                ErrorCode::InvalidField,
                format!(
                    "Field \"{field}\": {v} is out of range; this server allows {min} to {max}."
                ),
            )),
            v => Ok(v),
        };
        Ok(Tuning {
            root_fanout: check("root_fanout", self.root_fanout, 1, limits.root_fanout)?,
            relay_fanout: check("relay_fanout", self.relay_fanout, 0, limits.relay_fanout)?,
            max_depth: check("max_depth", self.max_depth, 1, limits.max_depth)?,
            max_peers: check("max_viewers", self.max_viewers, 1, limits.max_peers)?,
        })
    }
}

/// Refuses settings under which the room could never hold `max_viewers`, whatever the
/// viewers' uplinks: the broadcaster's fan-out times the relays' over every level within
/// the depth limit is the most the tree can place. The field named is the one `tuning`
/// set that matters most (`max_viewers`, then the depth, then the fan-outs).
pub(crate) fn check_settings(settings: &RoomSettings, tuning: &Tuning) -> Result<(), ApiError> {
    let mut level = u64::from(settings.root_fanout);
    let mut room = 0u64;
    for _ in 0..settings.max_depth {
        room = room.saturating_add(level);
        level = level.saturating_mul(u64::from(settings.relay_fanout));
        if level == 0 || room >= u64::from(settings.max_peers) {
            break;
        }
    }
    if room >= u64::from(settings.max_peers) {
        return Ok(());
    }
    let field = [
        (tuning.max_peers.is_some(), "max_viewers"),
        (tuning.max_depth.is_some(), "max_depth"),
        (tuning.relay_fanout.is_some(), "relay_fanout"),
        (tuning.root_fanout.is_some(), "root_fanout"),
    ]
    .into_iter()
    .find(|(set, _)| *set)
    .map_or("max_viewers", |(_, name)| name);
    Err(ApiError::with(
        ErrorCode::InvalidField,
        format!(
            "Field \"{field}\": with root_fanout {}, relay_fanout {} and max_depth {} the tree \
             holds at most {room} viewers, fewer than max_viewers {}.",
            settings.root_fanout, settings.relay_fanout, settings.max_depth, settings.max_peers
        ),
    ))
}

/// `config` with the change applied (no moves: the room is not running yet).
fn apply_tuning(config: &mut RoomConfig, t: &Tuning) {
    config.root_fanout = t.root_fanout.unwrap_or(config.root_fanout);
    config.relay_fanout = t.relay_fanout.unwrap_or(config.relay_fanout);
    config.max_depth = t.max_depth.unwrap_or(config.max_depth);
    config.max_peers = t.max_peers.unwrap_or(config.max_peers);
}

/// Longest broadcast title, in characters.
pub(crate) const MAX_TITLE_CHARS: usize = 100;

/// A title as given, trimmed; blank is none. Control characters and overlong titles are
/// refused rather than cut, so the broadcaster sees what viewers will see.
fn title_from(text: &str) -> Result<Option<String>, ApiError> {
    let title = text.trim();
    let bad = |why: &str| {
        Err(ApiError::with(
            ErrorCode::InvalidField,
            format!("Field \"title\": {why}"),
        ))
    };
    if title.chars().any(char::is_control) {
        return bad("it may not hold control characters such as line breaks.");
    }
    if title.chars().count() > MAX_TITLE_CHARS {
        return bad(&format!("it is longer than {MAX_TITLE_CHARS} characters."));
    }
    Ok((!title.is_empty()).then(|| title.to_owned()))
}

/// The request body, or why it could not be read (over [`MAX_ROOM_BODY`], or cut off).
fn read_body(body: Result<Bytes, BytesRejection>) -> Result<Bytes, ApiError> {
    body.map_err(|e| {
        if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::with(
                ErrorCode::TooLarge,
                format!("The request body is larger than {MAX_ROOM_BODY} bytes."),
            )
        } else {
            ApiError::with(ErrorCode::InvalidField, e.body_text())
        }
    })
}

/// Reads an optional JSON object body into `T`: an empty body is `T::default()`, one that
/// is not a JSON object is `bad_json`, a field `T` does not take (or of the wrong type) is
/// `invalid_field` naming it. `example` and `fields` go into the messages.
fn json_body<T: serde::de::DeserializeOwned + Default>(
    body: &[u8],
    example: &str,
    fields: &str,
) -> Result<T, ApiError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(T::default());
    }
    let not_object = |detail: String| {
        ApiError::with(
            ErrorCode::BadJson,
            format!("The request body must be a JSON object such as {example}{detail}."),
        )
    };
    let value: serde_json::Value =
        serde_json::from_slice(body).map_err(|e| not_object(format!(": {e}")))?;
    if !value.is_object() {
        return Err(not_object(String::new()));
    }
    serde_json::from_value(value).map_err(|e| {
        ApiError::with(
            ErrorCode::InvalidField,
            format!("The request body has a bad field: {e}. It may only hold {fields}."),
        )
    })
}

fn new_room(body: &[u8]) -> Result<NewRoom, ApiError> {
    json_body(
        body,
        "{\"quality\":\"720p\"}",
        "\"quality\", \"private\", \"title\", \"root_fanout\", \"relay_fanout\", \"max_depth\" \
         and \"max_viewers\"",
    )
}

/// The room settings for a `POST /api/rooms` body: the server's, narrowed by the settings
/// it chooses, with the chosen quality and title. An empty body chooses nothing.
pub(crate) fn room_config_for(base: &RoomConfig, body: &[u8]) -> Result<RoomConfig, ApiError> {
    let request = new_room(body)?;
    let title = request
        .title
        .as_deref()
        .map(title_from)
        .transpose()?
        .flatten();
    let settings = SettingsRequest {
        root_fanout: request.root_fanout,
        relay_fanout: request.relay_fanout,
        max_depth: request.max_depth,
        max_viewers: request.max_viewers,
    };
    let tuning = settings.tuning(base)?;
    let mut tuned = base.clone();
    apply_tuning(&mut tuned, &tuning);
    // The server's own settings are the operator's choice; only a request's are checked.
    if !settings.is_empty() {
        check_settings(&tuned.settings(), &tuning)?;
    }
    let mut config = match request.quality {
        None => tuned,
        Some(name) => with_quality(&tuned, &name)?,
    };
    config.title = title;
    Ok(config)
}

/// `base` with the preset named `name`.
fn with_quality(base: &RoomConfig, name: &str) -> Result<RoomConfig, ApiError> {
    let offered: Vec<&str> = Quality::ALL.iter().map(|q| q.as_str()).collect();
    let quality = Quality::from_name(name).ok_or_else(|| {
        ApiError::with(
            ErrorCode::InvalidField,
            format!(
                "Field \"quality\": there is no quality \"{}\"; the presets are {}.",
                shorten(name),
                offered.join(", ")
            ),
        )
    })?;
    base.for_quality(quality).map_err(|e| {
        ApiError::with(
            ErrorCode::QualityNotAllowed,
            format!("Field \"quality\": {e}"),
        )
    })
}

/// One preset in `GET /api/qualities`.
#[derive(Debug, Serialize)]
struct OfferedQuality {
    /// Wire name, for `POST /api/rooms`.
    quality: Quality,
    /// A name for people.
    label: &'static str,
    width: u32,
    height: u32,
    fps: u32,
    /// Bitrate of the stream, kbit/s.
    stream_kbps: u32,
    /// Whether this server offers it (its bitrate is within `max_stream_kbps`).
    allowed: bool,
}

/// The answer to `GET /api/qualities`.
#[derive(Debug, Serialize)]
struct Qualities {
    /// The highest stream bitrate a broadcaster may choose, kbit/s.
    max_stream_kbps: u32,
    /// Bitrate of rooms created without a quality, kbit/s.
    default_stream_kbps: u32,
    /// Every preset, lowest first, with whether it is offered.
    qualities: Vec<OfferedQuality>,
}

/// `GET /api/qualities`: the presets a broadcaster may choose on this server.
pub(crate) async fn qualities(State(state): State<Arc<ServerState>>) -> Response {
    let room = &state.config.room;
    let qualities = Quality::ALL
        .into_iter()
        .map(|q| {
            let v = q.video();
            OfferedQuality {
                quality: q,
                label: q.label(),
                width: v.width,
                height: v.height,
                fps: v.fps,
                stream_kbps: q.stream_kbps(),
                allowed: room.allows(q),
            }
        })
        .collect();
    Json(Qualities {
        max_stream_kbps: room.max_stream_kbps,
        default_stream_kbps: room.stream_kbps,
        qualities,
    })
    .into_response()
}

/// `POST /api/rooms`: creates a room and starts its task. The optional JSON body
/// `{"quality": "720p"}` chooses the stream ([`room_config_for`]).
pub(crate) async fn create_room(
    State(state): State<Arc<ServerState>>,
    ConnectInfo(client): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    if state.is_shutting_down() {
        return Err(ApiError::new(ErrorCode::ShuttingDown));
    }
    require_creation_right(&state, &headers)?;
    let body = read_body(body)?;
    let config = room_config_for(&state.config.room, &body)?;
    let private = new_room(&body)?.private;
    let limits = &state.config.limits;
    if !state.rooms.admit_creation(
        client.ip(),
        limits.room_creations_per_minute,
        limits.room_creation_burst,
    ) {
        return Err(ApiError::with(
            ErrorCode::RateLimited,
            "Too many rooms created from your address; try again in a minute.",
        ));
    }
    let max = state.config.limits.max_rooms;
    if state.rooms.is_full(max) {
        return Err(ApiError::new(ErrorCode::TooManyRooms));
    }
    let seed = rooms::random_seed().map_err(ApiError::internal)?;
    // 60 random bits make a clash unlikely; a few tries make it harmless.
    for _ in 0..8 {
        let id = rooms::random_room_id().map_err(ApiError::internal)?;
        let inc = rooms::random_seed().map_err(ApiError::internal)?;
        let (task, handle) = RoomTask::new(&state, id.clone(), inc, seed, config.clone(), private);
        let token = handle.token.to_string();
        let (commands, stats) = (handle.clone(), Arc::clone(&handle.stats));
        match state.rooms.add(id.clone(), handle, max) {
            Ok(()) => {
                if let Some(node) = &state.cluster {
                    // Owned here: the lease, and the room's meta for the other nodes.
                    let meta = crate::cluster::bus::RoomMeta { inc, private };
                    match node.own(&id, meta, &commands).await {
                        Ok(true) => {}
                        Ok(false) => {
                            state.rooms.remove(&id, &stats);
                            continue; // another node holds that id
                        }
                        Err(e) => {
                            state.rooms.remove(&id, &stats);
                            return Err(ApiError::internal(format!("taking the room: {e}")));
                        }
                    }
                }
                tokio::spawn(task.run());
                telemetry::room_created();
                let body = CreatedRoom {
                    watch_url: format!("/watch/{id}"),
                    room: id,
                    token,
                    stream_kbps: config.stream_kbps,
                    video: config.quality.map(Quality::video),
                    private,
                    title: config.title.clone(),
                };
                return Ok((StatusCode::CREATED, Json(body)).into_response());
            }
            Err(AddError::Full) => return Err(ApiError::new(ErrorCode::TooManyRooms)),
            Err(AddError::Taken) => continue,
        }
    }
    Err(ApiError::internal(
        "eight random room ids in a row were taken",
    ))
}

/// `GET /api/rooms`: every room, with its audience.
pub(crate) async fn list_rooms(
    State(state): State<Arc<ServerState>>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    require_operator(&state, &headers)?;
    let mut rooms = state.rooms.summaries();
    if !state.access.operator_required() {
        // Without an operator secret this list is everyone's: private rooms stay off it.
        rooms.retain(|r| !r.private);
    }
    Ok(Json(rooms).into_response())
}

fn find_room(state: &ServerState, room: &str) -> Result<RoomHandle, ApiError> {
    let id = RoomId::new(room).map_err(|_| unknown_room(room))?;
    state.rooms.get(&id).ok_or_else(|| unknown_room(room))
}

/// The answer for a room that does not exist (or that must look as if it did not).
fn unknown_room(room: &str) -> ApiError {
    ApiError::with(
        ErrorCode::UnknownRoom,
        format!("There is no room \"{}\".", shorten(room)),
    )
}

/// The optional body of `POST /api/rooms/{room}/links`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct NewLink {
    /// Seconds the link works for; absent: `[access] max_link_ttl`.
    #[serde(default)]
    expires_in_s: Option<u64>,
    /// Joins the link allows; absent: any number until it expires.
    #[serde(default)]
    max_uses: Option<u32>,
}

/// The answer to `POST /api/rooms/{room}/links`.
#[derive(Debug, Serialize)]
struct CreatedLink {
    /// The whole watch address, with the token in its fragment.
    link: String,
    /// The same, relative to this server.
    watch_url: String,
    /// The signed link token (what `hello.link` carries).
    token: String,
    /// When it stops working (Unix seconds).
    expires_at: u64,
    /// Joins it allows, if limited.
    #[serde(skip_serializing_if = "Option::is_none")]
    max_uses: Option<u32>,
}

/// `POST /api/rooms/{room}/links`: a signed viewer link for a private room, for its
/// broadcaster token or the operator. Body (optional): `{"expires_in_s": N, "max_uses": M}`.
pub(crate) async fn create_link(
    State(state): State<Arc<ServerState>>,
    Path(room): Path<String>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let handle = room_for(&state, &headers, &room)?;
    let body = read_body(body)?;
    let request: NewLink = json_body(
        &body,
        "{\"expires_in_s\":3600,\"max_uses\":30}",
        "\"expires_in_s\" and \"max_uses\"",
    )?;
    let max_ttl = state.access.max_link_ttl_s;
    let ttl = request.expires_in_s.unwrap_or(max_ttl);
    if !(1..=max_ttl).contains(&ttl) {
        return Err(ApiError::with(
            ErrorCode::InvalidField,
            format!(
                "Field \"expires_in_s\": a link works for 1 to {max_ttl} seconds on this server."
            ),
        ));
    }
    if request
        .max_uses
        .is_some_and(|n| !(1..=access::MAX_LINK_USES).contains(&n))
    {
        return Err(ApiError::with(
            ErrorCode::InvalidField,
            format!(
                "Field \"max_uses\": a link allows 1 to {} joins; leave it out for no limit.",
                access::MAX_LINK_USES
            ),
        ));
    }
    if handle
        .stats
        .ended
        .load(std::sync::atomic::Ordering::Relaxed)
    {
        return Err(ApiError::new(ErrorCode::RoomEnded));
    }
    let Some(key) = &handle.link_key else {
        return Err(ApiError::new(ErrorCode::NotPrivate));
    };
    let id = RoomId::new(room.as_str()).map_err(|_| unknown_room(&room))?;
    let expires_at = access::now_unix().saturating_add(ttl);
    let token = key
        .mint(&id, expires_at, request.max_uses)
        .map_err(ApiError::internal)?;
    let watch_url = format!("/watch/{id}#t={token}");
    let body = CreatedLink {
        link: format!("{}{watch_url}", origin(&state, &headers)),
        watch_url,
        token,
        expires_at,
        max_uses: request.max_uses,
    };
    Ok((StatusCode::CREATED, Json(body)).into_response())
}

/// `scheme://host` as the client reached this server: the `Host` header (if it is a plain
/// host and port), HTTPS when this server serves TLS or a proxy says so in
/// `X-Forwarded-Proto`.
fn origin(state: &ServerState, headers: &HeaderMap) -> String {
    let host = headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .filter(|h| {
            !h.is_empty()
                && h.len() <= 260
                && h.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b".-:[]".contains(&b))
        })
        .map(str::to_owned)
        .unwrap_or_else(|| state.config.bind.to_string());
    let forwarded_https = headers
        .get("x-forwarded-proto")
        .and_then(|h| h.to_str().ok())
        .is_some_and(|p| p.eq_ignore_ascii_case("https"));
    let tls = matches!(state.config.tls.mode(), Ok(Some(_)));
    let scheme = if tls || forwarded_https {
        "https"
    } else {
        "http"
    };
    format!("{scheme}://{host}")
}

/// At most 64 characters of a client-supplied string, for messages.
fn shorten(s: &str) -> String {
    s.chars().take(RoomId::MAX_LEN).collect()
}

/// Asks a room task for something; a task that is gone answers `unknown_room`.
async fn ask<T>(
    handle: &RoomHandle,
    command: impl FnOnce(oneshot::Sender<T>) -> RoomCommand,
) -> Result<T, ApiError> {
    let (tx, rx) = oneshot::channel();
    let gone = || ApiError::with(ErrorCode::UnknownRoom, "The room has just closed.");
    handle
        .commands
        .send(command(tx))
        .await
        .map_err(|_| gone())?;
    rx.await.map_err(|_| gone())
}

/// `GET /api/rooms/{room}`: the room's tree and peers.
pub(crate) async fn room_snapshot(
    State(state): State<Arc<ServerState>>,
    Path(room): Path<String>,
    headers: HeaderMap,
) -> Result<Json<RoomSnapshot>, ApiError> {
    let handle = room_for(&state, &headers, &room)?;
    Ok(Json(ask(&handle, RoomCommand::Snapshot).await?))
}

/// The answer to `PATCH /api/rooms/{room}`: the room's settings after the change.
#[derive(Debug, Serialize)]
struct SettingsBody {
    root_fanout: u32,
    relay_fanout: u32,
    max_depth: u32,
    max_viewers: u32,
}

/// Refuses unless the request carries the operator secret: `unauthorized` without it (or
/// with a wrong one), `forbidden` for this room's broadcaster token, which shows the room
/// but may not retune it.
fn require_operator_for(
    state: &ServerState,
    headers: &HeaderMap,
    room: &str,
) -> Result<(), ApiError> {
    let bearer = access::bearer(headers);
    if state.access.is_operator(bearer) {
        return Ok(());
    }
    let broadcaster = bearer.is_some_and(|b| {
        RoomId::new(room)
            .ok()
            .and_then(|id| state.rooms.get(&id))
            .is_some_and(|h| access::same_secret(&h.token, b))
    });
    if broadcaster {
        return Err(ApiError::with(
            ErrorCode::Forbidden,
            "Only the operator may change a room's settings; the broadcaster token may not.",
        ));
    }
    require_operator(state, headers)
}

/// `PATCH /api/rooms/{room}`: an operator changes a running room's fan-outs, depth limit or
/// most viewers (JSON object with any of `root_fanout`, `relay_fanout`, `max_depth`,
/// `max_viewers`, bounded like at creation). The room moves peers gradually,
/// make-before-break ([`treecast_core::room::Room::reconfigure`]); the answer is its
/// settings now.
pub(crate) async fn tune_room(
    State(state): State<Arc<ServerState>>,
    Path(room): Path<String>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    require_operator_for(&state, &headers, &room)?;
    let handle = find_room(&state, &room)?;
    let body = read_body(body)?;
    let request: SettingsRequest = json_body(
        &body,
        "{\"relay_fanout\":2}",
        "\"root_fanout\", \"relay_fanout\", \"max_depth\" and \"max_viewers\"",
    )?;
    if request.is_empty() {
        return Err(ApiError::with(
            ErrorCode::InvalidField,
            "The request body changes nothing: set at least one of \"root_fanout\", \
             \"relay_fanout\", \"max_depth\" and \"max_viewers\".",
        ));
    }
    let tuning = request.tuning(&state.config.room)?;
    let settings = ask(&handle, |reply| RoomCommand::Reconfigure(tuning, reply)).await??;
    Ok(Json(SettingsBody {
        root_fanout: settings.root_fanout,
        relay_fanout: settings.relay_fanout,
        max_depth: settings.max_depth,
        max_viewers: settings.max_peers,
    })
    .into_response())
}

/// `GET /api/rooms/{room}/events`: server-sent events for dashboards: first `snapshot`
/// (the whole room), then every room event as JSON, named by its kind (`tree`, `joined`,
/// `left`, `repaired`, ...). A subscriber that falls behind gets `lagged` with the number
/// of events it missed and should fetch a fresh snapshot. The stream ends with the room.
pub(crate) async fn room_events(
    State(state): State<Arc<ServerState>>,
    Path(room): Path<String>,
    headers: HeaderMap,
) -> Result<Sse<impl Stream<Item = Result<Event, Infallible>>>, ApiError> {
    let handle = room_for(&state, &headers, &room)?;
    let (snapshot, events) = ask(&handle, RoomCommand::Subscribe).await?;
    let first = Event::default()
        .event("snapshot")
        .json_data(&snapshot)
        .map_err(ApiError::internal)?;
    let source = EventSource {
        events,
        shutdown: state.shutdown.subscribe(),
        grace: state.config.limits.shutdown_grace,
        deadline: None,
    };
    let rest = futures_util::stream::unfold(source, next_event);
    let stream = futures_util::stream::once(async move { Ok(first) }).chain(rest);
    Ok(Sse::new(stream).keep_alive(KeepAlive::default()))
}

/// Where a dashboard stream's events come from.
struct EventSource {
    events: broadcast::Receiver<DashboardEvent>,
    shutdown: watch::Receiver<bool>,
    grace: Duration,
    /// Set on shutdown: the stream ends then at the latest, so the server's graceful
    /// shutdown (which waits for open responses) cannot hang on a dashboard.
    deadline: Option<Instant>,
}

async fn next_event(mut source: EventSource) -> Option<(Result<Event, Infallible>, EventSource)> {
    loop {
        if source.deadline.is_none() && *source.shutdown.borrow() {
            source.deadline = Some(Instant::now() + source.grace);
        }
        let deadline = source.deadline;
        let event = tokio::select! {
            received = source.events.recv() => match received {
                Ok(e) => Event::default().event(e.name).data(&*e.json),
                Err(broadcast::error::RecvError::Lagged(missed)) => {
                    Event::default().event("lagged").data(missed.to_string())
                }
                Err(broadcast::error::RecvError::Closed) => return None,
            },
            changed = source.shutdown.changed(), if deadline.is_none() => {
                if changed.is_err() {
                    source.deadline = Some(Instant::now());
                }
                continue;
            }
            () = sleep_until_opt(deadline) => return None,
        };
        return Some((Ok(event), source));
    }
}

async fn sleep_until_opt(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// `GET /healthz`.
pub(crate) async fn health() -> &'static str {
    "ok"
}

/// `GET /metrics`: Prometheus text format.
pub(crate) async fn metrics(State(state): State<Arc<ServerState>>) -> Response {
    let (rooms, peers, depth) = state.rooms.totals();
    if let Some(node) = &state.cluster {
        telemetry::cluster_leases(&node.lease_stats());
    }
    let text = telemetry::render(state.metrics.as_ref(), rooms, peers, depth);
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        text,
    )
        .into_response()
}

/// Anything else: a JSON 404.
pub(crate) async fn not_found() -> Response {
    not_found_response()
}

/// The JSON 404 every unknown address gets, `/assets/...` included.
pub(crate) fn not_found_response() -> Response {
    let body = ErrorBody {
        code: "not_found",
        message: "There is nothing at this address.",
    };
    (
        StatusCode::NOT_FOUND,
        [(header::CACHE_CONTROL, "no-cache")],
        Json(body),
    )
        .into_response()
}
