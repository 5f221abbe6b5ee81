//! The ComfyUI server protocol as typed Rust.
//!
//! `rest` holds the HTTP request and answer shapes, `ws` the WebSocket messages (text
//! and binary), and `client` an async client with one WebSocket session per connection.
//! Every shape keeps the fields it does not know in an `extra` map, and unknown message
//! types parse into `Unknown` variants: ComfyUI adds fields and messages over time, and a
//! client that drops or rejects them breaks on the next release.

pub mod client;
pub mod rest;
pub mod ws;

pub use client::{Client, Error, Session, SessionEvent};
