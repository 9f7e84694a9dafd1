//! Listeners and streams over TCP or unix sockets behind one type each, so the accept loop and
//! hyper see a single kind of connection.

use std::io;
use std::net::SocketAddr;
use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::pin::Pin;
use std::task::{Context, Poll};

use socket2::{Domain, SockRef, Socket};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream, UnixListener, UnixStream};

/// Who is on the other end of a connection.
#[derive(Debug, Clone, Copy)]
pub enum Peer {
    Ip(SocketAddr),
    Unix,
}

impl Peer {
    /// The address as the access log shows it.
    pub fn host(&self) -> String {
        match self {
            Peer::Ip(addr) => addr.ip().to_string(),
            Peer::Unix => "unix".to_string(),
        }
    }
}

pub enum Listener {
    Tcp(TcpListener),
    Unix(UnixListener),
}

impl Listener {
    /// Takes ownership of an inherited listening fd and registers it with this worker's runtime.
    pub fn from_inherited_fd(fd: RawFd) -> io::Result<Listener> {
        // SAFETY: the master handed this fd to this worker alone to own; nothing else closes it.
        let socket = unsafe { Socket::from_raw_fd(fd) };
        socket.set_nonblocking(true)?;
        let is_unix = socket.local_addr()?.domain() == Domain::UNIX;
        let owned = OwnedFd::from(socket);
        Ok(if is_unix {
            Listener::Unix(UnixListener::from_std(owned.into())?)
        } else {
            Listener::Tcp(TcpListener::from_std(owned.into())?)
        })
    }

    pub async fn accept(&self) -> io::Result<(Stream, Peer)> {
        match self {
            Listener::Tcp(l) => {
                let (s, addr) = l.accept().await?;
                let _ = s.set_nodelay(true);
                Ok((Stream::Tcp(s), Peer::Ip(addr)))
            }
            Listener::Unix(l) => {
                let (s, _) = l.accept().await?;
                Ok((Stream::Unix(s), Peer::Unix))
            }
        }
    }

    /// One `accept(2)` right now, bypassing the runtime's readiness cache: used when draining
    /// the backlog at shutdown, so connections the kernel already queued are served.
    pub fn accept_queued(&self) -> Option<io::Result<(Stream, Peer)>> {
        let sock = match self {
            Listener::Tcp(l) => SockRef::from(l),
            Listener::Unix(l) => SockRef::from(l),
        };
        let (socket, addr) = match sock.accept() {
            Ok(pair) => pair,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return None,
            Err(e) => return Some(Err(e)),
        };
        let convert = || -> io::Result<(Stream, Peer)> {
            socket.set_nonblocking(true)?;
            let owned = OwnedFd::from(socket);
            Ok(match self {
                Listener::Tcp(_) => {
                    let s = TcpStream::from_std(owned.into())?;
                    let _ = s.set_nodelay(true);
                    let peer = addr.as_socket().map(Peer::Ip).unwrap_or(Peer::Unix);
                    (Stream::Tcp(s), peer)
                }
                Listener::Unix(_) => (
                    Stream::Unix(UnixStream::from_std(owned.into())?),
                    Peer::Unix,
                ),
            })
        };
        Some(convert())
    }
}

pub enum Stream {
    Tcp(TcpStream),
    Unix(UnixStream),
}

macro_rules! delegate {
    ($self:ident, $s:ident => $e:expr) => {
        match $self.get_mut() {
            Stream::Tcp($s) => {
                let $s = Pin::new($s);
                $e
            }
            Stream::Unix($s) => {
                let $s = Pin::new($s);
                $e
            }
        }
    };
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        delegate!(self, s => s.poll_read(cx, buf))
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        delegate!(self, s => s.poll_write(cx, buf))
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        delegate!(self, s => s.poll_write_vectored(cx, bufs))
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        delegate!(self, s => s.poll_flush(cx))
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        delegate!(self, s => s.poll_shutdown(cx))
    }
}
