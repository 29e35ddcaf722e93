//! UDP sockets for QUIC endpoints with socket buffers sized for bulk transfer.
//!
//! Linux gives a UDP socket about 208 KiB of receive buffer. A QUIC peer sending a few
//! megabytes in flight (a producer's batches, a fetch's chunks) overflows it whenever the
//! receiving task is briefly busy; the kernel drops the datagrams, the sender's congestion
//! controller takes the loss for congestion and halves its window, and a loopback transfer
//! that should take a millisecond waits tens of milliseconds. Every endpoint Quiver opens
//! (clients, brokers, the controller) binds through [`endpoint`], which asks for larger
//! buffers. The kernel caps the request at `net.core.rmem_max` / `wmem_max` without an
//! error, so on a host with small limits the socket simply keeps what it may have.

use std::net::SocketAddr;

/// Receive and send buffer asked for on every endpoint socket.
pub const SOCKET_BUFFER_BYTES: usize = 8 * 1024 * 1024;

/// Binds a UDP socket at `addr` with [`SOCKET_BUFFER_BYTES`] buffers (as much of them as
/// the kernel allows).
pub fn bind_socket(addr: SocketAddr) -> std::io::Result<std::net::UdpSocket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    if addr.is_ipv6() {
        // Same as std's bind: an IPv6 wildcard also takes IPv4 where the system allows.
        let _ = socket.set_only_v6(false);
    }
    // Best effort: a refused size leaves the default, which still works, only slower.
    if let Err(e) = socket.set_recv_buffer_size(SOCKET_BUFFER_BYTES) {
        tracing::debug!(error = %e, "cannot enlarge the UDP receive buffer");
    }
    if let Err(e) = socket.set_send_buffer_size(SOCKET_BUFFER_BYTES) {
        tracing::debug!(error = %e, "cannot enlarge the UDP send buffer");
    }
    socket.bind(&addr.into())?;
    Ok(socket.into())
}

/// A QUIC endpoint on a socket from [`bind_socket`]: a server when `server` is given
/// (it can also connect out), else a client only.
pub fn endpoint(
    addr: SocketAddr,
    server: Option<quinn::ServerConfig>,
) -> std::io::Result<quinn::Endpoint> {
    let socket = bind_socket(addr)?;
    let runtime = quinn::default_runtime().ok_or_else(|| {
        std::io::Error::other("no async runtime for the QUIC endpoint (run inside tokio)")
    })?;
    quinn::Endpoint::new(quinn::EndpointConfig::default(), server, socket, runtime)
}

/// The receive buffer the kernel gave a socket bound by [`bind_socket`] (for tests and
/// diagnostics).
pub fn recv_buffer_size(socket: &std::net::UdpSocket) -> std::io::Result<usize> {
    socket2::SockRef::from(socket).recv_buffer_size()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sockets_get_a_larger_receive_buffer_where_the_kernel_allows_it() {
        let s = bind_socket("127.0.0.1:0".parse().unwrap()).unwrap();
        let default = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let ours = recv_buffer_size(&s).unwrap();
        let theirs = recv_buffer_size(&default).unwrap();
        assert!(ours >= theirs, "{ours} < {theirs}");
        // Linux reports twice the size it grants, capped at net.core.rmem_max: where that
        // cap is above the default, the socket must have got more.
        let cap = std::fs::read_to_string("/proc/sys/net/core/rmem_max")
            .ok()
            .and_then(|v| v.trim().parse::<usize>().ok());
        if let Some(cap) = cap {
            if cap * 2 > theirs {
                assert!(
                    ours > theirs,
                    "rmem_max {cap}, got {ours}, default {theirs}"
                );
            }
        }
        assert!(s.local_addr().unwrap().port() != 0);
    }
}
