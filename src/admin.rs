//! The admin endpoint (`--admin ADDR`): metrics, backend state, and the runtime API.
//!
//! To be written: see issue 4. This stub keeps the seam the rest of the crate uses.

use std::io;
use std::net::SocketAddr;

use crate::control::Controller;

/// The admin HTTP server, on a thread of its own. It reads through a [`Controller`] and
/// never touches the data plane.
pub struct AdminServer {
    addr: SocketAddr,
}

impl AdminServer {
    /// Binds `addr` and starts serving.
    pub fn start(addr: SocketAddr, control: Controller) -> io::Result<AdminServer> {
        let _ = control;
        Ok(AdminServer { addr })
    }

    /// The bound address (the real port when port 0 was asked for).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Stops serving and waits for the thread.
    pub fn stop(self) {}
}
