//! duplex: a real-time, full-duplex voice agent server for PersonaPlex / Moshi models.
//!
//! Dependencies point one way: `gateway`, `local` → `engine` → `audio`; `metrics` is a leaf used by both.
//! See `ARCHITECTURE.md` for the map and one frame's path through it.

pub mod audio;
pub mod bench;
pub mod doctor;
pub mod engine;
pub mod fetch;
pub mod gateway;
pub mod local;
pub mod metrics;
pub mod model;
pub mod offline;
pub mod tune;

/// Where duplex keeps what it makes for this machine (certificates, kernel plans):
/// `~/.cache/duplex`.
pub fn cache_dir() -> std::path::PathBuf {
    let home = std::env::var_os("HOME")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| std::path::PathBuf::from("."));
    home.join(".cache").join("duplex")
}
