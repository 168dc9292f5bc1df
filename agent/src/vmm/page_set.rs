//! A set of guest pages (by page index), with a cursor search that wraps:
//! what the source has yet to send, what the destination has received.

use crate::vmm::memory::PAGE_SIZE;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PageSet {
    words: Vec<u64>,
    pages: u64,
    len: u64,
}

impl PageSet {
    /// An empty set over `mem_bytes` of guest memory.
    pub fn empty(mem_bytes: u64) -> Self {
        let pages = mem_bytes / PAGE_SIZE;
        PageSet { words: vec![0; pages.div_ceil(64) as usize], pages, len: 0 }
    }

    /// Every page of `mem_bytes` of guest memory.
    pub fn full(mem_bytes: u64) -> Self {
        let mut set = Self::empty(mem_bytes);
        for page in 0..set.pages {
            set.words[(page / 64) as usize] |= 1 << (page % 64);
        }
        set.len = set.pages;
        set
    }

    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Whether every page of the memory is in the set.
    pub fn is_full(&self) -> bool {
        self.len == self.pages
    }

    /// Pages of the memory that are not in the set.
    pub fn missing(&self) -> u64 {
        self.pages - self.len
    }

    fn index(&self, gpa: u64) -> Option<u64> {
        let page = gpa / PAGE_SIZE;
        (gpa.is_multiple_of(PAGE_SIZE) && page < self.pages).then_some(page)
    }

    pub fn contains(&self, gpa: u64) -> bool {
        self.index(gpa).is_some_and(|p| self.words[(p / 64) as usize] & (1 << (p % 64)) != 0)
    }

    /// Adds the page at `gpa`; false if it was there already or is outside the set's range.
    pub fn insert(&mut self, gpa: u64) -> bool {
        let Some(p) = self.index(gpa) else { return false };
        let (word, bit) = (&mut self.words[(p / 64) as usize], 1u64 << (p % 64));
        let added = *word & bit == 0;
        *word |= bit;
        self.len += u64::from(added);
        added
    }

    /// Removes the page at `gpa`; false if it was not there.
    pub fn remove(&mut self, gpa: u64) -> bool {
        let Some(p) = self.index(gpa) else { return false };
        let (word, bit) = (&mut self.words[(p / 64) as usize], 1u64 << (p % 64));
        let removed = *word & bit != 0;
        *word &= !bit;
        self.len -= u64::from(removed);
        removed
    }

    /// Every page in the set, by ascending address.
    pub fn iter(&self) -> impl Iterator<Item = u64> + '_ {
        self.words.iter().enumerate().flat_map(|(w, &word)| {
            let mut bits = word;
            std::iter::from_fn(move || {
                (bits != 0).then(|| {
                    let bit = u64::from(bits.trailing_zeros());
                    bits &= bits - 1;
                    (w as u64 * 64 + bit) * PAGE_SIZE
                })
            })
        })
    }

    /// The first page at or after `gpa` that is in the set, wrapping around to 0.
    pub fn next_from(&self, gpa: u64) -> Option<u64> {
        if self.len == 0 {
            return None;
        }
        let start = (gpa / PAGE_SIZE).min(self.pages.saturating_sub(1));
        self.scan(start, self.pages).or_else(|| self.scan(0, start)).map(|p| p * PAGE_SIZE)
    }

    /// The first set page index in `[from, to)`.
    fn scan(&self, from: u64, to: u64) -> Option<u64> {
        let mut page = from;
        while page < to {
            let word = self.words[(page / 64) as usize] >> (page % 64);
            if word != 0 {
                let found = page + u64::from(word.trailing_zeros());
                return (found < to).then_some(found);
            }
            page = (page / 64 + 1) * 64;
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn insert_remove_and_count() {
        let mut set = PageSet::empty(1 << 20);
        assert!(set.insert(4096 * 3));
        assert!(!set.insert(4096 * 3));
        assert!(!set.insert(1 << 20), "outside the range");
        assert!(!set.insert(4097), "unaligned");
        assert_eq!(set.len(), 1);
        assert!(set.contains(4096 * 3));
        assert!(set.remove(4096 * 3));
        assert!(!set.remove(4096 * 3));
        assert!(set.is_empty());
        assert_eq!(PageSet::full(1 << 20).len(), 256);
        let mut set = PageSet::empty(1 << 20);
        for page in [200u64, 3, 64, 63] {
            set.insert(page * 4096);
        }
        assert_eq!(set.iter().map(|g| g / 4096).collect::<Vec<_>>(), vec![3, 63, 64, 200]);
    }

    #[test]
    fn next_from_wraps_around() {
        let mut set = PageSet::empty(1 << 20);
        for page in [5u64, 70, 200] {
            set.insert(page * 4096);
        }
        assert_eq!(set.next_from(0), Some(5 * 4096));
        assert_eq!(set.next_from(6 * 4096), Some(70 * 4096));
        assert_eq!(set.next_from(70 * 4096), Some(70 * 4096));
        assert_eq!(set.next_from(201 * 4096), Some(5 * 4096), "wraps to the start");
        assert_eq!(set.next_from(u64::MAX - 4095), Some(5 * 4096));
        let mut drained = Vec::new();
        let mut cursor = 0;
        while let Some(gpa) = set.next_from(cursor) {
            set.remove(gpa);
            drained.push(gpa / 4096);
            cursor = gpa + 4096;
        }
        assert_eq!(drained, vec![5, 70, 200]);
        assert_eq!(set.next_from(0), None);
    }
}
