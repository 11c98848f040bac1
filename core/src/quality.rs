//! The stream qualities a broadcaster may choose, and what each costs.
//!
//! A room knows one number about its media, the stream bitrate (`stream_kbps`): every child
//! costs its parent that much uplink, so capacities follow from it. A broadcaster picks a
//! [`Quality`] when it creates the room; the preset fixes the picture (resolution, frame
//! rate) and the bitrate, and the room's `stream_kbps` becomes the preset's. The server
//! offers only presets whose bitrate is within [`crate::room::RoomConfig::max_stream_kbps`].
//!
//! Resolution is kept at every depth: senders hold it and give up frame rate first, and a
//! broadcaster whose uplink cannot carry `root_fanout` copies gets fewer children (its
//! capacity is computed from the bitrate like anyone's), not a worse picture.

use serde::{Deserialize, Serialize};

/// A picture and bitrate preset, named on the wire by its height (`"720p"`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Quality {
    /// 640x360 at 30 fps, 500 kbit/s: the default room's stream.
    #[serde(rename = "360p")]
    Standard,
    /// 1280x720 at 30 fps, 1500 kbit/s.
    #[serde(rename = "720p")]
    Hd,
    /// 1920x1080 at 30 fps, 3000 kbit/s.
    #[serde(rename = "1080p")]
    FullHd,
}

impl Quality {
    /// Every preset, lowest first.
    pub const ALL: [Quality; 3] = [Self::Standard, Self::Hd, Self::FullHd];

    /// The wire name (`"360p"`, `"720p"`, `"1080p"`).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Standard => "360p",
            Self::Hd => "720p",
            Self::FullHd => "1080p",
        }
    }

    /// The preset of a wire name.
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|q| q.as_str() == name)
    }

    /// A name for people.
    pub fn label(self) -> &'static str {
        match self {
            Self::Standard => "Standard",
            Self::Hd => "HD",
            Self::FullHd => "Full HD",
        }
    }

    /// The picture: width, height and frame rate the broadcaster captures and every
    /// viewer receives.
    pub fn video(self) -> VideoFormat {
        let (width, height) = match self {
            Self::Standard => (640, 360),
            Self::Hd => (1280, 720),
            Self::FullHd => (1920, 1080),
        };
        VideoFormat {
            quality: self,
            width,
            height,
            fps: 30,
        }
    }

    /// Bitrate of the whole stream (video and audio), kbit/s. VP8 at 30 fps looks clean
    /// at about these rates; each is also what one child costs its parent's uplink.
    pub fn stream_kbps(self) -> u32 {
        match self {
            Self::Standard => 500,
            Self::Hd => 1_500,
            Self::FullHd => 3_000,
        }
    }
}

impl std::fmt::Display for Quality {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The room's picture, told to clients in `welcome.limits.video`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct VideoFormat {
    /// The preset it comes from.
    pub quality: Quality,
    /// Width in pixels.
    pub width: u32,
    /// Height in pixels.
    pub height: u32,
    /// Frames per second.
    pub fps: u32,
}

/// A quality this server does not offer: its bitrate is above the server's limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error(
    "The quality \"{quality}\" needs {needs_kbps} kbit/s per viewer; this server allows at most \
     {max_kbps} kbit/s. Choose a lower quality."
)]
pub struct QualityNotAllowed {
    /// The preset asked for.
    pub quality: Quality,
    /// Its bitrate.
    pub needs_kbps: u32,
    /// The server's limit.
    pub max_kbps: u32,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_on_the_wire() {
        for q in Quality::ALL {
            let json = serde_json::to_string(&q).unwrap();
            assert_eq!(json, format!("\"{}\"", q.as_str()));
            assert_eq!(serde_json::from_str::<Quality>(&json).unwrap(), q);
            assert_eq!(Quality::from_name(q.as_str()), Some(q));
        }
        assert_eq!(Quality::from_name("4k"), None);
    }

    #[test]
    fn presets_grow_in_picture_and_bitrate() {
        for pair in Quality::ALL.windows(2) {
            let (a, b) = (pair[0], pair[1]);
            assert!(a < b);
            assert!(a.video().height < b.video().height);
            assert!(a.stream_kbps() < b.stream_kbps());
        }
        assert_eq!(Quality::Hd.video().width, 1280);
        assert_eq!(Quality::Hd.video().height, 720);
    }
}
