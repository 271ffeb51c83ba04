//! Servers that answer with an implementation the program keeps a handle to
//! (`<Trait>Server::from_arc`), with one chosen at run time (`Arc<dyn Trait>`, blocking
//! flavour), and clones of one server answering on several connections with one state.
//! These are about how a server holds its implementation, so a connection pair in one process
//! is enough: the wire is the same as everywhere else.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread;

use typed_ipc::{Connection, interface};

/// A running total.
#[interface]
pub trait Tally {
    /// Adds `n`; the total after it.
    fn add(&self, n: u64) -> u64;
}

/// Keeps the total.
#[derive(Default)]
struct Counter(AtomicU64);

impl Tally for Counter {
    fn add(&self, n: u64) -> u64 {
        self.0.fetch_add(n, Ordering::SeqCst) + n
    }
}

/// Keeps nothing: answers twice what it is given.
struct Doubler;

impl Tally for Doubler {
    fn add(&self, n: u64) -> u64 {
        2 * n
    }
}

/// Serves `server` on one end of a fresh pair, on a thread; the client of the other end, and
/// the thread, which returns what `serve` did.
fn serve<T: Tally + Send + Sync + ?Sized + 'static>(
    server: TallyServer<T>,
) -> (TallyClient, thread::JoinHandle<typed_ipc::Result<()>>) {
    let (client_end, server_end) = Connection::pair().unwrap();
    let serving = thread::spawn(move || server.serve(server_end));
    (TallyClient::new(client_end), serving)
}

#[test]
fn a_server_made_from_an_arc_leaves_its_state_reachable_through_the_other_handles() {
    let counter = Arc::new(Counter::default());
    let (client, serving) = serve(TallyServer::from_arc(Arc::clone(&counter)));
    assert_eq!(client.add(3).unwrap(), 3);
    assert_eq!(client.add(4).unwrap(), 7);
    // What the calls did is there for the program to read, with no wrapper type around it.
    assert_eq!(counter.0.load(Ordering::SeqCst), 7);
    drop(client);
    serving.join().unwrap().unwrap();
    // The server let go of its handle when it stopped.
    assert_eq!(Arc::strong_count(&counter), 1);
}

#[test]
fn a_server_answers_with_an_implementation_chosen_at_run_time() {
    for (name, expected) in [("counter", 5), ("doubler", 10)] {
        let imp: Arc<dyn Tally + Send + Sync> = match name {
            "counter" => Arc::new(Counter::default()),
            _ => Arc::new(Doubler),
        };
        let (client, serving) = serve(TallyServer::from_arc(imp));
        assert_eq!(client.add(5).unwrap(), expected, "{name}");
        drop(client);
        serving.join().unwrap().unwrap();
    }
}

#[test]
fn clones_of_a_server_answer_on_several_connections_with_one_implementation() {
    let counter = Arc::new(Counter::default());
    let server = TallyServer::from_arc(Arc::clone(&counter));
    let (first, first_serving) = serve(server.clone());
    let (second, second_serving) = serve(server);
    assert_eq!(first.add(1).unwrap(), 1);
    assert_eq!(second.add(10).unwrap(), 11);
    assert_eq!(first.add(100).unwrap(), 111);
    drop((first, second));
    first_serving.join().unwrap().unwrap();
    second_serving.join().unwrap().unwrap();
    assert_eq!(Arc::strong_count(&counter), 1);
}

#[cfg(feature = "tokio")]
mod asynchronous {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU64, Ordering};

    use typed_ipc::interface;
    use typed_ipc::tokio::AsyncConnection;

    /// The async twin of [`super::Tally`].
    #[interface]
    pub trait Tally {
        /// Adds `n`; the total after it.
        async fn add(&self, n: u64) -> u64;
    }

    #[derive(Default)]
    struct Counter(AtomicU64);

    impl Tally for Counter {
        async fn add(&self, n: u64) -> u64 {
            self.0.fetch_add(n, Ordering::SeqCst) + n
        }
    }

    #[tokio::test]
    async fn clones_of_a_server_made_from_an_arc_share_its_state_with_the_program() {
        let counter = Arc::new(Counter::default());
        let server = TallyServer::from_arc(Arc::clone(&counter));
        let (first_end, first_server_end) = AsyncConnection::pair().unwrap();
        let (second_end, second_server_end) = AsyncConnection::pair().unwrap();
        let first_serving = tokio::spawn(server.clone().serve(first_server_end));
        let second_serving = tokio::spawn(server.serve(second_server_end));
        let (first, second) = (TallyClient::new(first_end), TallyClient::new(second_end));
        assert_eq!(first.add(2).await.unwrap(), 2);
        assert_eq!(second.add(20).await.unwrap(), 22);
        assert_eq!(counter.0.load(Ordering::SeqCst), 22);
        drop((first, second));
        first_serving.await.unwrap().unwrap();
        second_serving.await.unwrap().unwrap();
        assert_eq!(Arc::strong_count(&counter), 1);
    }
}
