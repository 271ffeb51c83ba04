//! [`AsyncServer`] and [`AsyncListener`]: serving async interfaces on one connection or on
//! every client of a listening socket.

use std::future::Future;
use std::io;
use std::os::fd::{AsFd, AsRawFd, RawFd};
use std::path::Path;
use std::sync::{Arc, Mutex, PoisonError};

use ::tokio::io::unix::AsyncFd;
use ::tokio::task::JoinHandle;
use nix::fcntl::{FcntlArg, OFlag, fcntl};

use super::{AsyncConnection, AsyncService};
use crate::error::{Error, Result};
use crate::listener::Listener;
use crate::service::InterfaceInfo;
use crate::socket::{PeerCredentials, Socket};

type SharedAuthorizer =
    Arc<dyn Fn(Option<&PeerCredentials>, &InterfaceInfo, u32) -> Result<(), String> + Send + Sync>;

/// A [`Listener`] whose `accept` waits on the tokio runtime instead of blocking a thread.
#[derive(Debug)]
pub struct AsyncListener {
    io: AsyncFd<Registered>,
}

#[derive(Debug)]
struct Registered(Listener);

impl AsRawFd for Registered {
    fn as_raw_fd(&self) -> RawFd {
        self.0.as_fd().as_raw_fd()
    }
}

// SAFETY: a `Listener` owns its fd and closes it only when dropped.
unsafe impl super::OwnsFd for Registered {}

impl AsyncListener {
    /// Takes over `listener` (making its socket non-blocking) on the current tokio runtime.
    pub fn new(listener: Listener) -> Result<AsyncListener> {
        let flags = OFlag::from_bits_retain(fcntl(&listener, FcntlArg::F_GETFL)?);
        fcntl(&listener, FcntlArg::F_SETFL(flags | OFlag::O_NONBLOCK))?;
        Ok(AsyncListener {
            io: super::register(Registered(listener))?,
        })
    }

    /// Listens on a filesystem path (see [`Listener::bind`]).
    pub fn bind(path: impl AsRef<Path>) -> Result<AsyncListener> {
        AsyncListener::new(Listener::bind(path)?)
    }

    /// Listens on a Linux abstract socket name (see [`Listener::bind_abstract`]).
    pub fn bind_abstract(name: impl AsRef<[u8]>) -> Result<AsyncListener> {
        AsyncListener::new(Listener::bind_abstract(name)?)
    }

    /// Waits for the next client and returns its socket; wrap it in
    /// [`AsyncConnection::new`] (after [`Socket::set_limits`], if need be).
    pub async fn accept(&self) -> Result<Socket> {
        loop {
            let mut ready = self.io.readable().await?;
            match ready.try_io(|io| io.get_ref().0.accept().map_err(io::Error::from)) {
                Ok(accepted) => return accepted.map_err(Error::from),
                Err(_would_block) => continue,
            }
        }
    }

    /// The listening socket.
    pub fn listener(&self) -> &Listener {
        &self.io.get_ref().0
    }
}

/// Serves a set of async interfaces: the async flavour of [`Server`](crate::Server).
///
/// Requests of one connection run concurrently, each call in a task of its own; oneway
/// messages from one peer run one at a time, in the order sent, and a call starts only once
/// the oneways that arrived before it have run.
///
/// ```no_run
/// # use ipc_runtime::tokio::{AsyncListener, AsyncServer, AsyncService};
/// # async fn demo(my_service: impl AsyncService) -> ipc_runtime::Result<()> {
/// let serving = AsyncServer::new()
///     .service(my_service) // e.g. IpaServer::new(MyIpa)
///     .authorize(|peer, _iface, _cmd| match peer {
///         Some(p) if p.uid == 1000 => Ok(()),
///         _ => Err("only uid 1000 may call".into()),
///     })
///     .listen(AsyncListener::bind("/run/my.sock")?);
/// // ... later: finish the calls in flight, stop accepting, return.
/// serving.shutdown().await;
/// # Ok(()) }
/// ```
#[derive(Clone, Default)]
pub struct AsyncServer {
    services: Vec<Arc<dyn AsyncService>>,
    authorizer: Option<SharedAuthorizer>,
}

impl AsyncServer {
    /// A server with no interfaces yet.
    pub fn new() -> AsyncServer {
        AsyncServer::default()
    }

    /// Serves `service`'s interface too.
    pub fn service(mut self, service: impl AsyncService) -> AsyncServer {
        self.services.push(Arc::new(service));
        self
    }

    /// Lets `authorize` refuse calls: it sees the caller's credentials, the interface and the
    /// command id; its `Err(reason)` reaches the caller as [`Error::Refused`].
    pub fn authorize(
        mut self,
        authorize: impl Fn(Option<&PeerCredentials>, &InterfaceInfo, u32) -> Result<(), String>
        + Send
        + Sync
        + 'static,
    ) -> AsyncServer {
        self.authorizer = Some(Arc::new(authorize));
        self
    }

    /// Serves `connection` (at once) and returns a future that resolves when the peer has
    /// hung up and every handler has finished: `Ok(())` on a clean close.
    pub fn serve(
        &self,
        connection: &AsyncConnection,
    ) -> impl Future<Output = Result<()>> + Send + 'static + use<> {
        for service in &self.services {
            connection.add_service(service.clone());
        }
        if let Some(authorize) = &self.authorizer {
            let authorize = authorize.clone();
            connection.set_authorizer(move |peer, iface, cmd| authorize(peer, iface, cmd));
        }
        let connection = connection.clone();
        async move { connection.run().await }
    }

    /// Accepts clients on `listener` and serves each, until [`AsyncServing::shutdown`]. Must be
    /// called inside a tokio runtime.
    pub fn listen(self, listener: AsyncListener) -> AsyncServing {
        let clients: Arc<Mutex<Vec<Client>>> = Arc::default();
        let acceptor = ::tokio::spawn(accept_loop(self, listener, clients.clone()));
        AsyncServing { acceptor, clients }
    }
}

async fn accept_loop(
    server: AsyncServer,
    listener: AsyncListener,
    clients: Arc<Mutex<Vec<Client>>>,
) -> Result<()> {
    loop {
        let socket = listener.accept().await?;
        let connection = AsyncConnection::new(socket)?;
        let task = ::tokio::spawn(server.serve(&connection));
        let mut clients = clients.lock().unwrap_or_else(PoisonError::into_inner);
        clients.retain(|c| !c.task.is_finished());
        clients.push(Client { connection, task });
    }
}

struct Client {
    connection: AsyncConnection,
    task: JoinHandle<Result<()>>,
}

/// An [`AsyncServer`] accepting clients on a listener. Dropping it stops accepting and hangs
/// up on every client at once; [`AsyncServing::shutdown`] lets calls in flight finish first.
pub struct AsyncServing {
    acceptor: JoinHandle<Result<()>>,
    clients: Arc<Mutex<Vec<Client>>>,
}

impl AsyncServing {
    /// How many clients are connected now.
    pub fn clients(&self) -> usize {
        let mut clients = self.clients.lock().unwrap_or_else(PoisonError::into_inner);
        clients.retain(|c| !c.task.is_finished());
        clients.len()
    }

    /// Stops accepting (the listener is closed), stops reading new requests, lets every call
    /// already running finish and send its reply, then returns. Clients see a hang-up
    /// afterwards.
    pub async fn shutdown(mut self) {
        self.acceptor.abort();
        // Once it has ended, the listener is closed (and its socket file removed).
        let _ = (&mut self.acceptor).await;
        let clients =
            std::mem::take(&mut *self.clients.lock().unwrap_or_else(PoisonError::into_inner));
        for client in &clients {
            client.connection.stop_reading();
        }
        for client in clients {
            let _ = client.task.await;
            client.connection.close();
        }
    }
}

impl Drop for AsyncServing {
    fn drop(&mut self) {
        self.acceptor.abort();
        let clients =
            std::mem::take(&mut *self.clients.lock().unwrap_or_else(PoisonError::into_inner));
        for client in clients {
            client.connection.close();
        }
    }
}
