//! JSON round trip: parse the event into a `serde_json::Value` and write it
//! back, pretty-printed — what an API function does to every request.

use serde_json::{json, Value};

/// Parses `event` and re-serialises it.
pub fn handle(event: &[u8]) -> Result<Vec<u8>, String> {
    let value: Value =
        serde_json::from_slice(event).map_err(|e| format!("the event is not JSON: {e}"))?;
    serde_json::to_vec_pretty(&value).map_err(|e| e.to_string())
}

/// The benchmark's event: an order list of about 100 KB.
pub fn sample_event() -> Vec<u8> {
    let orders: Vec<Value> = (0..400)
        .map(|i| {
            let tier = ["free", "pro", "team"][i % 3];
            json!({
                "id": format!("ord-{i:05}"),
                "customer": { "name": format!("Customer {}", i % 37), "tier": tier, "since": 2010 + i % 15 },
                "lines": (0..3).map(|j| json!({ "sku": format!("SKU-{}", (i * 7 + j) % 101), "qty": 1 + (i + j) % 5, "price": ((i * 13 + j * 17) % 10_000) as f64 / 100.0 })).collect::<Vec<_>>(),
                "paid": i % 4 != 0,
                "note": if i % 9 == 0 { Value::Null } else { Value::String("leave at the door \u{2014} thanks".into()) },
            })
        })
        .collect();
    serde_json::to_vec(&json!({ "orders": orders, "page": 1, "total": 400 })).expect("serialises")
}

#[cfg(test)]
mod tests {
    #[test]
    fn round_trips() {
        let out = super::handle(br#"{"a":[1,2.5,null],"b":"x"}"#).unwrap();
        let back: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(back["a"][1], 2.5);
        assert!(super::handle(b"{").is_err());
        let n = super::sample_event().len();
        assert!((80_000..140_000).contains(&n), "{n}");
    }
}
