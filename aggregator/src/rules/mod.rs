//! The rules engine: rule files ([`parse`], [`compile`]) -> [`model`] -> evaluator ([`eval`]).
pub mod compile;
pub mod eval;
pub mod model;
pub mod parse;
pub mod runtime;
pub mod tests;
