//! `outpost-aggregator`: the central half of Outpost. It receives telemetry
//! batches (through its embedded MQTT broker or an existing broker),
//! deduplicates and acknowledges them, evaluates the rule files, and delivers
//! alerts to operators (see `docs/architecture.md`).
//!
//! This crate is a skeleton so far: the command line exists; ingest, rules
//! and alert delivery are built by the issues that follow the foundation.
#![forbid(unsafe_code)]
