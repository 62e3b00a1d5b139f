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
