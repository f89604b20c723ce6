//! The splice pipes, shared by every connection of the process (docs/ARCHITECTURE.md,
//! pitfall 81). A relay direction takes a pipe when it has bytes to move and gives it back,
//! drained, as soon as its source has nothing more for now; an idle connection holds no pipe,
//! only its two sockets. The pool is bounded (`limit` pipes at once, idle or in use): when it
//! is exhausted a direction copies through the per-thread buffer instead, slower but correct.
//! A pipe that may still hold bytes (the relay failed or was cut mid-transfer) is closed, never
//! given back: the next connection would receive them.

use std::io;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::sync::Mutex;

use super::sockopt::Pipe;

/// Pipes at most, whatever the open-file limit: 512 descriptors, 32 MiB of pipe buffers when
/// every one is full (64 KiB each), far more than the bulk transfers one pod runs at once.
pub(crate) const MAX_PIPES: usize = 256;

/// The bounded pool.
pub(crate) struct PipePool {
    idle: Mutex<Vec<Pipe>>,
    /// Requested capacity of each pipe (`--pipe-size`).
    size: usize,
    limit: usize,
    /// Pipes that exist: idle in the pool or lent.
    open: AtomicUsize,
    lent: AtomicUsize,
}

/// The pool's gauges for `/metrics`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Stats {
    pub limit: usize,
    pub open: usize,
    pub in_use: usize,
}

impl std::fmt::Debug for PipePool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PipePool")
            .field("size", &self.size)
            .field("stats", &self.stats())
            .finish()
    }
}

impl PipePool {
    pub(crate) fn new(size: usize, limit: usize) -> PipePool {
        PipePool {
            idle: Mutex::new(Vec::new()),
            size,
            limit,
            open: AtomicUsize::new(0),
            lent: AtomicUsize::new(0),
        }
    }

    /// A pipe to fill: an idle one, or a new one while the pool is under its limit. `Ok(None)`
    /// when every pipe is lent; `Err` when the kernel refused a new one (EMFILE, ENFILE).
    pub(crate) fn take(&self) -> io::Result<Option<Lease<'_>>> {
        let reused = self.lock().pop();
        let pipe = match reused {
            Some(p) => p,
            None => {
                // Reserve a place first, so concurrent takers never exceed the limit.
                let reserved = self
                    .open
                    .fetch_update(Relaxed, Relaxed, |n| (n < self.limit).then_some(n + 1))
                    .is_ok();
                if !reserved {
                    return Ok(None);
                }
                match Pipe::new(self.size) {
                    Ok(p) => p,
                    Err(e) => {
                        self.open.fetch_sub(1, Relaxed);
                        return Err(e);
                    }
                }
            }
        };
        self.lent.fetch_add(1, Relaxed);
        Ok(Some(Lease {
            pool: self,
            pipe: Some(pipe),
        }))
    }

    pub(crate) fn stats(&self) -> Stats {
        Stats {
            limit: self.limit,
            open: self.open.load(Relaxed),
            in_use: self.lent.load(Relaxed),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Pipe>> {
        self.idle.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// A lent pipe. `drained` gives it back; dropped otherwise (error, cancellation), it is
/// closed, since it may hold bytes of this connection.
pub(crate) struct Lease<'a> {
    pool: &'a PipePool,
    pipe: Option<Pipe>,
}

impl Lease<'_> {
    pub(crate) fn pipe(&self) -> &Pipe {
        // Only `drained` and `drop` take it out, and both consume the lease.
        self.pipe
            .as_ref()
            .unwrap_or_else(|| unreachable!("a lease holds its pipe"))
    }

    /// Gives the pipe back to the pool. The caller moved every byte it spliced in out again:
    /// the pipe is empty.
    pub(crate) fn drained(mut self) {
        if let Some(p) = self.pipe.take() {
            self.pool.lock().push(p);
            self.pool.lent.fetch_sub(1, Relaxed);
        }
    }
}

impl Drop for Lease<'_> {
    fn drop(&mut self) {
        if let Some(p) = self.pipe.take() {
            drop(p);
            self.pool.open.fetch_sub(1, Relaxed);
            self.pool.lent.fetch_sub(1, Relaxed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lends_up_to_the_limit_reuses_drained_pipes_and_closes_the_others() {
        let pool = PipePool::new(65536, 2);
        let a = pool.take().unwrap().expect("first");
        let b = pool.take().unwrap().expect("second");
        assert!(pool.take().unwrap().is_none(), "at the limit");
        assert_eq!(
            pool.stats(),
            Stats {
                limit: 2,
                open: 2,
                in_use: 2
            }
        );
        let a_fd = {
            use std::os::fd::AsRawFd;
            a.pipe().r.as_raw_fd()
        };
        a.drained();
        assert_eq!(pool.stats().in_use, 1);
        assert_eq!(
            pool.stats().open,
            2,
            "a drained pipe stays open in the pool"
        );
        let again = pool.take().unwrap().expect("the drained one");
        {
            use std::os::fd::AsRawFd;
            assert_eq!(again.pipe().r.as_raw_fd(), a_fd, "reused, not a new pipe");
        }
        // Not drained (may hold bytes): closed, and its place is free for a new pipe.
        drop(b);
        assert_eq!(
            pool.stats(),
            Stats {
                limit: 2,
                open: 1,
                in_use: 1
            }
        );
        let c = pool.take().unwrap().expect("a new one in the freed place");
        drop((again, c));
        assert_eq!(pool.stats().open, 0);
    }

    #[test]
    fn a_pipe_that_is_not_drained_is_closed() {
        // Bytes left in a pipe, its lease dropped: not in the pool, counted closed.
        let pool = PipePool::new(65536, 4);
        let l = pool.take().unwrap().expect("pipe");
        nix::unistd::write(&l.pipe().w, b"left over").unwrap();
        drop(l);
        assert_eq!(pool.stats().open, 0);
        assert!(pool.lock().is_empty());
    }
}
