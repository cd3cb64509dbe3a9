//! End-to-end tests over real HTTP against SQLite and PostgreSQL.

mod helpers;

mod amplification;
mod blackhole;
mod credentials;
mod errors;
mod generic;
mod hostile;
mod lists;
mod openapi;
mod outage;
mod pipeline;
mod pylon;
mod retention;
mod slack;
mod slack_oauth;
mod smaller;
mod tenancy;
