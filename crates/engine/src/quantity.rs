//! Parsing of the quantities users write: memory sizes in Kubernetes quantity syntax
//! (`80Gi`, `40G`, `512Mi`, plain bytes), model parameter counts (`405B`, `1.5T`, `8e9`)
//! and model dtypes. Pure functions; errors say what was expected.

use thiserror::Error;

const MIB: f64 = 1024.0 * 1024.0;

#[derive(Debug, Error, PartialEq)]
pub enum QuantityError {
    #[error("`{0}` is not a memory size (expected e.g. `80Gi`, `40G`, `512Mi` or a byte count)")]
    Memory(String),
    #[error("`{0}` is not a parameter count (expected e.g. `405B`, `1.5T`, `70B`, `8e9`)")]
    Parameters(String),
    #[error("unknown dtype `{0}` (expected one of fp32, tf32, bf16, fp16, fp8, int8, fp4, int4, nvfp4)")]
    Dtype(String),
    #[error("`{0}` is not a resource quantity (expected e.g. `500m`, `2`, `16Gi`, `1.5`, `1e3`)")]
    Resource(String),
}

fn split_number(text: &str) -> Option<(f64, &str)> {
    let text = text.trim();
    let end = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.' || c == 'e' || c == 'E' || c == '+' || c == '-'))
        .unwrap_or(text.len());
    // A trailing `E` is the exa suffix, not an exponent: "2E" parses as 2 exa.
    let (mut number, mut suffix) = text.split_at(end);
    if number.ends_with(['e', 'E']) && !suffix.is_empty() {
        number = &number[..number.len() - 1];
        suffix = &text[number.len()..];
    }
    let value: f64 = number.parse().ok()?;
    (value.is_finite() && value >= 0.0).then_some((value, suffix.trim()))
}

/// Bytes of a Kubernetes-style memory quantity.
pub fn parse_bytes(text: &str) -> Result<u64, QuantityError> {
    let error = || QuantityError::Memory(text.to_string());
    let (value, suffix) = split_number(text).ok_or_else(error)?;
    let multiplier: f64 = match suffix {
        "" => 1.0,
        "Ki" => 1024.0,
        "Mi" => MIB,
        "Gi" => MIB * 1024.0,
        "Ti" => MIB * MIB,
        "Pi" => MIB * MIB * 1024.0,
        "k" | "K" | "KB" => 1e3,
        "M" | "MB" => 1e6,
        "G" | "GB" => 1e9,
        "T" | "TB" => 1e12,
        "P" | "PB" => 1e15,
        _ => return Err(error()),
    };
    let bytes = value * multiplier;
    if bytes > u64::MAX as f64 {
        return Err(error());
    }
    Ok(bytes.ceil() as u64)
}

/// A Kubernetes resource quantity in thousandths of its unit (`500m` CPU is 500, `1Gi` is
/// 1,073,741,824,000), rounded up as the API server's `MilliValue` does. Exact decimal
/// arithmetic: no float rounding decides whether a pod fits.
pub fn parse_milli(text: &str) -> Result<i64, QuantityError> {
    let error = || QuantityError::Resource(text.to_string());
    let text_trimmed = text.trim();
    let number_end =
        text_trimmed.find(|c: char| !(c.is_ascii_digit() || c == '.' || c == '+')).unwrap_or(text_trimmed.len());
    let (number, suffix) = text_trimmed.split_at(number_end);
    let number = number.strip_prefix('+').unwrap_or(number);
    let (whole, fraction) = number.split_once('.').unwrap_or((number, ""));
    if (whole.is_empty() && fraction.is_empty()) || !whole.chars().chain(fraction.chars()).all(|c| c.is_ascii_digit()) {
        return Err(error());
    }
    if whole.len() + fraction.len() > 30 {
        return Err(error());
    }
    let digits: u128 = format!("{whole}{fraction}").parse().map_err(|_| error())?;
    // value = digits * 10^exp10 * 2^exp2
    let mut exp10: i32 = 3 - fraction.len() as i32;
    let mut exp2: u32 = 0;
    match suffix {
        "" => {}
        "n" => exp10 -= 9,
        "u" => exp10 -= 6,
        "m" => exp10 -= 3,
        "k" => exp10 += 3,
        "M" => exp10 += 6,
        "G" => exp10 += 9,
        "T" => exp10 += 12,
        "P" => exp10 += 15,
        "E" => exp10 += 18,
        "Ki" => exp2 = 10,
        "Mi" => exp2 = 20,
        "Gi" => exp2 = 30,
        "Ti" => exp2 = 40,
        "Pi" => exp2 = 50,
        "Ei" => exp2 = 60,
        exponent if exponent.starts_with(['e', 'E']) => {
            let power: i32 = exponent[1..].parse().map_err(|_| error())?;
            if power.abs() > 40 {
                return Err(error());
            }
            exp10 += power;
        }
        _ => return Err(error()),
    }
    let mut value = digits.checked_mul(1u128 << exp2).ok_or_else(error)?;
    if exp10 >= 0 {
        value = value.checked_mul(10u128.checked_pow(exp10 as u32).ok_or_else(error)?).ok_or_else(error)?;
    } else {
        let divisor = 10u128.checked_pow(exp10.unsigned_abs()).ok_or_else(error)?;
        value = value.div_ceil(divisor);
    }
    i64::try_from(value).map_err(|_| error())
}

/// MiB of a memory quantity, rounded up (a floor is never weakened by rounding).
pub fn parse_mib(text: &str) -> Result<u64, QuantityError> {
    parse_bytes(text).map(bytes_to_mib_ceil)
}

pub fn bytes_to_mib_ceil(bytes: u64) -> u64 {
    bytes.div_ceil(1024 * 1024)
}

/// A model's parameter count.
pub fn parse_parameters(text: &str) -> Result<u64, QuantityError> {
    let error = || QuantityError::Parameters(text.to_string());
    let (value, suffix) = split_number(text).ok_or_else(error)?;
    let multiplier = match suffix {
        "" => 1.0,
        "K" | "k" => 1e3,
        "M" | "m" => 1e6,
        "B" | "b" | "G" => 1e9,
        "T" | "t" => 1e12,
        _ => return Err(error()),
    };
    let count = value * multiplier;
    if !(1.0..=1e16).contains(&count) {
        return Err(error());
    }
    Ok(count.round() as u64)
}

/// Bytes per parameter of a dtype, in eighths of a byte so that 4-bit types stay exact.
pub fn dtype_bytes_eighths(dtype: &str) -> Result<u64, QuantityError> {
    match dtype.trim().to_ascii_lowercase().as_str() {
        "fp32" | "float32" | "tf32" => Ok(32),
        "bf16" | "fp16" | "float16" | "bfloat16" => Ok(16),
        "fp8" | "int8" | "float8" | "e4m3" | "e5m2" => Ok(8),
        "fp4" | "int4" | "nvfp4" | "mxfp4" => Ok(4),
        _ => Err(QuantityError::Dtype(dtype.to_string())),
    }
}

/// Formats MiB as GiB with one decimal, for messages.
pub fn format_gib(mib: u64) -> String {
    format!("{:.1} GiB", mib as f64 / 1024.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resource_quantities_in_thousandths() {
        assert_eq!(parse_milli("500m"), Ok(500));
        assert_eq!(parse_milli("2"), Ok(2000));
        assert_eq!(parse_milli("1.5"), Ok(1500));
        assert_eq!(parse_milli("0.0001"), Ok(1), "rounded up like MilliValue");
        assert_eq!(parse_milli("1Gi"), Ok(1_073_741_824_000));
        assert_eq!(parse_milli("64G"), Ok(64_000_000_000_000));
        assert_eq!(parse_milli("1e3"), Ok(1_000_000));
        assert_eq!(parse_milli("100n"), Ok(1));
        assert_eq!(parse_milli(" 110 "), Ok(110_000));
        for bad in ["", "m", "1.2.3", "-1", "12x", "1e", "99999999999999999999999999999999", "8Ei"] {
            assert!(parse_milli(bad).is_err(), "{bad} should be refused");
        }
    }

    #[test]
    fn memory_sizes_follow_kubernetes_suffixes() {
        assert_eq!(parse_bytes("80Gi"), Ok(80 * 1024 * 1024 * 1024));
        assert_eq!(parse_bytes("40G"), Ok(40_000_000_000));
        assert_eq!(parse_bytes("512Mi"), Ok(512 * 1024 * 1024));
        assert_eq!(parse_bytes("1024"), Ok(1024));
        assert_eq!(parse_bytes("1.5Gi"), Ok(1536 * 1024 * 1024));
        assert_eq!(parse_mib("80Gi"), Ok(81_920));
        assert!(parse_bytes("80 gigs").is_err());
        assert!(parse_bytes("-1Gi").is_err());
        assert!(parse_bytes("").is_err());
    }

    #[test]
    fn parameter_counts() {
        assert_eq!(parse_parameters("405B"), Ok(405_000_000_000));
        assert_eq!(parse_parameters("1T"), Ok(1_000_000_000_000));
        assert_eq!(parse_parameters("1.5B"), Ok(1_500_000_000));
        assert_eq!(parse_parameters("8e9"), Ok(8_000_000_000));
        assert!(parse_parameters("big").is_err());
        assert!(parse_parameters("0").is_err());
    }

    #[test]
    fn dtypes() {
        assert_eq!(dtype_bytes_eighths("bf16"), Ok(16));
        assert_eq!(dtype_bytes_eighths("FP8"), Ok(8));
        assert_eq!(dtype_bytes_eighths("fp4"), Ok(4));
        assert!(dtype_bytes_eighths("fp3").is_err());
    }
}
