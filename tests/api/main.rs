//! End-to-end tests over real HTTP against SQLite and PostgreSQL.

mod helpers;

mod generic;
mod pipeline;
