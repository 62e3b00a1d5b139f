//! Measuring the server from the outside: a WebRTC client peer built on the same crate as the
//! gateway, and the loopback benchmark that drives many of them.

pub mod client;
pub mod loopback;
pub mod opus;
pub mod step;
