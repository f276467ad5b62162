//! Value types for config fields whose Deserialize refuses bad values with a message that names
//! the value (`expected a positive integer, got -3`), so the error carries the YAML position.

use std::fmt;

use serde::de::{self, Deserializer, Visitor};
use serde::{Deserialize, Serialize};

macro_rules! integer_type {
    ($name:ident, $min:expr, $what:literal) => {
        #[doc = concat!("An integer config value: ", $what, ".")]
        #[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
        #[serde(transparent)]
        pub struct $name(pub u64);

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                struct V;
                impl Visitor<'_> for V {
                    type Value = $name;
                    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                        f.write_str($what)
                    }
                    fn visit_i64<E: de::Error>(self, v: i64) -> Result<$name, E> {
                        if v < $min {
                            Err(E::custom(format!(
                                concat!("expected ", $what, ", got {}"),
                                v
                            )))
                        } else {
                            Ok($name(v as u64))
                        }
                    }
                    fn visit_u64<E: de::Error>(self, v: u64) -> Result<$name, E> {
                        if (v as i128) < $min as i128 {
                            Err(E::custom(format!(
                                concat!("expected ", $what, ", got {}"),
                                v
                            )))
                        } else {
                            Ok($name(v))
                        }
                    }
                    fn visit_f64<E: de::Error>(self, v: f64) -> Result<$name, E> {
                        Err(E::custom(format!(
                            concat!("expected ", $what, ", got {}"),
                            v
                        )))
                    }
                    fn visit_str<E: de::Error>(self, v: &str) -> Result<$name, E> {
                        Err(E::custom(format!(
                            concat!("expected ", $what, ", got {:?}"),
                            v
                        )))
                    }
                    fn visit_bool<E: de::Error>(self, v: bool) -> Result<$name, E> {
                        Err(E::custom(format!(
                            concat!("expected ", $what, ", got {}"),
                            v
                        )))
                    }
                    fn visit_unit<E: de::Error>(self) -> Result<$name, E> {
                        Err(E::custom(concat!("expected ", $what, ", got nothing")))
                    }
                }
                d.deserialize_any(V)
            }
        }
    };
}

integer_type!(PositiveInt, 1, "a positive integer");
integer_type!(NonNegativeInt, 0, "an integer >= 0");

/// A number strictly between 0 and 1 (confidence levels, fractions).
#[derive(Debug, Clone, Copy, PartialEq, PartialOrd, Serialize)]
#[serde(transparent)]
pub struct Fraction(pub f64);

impl<'de> Deserialize<'de> for Fraction {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let value = f64::deserialize(d)
            .map_err(|_| de::Error::custom("expected a number between 0 and 1"))?;
        if value > 0.0 && value < 1.0 {
            Ok(Fraction(value))
        } else {
            Err(de::Error::custom(format!(
                "expected a number between 0 and 1 (exclusive), got {value}"
            )))
        }
    }
}

/// A finite number >= 0 (weights, learning rates, budgets).
#[derive(Debug, Clone, Copy, PartialEq, PartialOrd, Serialize)]
#[serde(transparent)]
pub struct NonNegative(pub f64);

impl<'de> Deserialize<'de> for NonNegative {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let value = f64::deserialize(d).map_err(|_| de::Error::custom("expected a number >= 0"))?;
        if value.is_finite() && value >= 0.0 {
            Ok(NonNegative(value))
        } else {
            Err(de::Error::custom(format!(
                "expected a number >= 0, got {value}"
            )))
        }
    }
}
