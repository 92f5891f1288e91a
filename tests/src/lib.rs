//! kkachi tests
