//! Pieces shared by the `toa` agent and the `toa-probe` writer programs.
#![no_std]

pub mod packet;
