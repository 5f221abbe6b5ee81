//! gantry-server end to end: the v1 API over real HTTP, in front of simulated ComfyUI
//! backends on ephemeral ports.

mod agents;
mod api;
mod attachments;
mod auth;
mod backends;
mod callbacks;
mod chaos;
mod commands;
mod crashes;
mod engine;
mod failover;
mod fuzz;
mod history;
mod models;
mod monitor;
mod openapi;
mod pipeline;
mod postgres;
mod profile;
mod seeds;
mod support;
