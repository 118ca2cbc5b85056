//! The commands, one module each: what `main` dispatches to. Each parses
//! its flags (clap), checks them against the files they name, and runs the
//! layers below.

pub mod compare;
pub mod evaluate;
pub mod export;
pub mod predict;
pub mod samples;
pub mod train;

/// A whole number within `lo..=hi`. Negative numbers get the range error
/// too, where clap would take `-1` for a flag. The error says the range as
/// a person writes it: "at least 1" where `hi` is only a type's limit
/// (from `i32::MAX` up), "from 1 to 1024" where it is a real bound.
pub fn count(s: &str, lo: u64, hi: u64) -> Result<u64, String> {
    let open_ended = hi >= i32::MAX as u64;
    match s.parse::<i128>() {
        Ok(v) if (lo as i128..=hi as i128).contains(&v) => Ok(v as u64),
        Ok(v) if open_ended && v > hi as i128 => Err(format!("{s} is too large")),
        Ok(_) if open_ended => Err(format!("{s} must be at least {lo}")),
        Ok(_) => Err(format!("{s} must be from {lo} to {hi}")),
        Err(e) => Err(format!("`{s}`: {e}")),
    }
}
