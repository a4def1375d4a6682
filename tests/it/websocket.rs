//! A real WebSocket session (tungstenite on both ends) through the balancer.

use std::net::TcpListener;
use std::sync::mpsc;
use std::time::Duration;

use tungstenite::protocol::CloseFrame;
use tungstenite::protocol::frame::coding::CloseCode;
use tungstenite::{Error, Message};

use crate::util::*;

/// What the server saw of the client's close.
#[derive(Debug, PartialEq)]
struct SeenClose {
    code: u16,
    reason: String,
}

#[test]
fn websocket_session_through_balancer() {
    let listener = TcpListener::bind(localhost0()).unwrap();
    let server_addr = listener.local_addr().unwrap();
    let (tx, rx) = mpsc::channel::<Result<SeenClose, String>>();
    std::thread::spawn(move || {
        let result = (|| {
            let (stream, _) = listener.accept().map_err(|e| e.to_string())?;
            set_timeouts(&stream);
            let mut ws = tungstenite::accept(NoEintr(stream))
                .map_err(|e| format!("server handshake: {e}"))?;
            let mut seen = None;
            loop {
                match ws.read() {
                    Ok(m @ (Message::Text(_) | Message::Binary(_))) => {
                        ws.send(m).map_err(|e| format!("server echo: {e}"))?
                    }
                    Ok(Message::Close(frame)) => {
                        // tungstenite queues the close reply; the next read flushes it.
                        seen = frame.map(|f| SeenClose {
                            code: u16::from(f.code),
                            reason: f.reason.to_string(),
                        });
                    }
                    Ok(_) => {}
                    Err(Error::ConnectionClosed) => break,
                    Err(e) => return Err(format!("server read: {e}")),
                }
            }
            seen.ok_or_else(|| "server saw no close frame".to_string())
        })();
        let _ = tx.send(result);
    });

    let lb = start_balancer(config(&[server_addr]));
    let stream = client(lb_addr(&lb));
    let url = format!("ws://{}/chat", lb_addr(&lb));
    let (mut ws, response) = tungstenite::client(url.as_str(), NoEintr(stream))
        .unwrap_or_else(|e| panic!("client handshake through the balancer: {e}"));
    assert_eq!(response.status().as_u16(), 101, "upgrade refused");

    ws.send(Message::text("hello through holdfast")).unwrap();
    assert_eq!(ws.read().unwrap(), Message::text("hello through holdfast"));
    let blob = random_bytes(100_000, 9);
    ws.send(Message::binary(blob.clone())).unwrap();
    assert_eq!(ws.read().unwrap(), Message::binary(blob));

    ws.close(Some(CloseFrame {
        code: CloseCode::from(4001),
        reason: "bye".into(),
    }))
    .unwrap();
    // The close handshake completes: the server's close reply arrives, then the end.
    let mut reply = None;
    loop {
        match ws.read() {
            Ok(Message::Close(frame)) => reply = Some(frame),
            Ok(other) => panic!("client: unexpected {other:?} after sending close"),
            Err(Error::ConnectionClosed) => break,
            Err(e) => panic!("client: close handshake did not complete: {e}"),
        }
    }
    let reply = reply.expect("client: no close reply from the server");
    assert_eq!(
        reply.map(|f| u16::from(f.code)),
        Some(4001),
        "close reply echoes the code"
    );

    let seen = rx
        .recv_timeout(Duration::from_secs(5))
        .expect("server thread finished")
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        seen,
        SeenClose {
            code: 4001,
            reason: "bye".into()
        }
    );
}
