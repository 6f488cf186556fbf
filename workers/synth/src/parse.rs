//! Reading instructions out of a teacher's reply: a JSON array, JSON lines, or either one
//! wrapped in a code fence or in stray text.

use serde_json::Value;

/// The instructions in `reply`, or why none could be read.
pub fn instructions(reply: &str) -> Result<Vec<String>, String> {
    let text = reply.trim();
    if text.is_empty() {
        return Err("empty reply".into());
    }
    // A JSON array somewhere in the text: try every `[` from the first, against the last `]`
    // and then earlier ones, so stray brackets in prose do not defeat it.
    let closes: Vec<usize> = text.match_indices(']').map(|(i, _)| i).collect();
    for (open, _) in text.match_indices('[') {
        for &close in closes.iter().rev().filter(|c| **c > open) {
            if let Ok(Value::Array(items)) = serde_json::from_str::<Value>(&text[open..=close]) {
                let out: Vec<String> = items.iter().filter_map(item_text).collect();
                if !out.is_empty() {
                    return Ok(out);
                }
            }
        }
    }
    // JSON lines: each line a string or an object with an instruction.
    let mut out = Vec::new();
    for line in text.lines() {
        let l = line.trim().trim_end_matches(',');
        if l.starts_with('{') || l.starts_with('"') {
            if let Ok(v) = serde_json::from_str::<Value>(l) {
                if let Some(s) = item_text(&v) {
                    out.push(s);
                }
            }
        }
    }
    if !out.is_empty() {
        return Ok(out);
    }
    Err(format!(
        "no JSON array or JSON lines of instructions in the reply (starts with `{}`)",
        text.chars().take(80).collect::<String>().replace('\n', " ")
    ))
}

/// The instruction text of one array element.
fn item_text(v: &Value) -> Option<String> {
    let s = match v {
        Value::String(s) => s.clone(),
        Value::Object(m) => ["instruction", "text", "prompt", "request"]
            .iter()
            .find_map(|k| m.get(*k).and_then(|x| x.as_str()))?
            .to_string(),
        _ => return None,
    };
    let s = s.trim().to_string();
    (!s.is_empty()).then_some(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_arrays_with_stray_text_and_fences() {
        let r = "Sure! Here you go:\n```json\n[\"Build a daily ETL [with retries]\", \"Make a DAG\"]\n```\nHope this helps [1].";
        assert_eq!(
            instructions(r).unwrap(),
            vec!["Build a daily ETL [with retries]", "Make a DAG"]
        );
        let r = "[{\"variant\": 1, \"instruction\": \"A\"}, {\"instruction\": \"B\"}]";
        assert_eq!(instructions(r).unwrap(), vec!["A", "B"]);
    }

    #[test]
    fn reads_json_lines() {
        let r = "{\"instruction\": \"First one\"}\n{\"instruction\": \"Second\"}\n";
        assert_eq!(instructions(r).unwrap(), vec!["First one", "Second"]);
        let r = "\"one\",\n\"two\"";
        assert_eq!(instructions(r).unwrap(), vec!["one", "two"]);
    }

    #[test]
    fn prose_is_unparseable() {
        assert!(instructions("I cannot help with that.").is_err());
        assert!(instructions("").is_err());
        assert!(instructions("[1, 2, 3]").is_err());
    }
}
