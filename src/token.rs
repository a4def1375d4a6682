//! Typed `mio::Token`s: what a readiness event is about.
//!
//! A worker registers three kinds of things with its `Poll`: its waker, its listeners, and the
//! two sockets of each session. The token space is laid out as
//!
//! ```text
//! 0                      the waker (control messages)
//! 1 ..= MAX_LISTENERS    listener i - 1
//! SESSION_BASE + 2k      session k, client socket
//! SESSION_BASE + 2k + 1  session k, backend socket
//! ```
//!
//! so a session's slab key and the side are recovered with a shift and a mask, and no lookup
//! table is needed.

use mio::Token;

/// How many listen addresses one balancer may have.
pub const MAX_LISTENERS: usize = 64;

const WAKER: usize = 0;
const LISTENER_BASE: usize = 1;
const SESSION_BASE: usize = LISTENER_BASE + MAX_LISTENERS;

/// One end of a session. `client` and `backend` are the only names used for the two ends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Side {
    Client,
    Backend,
}

/// What a token refers to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Target {
    Waker,
    Listener(usize),
    Session(usize, Side),
}

impl Target {
    pub fn token(self) -> Token {
        Token(match self {
            Target::Waker => WAKER,
            Target::Listener(i) => {
                debug_assert!(i < MAX_LISTENERS);
                LISTENER_BASE + i
            }
            Target::Session(key, side) => {
                SESSION_BASE + (key << 1) + usize::from(side == Side::Backend)
            }
        })
    }

    pub fn from_token(token: Token) -> Target {
        match token.0 {
            WAKER => Target::Waker,
            t if t < SESSION_BASE => Target::Listener(t - LISTENER_BASE),
            t => {
                let x = t - SESSION_BASE;
                let side = if x & 1 == 0 {
                    Side::Client
                } else {
                    Side::Backend
                };
                Target::Session(x >> 1, side)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_round_trip_and_never_collide() {
        let mut targets = vec![Target::Waker];
        targets.extend((0..MAX_LISTENERS).map(Target::Listener));
        for key in [0, 1, 2, 1000, 1 << 20] {
            targets.push(Target::Session(key, Side::Client));
            targets.push(Target::Session(key, Side::Backend));
        }
        let mut seen = std::collections::HashSet::new();
        for t in targets {
            assert_eq!(Target::from_token(t.token()), t);
            assert!(seen.insert(t.token()), "{t:?} collides");
        }
    }
}
