//! Numbers checked at the door: clap value parsers for every numeric option, so
//! NaN, infinities, negative or absurd values are refused by name (exit code 2)
//! before anything is loaded.

/// A finite number ≥ 0 (damping, weight decay, momentum).
pub fn non_negative(s: &str) -> Result<f64, String> {
    let v: f64 = s.trim().parse().map_err(|_| format!("'{s}' is not a number"))?;
    if !v.is_finite() {
        return Err(format!("{v} is not finite; give a finite number ≥ 0"));
    }
    if v < 0.0 {
        return Err(format!("{v} is negative; give a number ≥ 0"));
    }
    Ok(v)
}

/// A finite number > 0 (learning rates, scales, tolerances).
pub fn positive(s: &str) -> Result<f64, String> {
    let v = non_negative(s)?;
    if v == 0.0 {
        return Err("0 is not allowed; give a number > 0".into());
    }
    Ok(v)
}

/// A tolerance: finite, in (0, 1).
pub fn tolerance(s: &str) -> Result<f64, String> {
    let v = positive(s)?;
    if v >= 1.0 {
        return Err(format!(
            "{v} is not a relative tolerance; give a number in (0, 1), e.g. 1e-6"
        ));
    }
    Ok(v)
}

/// A momentum coefficient in [0, 1).
pub fn momentum(s: &str) -> Result<f64, String> {
    let v = non_negative(s)?;
    if v >= 1.0 {
        return Err(format!("{v} is not a momentum; give a number in [0, 1)"));
    }
    Ok(v)
}

fn count(s: &str, lo: usize, hi: usize, what: &str) -> Result<usize, String> {
    let v: usize = s
        .trim()
        .parse()
        .map_err(|_| format!("'{s}' is not a whole number ≥ {lo}"))?;
    if v < lo || v > hi {
        return Err(format!("{v} is out of range: {what} must be between {lo} and {hi}"));
    }
    Ok(v)
}

/// Examples per batch: 1 to 65,536 (one batch of activations must fit in memory).
pub fn batch_size(s: &str) -> Result<usize, String> {
    count(s, 1, 1 << 16, "the batch size")
}

/// Worker threads: 1 to 8 × the cores of this machine.
pub fn threads(s: &str) -> Result<usize, String> {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    count(
        s,
        1,
        8 * cores,
        &format!("the thread count (this machine has {cores} cores)"),
    )
}

/// Zero-padding of images: 0 to 1,024 pixels per side.
pub fn pad(s: &str) -> Result<usize, String> {
    count(s, 0, 1024, "the padding")
}

/// Iterations, depths, repeats, ranks, epochs, top-k: 1 to 1,000,000.
pub fn iterations(s: &str) -> Result<usize, String> {
    count(s, 1, 1_000_000, "this count")
}

/// A count that may be 0 (e.g. --top 0 lists nothing): 0 to 1,000,000.
pub fn small_count(s: &str) -> Result<usize, String> {
    count(s, 0, 1_000_000, "this count")
}

/// Image channels of a built-in network: 1 to 4,096.
pub fn channels(s: &str) -> Result<usize, String> {
    count(s, 1, 4096, "the channel count")
}

/// An example limit: at least 1.
pub fn limit(s: &str) -> Result<usize, String> {
    count(s, 1, usize::MAX, "--limit")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_numbers_are_refused_by_name() {
        for bad in ["nan", "NaN", "inf", "-inf", "-1", "1e400", "x", ""] {
            assert!(non_negative(bad).is_err(), "{bad}");
        }
        assert_eq!(non_negative("0").unwrap(), 0.0);
        assert!(positive("0").is_err());
        assert!(tolerance("1").is_err() && tolerance("1e-6").is_ok());
        assert!(momentum("1").is_err() && momentum("0.9").is_ok());
        assert!(batch_size("0").is_err() && batch_size("100000").is_err() && batch_size("256").is_ok());
        assert!(threads("0").is_err() && threads("100000").is_err() && threads("1").is_ok());
        assert!(pad("99999999999999999999").is_err() && pad("2").is_ok());
        assert!(iterations("0").is_err() && iterations("18446744073709551615").is_err());
    }
}
