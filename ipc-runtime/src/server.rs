//! [`Server`]: which interfaces to serve, how many requests at once, who may call; on one
//! connection or on every client of a [`Listener`].

use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;

use crate::connection::Connection;
use crate::error::{Error, Result};
use crate::listener::Listener;
use crate::service::{InterfaceInfo, Service};
use crate::socket::PeerCredentials;

type SharedAuthorizer =
    Arc<dyn Fn(Option<&PeerCredentials>, &InterfaceInfo, u32) -> Result<(), String> + Send + Sync>;

/// Serves a set of interfaces.
///
/// ```no_run
/// # use ipc_runtime::{Listener, Server, service::Service};
/// # fn demo(my_service: impl Service) -> ipc_runtime::Result<()> {
/// let server = Server::new()
///     .service(my_service)                      // e.g. IpaServer::new(MyIpa)
///     .threads(4)                               // up to 4 requests at once per client
///     .authorize(|peer, _iface, _cmd| match peer {
///         Some(p) if p.uid == 1000 => Ok(()),
///         _ => Err("only uid 1000 may call".into()),
///     });
/// let serving = server.listen(Listener::bind("/run/my.sock")?)?;
/// // ... later: finish the calls in flight, stop accepting, return.
/// serving.shutdown();
/// # Ok(()) }
/// ```
#[derive(Clone, Default)]
pub struct Server {
    services: Vec<Arc<dyn Service>>,
    threads: usize,
    authorizer: Option<SharedAuthorizer>,
}

impl Server {
    /// A server with no interfaces yet that runs each connection's requests strictly one
    /// after the other, in the order they arrive.
    pub fn new() -> Server {
        Server {
            services: Vec::new(),
            threads: 1,
            authorizer: None,
        }
    }

    /// Serves `service`'s interface too.
    pub fn service(mut self, service: impl Service) -> Server {
        self.services.push(Arc::new(service));
        self
    }

    /// Runs up to `n` requests of one connection at once, on a pool of `n` threads (`n` = 1,
    /// the default, is strictly in order). Oneway messages from one peer still run one at a
    /// time, in the order sent, and a call waits for the oneways that arrived before it.
    pub fn threads(mut self, n: usize) -> Server {
        self.threads = n.max(1);
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
    ) -> Server {
        self.authorizer = Some(Arc::new(authorize));
        self
    }

    /// Serves `connection` until the peer hangs up, on this thread plus `threads - 1` more.
    /// Returns `Ok(())` on a clean close.
    pub fn serve(&self, connection: &Connection) -> Result<()> {
        self.install(connection);
        let helpers: Vec<_> = (1..self.threads)
            .map(|_| {
                let connection = connection.clone();
                std::thread::spawn(move || connection.run())
            })
            .collect();
        let mut result = connection.run();
        for helper in helpers {
            let outcome = helper
                .join()
                .unwrap_or(Err(Error::Remote("serving thread panicked".into())));
            result = result.and(outcome);
        }
        result
    }

    /// Accepts clients on `listener` and serves each on threads of its own, until
    /// [`Serving::shutdown`].
    pub fn listen(self, listener: Listener) -> Result<Serving> {
        let listener = Arc::new(listener);
        let clients: Arc<Mutex<Vec<Client>>> = Arc::default();
        let acceptor = {
            let (listener, clients, server) = (listener.clone(), clients.clone(), self);
            std::thread::spawn(move || server.accept_loop(&listener, &clients))
        };
        Ok(Serving {
            listener,
            clients,
            acceptor: Some(acceptor),
        })
    }

    fn accept_loop(&self, listener: &Listener, clients: &Mutex<Vec<Client>>) -> Result<()> {
        loop {
            let socket = match listener.accept() {
                Ok(socket) => socket,
                // Serving::shutdown shut the listening socket down.
                Err(Error::Io(e)) if e.raw_os_error() == Some(libc::EINVAL) => return Ok(()),
                Err(e) => return Err(e),
            };
            let connection = Connection::new(socket);
            let serving = {
                let (server, connection) = (self.clone(), connection.clone());
                std::thread::spawn(move || server.serve(&connection))
            };
            let mut clients = clients.lock().unwrap_or_else(PoisonError::into_inner);
            clients.retain(|c| !c.thread.is_finished());
            clients.push(Client {
                connection,
                thread: serving,
            });
        }
    }

    fn install(&self, connection: &Connection) {
        for service in &self.services {
            connection.add_service(service.clone());
        }
        if let Some(authorize) = &self.authorizer {
            let authorize = authorize.clone();
            connection.set_authorizer(move |peer, iface, cmd| authorize(peer, iface, cmd));
        }
    }
}

struct Client {
    connection: Connection,
    thread: JoinHandle<Result<()>>,
}

/// A [`Server`] accepting clients on a listener. Dropping it shuts it down.
pub struct Serving {
    listener: Arc<Listener>,
    clients: Arc<Mutex<Vec<Client>>>,
    acceptor: Option<JoinHandle<Result<()>>>,
}

impl Serving {
    /// How many clients are connected now.
    pub fn clients(&self) -> usize {
        let mut clients = self.clients.lock().unwrap_or_else(PoisonError::into_inner);
        clients.retain(|c| !c.thread.is_finished());
        clients.len()
    }

    /// Stops accepting, stops reading new requests, lets every call already running finish
    /// and send its reply, then returns. Clients see a hang-up afterwards.
    pub fn shutdown(mut self) {
        self.stop();
    }

    fn stop(&mut self) {
        let _ = self.listener.shutdown();
        if let Some(acceptor) = self.acceptor.take() {
            let _ = acceptor.join();
        }
        let clients =
            std::mem::take(&mut *self.clients.lock().unwrap_or_else(PoisonError::into_inner));
        for client in &clients {
            client.connection.stop_reading();
        }
        for client in clients {
            let _ = client.thread.join();
            client.connection.close();
        }
    }
}

impl Drop for Serving {
    fn drop(&mut self) {
        self.stop();
    }
}
