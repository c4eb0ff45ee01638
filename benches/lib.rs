//! Nothing: this package holds benchmarks only (see its `[[bench]]` targets).
