//! An async thumbnail service: three worker processes, many jobs in flight at once, calls
//! given up on (futures dropped, timeouts), a worker killed mid-job and replaced, and a worker
//! that calls back into the host while it works. Jobs queued to the killed worker fail with
//! `Disconnected`; the host started them with that worker's client, so it reports them.
//!
//! ```text
//! cargo run --example thumbnailer --features tokio
//! ```

use std::error::Error as StdError;
use std::fs::File;
use std::os::fd::OwnedFd;
use std::os::unix::fs::FileExt;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use nix::sys::memfd::{MFdFlags, memfd_create};
use serde::{Deserialize, Serialize};
use tokio::sync::Notify;
use typed_ipc::tokio::worker;
use typed_ipc::{Error, Limits, interface, worker::Exit, worker::Worker};

/// A thumbnail: a few bytes inline, and the full output in a memfd of the worker's.
#[derive(Debug, Serialize, Deserialize)]
pub struct Thumb {
    #[serde(with = "typed_ipc::bytes")] // one byte string, not a sequence of u8s
    pub preview: Vec<u8>,
    #[serde(with = "typed_ipc::fd")]
    pub output: OwnedFd,
}

#[interface]
pub trait Thumbnailer {
    /// Shrinks `image` (and the header in `input`) by 64; asks the host for the quality.
    async fn thumbnail(&self, job: u32, image: Vec<u8>, input: OwnedFd) -> Result<Thumb, String>;
}

/// Served by the host, called by the workers mid-job.
#[interface]
pub trait Host {
    async fn quality(&self, worker: u32, job: u32) -> u8;
}

const DOOMED: u32 = 999; // the job the host kills its worker during: the worker stalls on it

struct Thumbnail(HostClient);

impl Thumbnailer for Thumbnail {
    async fn thumbnail(&self, job: u32, image: Vec<u8>, input: OwnedFd) -> Result<Thumb, String> {
        let quality = self.0.quality(std::process::id(), job).await;
        if job == DOOMED {
            std::future::pending::<()>().await;
        }
        shrink(&image, quality.map_err(|e| e.to_string())?, input).map_err(|e| e.to_string())
    }
}

fn shrink(image: &[u8], quality: u8, input: OwnedFd) -> std::io::Result<Thumb> {
    let mut header = [0u8; 4];
    File::from(input).read_exact_at(&mut header, 0)?;
    let preview: Vec<u8> = image.iter().step_by(64).map(|b| b / quality).collect();
    let output = File::from(memfd_create("thumb", MFdFlags::MFD_CLOEXEC)?);
    output.write_all_at(&[&header[..], &preview].concat(), 0)?;
    let output = output.into();
    Ok(Thumb { preview, output })
}

/// The host's side: tells `mid_job` when the doomed job has reached its worker.
struct Quality(Arc<Notify>);

impl Host for Quality {
    async fn quality(&self, _worker: u32, job: u32) -> u8 {
        if job == DOOMED {
            self.0.notify_one();
        }
        2
    }
}

fn start(mid_job: &Arc<Notify>) -> Result<(Worker, ThumbnailerClient), Box<dyn StdError>> {
    let mut command = Command::new(std::env::current_exe()?);
    command.arg("--worker");
    typed_ipc::worker::exit_with_parent(&mut command);
    // What a worker may send us, and also the most we send it: above our largest job.
    let max_message_len = 16 << 20;
    let limits = Limits {
        max_message_len,
        ..Limits::default()
    };
    let (worker, connection) = worker::spawn_with_limits(command, limits)?;
    connection.add_service(HostServer::new(Quality(mid_job.clone())));
    Ok((worker, ThumbnailerClient::new(connection)))
}

fn input_file(job: u32) -> std::io::Result<OwnedFd> {
    let fd = memfd_create("input", MFdFlags::MFD_CLOEXEC)?;
    File::from(fd.try_clone()?).write_all_at(&job.to_le_bytes(), 0)?;
    Ok(fd)
}

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").unwrap().count()
}

async fn host() -> Result<(), Box<dyn StdError>> {
    let fds_before = open_fds();
    let mid_job = Arc::new(Notify::new());
    let (mut workers, mut clients) = (Vec::new(), Vec::new());
    for _ in 0..3 {
        let (worker, client) = start(&mid_job)?;
        workers.push(worker);
        clients.push(client);
    }

    // 48 jobs from 48 tasks, 100 B to 8 MiB; every 4th gives up after 1 ms, every 6th is
    // aborted at once, the rest wait.
    let mut tasks = Vec::new();
    for job in 0..48u32 {
        let client = clients[job as usize % 3].clone();
        let len = [100, 4 << 10, 300 << 10, 2 << 20, 8 << 20][job as usize % 5];
        let task = tokio::spawn(async move {
            let call = client.thumbnail(job, vec![job as u8; len], input_file(job)?);
            let thumb = match job % 4 {
                0 => match tokio::time::timeout(Duration::from_millis(1), call).await {
                    Ok(reply) => reply?,
                    Err(_) => return Ok(None),
                },
                _ => call.await?,
            };
            let mut header = [0u8; 4];
            File::from(thumb.expect("worker refused").output).read_exact_at(&mut header, 0)?;
            assert_eq!(u32::from_le_bytes(header), job);
            Ok::<_, Box<dyn StdError + Send + Sync>>(Some(len))
        });
        if job % 6 == 5 {
            task.abort();
        }
        tasks.push(task);
    }

    // Worker 1, mid-job (it has called back for its quality), is killed and replaced.
    let (doomed, input) = (clients[1].clone(), input_file(DOOMED)?);
    let doomed = tokio::spawn(async move { doomed.thumbnail(DOOMED, vec![1; 9], input).await });
    mid_job.notified().await;
    workers[1].kill()?;
    assert!(matches!(doomed.await?, Err(Error::Disconnected)));
    let exit = worker::wait(&mut workers[1]).await?;
    println!("worker 1 killed mid-job: {exit}");
    (workers[1], clients[1]) = start(&mid_job)?;

    let (mut done, mut gave_up, mut aborted, mut lost) = (0, 0, 0, 0);
    for task in tasks {
        match task.await {
            Ok(Ok(Some(_))) => done += 1,
            Ok(Ok(None)) => gave_up += 1,
            Ok(Err(_)) => lost += 1, // queued to the killed worker
            Err(e) if e.is_cancelled() => aborted += 1,
            Err(e) => return Err(e.into()),
        }
    }
    println!("{done} done, {gave_up} timed out, {aborted} aborted, {lost} lost with worker 1");
    // Every worker still answers after all that.
    for client in &clients {
        let thumb = client.thumbnail(7, vec![7; 100], input_file(7)?).await?;
        thumb.expect("refused");
    }

    // Shut down: hang up on each worker, which then exits 0. (`close`, not a drop: a service
    // holding a client of the worker would keep the connection up.)
    for client in clients {
        client.connection().close();
    }
    for mut worker in workers {
        let exit = worker::wait(&mut worker).await?;
        assert!(matches!(exit, Exit::Code(0)), "{exit}");
    }
    drop(mid_job);
    // The fds typed-ipc dropped (late replies' memfds) are closed on threads of its own.
    // `wait_for_closes` blocks: not on a runtime thread.
    tokio::task::spawn_blocking(typed_ipc::wait_for_closes).await?;
    println!("fds open before: {fds_before}, after: {}", open_fds());
    Ok(())
}

async fn serve_worker() -> Result<(), Box<dyn StdError>> {
    let connection = worker::connection()?;
    let host = HostClient::new(connection.clone());
    let server = ThumbnailerServer::new(Thumbnail(host));
    Ok(server.serve(connection).await?)
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn StdError>> {
    if std::env::args().any(|a| a == "--worker") {
        serve_worker().await
    } else {
        host().await
    }
}
