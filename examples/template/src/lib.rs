//! An HTML page rendered from JSON with a Jinja template (`minijinja`):
//! the event is the page's data, the result the page.

use minijinja::Environment;

/// The page's template.
const PAGE: &str = r#"<!doctype html>
<html><head><title>{{ title }}</title></head>
<body>
<h1>{{ title }}</h1>
<p>{{ products | length }} products, {{ products | selectattr("stock") | list | length }} in stock.</p>
<table>
<tr><th>Name</th><th>Price</th><th>Tags</th></tr>
{%- for p in products %}
<tr class="{{ loop.cycle('odd', 'even') }}"><td>{{ p.name | title }}</td><td>{{ p.price | round(2) }}</td><td>{{ p.tags | join(", ") }}</td></tr>
{%- endfor %}
</table>
</body></html>
"#;

/// Renders the page for the JSON `event`.
pub fn handle(event: &[u8]) -> Result<Vec<u8>, String> {
    let data: serde_json::Value =
        serde_json::from_slice(event).map_err(|e| format!("the event is not JSON: {e}"))?;
    let mut env = Environment::new();
    env.add_template("page", PAGE).map_err(|e| e.to_string())?;
    let page = env
        .get_template("page")
        .and_then(|t| t.render(&data))
        .map_err(|e| format!("cannot render: {e}"))?;
    Ok(page.into_bytes())
}

/// The benchmark's event: a catalogue of 500 products.
pub fn sample_event() -> Vec<u8> {
    let products: Vec<serde_json::Value> = (0..500)
        .map(|i| {
            serde_json::json!({
                "name": format!("widget <{}> & co", i),
                "price": (i * 37 % 5000) as f64 / 7.0,
                "stock": i % 3 != 0,
                "tags": (0..(i % 4)).map(|t| format!("tag{t}")).collect::<Vec<_>>(),
            })
        })
        .collect();
    serde_json::to_vec(&serde_json::json!({ "title": "Catalogue", "products": products }))
        .expect("serialises")
}

#[cfg(test)]
mod tests {
    #[test]
    fn renders_and_escapes() {
        let page = super::handle(&super::sample_event()).unwrap();
        let page = String::from_utf8(page).unwrap();
        assert!(page.contains("500 products, 333 in stock."), "{page}");
        assert!(page.contains("Widget &lt;1&gt; &amp; Co"), "{page}");
        assert!(super::handle(b"[").is_err());
    }
}
