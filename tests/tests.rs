//! End-to-end tests: real `quiver` broker processes on 127.0.0.1, real QUIC with TLS, real
//! sled files in temporary directories. One test binary (modules below) so it links once.

mod e2e;
