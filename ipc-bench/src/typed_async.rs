//! typed-ipc's async flavour: generated stubs of an `async fn` interface over an
//! `AsyncConnection`, each side on a current-thread tokio runtime (the server in a real child
//! process), calls driven with `block_on` from the harness thread.

use std::io;
use std::os::fd::OwnedFd;
use std::sync::Arc;

use ipc_bench::{AsyncBenchClient, AsyncBenchImpl, AsyncBenchServer, Blob, current_thread_runtime};
use typed_ipc::peer_memory::PeerMemory;
use typed_ipc::tokio::AsyncConnection;
use typed_ipc::{SharedBytes, Socket};

use crate::system::{Client, Kind, Launcher, MAX_PAYLOAD, System, inherited_fd};
use crate::typed::{expect, other};

/// The `typed-ipc/async` row.
pub struct TypedIpcAsync;

impl System for TypedIpcAsync {
    fn name(&self) -> &'static str {
        "typed-ipc/async"
    }

    fn kinds(&self) -> &'static [Kind] {
        &[Kind::Small, Kind::Bulk]
    }

    fn start(&self, launcher: &mut Launcher) -> io::Result<Box<dyn Client>> {
        let (ours, theirs) = Socket::pair().map_err(other)?;
        let child = launcher.spawn_with_fd(OwnedFd::from(theirs))?;
        let runtime = current_thread_runtime()?;
        let connection = {
            let _context = runtime.enter(); // the connection registers with this runtime
            AsyncConnection::new(ours).map_err(other)?
        };
        // Set up as `typed_ipc::tokio::worker::spawn` sets up a worker's connection.
        connection.write_into_peer(PeerMemory::of_child(child));
        Ok(Box::new(AsyncClient {
            client: AsyncBenchClient::new(connection),
            runtime,
            payload: Arc::new(vec![0xa5; MAX_PAYLOAD]),
        }))
    }

    fn serve(&self, arg: &str) -> io::Result<()> {
        let socket = Socket::from_fd(inherited_fd(arg)?).map_err(other)?;
        current_thread_runtime()?.block_on(async {
            let connection = AsyncConnection::new(socket).map_err(other)?;
            connection.accept_writes_from_peer().map_err(other)?;
            AsyncBenchServer::new(AsyncBenchImpl::new(|| 0))
                .serve(connection)
                .await
                .map_err(other)
        })
    }
}

struct AsyncClient {
    client: AsyncBenchClient,
    runtime: tokio::runtime::Runtime,
    /// What calls send from: small ones borrow it, bulk ones share it.
    payload: Arc<Vec<u8>>,
}

impl Client for AsyncClient {
    fn call(&mut self, kind: Kind, len: usize) -> io::Result<()> {
        match kind {
            Kind::Small => {
                let call = self.client.echo(&self.payload[..len]);
                let reply = self.runtime.block_on(call).map_err(other)?;
                expect("echoed bytes", reply.len() as u64, len as u64)
            }
            Kind::Bulk => {
                let call = self.client.put(Blob::Shared(
                    SharedBytes::from(Arc::clone(&self.payload)).slice(..len),
                ));
                let got = self.runtime.block_on(call).map_err(other)?;
                expect("bytes received", got, len as u64)
            }
        }
    }
}
