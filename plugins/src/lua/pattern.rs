//! Lua 5.4 pattern matching with a step budget, for the sandbox's `string.find`, `match`,
//! `gmatch` and `gsub` (see `strlib.rs`, which wires these into Lua).
//!
//! Lua's own matcher is a backtracking C function: no instruction hook fires while it runs, so
//! `string.find(("a"):rep(40), ("a?"):rep(40) .. ("a"):rep(40))` or `(.-)(.-)(.-)…x` can run
//! for hours inside one call. This is an independent implementation of the same semantics
//! (character classes, sets, the four quantifiers, anchors, captures and position captures,
//! back-references, `%b`, `%f`, and the 200-level recursion limit with Lua's error messages)
//! that counts every matching step against a [`Meter`]: when the plugin call's step budget is
//! spent or its deadline has passed, matching stops with [`Fail::Budget`] / [`Fail::Deadline`].
//!
//! Positions are 0-based byte offsets into the subject; the Lua glue converts them.

/// Most captures in one pattern (Lua's `LUA_MAXCAPTURES`).
pub(crate) const MAX_CAPTURES: usize = 32;
/// Most nested matcher calls (Lua's `MAXCCALLS` in the string library).
const MAX_DEPTH: u32 = 200;
/// How many steps run between two looks at the clock.
const CHECK_EVERY: u64 = 1024;
/// Pattern characters that make `string.find` use the matcher instead of a plain search.
const SPECIALS: &[u8] = b"^$*+?.([%-";

/// A malformed pattern or a bad capture reference; [`PatError::write`] gives Lua's message.
/// (Plain data: the C functions raise it with `longjmp`, which runs no destructors.)
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum PatError {
    EndsWithPercent,
    MissingBracket,
    MissingBalanceArguments,
    MissingFrontierSet,
    /// `%N` names no closed capture (N as written, so `%0` is 0).
    InvalidCaptureIndex(i64),
    InvalidPatternCapture,
    TooManyCaptures,
    TooComplex,
    UnfinishedCapture,
}

impl PatError {
    /// Lua's message, in pieces.
    pub(crate) fn write(&self, out: &mut dyn FnMut(&[u8])) {
        let text: &[u8] = match self {
            PatError::EndsWithPercent => b"malformed pattern (ends with '%')",
            PatError::MissingBracket => b"malformed pattern (missing ']')",
            PatError::MissingBalanceArguments => b"malformed pattern (missing arguments to '%b')",
            PatError::MissingFrontierSet => b"missing '[' after '%f' in pattern",
            PatError::InvalidCaptureIndex(n) => {
                out(b"invalid capture index %");
                out(n.to_string().as_bytes());
                return;
            }
            PatError::InvalidPatternCapture => b"invalid pattern capture",
            PatError::TooManyCaptures => b"too many captures",
            PatError::TooComplex => b"pattern too complex",
            PatError::UnfinishedCapture => b"unfinished capture",
        };
        out(text);
    }
}

impl std::fmt::Display for PatError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut s = Vec::new();
        self.write(&mut |b| s.extend_from_slice(b));
        f.write_str(&String::from_utf8_lossy(&s))
    }
}

/// Why matching stopped without an answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Fail {
    /// A malformed pattern or a bad capture reference.
    Error(PatError),
    /// The step budget of the current plugin call is spent.
    Budget,
    /// The plugin call's deadline has passed.
    Deadline,
}

type R<T> = Result<T, Fail>;

fn error<T>(e: PatError) -> R<T> {
    Err(Fail::Error(e))
}

/// Counts matching steps against a budget and looks at a deadline every [`CHECK_EVERY`] steps.
pub(crate) struct Meter<'a> {
    used: u64,
    limit: u64,
    next_check: u64,
    expired: &'a dyn Fn() -> bool,
}

impl<'a> Meter<'a> {
    /// A meter allowing `budget` steps; `expired` tells whether the deadline has passed.
    pub(crate) fn new(budget: u64, expired: &'a dyn Fn() -> bool) -> Self {
        Meter {
            used: 0,
            limit: budget,
            next_check: budget.min(CHECK_EVERY),
            expired,
        }
    }

    /// Steps counted so far.
    pub(crate) fn used(&self) -> u64 {
        self.used
    }

    /// Count `n` steps.
    #[inline]
    pub(crate) fn add(&mut self, n: u64) -> R<()> {
        self.used = self.used.saturating_add(n);
        if self.used >= self.next_check {
            return self.checkpoint();
        }
        Ok(())
    }

    #[cold]
    fn checkpoint(&mut self) -> R<()> {
        if self.used >= self.limit {
            return Err(Fail::Budget);
        }
        if (self.expired)() {
            return Err(Fail::Deadline);
        }
        self.next_check = self.used.saturating_add(CHECK_EVERY).min(self.limit);
        Ok(())
    }
}

/// One capture after a successful match.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Capture {
    /// A substring `start..end` of the subject.
    Str(usize, usize),
    /// A position capture `()`: the 0-based offset.
    Position(usize),
    /// A capture whose `)` was never reached (an error when its value is asked for).
    Unfinished,
}

#[derive(Debug, Clone, Copy)]
enum Len {
    Unfinished,
    Position,
    Closed(usize),
}

#[derive(Debug, Clone, Copy)]
struct Slot {
    start: usize,
    len: Len,
}

/// Matching state for one subject and one pattern.
pub(crate) struct Matcher<'s, 'm, 'a> {
    src: &'s [u8],
    pat: &'s [u8],
    depth: u32,
    level: usize,
    slots: [Slot; MAX_CAPTURES],
    meter: &'m mut Meter<'a>,
}

impl<'s, 'm, 'a> Matcher<'s, 'm, 'a> {
    pub(crate) fn new(src: &'s [u8], pat: &'s [u8], meter: &'m mut Meter<'a>) -> Self {
        Matcher {
            src,
            pat,
            depth: MAX_DEPTH,
            level: 0,
            slots: [Slot {
                start: 0,
                len: Len::Unfinished,
            }; MAX_CAPTURES],
            meter,
        }
    }

    /// Try the whole pattern at subject offset `s`; the end of the match if it matches.
    pub(crate) fn match_at(&mut self, s: usize) -> R<Option<usize>> {
        self.level = 0;
        self.depth = MAX_DEPTH;
        self.run(s, 0)
    }

    /// The meter, for callers that count their own steps between matches.
    pub(crate) fn meter(&mut self) -> &mut Meter<'a> {
        self.meter
    }

    /// Number of captures the pattern opened in the last successful match.
    pub(crate) fn level(&self) -> usize {
        self.level
    }

    /// Capture `i` (0-based) of the last successful match `s..e`. With no captures, capture 0
    /// is the whole match; asking for a capture the pattern does not have is Lua's
    /// "invalid capture index" error.
    pub(crate) fn capture(&self, i: usize, s: usize, e: usize) -> R<Capture> {
        if i >= self.level {
            if i != 0 {
                return error(PatError::InvalidCaptureIndex(i as i64 + 1));
            }
            return Ok(Capture::Str(s, e));
        }
        let slot = self.slots[i];
        Ok(match slot.len {
            Len::Unfinished => Capture::Unfinished,
            Len::Position => Capture::Position(slot.start),
            Len::Closed(n) => Capture::Str(slot.start, slot.start + n),
        })
    }

    #[inline]
    fn step(&mut self) -> R<()> {
        self.meter.add(1)
    }

    fn run(&mut self, s: usize, p: usize) -> R<Option<usize>> {
        if self.depth == 0 {
            return error(PatError::TooComplex);
        }
        self.depth -= 1;
        let r = self.run_inner(s, p);
        self.depth += 1;
        r
    }

    fn run_inner(&mut self, mut s: usize, mut p: usize) -> R<Option<usize>> {
        let pat = self.pat;
        loop {
            self.step()?;
            let Some(&c) = pat.get(p) else {
                return Ok(Some(s));
            };
            match c {
                b'(' => {
                    return if pat.get(p + 1) == Some(&b')') {
                        self.open_capture(s, p + 2, Len::Position)
                    } else {
                        self.open_capture(s, p + 1, Len::Unfinished)
                    };
                }
                b')' => return self.close_capture(s, p + 1),
                b'$' if p + 1 == pat.len() => {
                    return Ok((s == self.src.len()).then_some(s));
                }
                b'%' => match pat.get(p + 1) {
                    Some(b'b') => match self.balance(s, p + 2)? {
                        Some(end) => {
                            s = end;
                            p += 4;
                            continue;
                        }
                        None => return Ok(None),
                    },
                    Some(b'f') => {
                        p += 2;
                        if pat.get(p) != Some(&b'[') {
                            return error(PatError::MissingFrontierSet);
                        }
                        let ep = self.class_end(p)?;
                        let prev = if s == 0 { 0 } else { self.src[s - 1] };
                        let cur = self.src.get(s).copied().unwrap_or(0);
                        if !self.in_set(prev, p, ep - 1) && self.in_set(cur, p, ep - 1) {
                            p = ep;
                            continue;
                        }
                        return Ok(None);
                    }
                    Some(&d) if d.is_ascii_digit() => match self.back_reference(s, d)? {
                        Some(end) => {
                            s = end;
                            p += 2;
                            continue;
                        }
                        None => return Ok(None),
                    },
                    _ => {}
                },
                _ => {}
            }
            // A single-character class, maybe followed by a quantifier.
            let ep = self.class_end(p)?;
            let quantifier = pat.get(ep).copied();
            if !self.single(s, p, ep) {
                if matches!(quantifier, Some(b'*' | b'?' | b'-')) {
                    p = ep + 1;
                    continue;
                }
                return Ok(None);
            }
            match quantifier {
                Some(b'?') => {
                    if let Some(end) = self.run(s + 1, ep + 1)? {
                        return Ok(Some(end));
                    }
                    p = ep + 1;
                }
                Some(b'+') => return self.max_expand(s + 1, p, ep),
                Some(b'*') => return self.max_expand(s, p, ep),
                Some(b'-') => return self.min_expand(s, p, ep),
                _ => {
                    s += 1;
                    p = ep;
                }
            }
        }
    }

    /// Greedy repetition: take as many as possible, then give back one at a time.
    fn max_expand(&mut self, s: usize, p: usize, ep: usize) -> R<Option<usize>> {
        let mut i = 0;
        while self.single(s + i, p, ep) {
            self.step()?;
            i += 1;
        }
        loop {
            if let Some(end) = self.run(s + i, ep + 1)? {
                return Ok(Some(end));
            }
            if i == 0 {
                return Ok(None);
            }
            i -= 1;
        }
    }

    /// Lazy repetition: try the rest first, take one more only when it fails.
    fn min_expand(&mut self, mut s: usize, p: usize, ep: usize) -> R<Option<usize>> {
        loop {
            if let Some(end) = self.run(s, ep + 1)? {
                return Ok(Some(end));
            }
            if !self.single(s, p, ep) {
                return Ok(None);
            }
            s += 1;
        }
    }

    fn open_capture(&mut self, s: usize, p: usize, len: Len) -> R<Option<usize>> {
        if self.level >= MAX_CAPTURES {
            return error(PatError::TooManyCaptures);
        }
        self.slots[self.level] = Slot { start: s, len };
        self.level += 1;
        let r = self.run(s, p)?;
        if r.is_none() {
            self.level -= 1;
        }
        Ok(r)
    }

    fn close_capture(&mut self, s: usize, p: usize) -> R<Option<usize>> {
        let Some(l) = (0..self.level)
            .rev()
            .find(|&l| matches!(self.slots[l].len, Len::Unfinished))
        else {
            return error(PatError::InvalidPatternCapture);
        };
        self.slots[l].len = Len::Closed(s - self.slots[l].start);
        let r = self.run(s, p)?;
        if r.is_none() {
            self.slots[l].len = Len::Unfinished;
        }
        Ok(r)
    }

    /// `%1`..`%9` (and `%0`, which is always invalid in a pattern).
    fn back_reference(&mut self, s: usize, digit: u8) -> R<Option<usize>> {
        let l = i32::from(digit) - i32::from(b'1');
        let slot = usize::try_from(l)
            .ok()
            .filter(|&l| l < self.level)
            .map(|l| self.slots[l])
            .filter(|slot| !matches!(slot.len, Len::Unfinished));
        let Some(slot) = slot else {
            return error(PatError::InvalidCaptureIndex(i64::from(l) + 1));
        };
        // A position capture has no text: a back-reference to it never matches.
        let Len::Closed(n) = slot.len else {
            return Ok(None);
        };
        self.meter.add(1 + n as u64 / 64)?;
        let captured = &self.src[slot.start..slot.start + n];
        match self.src.get(s..s + n) {
            Some(here) if here == captured => Ok(Some(s + n)),
            _ => Ok(None),
        }
    }

    /// `%bxy`: a balanced run from `x` to the matching `y`.
    fn balance(&mut self, s: usize, p: usize) -> R<Option<usize>> {
        let (Some(&open), Some(&close)) = (self.pat.get(p), self.pat.get(p + 1)) else {
            return error(PatError::MissingBalanceArguments);
        };
        if self.src.get(s) != Some(&open) {
            return Ok(None);
        }
        let mut depth = 1u64;
        for i in s + 1..self.src.len() {
            self.step()?;
            let c = self.src[i];
            if c == close {
                depth -= 1;
                if depth == 0 {
                    return Ok(Some(i + 1));
                }
            } else if c == open {
                depth += 1;
            }
        }
        Ok(None)
    }

    /// The index just past the single-character class starting at `p`.
    fn class_end(&self, p: usize) -> R<usize> {
        let pat = self.pat;
        let c = pat[p];
        let mut p = p + 1;
        if c == b'%' {
            if p >= pat.len() {
                return error(PatError::EndsWithPercent);
            }
            return Ok(p + 1);
        }
        if c == b'[' {
            if pat.get(p) == Some(&b'^') {
                p += 1;
            }
            // The first character of a set is a member even when it is `]`.
            loop {
                if p >= pat.len() {
                    return error(PatError::MissingBracket);
                }
                let c = pat[p];
                p += 1;
                if c == b'%' && p < pat.len() {
                    p += 1;
                }
                if pat.get(p) == Some(&b']') {
                    return Ok(p + 1);
                }
            }
        }
        Ok(p)
    }

    /// Whether subject byte `s` exists and matches the class `p..ep`.
    #[inline]
    fn single(&self, s: usize, p: usize, ep: usize) -> bool {
        let Some(&c) = self.src.get(s) else {
            return false;
        };
        match self.pat[p] {
            b'.' => true,
            b'%' => class_matches(c, self.pat[p + 1]),
            b'[' => self.in_set(c, p, ep - 1),
            lit => lit == c,
        }
    }

    /// Whether `c` is in the set `[...]` that opens at `p` and closes at `close`.
    fn in_set(&self, c: u8, p: usize, close: usize) -> bool {
        let pat = self.pat;
        let mut p = p + 1;
        let negated = pat.get(p) == Some(&b'^');
        if negated {
            p += 1;
        }
        while p < close {
            let here = pat[p];
            if here == b'%' && p + 1 < close {
                p += 1;
                if class_matches(c, pat[p]) {
                    return !negated;
                }
                p += 1;
            } else if pat.get(p + 1) == Some(&b'-') && p + 2 < close {
                if here <= c && c <= pat[p + 2] {
                    return !negated;
                }
                p += 3;
            } else {
                if here == c {
                    return !negated;
                }
                p += 1;
            }
        }
        negated
    }
}

/// `%a`, `%d`, ... in the C locale; an upper-case letter is the complement; any other
/// character stands for itself (`%.` is a dot).
fn class_matches(c: u8, class: u8) -> bool {
    let yes = match class.to_ascii_lowercase() {
        b'a' => c.is_ascii_alphabetic(),
        b'c' => c.is_ascii_control(),
        b'd' => c.is_ascii_digit(),
        b'g' => c.is_ascii_graphic(),
        b'l' => c.is_ascii_lowercase(),
        b'p' => c.is_ascii_punctuation(),
        b's' => matches!(c, b' ' | b'\t' | b'\n' | 0x0b | 0x0c | b'\r'),
        b'u' => c.is_ascii_uppercase(),
        b'w' => c.is_ascii_alphanumeric(),
        b'x' => c.is_ascii_hexdigit(),
        // Not documented in 5.4 but still accepted by its string library: the NUL byte.
        b'z' => c == 0,
        _ => return class == c,
    };
    if class.is_ascii_uppercase() {
        !yes
    } else {
        yes
    }
}

/// Whether `string.find` must use the matcher (the pattern has a special character).
pub(crate) fn has_specials(pat: &[u8]) -> bool {
    pat.iter().any(|c| SPECIALS.contains(c))
}

/// Plain substring search from `from`, metered (a naive search is quadratic in the worst case).
pub(crate) fn find_plain(
    hay: &[u8],
    needle: &[u8],
    from: usize,
    meter: &mut Meter<'_>,
) -> R<Option<usize>> {
    if needle.is_empty() {
        return Ok(Some(from));
    }
    if needle.len() > hay.len().saturating_sub(from) {
        return Ok(None);
    }
    let last = hay.len() - needle.len();
    let (first, rest) = (needle[0], &needle[1..]);
    let mut i = from;
    while i <= last {
        // Find the next candidate first byte, a bounded chunk at a time.
        let chunk_end = (i + 4096).min(last + 1);
        let found = hay[i..chunk_end].iter().position(|&b| b == first);
        meter.add(1 + (chunk_end - i) as u64 / 64)?;
        let Some(k) = found else {
            i = chunk_end;
            continue;
        };
        i += k;
        let here = &hay[i + 1..i + needle.len()];
        let mut same = true;
        for (a, b) in here.chunks(64).zip(rest.chunks(64)) {
            meter.add(1)?;
            if a != b {
                same = false;
                break;
            }
        }
        if same {
            return Ok(Some(i));
        }
        i += 1;
    }
    Ok(None)
}

/// Lua's `posrelatI`: a 1-based, possibly negative start position made 1-based and positive
/// (0 and anything before the start become 1; may be past the end).
pub(crate) fn start_position(pos: i64, len: usize) -> usize {
    if pos > 0 {
        usize::try_from(pos).unwrap_or(usize::MAX)
    } else if pos == 0 || pos.unsigned_abs() > len as u64 {
        1
    } else {
        len - pos.unsigned_abs() as usize + 1
    }
}

/// `string.find`/`string.match` core: the first match at or after `init` (0-based).
/// Returns the match's start and end; the matcher holds its captures.
pub(crate) fn search(m: &mut Matcher<'_, '_, '_>, init: usize) -> R<Option<(usize, usize)>> {
    let anchored = m.pat.first() == Some(&b'^');
    if anchored {
        m.pat = &m.pat[1..];
    }
    let mut s = init;
    loop {
        if let Some(e) = m.match_at(s)? {
            return Ok(Some((s, e)));
        }
        if anchored || s >= m.src.len() {
            return Ok(None);
        }
        s += 1;
    }
}

/// Strip a leading `^` (gsub and find treat it as an anchor); returns whether it was there.
pub(crate) fn strip_anchor(m: &mut Matcher<'_, '_, '_>) -> bool {
    let anchored = m.pat.first() == Some(&b'^');
    if anchored {
        m.pat = &m.pat[1..];
    }
    anchored
}

#[cfg(test)]
mod tests {
    use super::*;

    fn never() -> bool {
        false
    }

    fn find(s: &str, p: &str) -> R<Option<(usize, usize)>> {
        let mut meter = Meter::new(u64::MAX, &never);
        let mut m = Matcher::new(s.as_bytes(), p.as_bytes(), &mut meter);
        search(&mut m, 0)
    }

    #[test]
    fn basics() {
        assert_eq!(find("hello world", "o w"), Ok(Some((4, 7))));
        assert_eq!(find("hello", "l+"), Ok(Some((2, 4))));
        assert_eq!(find("hello", "^h.-o$"), Ok(Some((0, 5))));
        assert_eq!(find("hello", "^e"), Ok(None));
        assert_eq!(find("THE (quick) fox", "%((%a+)%)"), Ok(Some((4, 11))));
        assert_eq!(find("x = [[a]] y", "%b[]"), Ok(Some((4, 9))));
        assert_eq!(find("THE quick", "%f[%a]%a+$"), Ok(Some((4, 9))));
        assert_eq!(find("a]b", "[]]"), Ok(Some((1, 2))));
        assert_eq!(find("abab", "(ab)%1"), Ok(Some((0, 4))));
        assert_eq!(find("a", "%"), Err(Fail::Error(PatError::EndsWithPercent)));
        assert_eq!(find("a", "[a"), Err(Fail::Error(PatError::MissingBracket)));
    }

    #[test]
    fn exponential_patterns_run_out_of_budget() {
        let s = "a".repeat(40);
        let p = format!("{}{}", "a?".repeat(40), "a".repeat(40));
        let mut meter = Meter::new(1_000_000, &never);
        let mut m = Matcher::new(s.as_bytes(), p.as_bytes(), &mut meter);
        assert_eq!(search(&mut m, 0), Err(Fail::Budget));
        let expired = || true;
        let mut meter = Meter::new(u64::MAX, &expired);
        let mut m = Matcher::new(s.as_bytes(), p.as_bytes(), &mut meter);
        assert_eq!(search(&mut m, 0), Err(Fail::Deadline));
    }

    #[test]
    fn plain_search_is_metered() {
        let hay = "a".repeat(200_000);
        let needle = format!("{}b", "a".repeat(100_000));
        let mut meter = Meter::new(100_000, &never);
        assert_eq!(
            find_plain(hay.as_bytes(), needle.as_bytes(), 0, &mut meter),
            Err(Fail::Budget)
        );
        let mut meter = Meter::new(u64::MAX, &never);
        assert_eq!(
            find_plain(b"hello world", b"world", 0, &mut meter),
            Ok(Some(6))
        );
        assert_eq!(find_plain(b"hello", b"", 3, &mut meter), Ok(Some(3)));
        assert_eq!(find_plain(b"hello", b"lo", 4, &mut meter), Ok(None));
    }
}
