//! The `pgoutput` logical decoding messages (protocol version 1) the slot streams, and
//! a column's text as JSON.

use serde_json::{Value, json};

/// A column's text (pgoutput's or a query's text format) as JSON: numbers, booleans,
/// json and jsonb as JSON; the rest as strings.
pub(super) fn to_json(oid: u32, text: &str) -> Value {
    const BOOL: u32 = 16;
    const INT8: u32 = 20;
    const INT2: u32 = 21;
    const INT4: u32 = 23;
    const OID: u32 = 26;
    const JSON: u32 = 114;
    const FLOAT4: u32 = 700;
    const FLOAT8: u32 = 701;
    const NUMERIC: u32 = 1700;
    const JSONB: u32 = 3802;
    let number = |t: &str| -> Option<Value> {
        if let Ok(i) = t.parse::<i64>() {
            return Some(json!(i));
        }
        if let Ok(u) = t.parse::<u64>() {
            return Some(json!(u));
        }
        // A decimal as a JSON number only when a double holds it exactly enough
        // (15 significant digits); otherwise as its text.
        let digits = t.bytes().filter(u8::is_ascii_digit).count();
        let f = t.parse::<f64>().ok().filter(|f| f.is_finite())?;
        (digits <= 15).then(|| json!(f))
    };
    let parsed = match oid {
        BOOL => match text {
            "t" | "true" => Some(Value::Bool(true)),
            "f" | "false" => Some(Value::Bool(false)),
            _ => None,
        },
        INT2 | INT4 | INT8 | OID => number(text),
        FLOAT4 | FLOAT8 => text
            .parse::<f64>()
            .ok()
            .filter(|f| f.is_finite())
            .map(|f| json!(f)),
        NUMERIC => number(text),
        JSON | JSONB => serde_json::from_str(text).ok(),
        _ => None,
    };
    parsed.unwrap_or_else(|| Value::String(text.to_owned()))
}

/// One column of a pgoutput tuple.
#[derive(Clone, Debug, PartialEq)]
pub(super) enum Datum {
    Null,
    /// An unchanged TOASTed value, not sent.
    Unchanged,
    Text(String),
}

/// A pgoutput message's reader.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        if self.0.len() < n {
            return Err("pgoutput: a message ends too early".into());
        }
        let (head, tail) = self.0.split_at(n);
        self.0 = tail;
        Ok(head)
    }
    fn u8(&mut self) -> Result<u8, String> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16, String> {
        Ok(u16::from_be_bytes(self.take(2)?.try_into().expect("2")))
    }
    fn u32(&mut self) -> Result<u32, String> {
        Ok(u32::from_be_bytes(self.take(4)?.try_into().expect("4")))
    }
    fn string(&mut self) -> Result<String, String> {
        let end = self
            .0
            .iter()
            .position(|&b| b == 0)
            .ok_or("pgoutput: a string without its end")?;
        let s = String::from_utf8_lossy(&self.0[..end]).into_owned();
        self.0 = &self.0[end + 1..];
        Ok(s)
    }
    fn tuple(&mut self) -> Result<Vec<Datum>, String> {
        let n = self.u16()?;
        let mut out = Vec::with_capacity(n as usize);
        for _ in 0..n {
            out.push(match self.u8()? {
                b'n' => Datum::Null,
                b'u' => Datum::Unchanged,
                b't' => {
                    let len = self.u32()? as usize;
                    Datum::Text(String::from_utf8_lossy(self.take(len)?).into_owned())
                }
                b'b' => return Err("pgoutput: a binary value (asp asks for text)".into()),
                other => return Err(format!("pgoutput: column kind {:?}", other as char)),
            });
        }
        Ok(out)
    }
}

/// A relation as pgoutput described it: its name and columns (name, type OID).
#[derive(Clone, Debug)]
pub(super) struct Relation {
    pub(super) name: String,
    pub(super) columns: Vec<(String, u32)>,
}

/// A decoded row change.
#[derive(Debug, PartialEq)]
pub(super) enum Change {
    Relation {
        id: u32,
        name: String,
        columns: Vec<(String, u32)>,
    },
    Insert {
        rel: u32,
        new: Vec<Datum>,
    },
    Update {
        rel: u32,
        old: Option<Vec<Datum>>,
        new: Vec<Datum>,
    },
    Delete {
        rel: u32,
        old: Vec<Datum>,
    },
    Truncate {
        rels: Vec<u32>,
    },
    Other,
}

/// Decodes one pgoutput message (protocol version 1; Begin and Commit come decoded by
/// the replication client).
pub(super) fn decode(data: &[u8]) -> Result<Change, String> {
    let Some((&tag, rest)) = data.split_first() else {
        return Ok(Change::Other);
    };
    let mut r = Reader(rest);
    Ok(match tag {
        b'R' => {
            let id = r.u32()?;
            let schema = r.string()?;
            let table = r.string()?;
            let _identity = r.u8()?;
            let n = r.u16()?;
            let mut columns = Vec::with_capacity(n as usize);
            for _ in 0..n {
                let _flags = r.u8()?;
                let name = r.string()?;
                let oid = r.u32()?;
                let _typmod = r.u32()?;
                columns.push((name, oid));
            }
            Change::Relation {
                id,
                name: format!("{schema}.{table}"),
                columns,
            }
        }
        b'I' => {
            let rel = r.u32()?;
            match r.u8()? {
                b'N' => Change::Insert {
                    rel,
                    new: r.tuple()?,
                },
                other => return Err(format!("pgoutput Insert: {:?}", other as char)),
            }
        }
        b'U' => {
            let rel = r.u32()?;
            let mut old = None;
            let mut kind = r.u8()?;
            if kind == b'K' || kind == b'O' {
                old = Some(r.tuple()?);
                kind = r.u8()?;
            }
            if kind != b'N' {
                return Err(format!("pgoutput Update: {:?}", kind as char));
            }
            Change::Update {
                rel,
                old,
                new: r.tuple()?,
            }
        }
        b'D' => {
            let rel = r.u32()?;
            match r.u8()? {
                b'K' | b'O' => Change::Delete {
                    rel,
                    old: r.tuple()?,
                },
                other => return Err(format!("pgoutput Delete: {:?}", other as char)),
            }
        }
        b'T' => {
            let n = r.u32()?;
            let _options = r.u8()?;
            // The count is the server's word: room for no more than the bytes can hold.
            let mut rels = Vec::with_capacity((n as usize).min(r.0.len() / 4));
            for _ in 0..n {
                rels.push(r.u32()?);
            }
            Change::Truncate { rels }
        }
        _ => Change::Other,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_becomes_json_by_type() {
        assert_eq!(to_json(16, "t"), json!(true));
        assert_eq!(to_json(16, "f"), json!(false));
        assert_eq!(to_json(23, "-42"), json!(-42));
        assert_eq!(to_json(20, "9223372036854775807"), json!(i64::MAX));
        assert_eq!(to_json(701, "1.5"), json!(1.5));
        assert_eq!(to_json(701, "NaN"), json!("NaN"));
        assert_eq!(to_json(1700, "12.25"), json!(12.25));
        assert_eq!(
            to_json(1700, "12345678901234567890.5"),
            json!("12345678901234567890.5"),
            "more digits than a double holds: text"
        );
        assert_eq!(to_json(3802, r#"{"a": [1]}"#), json!({"a": [1]}));
        assert_eq!(to_json(114, "[1, 2]"), json!([1, 2]));
        assert_eq!(to_json(25, "hello"), json!("hello"));
        assert_eq!(
            to_json(1184, "2024-01-01 00:00:00+00"),
            json!("2024-01-01 00:00:00+00")
        );
    }

    fn tuple(cols: &[Option<&str>]) -> Vec<u8> {
        let mut b = (cols.len() as u16).to_be_bytes().to_vec();
        for c in cols {
            match c {
                None => b.push(b'n'),
                Some("\u{0}u") => b.push(b'u'),
                Some(t) => {
                    b.push(b't');
                    b.extend((t.len() as u32).to_be_bytes());
                    b.extend(t.as_bytes());
                }
            }
        }
        b
    }

    #[test]
    fn pgoutput_messages_decode() {
        let mut rel = vec![b'R'];
        rel.extend(7u32.to_be_bytes());
        rel.extend(b"public\0items\0d");
        rel.extend(2u16.to_be_bytes());
        for (name, oid) in [("id", 23u32), ("body", 25)] {
            rel.push(1);
            rel.extend(name.as_bytes());
            rel.push(0);
            rel.extend(oid.to_be_bytes());
            rel.extend((-1i32).to_be_bytes());
        }
        assert_eq!(
            decode(&rel).unwrap(),
            Change::Relation {
                id: 7,
                name: "public.items".into(),
                columns: vec![("id".into(), 23), ("body".into(), 25)],
            }
        );
        let mut ins = vec![b'I'];
        ins.extend(7u32.to_be_bytes());
        ins.push(b'N');
        ins.extend(tuple(&[Some("1"), None]));
        assert_eq!(
            decode(&ins).unwrap(),
            Change::Insert {
                rel: 7,
                new: vec![Datum::Text("1".into()), Datum::Null]
            }
        );
        let mut upd = vec![b'U'];
        upd.extend(7u32.to_be_bytes());
        upd.push(b'K');
        upd.extend(tuple(&[Some("1"), None]));
        upd.push(b'N');
        upd.extend(tuple(&[Some("2"), Some("\u{0}u")]));
        assert_eq!(
            decode(&upd).unwrap(),
            Change::Update {
                rel: 7,
                old: Some(vec![Datum::Text("1".into()), Datum::Null]),
                new: vec![Datum::Text("2".into()), Datum::Unchanged],
            }
        );
        let mut del = vec![b'D'];
        del.extend(7u32.to_be_bytes());
        del.push(b'K');
        del.extend(tuple(&[Some("2"), None]));
        assert!(matches!(
            decode(&del).unwrap(),
            Change::Delete { rel: 7, .. }
        ));
        let mut trunc = vec![b'T'];
        trunc.extend(2u32.to_be_bytes());
        trunc.push(0);
        trunc.extend(7u32.to_be_bytes());
        trunc.extend(8u32.to_be_bytes());
        assert_eq!(
            decode(&trunc).unwrap(),
            Change::Truncate { rels: vec![7, 8] }
        );
        assert!(decode(&ins[..8]).is_err(), "a cut message is an error");
    }

    proptest::proptest! {
        /// Whatever a server sends, decoding ends in a change or an error, never a
        /// panic or an allocation the bytes do not justify.
        #[test]
        fn any_bytes_decode_or_fail(
            tag in proptest::sample::select(b"RIUDTBCOYMx".to_vec()),
            body in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..300),
        ) {
            let mut data = vec![tag];
            data.extend(body);
            let _ = decode(&data);
        }
    }
}
