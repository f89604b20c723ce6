//! The sidecar's global allocator: the system allocator (glibc's malloc) for everything but
//! small over-aligned blocks, which come from per-size free lists carved out of 64 KiB chunks.
//!
//! Why: tokio aligns every task cell and every socket registration to 128 bytes, and an
//! idle connection is exactly one task and two registrations. glibc serves such a request with
//! `memalign`, which takes `size + 128 + 32` bytes and frees the misaligned head and the
//! unused tail as small chunks that the next requests of the connection (the same sizes again)
//! cannot use: about 0.6 KiB of every idle connection's 2.75 KiB was that waste
//! (docs/ARCHITECTURE.md, pitfall 82). Here a block of a class is exactly its class size
//! (a multiple of 128), placed at a multiple of 128, with no header.
//!
//! Freed blocks go back to their class's list and are reused for the next block of that class;
//! chunks are never given back to the system (glibc rarely could either: its heap only shrinks
//! from the top). The lists sit behind one lock: a connection takes three blocks when it
//! starts and gives them back when it ends, far from the data path's hot loop.

use std::alloc::{GlobalAlloc, Layout, System};
use std::ptr::null_mut;
use std::sync::Mutex;

/// Blocks are multiples of this, placed at multiples of it: tokio's largest alignment.
const GRAIN: usize = 128;
/// Larger requests go to the system allocator, whatever their alignment.
const MAX_BLOCK: usize = 4096;
const CLASSES: usize = MAX_BLOCK / GRAIN;
/// What one refill takes from the system allocator.
const CHUNK: usize = 64 * 1024;

/// The sidecar binary's `#[global_allocator]`.
pub struct Allocator;

/// The free lists (a freed block holds the address of the next one) and the chunk being
/// carved.
struct Lists {
    free: [*mut u8; CLASSES],
    next: *mut u8,
    end: *mut u8,
}

// SAFETY: the pointers are plain addresses of memory this module owns; they are only read
// or written under the mutex.
unsafe impl Send for Lists {}

static LISTS: Mutex<Lists> = Mutex::new(Lists {
    free: [null_mut(); CLASSES],
    next: null_mut(),
    end: null_mut(),
});

/// The class of a layout served here, by size: `None` for what the system allocator serves
/// (alignment up to 16, which malloc gives anyway, or blocks over `MAX_BLOCK`). Depends only on
/// the layout, so `dealloc` routes a block where `alloc` took it from.
fn class(layout: Layout) -> Option<usize> {
    if layout.align() <= 16 || layout.align() > GRAIN || layout.size() > MAX_BLOCK {
        return None;
    }
    Some(layout.size().max(1).div_ceil(GRAIN) - 1)
}

fn lists() -> std::sync::MutexGuard<'static, Lists> {
    // Nothing panics while the lock is held; a poisoned lock still guards consistent lists.
    LISTS.lock().unwrap_or_else(|p| p.into_inner())
}

impl Lists {
    /// A block of class `c`: the last freed one, else the next one carved from the chunk.
    ///
    /// # Safety
    /// `c < CLASSES`.
    unsafe fn take(&mut self, c: usize) -> *mut u8 {
        let head = self.free[c];
        if !head.is_null() {
            // SAFETY: `head` is a freed block of this class; its first word is the next one.
            self.free[c] = unsafe { head.cast::<*mut u8>().read() };
            return head;
        }
        let size = (c + 1) * GRAIN;
        if (self.end as usize) - (self.next as usize) < size {
            // The rest of the old chunk (less than one block) is left unused.
            // SAFETY: a valid, non-zero layout.
            let chunk = unsafe { System.alloc(Layout::from_size_align_unchecked(CHUNK, 4096)) };
            if chunk.is_null() {
                return null_mut();
            }
            self.next = chunk;
            // SAFETY: within the chunk just allocated (one past its end).
            self.end = unsafe { chunk.add(CHUNK) };
        }
        let block = self.next;
        // SAFETY: `size` bytes fit between `next` and `end`, checked above.
        self.next = unsafe { block.add(size) };
        block
    }

    /// Gives a block of class `c` back to its list.
    ///
    /// # Safety
    /// `block` came from `take(c)` and is no longer used.
    unsafe fn give(&mut self, c: usize, block: *mut u8) {
        // SAFETY: the block is ours, at least 128 bytes, aligned for a pointer.
        unsafe { block.cast::<*mut u8>().write(self.free[c]) };
        self.free[c] = block;
    }
}

// SAFETY: every block handed out is `GRAIN`-aligned (chunks are 4096-aligned and blocks are
// multiples of `GRAIN`), at least as large as asked, and owned by one caller until freed; the
// rest is the system allocator's.
unsafe impl GlobalAlloc for Allocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        match class(layout) {
            // SAFETY: `class` returns indexes below `CLASSES`.
            Some(c) => unsafe { lists().take(c) },
            // SAFETY: forwarded with the caller's guarantees.
            None => unsafe { System.alloc(layout) },
        }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        match class(layout) {
            Some(_) => {
                // SAFETY: forwarded with the caller's guarantees.
                let p = unsafe { self.alloc(layout) };
                if !p.is_null() {
                    // SAFETY: the block holds at least `layout.size()` bytes.
                    unsafe { p.write_bytes(0, layout.size()) };
                }
                p
            }
            // SAFETY: forwarded with the caller's guarantees.
            None => unsafe { System.alloc_zeroed(layout) },
        }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        match class(layout) {
            // SAFETY: the same layout was given to `alloc`, so the block came from `take(c)`.
            Some(c) => unsafe { lists().give(c, ptr) },
            // SAFETY: forwarded with the caller's guarantees.
            None => unsafe { System.dealloc(ptr, layout) },
        }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: the caller guarantees `new_size` with this alignment is a valid layout.
        let new = unsafe { Layout::from_size_align_unchecked(new_size, layout.align()) };
        match (class(layout), class(new)) {
            // Both the system's: let it grow in place when it can.
            // SAFETY: forwarded with the caller's guarantees.
            (None, None) => unsafe { System.realloc(ptr, layout, new_size) },
            // Same class: the block already fits.
            (Some(a), Some(b)) if a == b => ptr,
            _ => {
                // SAFETY: a valid layout, then a copy of the bytes both blocks hold.
                let p = unsafe { self.alloc(new) };
                if !p.is_null() {
                    unsafe {
                        p.copy_from_nonoverlapping(ptr, layout.size().min(new_size));
                        self.dealloc(ptr, layout);
                    }
                }
                p
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layout(size: usize, align: usize) -> Layout {
        Layout::from_size_align(size, align).unwrap()
    }

    #[test]
    fn routes_by_alignment_and_size() {
        assert_eq!(class(layout(1792, 8)), None, "malloc aligns to 16 itself");
        assert_eq!(class(layout(1792, 16)), None);
        assert_eq!(class(layout(1792, 128)), Some(13));
        assert_eq!(class(layout(256, 128)), Some(1));
        assert_eq!(class(layout(1, 64)), Some(0));
        assert_eq!(class(layout(0, 128)), Some(0));
        assert_eq!(class(layout(4096, 128)), Some(31));
        assert_eq!(class(layout(4097, 128)), None);
        assert_eq!(class(layout(64, 256)), None, "beyond the grain");
    }

    #[test]
    fn blocks_are_aligned_distinct_and_hold_their_bytes() {
        let a = Allocator;
        let l = layout(1792, 128);
        let blocks: Vec<*mut u8> = (0..100)
            .map(|i| unsafe {
                let p = a.alloc(l);
                assert!(!p.is_null());
                assert_eq!(p as usize % 128, 0);
                p.write_bytes(i as u8, l.size());
                p
            })
            .collect();
        let mut sorted: Vec<usize> = blocks.iter().map(|p| *p as usize).collect();
        sorted.sort_unstable();
        assert!(sorted.windows(2).all(|w| w[1] - w[0] >= 1792), "overlap");
        for (i, p) in blocks.iter().enumerate() {
            let s = unsafe { std::slice::from_raw_parts(*p, l.size()) };
            assert!(s.iter().all(|b| *b == i as u8), "block {i} was overwritten");
        }
        for p in blocks {
            unsafe { a.dealloc(p, l) };
        }
        let again = unsafe { a.alloc(l) };
        assert_eq!(again as usize % 128, 0);
        unsafe { a.dealloc(again, l) };
    }

    #[test]
    fn zeroed_and_realloc_keep_the_contract() {
        let a = Allocator;
        unsafe {
            let l = layout(300, 128);
            let p = a.alloc(l);
            p.write_bytes(0xAB, 300);
            a.dealloc(p, l);
            let z = a.alloc_zeroed(l);
            assert!(std::slice::from_raw_parts(z, 300).iter().all(|b| *b == 0));
            z.write_bytes(7, 300);
            // Grows into another class: the bytes move with it.
            let g = a.realloc(z, l, 1000);
            assert_eq!(g as usize % 128, 0);
            assert!(std::slice::from_raw_parts(g, 300).iter().all(|b| *b == 7));
            // Grows beyond the classes: the system's now.
            let big = a.realloc(g, layout(1000, 128), 10_000);
            assert_eq!(big as usize % 128, 0);
            assert!(std::slice::from_raw_parts(big, 300).iter().all(|b| *b == 7));
            a.dealloc(big, layout(10_000, 128));
            // Plain alignment: the system's throughout.
            let s = a.alloc(layout(10, 8));
            let s = a.realloc(s, layout(10, 8), 20);
            a.dealloc(s, layout(20, 8));
        }
    }

    #[test]
    fn threads_take_and_give_concurrently() {
        let handles: Vec<_> = (0..4)
            .map(|t| {
                std::thread::spawn(move || {
                    let a = Allocator;
                    for round in 0..200 {
                        let l = layout(128 * (1 + (round + t) % 20), 128);
                        let ps: Vec<*mut u8> = (0..16)
                            .map(|_| unsafe {
                                let p = a.alloc(l);
                                p.write_bytes(t as u8, l.size());
                                p
                            })
                            .collect();
                        for p in ps {
                            let s = unsafe { std::slice::from_raw_parts(p, l.size()) };
                            assert!(s.iter().all(|b| *b == t as u8));
                            unsafe { a.dealloc(p, l) };
                        }
                    }
                })
            })
            .collect();
        for h in handles {
            h.join().unwrap();
        }
    }
}
