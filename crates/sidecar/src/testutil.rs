//! Helpers for the sidecar's unit tests: a deterministic PRNG, the byte edits the parser
//! fuzz loops make to valid messages, and connected loopback socket pairs for the relays.

/// xorshift64: deterministic, no dependency.
pub(crate) struct Rng(pub(crate) u64);

impl Rng {
    pub(crate) fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }

    /// Uniform-ish in `0..n` (0 when `n` is 0).
    pub(crate) fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }

    /// A copy of one of `seeds` with 1 to `max_edits` edits, each picked from `edits`.
    pub(crate) fn mutant(
        &mut self,
        seeds: &[Vec<u8>],
        edits: &[Edit],
        max_edits: usize,
        alphabet: &[u8],
    ) -> Vec<u8> {
        let mut buf = seeds[self.below(seeds.len())].clone();
        for _ in 0..=self.below(max_edits) {
            let edit = edits[self.below(edits.len())];
            self.edit(&mut buf, edit, alphabet);
        }
        buf
    }

    /// Applies one edit; those of an existing byte leave an empty buffer alone.
    pub(crate) fn edit(&mut self, buf: &mut Vec<u8>, edit: Edit, alphabet: &[u8]) {
        match edit {
            Edit::Set if !buf.is_empty() => {
                let i = self.below(buf.len());
                buf[i] = alphabet[self.below(alphabet.len())];
            }
            Edit::SetAny if !buf.is_empty() => {
                let i = self.below(buf.len());
                buf[i] = self.next() as u8;
            }
            Edit::Insert => {
                let i = self.below(buf.len() + 1);
                buf.insert(i, alphabet[self.below(alphabet.len())]);
            }
            Edit::Remove if !buf.is_empty() => {
                let i = self.below(buf.len());
                buf.remove(i);
            }
            Edit::Truncate => buf.truncate(self.below(buf.len() + 1)),
            Edit::Append(max) => {
                let n = self.below(max);
                buf.extend((0..n).map(|_| self.next() as u8));
            }
            Edit::Custom(f) => f(self, buf.as_mut_slice()),
            Edit::Set | Edit::SetAny | Edit::Remove => {}
        }
    }
}

/// One edit a fuzz loop makes to a message.
#[derive(Clone, Copy)]
pub(crate) enum Edit {
    /// Overwrite a byte with one from the alphabet.
    Set,
    /// Overwrite a byte with any byte.
    SetAny,
    /// Insert a byte from the alphabet.
    Insert,
    /// Remove a byte.
    Remove,
    /// Cut off the tail at a random point (possibly all, possibly nothing).
    Truncate,
    /// Append fewer than this many random bytes.
    Append(usize),
    /// An in-place edit that knows the format (e.g. of a length field).
    Custom(fn(&mut Rng, &mut [u8])),
}

/// A connected loopback pair: (connecting side, accepted side).
pub(crate) async fn tcp_pair() -> (tokio::net::TcpStream, tokio::net::TcpStream) {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let a = l.local_addr().unwrap();
    let (c, s) = tokio::join!(tokio::net::TcpStream::connect(a), l.accept());
    (c.unwrap(), s.unwrap().0)
}
