//! Module m01's lesson code: linear regression three ways and the reproducibility fingerprint.

pub mod linreg;
pub mod repro;
