//! What one segment's option means for its connection, in either mode: the eBPF sock_ops program
//! and the userspace reader both ask [`decide`], so the two cannot drift apart. The modes differ
//! only in what they do with the answer (socket storage or the table, and the counters of the
//! place in the connection the segment had).

use crate::parse::{Outcome, Parsed};

/// The verdict on one segment.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// A client address from a trusted source: store it.
    Remember,
    /// A valid option from a source outside the trust list: ignore it (counted), and look no
    /// further.
    Untrusted,
    /// No client address yet: look at the connection's next segments.
    KeepLooking,
    /// No client address, and none will be honoured: the source is not trusted, or the
    /// connection's search window is over.
    GiveUp,
}

/// The verdict on a segment whose options parsed to `outcome`, from a source that is
/// `trusted` ([`crate::AgentConfig::trusts`]), once the connection's search window is
/// `window_over` (eBPF: `SEARCH_SEGMENTS_IN` segments received; the reader's entries expire
/// by age instead, so it never says so). A malformed option is no client: the real address
/// is kept, and callers count it whatever the verdict.
#[inline(always)]
pub fn decide(outcome: Outcome, trusted: bool, window_over: bool) -> Verdict {
    match outcome {
        Outcome::Found if trusted => Verdict::Remember,
        Outcome::Found => Verdict::Untrusted,
        Outcome::Absent | Outcome::Malformed if trusted && !window_over => Verdict::KeepLooking,
        Outcome::Absent | Outcome::Malformed => Verdict::GiveUp,
    }
}

impl Parsed {
    /// The outcome, without the address.
    pub fn outcome(&self) -> Outcome {
        match self {
            Parsed::Found(_) => Outcome::Found,
            Parsed::Absent => Outcome::Absent,
            Parsed::Malformed => Outcome::Malformed,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every input, against the table the two modes are documented to follow.
    #[test]
    fn every_case() {
        use Outcome::*;
        use Verdict::*;
        let cases = [
            // outcome, trusted, window over → verdict
            (Found, true, false, Remember),
            (Found, true, true, Remember),
            (Found, false, false, Untrusted),
            (Found, false, true, Untrusted),
            (Absent, true, false, KeepLooking),
            (Malformed, true, false, KeepLooking),
            (Absent, true, true, GiveUp),
            (Malformed, true, true, GiveUp),
            (Absent, false, false, GiveUp),
            (Malformed, false, false, GiveUp),
            (Absent, false, true, GiveUp),
            (Malformed, false, true, GiveUp),
        ];
        for (outcome, trusted, over, verdict) in cases {
            assert_eq!(decide(outcome, trusted, over), verdict, "{outcome:?} trusted={trusted} over={over}");
        }
    }
}
