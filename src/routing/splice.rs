//! Joining a second deployment's text onto what the caller already has: a continuation may
//! repeat the end of the answer before it goes on (trim that overlap), and a restarted answer is
//! only usable if it begins with exactly what was sent (skip that prefix). Pure text functions.

/// An overlap shorter than this is taken for a coincidence ("a" then "and"), not a repetition.
const MIN_OVERLAP: usize = 4;
/// How far back into the answer a repetition is looked for.
const OVERLAP_WINDOW: usize = 512;

/// What to do with the text a continuation has produced so far.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Join {
    /// It could still turn out to repeat the answer's end: wait for more.
    Wait,
    /// Relay it without its first `n` bytes (0: nothing repeated).
    Trim(usize),
    /// It is not the answer that was sent (a restart that went another way).
    Diverged,
}

/// The suffixes of `sent` that begin a word, longest first, within the window.
fn word_suffixes(sent: &str) -> impl Iterator<Item = &str> {
    let start = sent.len().saturating_sub(OVERLAP_WINDOW);
    let start = (start..=sent.len())
        .find(|&i| sent.is_char_boundary(i))
        .unwrap_or(sent.len());
    sent[start..]
        .char_indices()
        .filter(move |&(i, _)| {
            let at = start + i;
            at == 0 || sent[..at].ends_with(char::is_whitespace)
        })
        .map(move |(i, _)| &sent[start + i..])
        .filter(|s| !s.starts_with(char::is_whitespace))
}

/// How a continuation's first `text` joins `sent`: if it begins with a word-aligned tail of
/// `sent` (of at least `MIN_OVERLAP` bytes), that repetition is trimmed. `finished`: no more
/// text will come, so decide now.
pub fn continuation(sent: &str, text: &str, finished: bool) -> Join {
    if !finished
        && (text.is_empty()
            || word_suffixes(sent).any(|s| s.len() > text.len() && s.starts_with(text)))
    {
        return Join::Wait;
    }
    let repeated = word_suffixes(sent)
        .filter(|s| s.len() >= MIN_OVERLAP && text.starts_with(s))
        .map(str::len)
        .max()
        .unwrap_or(0);
    Join::Trim(repeated)
}

/// How a restarted answer's first `text` joins `sent`: usable only if it begins with exactly
/// `sent`, which is then skipped.
pub fn restart(sent: &str, text: &str, finished: bool) -> Join {
    if text.len() >= sent.len() {
        if text.starts_with(sent) {
            Join::Trim(sent.len())
        } else {
            Join::Diverged
        }
    } else if sent.starts_with(text) && !finished {
        Join::Wait
    } else {
        Join::Diverged
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_continuation_that_repeats_the_end_of_the_answer_is_trimmed() {
        let sent = "[gpt-4o] You said: ";
        assert_eq!(continuation(sent, "", false), Join::Wait);
        assert_eq!(
            continuation(sent, "You ", false),
            Join::Wait,
            "could be 'You said: '"
        );
        assert_eq!(continuation(sent, "You said: Tell", false), Join::Trim(10));
        assert_eq!(continuation(sent, "said: Tell", false), Join::Trim(6));
        assert_eq!(continuation(sent, "Tell", false), Join::Trim(0));
        // Mid-word: the rest of a word is not a repetition.
        assert_eq!(continuation("I wan", "t to go", false), Join::Trim(0));
        // Too short to tell from a coincidence.
        assert_eq!(continuation("take a", "a walk", false), Join::Trim(0));
        // The stream ended while it could still have been a repetition: decide on what came.
        assert_eq!(continuation(sent, "You said", true), Join::Trim(0));
        assert_eq!(continuation(sent, "You said: ", true), Join::Trim(10));
    }

    #[test]
    fn a_restart_is_used_only_when_it_begins_with_exactly_what_was_sent() {
        let sent = "[gpt-4o] You said: ";
        assert_eq!(restart(sent, "[gpt-4o] You", false), Join::Wait);
        assert_eq!(
            restart(sent, "[gpt-4o] You said: Tell", false),
            Join::Trim(sent.len())
        );
        assert_eq!(restart(sent, "[gpt-35-turbo]", false), Join::Diverged);
        assert_eq!(
            restart(sent, "[gpt-4o] You", true),
            Join::Diverged,
            "it ended short"
        );
        assert_eq!(restart("é", "é", false), Join::Trim(2));
    }

    #[test]
    fn multibyte_text_is_cut_on_character_boundaries() {
        let sent = "Grüße aus Köln ";
        assert_eq!(continuation(sent, "Köln und", false), Join::Trim(6));
        let long = "ü".repeat(400);
        assert_eq!(continuation(&long, "x", false), Join::Trim(0));
    }
}
