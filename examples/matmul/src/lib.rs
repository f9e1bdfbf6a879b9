//! A 128×128 f64 matrix multiply. The event is a seed (decimal text); the
//! two matrices are generated from it, multiplied, and the result is the
//! product's trace and sum and four of its entries, printed exactly (the
//! shortest text that reads back to the same f64: native and wasm agree
//! to the bit).

/// The matrices' side.
pub const N: usize = 128;

/// Multiplies the two matrices the seed in `event` makes.
pub fn handle(event: &[u8]) -> Result<Vec<u8>, String> {
    let text = std::str::from_utf8(event).map_err(|_| "the event is not UTF-8")?;
    let seed: u64 = text
        .trim()
        .parse()
        .map_err(|_| format!("the event {text:?} is not a seed (an unsigned integer)"))?;
    let (a, b) = (matrix(seed), matrix(seed ^ 0x9e37_79b9_7f4a_7c15));
    let c = multiply(&a, &b);
    let trace: f64 = (0..N).map(|i| c[i * N + i]).sum();
    let sum: f64 = c.iter().sum();
    Ok(format!(
        "trace {trace:?} sum {sum:?} c[0][0] {:?} c[0][127] {:?} c[127][0] {:?} c[127][127] {:?}\n",
        c[0],
        c[N - 1],
        c[(N - 1) * N],
        c[N * N - 1]
    )
    .into_bytes())
}

/// `a` × `b`, row-major, in the i-k-j order (the inner loop runs along
/// rows of `b` and `c`).
pub fn multiply(a: &[f64], b: &[f64]) -> Vec<f64> {
    let mut c = vec![0.0; N * N];
    for i in 0..N {
        for k in 0..N {
            let aik = a[i * N + k];
            let row = &b[k * N..(k + 1) * N];
            let out = &mut c[i * N..(i + 1) * N];
            for (o, bkj) in out.iter_mut().zip(row) {
                *o += aik * bkj;
            }
        }
    }
    c
}

/// A matrix of values in [-1, 1) from a xorshift sequence.
fn matrix(seed: u64) -> Vec<f64> {
    let mut x = seed | 1;
    (0..N * N)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 11) as f64 / (1u64 << 52) as f64 - 1.0
        })
        .collect()
}

/// The benchmark's event.
pub fn sample_event() -> Vec<u8> {
    b"42".to_vec()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identity_product_is_the_matrix() {
        let a = matrix(7);
        let mut id = vec![0.0; N * N];
        for i in 0..N {
            id[i * N + i] = 1.0;
        }
        assert_eq!(multiply(&a, &id), a);
        assert!(handle(b"x").is_err());
        assert!(String::from_utf8(handle(b"42").unwrap())
            .unwrap()
            .starts_with("trace "));
    }
}
