//! asp's HTTP API v1: the server (axum), its JSON shapes, payload format conversion, and
//! a client. This is the only crate that knows JSON request shapes; the store below it
//! deals in typed operations.

pub mod auth;
pub mod client;
mod console;
mod crdt_api;
mod error;
pub mod formats;
mod held_api;
mod json;
mod leases_api;
mod modes_api;
mod openapi;
mod placement_api;
mod preconditions;
mod residency_api;
mod routes;
mod server;
mod shares_api;

pub use error::ApiError;
pub use routes::{
    ApiConfig, AppState, ConnectorsView, DEFAULT_REQUEST_BYTES_MAX, TransportStatusFn, cors_origin,
    router,
};
pub use server::{serve, serve_with_tls};
