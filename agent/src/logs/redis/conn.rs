//! One connection to Redis: TCP with keepalive, `AUTH`, commands with a reply deadline, and
//! reads of the `MONITOR` stream.

use std::{fmt, net::SocketAddr, path::Path, time::Duration};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
    time::timeout,
};

use super::{
    RedisError,
    monitor::sanitize,
    resp::{Decoder, Limits, Value, encode_command},
};

/// How long connecting, `AUTH` and each command may take.
pub(super) const IO_TIMEOUT: Duration = Duration::from_secs(10);

/// Bytes read from the socket at a time.
const READ_CHUNK: usize = 64 * 1024;

/// Most bytes of a Redis error message kept (for logs and error values).
const MAX_MESSAGE: usize = 300;

/// What `AUTH` sends.
#[derive(Clone)]
pub(super) struct Credential {
    /// ACL user; `None` sends `AUTH password` (the `default` user, `requirepass`).
    pub username: Option<String>,
    /// The password, as read from the file (trimmed).
    pub password: String,
}

impl fmt::Debug for Credential {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Credential")
            .field("username", &self.username)
            .field("password", &"(redacted)")
            .finish()
    }
}

/// Reads the password file: its content with surrounding whitespace (the trailing newline an
/// editor adds) removed. The second value is true if the file is readable by group or others.
pub(super) fn read_password(path: &Path) -> Result<(String, bool), RedisError> {
    use std::os::unix::fs::PermissionsExt;

    let err = |source| RedisError::Password {
        path: path.to_owned(),
        source,
    };
    let meta = std::fs::metadata(path).map_err(err)?;
    let text = std::fs::read_to_string(path).map_err(err)?;
    Ok((
        text.trim().to_owned(),
        meta.permissions().mode() & 0o044 != 0,
    ))
}

/// A connection and the decoder of what it receives.
pub(super) struct Conn {
    stream: TcpStream,
    dec: Decoder,
    rbuf: Box<[u8]>,
    local: SocketAddr,
}

impl Conn {
    /// Connects to `address` (`HOST:PORT`, resolved on every attempt).
    pub(super) async fn connect(address: &str) -> Result<Self, RedisError> {
        let stream = timeout(IO_TIMEOUT, TcpStream::connect(address))
            .await
            .map_err(|_| RedisError::Timeout { op: "connect" })?
            .map_err(|source| RedisError::Connect {
                address: address.to_owned(),
                source,
            })?;
        // A MONITOR connection is idle while Redis is: keepalive is what notices a peer that
        // vanished without a FIN (host down, network partition) — after 30 s idle plus 9
        // probes 10 s apart (Linux's default count) — so the collector reconnects.
        let keepalive = socket2::TcpKeepalive::new()
            .with_time(Duration::from_secs(30))
            .with_interval(Duration::from_secs(10));
        if let Err(err) = socket2::SockRef::from(&stream).set_tcp_keepalive(&keepalive) {
            tracing::debug!(error = %err, "Could not enable TCP keepalive.");
        }
        let local = stream.local_addr().map_err(|source| RedisError::Io {
            op: "local_addr",
            source,
        })?;
        Ok(Self {
            stream,
            dec: Decoder::new(Limits::default()),
            rbuf: vec![0; READ_CHUNK].into_boxed_slice(),
            local,
        })
    }

    /// The connection's own address, as Redis shows it in `MONITOR` lines.
    pub(super) fn local_addr(&self) -> SocketAddr {
        self.local
    }

    /// `AUTH [username] password`.
    pub(super) async fn auth(&mut self, cred: &Credential) -> Result<(), RedisError> {
        let reply = match &cred.username {
            Some(user) => {
                self.call(
                    "AUTH",
                    &[b"AUTH", user.as_bytes(), cred.password.as_bytes()],
                )
                .await
            }
            None => {
                self.call("AUTH", &[b"AUTH", cred.password.as_bytes()])
                    .await
            }
        }?;
        expect_ok("AUTH", reply)
    }

    /// Sends a command and waits (at most [`IO_TIMEOUT`]) for its reply; an error reply is
    /// returned as a [`RedisError`].
    pub(super) async fn call(
        &mut self,
        name: &'static str,
        args: &[&[u8]],
    ) -> Result<Value, RedisError> {
        timeout(IO_TIMEOUT, async {
            self.stream
                .write_all(&encode_command(args))
                .await
                .map_err(|source| RedisError::Io {
                    op: "write",
                    source,
                })?;
            self.read().await
        })
        .await
        .map_err(|_| RedisError::Timeout { op: name })?
        .and_then(|v| match v {
            Value::Error(msg) => Err(reply_error(name, &msg)),
            v => Ok(v),
        })
    }

    /// The next value, waiting as long as it takes.
    pub(super) async fn read(&mut self) -> Result<Value, RedisError> {
        loop {
            if let Some(v) = self.dec.decode()? {
                return Ok(v);
            }
            let n = self
                .stream
                .read(&mut self.rbuf)
                .await
                .map_err(|source| RedisError::Io { op: "read", source })?;
            if n == 0 {
                return Err(RedisError::Closed);
            }
            self.dec.feed(&self.rbuf[..n]);
        }
    }
}

/// `+OK` or an [`RedisError::Unexpected`].
pub(super) fn expect_ok(command: &'static str, reply: Value) -> Result<(), RedisError> {
    match reply {
        Value::Simple(s) if s == b"OK" => Ok(()),
        other => Err(unexpected(command, &other)),
    }
}

/// An unexpected reply, described briefly.
pub(super) fn unexpected(command: &'static str, got: &Value) -> RedisError {
    let got = match got {
        Value::Simple(s) | Value::LongSimple(s) => format!("status {}", short(s)),
        Value::Error(s) => format!("error {}", short(s)),
        Value::Integer(n) => format!("integer {n}"),
        Value::Bulk(b) => format!("bulk string of {} bytes", b.len()),
        Value::Null => "null".to_owned(),
        Value::Array(items) => format!("array of {}", items.len()),
    };
    RedisError::Unexpected { command, got }
}

/// An error reply as the error it stands for.
fn reply_error(command: &'static str, msg: &[u8]) -> RedisError {
    let message = short(msg);
    // Redis's prefixes (server.c `shared.*err`, acl.c): WRONGPASS for a refused AUTH, NOAUTH
    // for a command sent before it, NOPERM for an ACL denial. `AUTH pw` to a server without
    // requirepass says "ERR AUTH <password> called without any password configured".
    if message.starts_with("WRONGPASS")
        || message.starts_with("NOAUTH")
        || message.starts_with("ERR AUTH")
        || message.starts_with("ERR invalid password")
    {
        RedisError::Auth { message }
    } else if message.starts_with("NOPERM") {
        RedisError::Permission { command, message }
    } else {
        RedisError::Reply { command, message }
    }
}

/// A message from Redis, made printable and cut to [`MAX_MESSAGE`] bytes.
fn short(msg: &[u8]) -> String {
    let mut s = sanitize(&msg[..msg.len().min(MAX_MESSAGE)]);
    if msg.len() > MAX_MESSAGE {
        s.push_str("...");
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_replies_are_classified() {
        assert!(matches!(
            reply_error(
                "AUTH",
                b"WRONGPASS invalid username-password pair or user is disabled."
            ),
            RedisError::Auth { .. }
        ));
        assert!(matches!(
            reply_error("MONITOR", b"NOAUTH Authentication required."),
            RedisError::Auth { .. }
        ));
        assert!(matches!(
            reply_error(
                "AUTH",
                b"ERR AUTH <password> called without any password configured for the default user. Are you sure your configuration is correct?"
            ),
            RedisError::Auth { .. }
        ));
        match reply_error(
            "ACL LOG",
            b"NOPERM this user has no permissions to run the 'acl|log' command",
        ) {
            RedisError::Permission { command, message } => {
                assert_eq!(command, "ACL LOG");
                assert!(message.contains("acl|log"));
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            reply_error("MONITOR", b"ERR unknown command"),
            RedisError::Reply { .. }
        ));
        let long = vec![b'\x01'; 1000];
        match reply_error("X", &long) {
            RedisError::Reply { message, .. } => {
                assert!(message.len() <= 4 * MAX_MESSAGE + 3);
                assert!(message.starts_with("\\x01"));
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn credential_debug_hides_the_password() {
        let c = Credential {
            username: Some("mirage".into()),
            password: "hunter2".into(),
        };
        assert!(!format!("{c:?}").contains("hunter2"));
    }
}
