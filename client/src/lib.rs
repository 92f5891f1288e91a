//! kkachi client
