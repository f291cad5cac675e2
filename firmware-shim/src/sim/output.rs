//! The simulator's transmitter: a writer thread behind a bounded queue.
//!
//! A real UART never waits for its reader, so the simulator must not either.
//! [`Output::send`] hands a tick's bytes to a writer thread through a queue
//! of [`QUEUE_CHUNKS`] chunks and never blocks: when the queue is full
//! (nobody reads the port and the kernel's buffer is full) the chunk is
//! dropped and its frames are counted as `dropped_no_reader`. The frame
//! counter keeps running, so the agent sees the gap and counts the loss.
//!
//! The writer thread writes each chunk with `write_all`. A write that times
//! out (`TimedOut`/`WouldBlock`, e.g. a `serialport` port whose timeout
//! expired) drops the rest of that chunk: part of a frame may have gone
//! out, which the reader sees as one framing error; the 0x00 before the next
//! frame resynchronises it. Any other write error ends the thread and is
//! reported by the next [`Output::send`]: the run fails.
//!
//! The thread owns the writer and keeps it (the port stays open) until
//! [`Output::finish`] gives it back; if it is still blocked in a write at
//! that point it keeps the writer until the process exits.

use std::io::{self, Write};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

/// Chunks (ticks' worth of bytes) the queue to the writer thread holds.
pub const QUEUE_CHUNKS: usize = 8;

/// One tick's bytes and how many frames (or lines) they hold.
#[derive(Debug)]
struct Chunk {
    bytes: Vec<u8>,
    frames: u64,
}

/// State shared with the writer thread.
#[derive(Debug, Default)]
struct Shared {
    written_frames: AtomicU64,
    error: Mutex<Option<io::Error>>,
}

/// What happened to the frames offered to an [`Output`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct OutputStats {
    /// Frames (or lines) offered.
    pub offered: u64,
    /// Frames completely written to the port.
    pub written: u64,
    /// Frames not (completely) written: queue full, write timed out, or
    /// still queued when the output was finished.
    pub dropped_no_reader: u64,
}

/// A non-blocking transmitter over any writer; see the module docs.
#[derive(Debug)]
pub struct Output<W> {
    tx: Option<SyncSender<Chunk>>,
    thread: Option<JoinHandle<W>>,
    shared: Arc<Shared>,
    offered: u64,
}

impl<W: Write + Send + 'static> Output<W> {
    /// Starts the writer thread over `writer`.
    pub fn spawn(writer: W) -> io::Result<Self> {
        let (tx, rx) = mpsc::sync_channel::<Chunk>(QUEUE_CHUNKS);
        let shared = Arc::new(Shared::default());
        let thread_shared = Arc::clone(&shared);
        let thread = thread::Builder::new()
            .name("sim-writer".into())
            .spawn(move || {
                let mut writer = writer;
                for chunk in rx {
                    match writer.write_all(&chunk.bytes) {
                        Ok(()) => {
                            thread_shared
                                .written_frames
                                .fetch_add(chunk.frames, Ordering::Relaxed);
                        }
                        Err(e)
                            if matches!(
                                e.kind(),
                                io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock
                            ) => {}
                        Err(e) => {
                            if let Ok(mut slot) = thread_shared.error.lock() {
                                *slot = Some(e);
                            }
                            break;
                        }
                    }
                }
                writer
            })?;
        Ok(Output {
            tx: Some(tx),
            thread: Some(thread),
            shared,
            offered: 0,
        })
    }

    /// Queues `bytes` holding `frames` frames without blocking; drops them
    /// if the queue is full. Fails only when the writer thread stopped on a
    /// write error.
    pub fn send(&mut self, bytes: Vec<u8>, frames: u64) -> io::Result<()> {
        if bytes.is_empty() {
            return Ok(());
        }
        self.offered += frames;
        let Some(tx) = &self.tx else {
            return Err(io::Error::other("output already finished"));
        };
        match tx.try_send(Chunk { bytes, frames }) {
            Ok(()) | Err(TrySendError::Full(_)) => Ok(()),
            Err(TrySendError::Disconnected(_)) => Err(self.take_error()),
        }
    }

    /// Counts so far (frames still queued count as dropped until written).
    pub fn stats(&self) -> OutputStats {
        let written = self.shared.written_frames.load(Ordering::Relaxed);
        OutputStats {
            offered: self.offered,
            written,
            dropped_no_reader: self.offered.saturating_sub(written),
        }
    }

    /// Closes the queue and waits up to `drain` for the writer thread to
    /// write what is queued. Returns the final counts and the writer, or
    /// `None` if the thread is still blocked writing (it then keeps the
    /// writer until the process exits).
    pub fn finish(mut self, drain: Duration) -> (OutputStats, Option<W>) {
        self.tx = None;
        let deadline = Instant::now() + drain;
        let mut writer = None;
        if let Some(thread) = self.thread.take() {
            while !thread.is_finished() && Instant::now() < deadline {
                thread::sleep(Duration::from_millis(2));
            }
            if thread.is_finished() {
                writer = thread.join().ok();
            }
        }
        (self.stats(), writer)
    }

    fn take_error(&self) -> io::Error {
        let stored = self
            .shared
            .error
            .lock()
            .ok()
            .and_then(|mut slot| slot.take());
        stored.unwrap_or_else(|| io::Error::other("serial writer thread stopped"))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use std::sync::mpsc::Receiver;

    /// A writer into a shared buffer.
    #[derive(Debug, Clone, Default)]
    struct Shared(Arc<Mutex<Vec<u8>>>);
    impl Write for Shared {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    /// A writer that writes one chunk per permit the test sends (a port
    /// nobody reads until then) and fails once the test drops the sender.
    #[derive(Debug)]
    struct Gated {
        permits: Receiver<()>,
    }
    impl Write for Gated {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            match self.permits.recv() {
                Ok(()) => Ok(buf.len()),
                Err(_) => Err(io::Error::new(io::ErrorKind::BrokenPipe, "gate closed")),
            }
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn everything_is_written_when_the_reader_keeps_up() {
        let sink = Shared::default();
        let mut out = Output::spawn(sink.clone()).unwrap();
        for i in 0..100u8 {
            out.send(vec![i; 3], 1).unwrap();
            // Let the writer keep up, as a reader would.
            while out.stats().written < u64::from(i) + 1 {
                thread::sleep(Duration::from_micros(50));
            }
        }
        let (stats, writer) = out.finish(Duration::from_secs(5));
        assert!(writer.is_some());
        assert_eq!(
            stats,
            OutputStats {
                offered: 100,
                written: 100,
                dropped_no_reader: 0
            }
        );
        let expected: Vec<u8> = (0..100u8).flat_map(|i| [i; 3]).collect();
        assert_eq!(*sink.0.lock().unwrap(), expected);
    }

    #[test]
    fn send_never_blocks_and_counts_drops_when_nobody_reads() {
        let (permit, permits) = mpsc::channel();
        let mut out = Output::spawn(Gated { permits }).unwrap();
        // The writer is stuck on its first chunk: a blocking send would hang here.
        for _ in 0..1000 {
            out.send(vec![0; 10], 2).unwrap();
        }
        let s = out.stats();
        assert_eq!((s.offered, s.written), (2000, 0));
        // At most the queue plus the chunk being written get through later.
        for _ in 0..QUEUE_CHUNKS + 1 {
            permit.send(()).unwrap();
        }
        let (stats, writer) = out.finish(Duration::from_secs(5));
        assert!(writer.is_some(), "thread finished once the queue drained");
        assert!(stats.written <= 2 * (QUEUE_CHUNKS as u64 + 1), "{stats:?}");
        assert_eq!(stats.written + stats.dropped_no_reader, 2000);
    }

    #[test]
    fn finish_gives_up_on_a_blocked_writer() {
        let (_permit, permits) = mpsc::channel::<()>();
        let mut out = Output::spawn(Gated { permits }).unwrap();
        out.send(vec![1], 1).unwrap();
        let (stats, writer) = out.finish(Duration::from_millis(50));
        assert!(writer.is_none());
        assert_eq!(stats.dropped_no_reader, 1);
    }

    #[test]
    fn a_write_error_fails_the_next_send() {
        let (permit, permits) = mpsc::channel::<()>();
        drop(permit);
        let mut out = Output::spawn(Gated { permits }).unwrap();
        out.send(vec![1], 1).unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        let err = loop {
            match out.send(vec![1], 1) {
                Err(e) => break e,
                Ok(()) if Instant::now() < deadline => thread::sleep(Duration::from_millis(1)),
                Ok(()) => panic!("write error never reported"),
            }
        };
        assert_eq!(err.kind(), io::ErrorKind::BrokenPipe);
    }
}
