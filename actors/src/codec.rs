//! codec placeholder
