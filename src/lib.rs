//! claude-balancer: one Anthropic Messages API in front, many providers behind.
//!
//! Modules in request-flow order:
//!
//! 1. [`server`]: the HTTP router and its Anthropic-shaped fallbacks.
//! 2. [`inbound`]: reading and validating requests (`/v1/messages`, `count_tokens`).
//! 3. [`routing`]: model name to ordered candidates (routes, strategies, health, affinity).
//! 4. [`dedup`]: the response cache and the coalescing of identical requests in flight.
//! 5. [`dispatch`]: the one failover loop, the commit point, the stream relay; its result is a
//!    typed [`dispatch::Answer`].
//! 6. [`upstream`]: HTTP clients, header rules, SSE framing.
//! 7. [`respond`]: the answer rendered as the client's response, observed until its body ends.
//!
//! [`adapter`] holds the pure conversion code the dispatcher uses.
//!
//! Cross-cutting: [`config`] (file to validated [`config::Config`]), [`state`] (the runtime swapped on
//! reload, books that outlive it), [`cluster`] (the state backend shared by instances), [`observability`] (logs, metrics), [`admin`], [`error`], [`secret`], [`tokens`].

pub mod adapter;
pub mod admin;
pub mod clients;
pub mod cluster;
pub mod config;
pub mod dedup;
pub mod dispatch;
pub mod error;
pub mod explain;
pub mod inbound;
pub mod observability;
pub mod pricing;
pub mod reload;
pub mod respond;
pub mod routing;
pub mod secret;
pub mod server;
pub mod state;
pub mod tokens;
pub mod upstream;
pub mod usage;
