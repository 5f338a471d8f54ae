//! The MQTT 5 wire format, as much as the brokers written in the tests
//! need: reading packets, numbering connections, answering SUBSCRIBE.

use std::io::Read;
use std::net::{TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::time::Duration;

/// A variable byte integer read from `r`.
pub(super) fn read_varint(r: &mut impl Read) -> std::io::Result<usize> {
    let (mut n, mut shift) = (0usize, 0);
    loop {
        let mut b = [0u8];
        r.read_exact(&mut b)?;
        n |= ((b[0] & 0x7f) as usize) << shift;
        if b[0] & 0x80 == 0 {
            return Ok(n);
        }
        shift += 7;
    }
}

/// A variable byte integer at `body[at..]`: (value, index after it).
pub(super) fn varint_at(body: &[u8], mut at: usize) -> (usize, usize) {
    let (mut n, mut shift) = (0usize, 0);
    loop {
        let b = body[at];
        at += 1;
        n |= ((b & 0x7f) as usize) << shift;
        if b & 0x80 == 0 {
            return (n, at);
        }
        shift += 7;
    }
}

/// What [`read_packet`] found.
pub(super) enum Got {
    /// A packet: its first byte and its body.
    Packet(u8, Vec<u8>),
    /// Nothing within the tick.
    Idle,
    /// The connection ended.
    Closed,
}

/// Waits up to `tick` for a packet and reads it whole.
pub(super) fn read_packet(stream: &mut TcpStream, tick: Duration) -> Got {
    stream.set_read_timeout(Some(tick)).unwrap();
    let mut first = [0u8];
    match stream.read(&mut first) {
        Ok(0) => return Got::Closed,
        Ok(_) => {}
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ) =>
        {
            return Got::Idle;
        }
        Err(_) => return Got::Closed,
    }
    // The rest of a packet follows at once.
    stream.set_read_timeout(None).unwrap();
    let Ok(len) = read_varint(stream) else {
        return Got::Closed;
    };
    let mut body = vec![0u8; len];
    if stream.read_exact(&mut body).is_err() {
        return Got::Closed;
    }
    Got::Packet(first[0], body)
}

/// The SUBACK for a SUBSCRIBE `body`, granting QoS 1 to each filter.
pub(super) fn suback(body: &[u8]) -> Vec<u8> {
    let (props, mut at) = varint_at(body, 2);
    at += props;
    let mut codes = Vec::new();
    while at < body.len() {
        at += 2 + u16::from_be_bytes([body[at], body[at + 1]]) as usize + 1;
        codes.push(1u8);
    }
    let mut p = vec![0x90, (3 + codes.len()) as u8, body[0], body[1], 0];
    p.extend(codes);
    p
}

/// Accepts connections on `listener` until `stop`, each served by
/// `serve(stream, number)` on a thread of its own; `number` counts from 1.
pub(super) fn accept_until(
    listener: TcpListener,
    stop: Arc<AtomicBool>,
    serve: impl Fn(TcpStream, usize) + Send + Sync + 'static,
) {
    listener.set_nonblocking(true).unwrap();
    let serve = Arc::new(serve);
    std::thread::spawn(move || {
        let mut number = 0;
        while !stop.load(Relaxed) {
            match listener.accept() {
                Ok((stream, _)) => {
                    number += 1;
                    let serve = serve.clone();
                    std::thread::spawn(move || serve(stream, number));
                }
                Err(_) => std::thread::sleep(Duration::from_millis(10)),
            }
        }
    });
}
