//! kkachi relay
