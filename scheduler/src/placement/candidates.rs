//! The candidate node names kube-scheduler sends with every filter.

/// The candidate node names, read into one buffer: thousands of names arrive with every filter,
/// and one allocation each was a measurable part of a filter's time.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NodeNames {
    buf: String,
    ends: Vec<usize>,
}

impl NodeNames {
    pub fn len(&self) -> usize {
        self.ends.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ends.is_empty()
    }

    pub fn get(&self, i: usize) -> &str {
        let start = if i == 0 { 0 } else { self.ends[i - 1] };
        &self.buf[start..self.ends[i]]
    }

    pub fn iter(&self) -> impl ExactSizeIterator<Item = &str> + '_ {
        (0..self.len()).map(|i| self.get(i))
    }

    pub fn push(&mut self, name: &str) {
        self.buf.push_str(name);
        self.ends.push(self.buf.len());
    }
}

impl<S: AsRef<str>> FromIterator<S> for NodeNames {
    fn from_iter<I: IntoIterator<Item = S>>(iter: I) -> Self {
        let mut n = NodeNames::default();
        for s in iter {
            n.push(s.as_ref());
        }
        n
    }
}

impl<'de> serde::Deserialize<'de> for NodeNames {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Names;
        /// Appends one string element to the buffer without allocating it on its own.
        struct Append<'b>(&'b mut NodeNames);

        impl<'de> serde::de::DeserializeSeed<'de> for Append<'_> {
            type Value = ();
            fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
                d.deserialize_str(self)
            }
        }

        impl serde::de::Visitor<'_> for Append<'_> {
            type Value = ();
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a node name")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<(), E> {
                self.0.push(v);
                Ok(())
            }
        }

        impl<'de> serde::de::Visitor<'de> for Names {
            type Value = NodeNames;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a list of node names")
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> Result<NodeNames, A::Error> {
                let mut n = NodeNames::default();
                if let Some(len) = seq.size_hint() {
                    n.ends.reserve(len);
                }
                while seq.next_element_seed(Append(&mut n))?.is_some() {}
                Ok(n)
            }
        }

        d.deserialize_seq(Names)
    }
}
