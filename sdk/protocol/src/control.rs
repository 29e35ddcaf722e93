//! Decoding a control part (the postcard-encoded struct at the head of a request or
//! response body) so that peers of different builds understand each other when fields were
//! appended to it.
//!
//! Two rules, one per direction:
//! - **Bytes after the value are ignored**: a newer peer appended fields this build does
//!   not know, and it reads on.
//! - **A value that ends at a field boundary leaves its remaining top-level fields to
//!   their `#[serde(default)]`**: an older peer did not send the fields added since. Only
//!   fields marked so may be missing (a required one missing is an error naming the
//!   struct), and only at the end of the top-level struct; a value cut inside a field, or
//!   inside a nested value, is an error as before.
//!
//! Nothing is accepted that a peer could not have sent on purpose: the body carries the
//! control's length, so a control shorter than its struct is one the sender chose to write,
//! and the values a default fills in are values the sender could have written itself.
//! A field appended later therefore goes at the end of its top-level struct, with
//! `#[serde(default)]` and a default that means what the older peer meant.

use std::cell::Cell;

use postcard::de_flavors::Flavor;
use serde::de::{DeserializeOwned, DeserializeSeed, SeqAccess, Visitor};

use crate::ProtocolError;

/// Decodes a postcard control part under the two rules above.
pub(crate) fn decode_control<T: DeserializeOwned>(
    bytes: &[u8],
    what: &'static str,
) -> Result<T, ProtocolError> {
    let left = Cell::new(bytes.len());
    let mut de = postcard::Deserializer::from_flavor(Counted {
        input: bytes,
        left: &left,
    });
    T::deserialize(TopLevel {
        de: &mut de,
        left: &left,
    })
    .map_err(|e| ProtocolError::Body {
        what,
        reason: e.to_string(),
    })
}

/// A slice flavor that publishes how many bytes are left, so the top-level struct can see
/// where the input ends.
struct Counted<'de> {
    input: &'de [u8],
    left: &'de Cell<usize>,
}

impl<'de> Flavor<'de> for Counted<'de> {
    type Remainder = &'de [u8];
    type Source = &'de [u8];

    fn pop(&mut self) -> postcard::Result<u8> {
        let (&b, rest) = self
            .input
            .split_first()
            .ok_or(postcard::Error::DeserializeUnexpectedEnd)?;
        self.input = rest;
        self.left.set(rest.len());
        Ok(b)
    }

    fn size_hint(&self) -> Option<usize> {
        Some(self.input.len())
    }

    fn try_take_n(&mut self, ct: usize) -> postcard::Result<&'de [u8]> {
        if ct > self.input.len() {
            return Err(postcard::Error::DeserializeUnexpectedEnd);
        }
        let (taken, rest) = self.input.split_at(ct);
        self.input = rest;
        self.left.set(rest.len());
        Ok(taken)
    }

    fn finalize(self) -> postcard::Result<&'de [u8]> {
        Ok(self.input)
    }
}

/// A decoding error: postcard's, or the struct's own (a required field missing), whose
/// message postcard would drop.
#[derive(Debug)]
enum ControlError {
    Postcard(postcard::Error),
    Struct(String),
}

impl std::fmt::Display for ControlError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ControlError::Postcard(e) => e.fmt(f),
            ControlError::Struct(m) => f.write_str(m),
        }
    }
}

impl std::error::Error for ControlError {}

impl serde::de::Error for ControlError {
    fn custom<M: std::fmt::Display>(msg: M) -> Self {
        ControlError::Struct(msg.to_string())
    }
}

impl From<postcard::Error> for ControlError {
    fn from(e: postcard::Error) -> Self {
        ControlError::Postcard(e)
    }
}

type Inner<'a, 'de> = &'a mut postcard::Deserializer<'de, Counted<'de>>;

/// The deserializer the top-level value sees: postcard's, except that a struct's fields
/// end where the input ends.
struct TopLevel<'a, 'de> {
    de: Inner<'a, 'de>,
    left: &'de Cell<usize>,
}

/// The top-level struct's fields: none left once the input is used up.
struct Fields<'a, 'de> {
    de: Inner<'a, 'de>,
    left: &'de Cell<usize>,
    remaining: usize,
}

impl<'de> SeqAccess<'de> for Fields<'_, 'de> {
    type Error = ControlError;

    fn next_element_seed<S: DeserializeSeed<'de>>(
        &mut self,
        seed: S,
    ) -> Result<Option<S::Value>, Self::Error> {
        if self.remaining == 0 || self.left.get() == 0 {
            return Ok(None);
        }
        self.remaining -= 1;
        Ok(Some(seed.deserialize(&mut *self.de)?))
    }

    fn size_hint(&self) -> Option<usize> {
        Some(self.remaining)
    }
}

/// Methods that hand the call to postcard's deserializer unchanged (with their own
/// arguments before the visitor), its error converted.
macro_rules! forward {
    ($($method:ident($($arg:ident: $ty:ty),*)),* $(,)?) => {
        $(
            fn $method<V: Visitor<'de>>(
                self,
                $($arg: $ty,)*
                visitor: V,
            ) -> Result<V::Value, Self::Error> {
                Ok(serde::Deserializer::$method(self.de, $($arg,)* visitor)?)
            }
        )*
    };
}

impl<'de> serde::Deserializer<'de> for TopLevel<'_, 'de> {
    type Error = ControlError;

    forward!(
        deserialize_any(),
        deserialize_bool(),
        deserialize_i8(),
        deserialize_i16(),
        deserialize_i32(),
        deserialize_i64(),
        deserialize_i128(),
        deserialize_u8(),
        deserialize_u16(),
        deserialize_u32(),
        deserialize_u64(),
        deserialize_u128(),
        deserialize_f32(),
        deserialize_f64(),
        deserialize_char(),
        deserialize_str(),
        deserialize_string(),
        deserialize_bytes(),
        deserialize_byte_buf(),
        deserialize_option(),
        deserialize_unit(),
        deserialize_seq(),
        deserialize_map(),
        deserialize_identifier(),
        deserialize_ignored_any(),
        deserialize_unit_struct(name: &'static str),
        deserialize_newtype_struct(name: &'static str),
        deserialize_tuple(len: usize),
        deserialize_tuple_struct(name: &'static str, len: usize),
        deserialize_enum(name: &'static str, variants: &'static [&'static str]),
    );

    fn deserialize_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        fields: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, Self::Error> {
        visitor.visit_seq(Fields {
            de: self.de,
            left: self.left,
            remaining: fields.len(),
        })
    }

    fn is_human_readable(&self) -> bool {
        false
    }
}

#[cfg(test)]
mod tests {
    use serde::{Deserialize, Serialize};

    use super::decode_control;
    use crate::encode_control;

    /// A control as an older build wrote it.
    #[derive(Debug, Serialize, Deserialize, PartialEq)]
    struct Old {
        name: String,
        count: u32,
    }

    /// The same control after two fields were appended, both with a default.
    #[derive(Debug, Serialize, Deserialize, PartialEq)]
    struct New {
        name: String,
        count: u32,
        #[serde(default)]
        limit: Option<u64>,
        #[serde(default)]
        flags: Vec<u8>,
    }

    /// The same control had the appended field no default (it is required).
    #[derive(Debug, Serialize, Deserialize, PartialEq)]
    struct Required {
        name: String,
        count: u32,
        limit: Option<u64>,
    }

    /// A control nesting a struct that grew a defaulted field.
    #[derive(Debug, Serialize, Deserialize, PartialEq)]
    struct Outer {
        inner: New,
        tail: u8,
    }

    fn old() -> Old {
        Old {
            name: "a".into(),
            count: 7,
        }
    }

    #[test]
    fn an_older_peers_control_gets_the_appended_fields_defaults() {
        let got: New = decode_control(&encode_control(&old()), "test").unwrap();
        assert_eq!(
            got,
            New {
                name: "a".into(),
                count: 7,
                limit: None,
                flags: Vec::new(),
            }
        );
        // Some appended fields sent, the rest defaulted.
        let mut bytes = encode_control(&old());
        bytes.extend_from_slice(&encode_control(&Some(9u64)));
        let got: New = decode_control(&bytes, "test").unwrap();
        assert_eq!(got.limit, Some(9));
        assert!(got.flags.is_empty());
    }

    #[test]
    fn a_newer_peers_appended_fields_are_ignored() {
        let new = New {
            name: "a".into(),
            count: 7,
            limit: Some(3),
            flags: vec![1, 2],
        };
        let got: Old = decode_control(&encode_control(&new), "test").unwrap();
        assert_eq!(got, old());
    }

    #[test]
    fn a_missing_required_field_is_an_error_naming_the_struct() {
        let err = decode_control::<Required>(&encode_control(&old()), "test").unwrap_err();
        assert!(err.to_string().contains("Required"), "{err}");
    }

    #[test]
    fn a_value_cut_anywhere_but_before_a_defaulted_field_is_an_error() {
        let sent = Old {
            name: "abcdef".into(),
            count: 300,
        };
        let limit = Some(u64::MAX);
        let mut full = encode_control(&sent);
        let after_count = full.len();
        full.extend_from_slice(&encode_control(&limit));
        let after_limit = full.len();
        full.extend_from_slice(&encode_control(&vec![1u8, 2, 3]));
        for n in 0..full.len() {
            let r = decode_control::<New>(&full[..n], "test");
            if n == after_count || n == after_limit {
                let got = r.unwrap();
                assert_eq!((got.name.as_str(), got.count), ("abcdef", 300));
                assert_eq!(got.limit, if n == after_limit { limit } else { None });
            } else {
                assert!(r.is_err(), "{n}-byte prefix decoded: {r:?}");
            }
        }
    }

    #[test]
    fn a_nested_struct_never_defaults_its_fields() {
        let mut bytes = encode_control(&old());
        bytes.push(5);
        // `inner` ends early only if it may take the `tail` byte as its `limit`: it must not
        // end at all, so this reads 5 as `limit`'s tag and fails.
        assert!(decode_control::<Outer>(&bytes, "test").is_err());
        assert!(decode_control::<Outer>(&encode_control(&old()), "test").is_err());
    }
}
