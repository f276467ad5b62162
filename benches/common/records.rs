//! The synthetic feedback records the pull and service benchmarks send: every kind, realistic
//! sizes (a prompt, an answer with two steps, ~700 bytes of JSON), strictly increasing times.

/// Record `i` as the API's JSON.
pub fn feedback_record(i: usize) -> String {
    let kinds = ["thumb", "rating", "aspect", "step"];
    let kind = kinds[i % 4];
    let payload = match kind {
        "thumb" => format!(
            r#""thumb":"{}""#,
            if i.is_multiple_of(3) { "down" } else { "up" }
        ),
        "rating" => format!(r#""rating":{}"#, 1 + i % 5),
        "aspect" => format!(r#""aspect":"accuracy","rating":{}"#, 1 + i % 5),
        _ => format!(r#""step_index":{},"thumb":"up""#, i % 2),
    };
    // Strictly increasing timestamps keep (updated_at, id) order with the index.
    let t = chrono::DateTime::from_timestamp_millis(1_790_000_000_000 + i as i64).unwrap();
    let stamp = t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
    format!(
        r#"{{"id":"fb_{i:08}","kind":"{kind}",{payload},"conversation_id":"c_{c}","message_id":"m_{m}","model_version":"policy-v{v}","prompt":[{{"role":"user","content":"How would a carbon border tax affect steel imports from country {c}?"}}],"response":{{"content":"A carbon border adjustment prices the emissions embedded in imported steel, so exporters with dirtier plants pay more.","steps":["First, the importer declares embedded emissions.","Then, certificates are bought at the carbon price."]}},"source":"end_user","user_id":"u_{u}","created_at":"{stamp}","updated_at":"{stamp}"}}"#,
        c = i / 40,
        m = i / 8,
        v = 1 + (i / 250_000),
        u = i % 5000,
    )
}
